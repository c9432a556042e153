//! TLS to PostgreSQL against a real server that accepts only TLS over TCP: each `sslmode`
//! does what libpq's does, a wrong certificate or host name is refused with the reason, and
//! no error repeats the URL's password.

mod common;

use common::postgres::{Certs, Postgres};
use depwatch::domain::ServiceKey;
use depwatch::store::Store;

/// Connect and write and read one record.
async fn round_trip(url: String) -> Result<String, String> {
    {
        let store = Store::connect(&url).await.map_err(|e| e.to_string())?;
        let key = ServiceKey::new("web", "prod").expect("key");
        store
            .change_service(
                &key,
                depwatch::store::ServiceChange::default().message("over TLS"),
            )
            .await
            .map_err(|e| e.to_string())?;
        let back = store.service(&key).await.map_err(|e| e.to_string())?;
        assert_eq!(back.map(|r| r.message).as_deref(), Some("over TLS"));
        Ok(store.describe())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_does_what_libpq_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::make(&dir.path().join("certs"));
    let pg = Postgres::start_tls(&certs).await;
    pg.database("tls").await;
    let port = pg.port;
    let ca = certs.ca.display().to_string();
    let other = certs.other_ca.display().to_string();
    // trust authentication ignores the password; it is there to prove it is never shown.
    let url = |host: &str, query: &str| {
        format!("postgres://depwatch:s3cret-pw@{host}:{port}/tls?{query}")
    };

    let works: &[(String, &str)] = &[
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "postgresql (TLS, certificate and host name verified)",
        ),
        // The certificate names localhost only: verify-ca checks the chain, not the name.
        (
            url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")),
            "postgresql (TLS, certificate chain verified)",
        ),
        (
            url("127.0.0.1", "sslmode=require"),
            "postgresql (TLS, certificate not verified)",
        ),
        // The default (prefer) uses TLS when offered: this server takes nothing else.
        (
            url("127.0.0.1", "connect_timeout=10"),
            "postgresql (TLS when the server offers it, certificate not verified)",
        ),
        // As libpq, a root certificate makes require check the chain.
        (
            url("127.0.0.1", &format!("sslmode=require&sslrootcert={ca}")),
            "postgresql (TLS, certificate chain verified)",
        ),
    ];
    for (u, want) in works {
        let got = round_trip(u.clone())
            .await
            .unwrap_or_else(|e| panic!("{u}: {e}"));
        assert_eq!(&got, want, "{u}");
    }

    let refused: &[(String, &str)] = &[
        (
            url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "certificate not valid for name",
        ),
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
            "UnknownIssuer",
        ),
        (
            url("127.0.0.1", &format!("sslmode=require&sslrootcert={other}")),
            "UnknownIssuer",
        ),
        (url("127.0.0.1", "sslmode=disable"), "no encryption"),
        (
            url(
                "127.0.0.1",
                "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            ),
            "sslrootcert /nonexistent/ca.pem",
        ),
        (url("127.0.0.1", "sslmode=paranoid"), "verify-full"),
    ];
    for (u, why) in refused {
        let e = round_trip(u.clone()).await.expect_err(u);
        assert!(e.contains(why), "{u}: {e}");
        assert!(!e.contains("s3cret-pw"), "the password is never shown: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_refused_when_tls_is_required() {
    let pg = Postgres::start().await;
    let url = pg.database("plain").await;
    assert_eq!(
        round_trip(format!("{url}?sslmode=prefer")).await.as_deref(),
        Ok("postgresql (TLS when the server offers it, certificate not verified)"),
        "prefer falls back to plain"
    );
    let e = round_trip(format!("{url}?sslmode=require"))
        .await
        .expect_err("no TLS on offer");
    assert!(e.to_lowercase().contains("tls") || e.contains("SSL"), "{e}");
}
