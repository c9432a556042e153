//! The throwaway registry the registry tests use is a real one: pushed tags answer HEAD with
//! their digests and are listed, missing tags are 404, and with a realm only basic auth gets
//! in. Each test starts its own registry.

mod common;

use base64::Engine as _;
use common::registry::{Registry, OCI_MANIFEST};
use reqwest::{Client, Response, StatusCode};

/// HEAD a manifest with the OCI Accept header, with `auth` as the Authorization header.
async fn head(registry: &Registry, repo: &str, reference: &str, auth: Option<&str>) -> Response {
    let url = registry.url(&format!("/v2/{repo}/manifests/{reference}"));
    let mut req = Client::new().head(url).header("Accept", OCI_MANIFEST);
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    req.send().await.expect("HEAD manifest")
}

fn digest_of(resp: &Response) -> &str {
    resp.headers()["Docker-Content-Digest"]
        .to_str()
        .expect("digest")
}

fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[tokio::test]
async fn pushed_tags_answer_head_with_their_digests() {
    let registry = Registry::start(false).await;
    let v1 = registry.push("depwatch/web", "v1").await;
    let v2 = registry.push("depwatch/web", "v2").await;
    assert!(v1.starts_with("sha256:") && v1.len() == 7 + 64, "{v1}");
    assert_ne!(v1, v2, "each tag's image is its own");
    for (tag, digest) in [("v1", &v1), ("v2", &v2)] {
        let resp = head(&registry, "depwatch/web", tag, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{tag}: {resp:?}");
        assert_eq!(digest_of(&resp), digest, "{tag}");
        assert_eq!(resp.headers()["Content-Type"], OCI_MANIFEST, "{tag}");
        let by_digest = head(&registry, "depwatch/web", digest, None).await;
        assert_eq!(by_digest.status(), StatusCode::OK, "{tag} by digest");
    }
}

#[tokio::test]
async fn missing_tags_and_repositories_are_404() {
    let registry = Registry::start(false).await;
    registry.push("depwatch/web", "v1").await;
    let missing_tag = head(&registry, "depwatch/web", "v9", None).await;
    assert_eq!(missing_tag.status(), StatusCode::NOT_FOUND);
    let missing_repo = head(&registry, "depwatch/none", "v1", None).await;
    assert_eq!(missing_repo.status(), StatusCode::NOT_FOUND);
}

/// The distribution server serves an OCI manifest only to a client that names the OCI media
/// type in Accept: to any other (none, `*/*`, Docker's v2 only), by tag or by digest, it
/// answers 404 MANIFEST_UNKNOWN, as if the manifest were missing.
#[tokio::test]
async fn an_oci_manifest_is_404_without_the_oci_accept_header() {
    let registry = Registry::start(false).await;
    let digest = registry.push("depwatch/web", "v1").await;
    let docker_v2 = "application/vnd.docker.distribution.manifest.v2+json";
    for reference in ["v1", digest.as_str()] {
        let url = registry.url(&format!("/v2/depwatch/web/manifests/{reference}"));
        for accept in [None, Some("*/*"), Some(docker_v2)] {
            let mut req = Client::new().get(&url);
            if let Some(accept) = accept {
                req = req.header("Accept", accept);
            }
            let resp = req.send().await.expect("GET manifest");
            assert_eq!(
                resp.status(),
                StatusCode::NOT_FOUND,
                "{reference} {accept:?}"
            );
            let body = resp.text().await.expect("body");
            assert!(
                body.contains("MANIFEST_UNKNOWN"),
                "{reference} {accept:?}: {body}"
            );
        }
    }
}

#[tokio::test]
async fn tags_list_names_every_pushed_tag() {
    let registry = Registry::start(false).await;
    registry.push("depwatch/web", "v1").await;
    registry.push("depwatch/web", "v2").await;
    let list: serde_json::Value = Client::new()
        .get(registry.url("/v2/depwatch/web/tags/list"))
        .send()
        .await
        .expect("tags list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["name"], "depwatch/web");
    let mut tags: Vec<&str> = list["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| t.as_str().expect("tag"))
        .collect();
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);
}

#[tokio::test]
async fn with_a_realm_only_basic_auth_gets_in() {
    let registry = Registry::start(true).await;
    let digest = registry.push("depwatch/web", "v1").await;
    let anonymous = head(&registry, "depwatch/web", "v1", None).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let challenge = anonymous.headers()["WWW-Authenticate"]
        .to_str()
        .expect("challenge");
    assert_eq!(challenge, "Basic realm=\"depwatch-test\"");
    let wrong = head(&registry, "depwatch/web", "v1", Some(&basic("ci", "nope"))).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let (user, password) = registry.credentials();
    let authed = head(
        &registry,
        "depwatch/web",
        "v1",
        Some(&basic(&user, &password)),
    )
    .await;
    assert_eq!(authed.status(), StatusCode::OK);
    assert_eq!(digest_of(&authed), digest);
}

#[tokio::test]
async fn the_docker_config_json_gets_in() {
    let registry = Registry::start(true).await;
    let digest = registry.push("depwatch/web", "v1").await;
    let config: serde_json::Value =
        serde_json::from_str(&registry.docker_config_json()).expect("json");
    let entry = &config["auths"][registry.addr()];
    let auth = entry["auth"].as_str().expect("auth");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .expect("base64");
    assert_eq!(decoded, b"ci:s3cret");
    let resp = head(
        &registry,
        "depwatch/web",
        "v1",
        Some(&format!("Basic {auth}")),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(digest_of(&resp), digest);
}
