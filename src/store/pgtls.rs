//! TLS to PostgreSQL as libpq's `sslmode` and `sslrootcert` describe it, so a URL that works
//! with psql works here. tokio-postgres itself knows only `disable`, `prefer` and `require` and
//! no root certificate, so these two parameters are taken out of the URL and carried out with
//! rustls:
//!
//! | sslmode | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (default) | when the server offers it | chain, only with `sslrootcert` |
//! | `require` | always | chain, only with `sslrootcert` |
//! | `verify-ca` | always | chain (`sslrootcert`, else the system's roots) |
//! | `verify-full` | always | chain and host name |

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

/// The TLS half of a `--database-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub verify: Verify,
    /// `sslrootcert`: the CA certificates (PEM) the server's chain must lead to.
    pub root: Option<PathBuf>,
}

impl TlsSettings {
    /// Words for the start-up line.
    pub fn describe(&self) -> &'static str {
        match (self.mode, self.verify) {
            (SslMode::Disable, _) => "no TLS",
            (_, Verify::ChainAndName) => "TLS, certificate and host name verified",
            (_, Verify::Chain) => "TLS, certificate chain verified",
            (SslMode::Require, Verify::Nothing) => "TLS, certificate not verified",
            _ => "TLS when the server offers it, certificate not verified",
        }
    }
}

const MODES: &str = "disable, allow, prefer, require, verify-ca or verify-full";

/// Take `sslmode` and `sslrootcert` out of a URL (`postgres://…?sslmode=verify-full`) or a
/// key=value string (`host=… sslmode=require`). Errors never repeat the URL: it may hold a
/// password.
pub fn split(url: &str) -> Result<(String, TlsSettings), String> {
    let mut mode = None;
    let mut root = None;
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = form_urlencoded::Serializer::new(String::new());
                let mut any = false;
                for (k, v) in form_urlencoded::parse(query.as_bytes()) {
                    match k.as_ref() {
                        "sslmode" => mode = Some(v.into_owned()),
                        "sslrootcert" => root = Some(PathBuf::from(v.as_ref())),
                        _ => {
                            kept.append_pair(&k, &v);
                            any = true;
                        }
                    }
                }
                if any {
                    format!("{base}?{}", kept.finish())
                } else {
                    base.to_string()
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            if let Some(v) = word.strip_prefix("sslmode=") {
                mode = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("sslrootcert=") {
                root = Some(PathBuf::from(v));
            } else {
                kept.push(word);
            }
        }
        kept.join(" ")
    };
    let (mode, verify) = match mode.as_deref().unwrap_or("prefer") {
        "disable" => (SslMode::Disable, Verify::Nothing),
        "allow" | "prefer" => (SslMode::Prefer, Verify::Nothing),
        "require" => (SslMode::Require, Verify::Nothing),
        "verify-ca" => (SslMode::Require, Verify::Chain),
        "verify-full" => (SslMode::Require, Verify::ChainAndName),
        other => {
            return Err(format!(
                "--database-url: sslmode {:?} is not one of {MODES}",
                crate::safefs::escape(other)
            ))
        }
    };
    // As libpq: a root certificate given turns `prefer` and `require` into a chain check.
    let verify = match verify {
        Verify::Nothing if root.is_some() && mode != SslMode::Disable => Verify::Chain,
        v => v,
    };
    Ok((rest, TlsSettings { mode, verify, root }))
}

fn roots(settings: &TlsSettings) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    match &settings.root {
        Some(path) => {
            let shown = path.display();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    format!(
                        "--database-url: sslrootcert {shown}: cannot read PEM certificates ({e})"
                    )
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "--database-url: sslrootcert {shown} holds no usable CA certificate"
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err("--database-url: no CA certificates on this system to verify the server with; give one with sslrootcert=/path/to/ca.pem".into());
            }
        }
    }
    Ok(store)
}

/// The connector for these settings.
pub fn connector(
    settings: &TlsSettings,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match settings.verify {
        Verify::Nothing => Arc::new(EncryptOnly(provider.clone())),
        verify => {
            let webpki = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(settings)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("--database-url: cannot verify certificates: {e}"))?;
            if verify == Verify::ChainAndName {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("--database-url: TLS setup failed: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `require` and `prefer` without a root certificate: encrypted, whoever answers (libpq's
/// meaning). The handshake's signatures are still checked against the certificate presented.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_taken_out_and_mapped() {
        let cases: &[(&str, &str, SslMode, Verify, bool)] = &[
            (
                "postgres://u:p@h/db",
                "postgres://u:p@h/db",
                SslMode::Prefer,
                Verify::Nothing,
                false,
            ),
            (
                "postgres://u@h/db?sslmode=disable",
                "postgres://u@h/db",
                SslMode::Disable,
                Verify::Nothing,
                false,
            ),
            (
                "postgres://u@h/db?sslmode=require&connect_timeout=5",
                "postgres://u@h/db?connect_timeout=5",
                SslMode::Require,
                Verify::Nothing,
                false,
            ),
            (
                "postgres://u@h/db?sslmode=require&sslrootcert=%2Fetc%2Fca.pem",
                "postgres://u@h/db",
                SslMode::Require,
                Verify::Chain,
                true,
            ),
            (
                "postgres://u@h/db?sslmode=verify-ca",
                "postgres://u@h/db",
                SslMode::Require,
                Verify::Chain,
                false,
            ),
            (
                "postgresql://u@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem",
                "postgresql://u@h/db",
                SslMode::Require,
                Verify::ChainAndName,
                true,
            ),
            (
                "host=h user=u sslmode=verify-full",
                "host=h user=u",
                SslMode::Require,
                Verify::ChainAndName,
                false,
            ),
            (
                "postgres://u@h/db?sslmode=allow",
                "postgres://u@h/db",
                SslMode::Prefer,
                Verify::Nothing,
                false,
            ),
        ];
        for (url, rest, mode, verify, rooted) in cases {
            let (r, s) = split(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(&r, rest, "{url}");
            assert_eq!(
                (s.mode, s.verify, s.root.is_some()),
                (*mode, *verify, *rooted),
                "{url}"
            );
            assert!(r.parse::<tokio_postgres::Config>().is_ok(), "{r} parses");
        }
        let e = split("postgres://u:secret@h/db?sslmode=paranoid").expect_err("bad mode");
        assert!(e.contains("verify-full") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn a_missing_root_certificate_is_named() {
        let (_, s) = split("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .expect("split");
        let e = connector(&s).err().expect("no such file");
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
    }
}
