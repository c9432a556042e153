//! A loopback stand-in for ECR's GetAuthorizationToken (the JSON 1.1 protocol the AWS SDK
//! speaks, reached through `AWS_ENDPOINT_URL_ECR`), and the AWS environment that reaches only
//! it: dummy keys, a region, no instance metadata, empty config files.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

use super::registry::Registry;

const TARGET: &str = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken";

/// Hands out tokens (base64 of `user:password`) for one registry, each expiring `lifetime`
/// seconds after it is handed out (below zero: already expired); answers 500 while `failing`.
/// Counts the tokens it hands out, and keeps when each went.
pub struct Endpoint {
    pub url: String,
    pub calls: Arc<AtomicUsize>,
    pub failing: Arc<AtomicBool>,
    pub lifetime: Arc<AtomicI64>,
    /// When each token was handed out, with the lifetime it was given.
    pub handed: Arc<Mutex<Vec<(Instant, i64)>>>,
}

type Reply = (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    String,
);

fn reply(status: u16, body: serde_json::Value) -> Reply {
    let status = axum::http::StatusCode::from_u16(status).expect("status");
    (
        status,
        [("content-type", "application/x-amz-json-1.1")],
        body.to_string(),
    )
}

impl Endpoint {
    /// Tokens for `registry`'s realm.
    pub async fn for_registry(registry: &Registry, lifetime: Duration, failing: bool) -> Endpoint {
        let (user, password) = registry.credentials();
        Endpoint::start(&registry.url(""), &user, &password, lifetime, failing).await
    }

    /// Tokens for the registry at `proxy_endpoint` (`http://127.0.0.1:PORT`).
    pub async fn start(
        proxy_endpoint: &str,
        user: &str,
        password: &str,
        lifetime: Duration,
        failing: bool,
    ) -> Endpoint {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let proxy = proxy_endpoint.to_string();
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(failing));
        let lifetime = Arc::new(AtomicI64::new(lifetime.as_secs() as i64));
        let handed = Arc::new(Mutex::new(Vec::new()));
        let (counted, fails) = (calls.clone(), failing.clone());
        let (lives, log) = (lifetime.clone(), handed.clone());
        let answer = move |headers: axum::http::HeaderMap| {
            let (token, proxy) = (token.clone(), proxy.clone());
            let (counted, fails) = (counted.clone(), fails.clone());
            let (lives, log) = (lives.clone(), log.clone());
            async move {
                let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok());
                if target != Some(TARGET) {
                    let why = format!("not {TARGET}: {target:?}");
                    return reply(
                        400,
                        json!({"__type": "UnknownOperationException", "message": why}),
                    );
                }
                if fails.load(Ordering::SeqCst) {
                    let why = "the test endpoint fails";
                    return reply(500, json!({"__type": "ServerException", "message": why}));
                }
                let lifetime = lives.load(Ordering::SeqCst);
                log.lock().expect("lock").push((Instant::now(), lifetime));
                counted.fetch_add(1, Ordering::SeqCst);
                let expires = jiff::Timestamp::now().as_second() + lifetime;
                reply(
                    200,
                    json!({"authorizationData": [{
                    "authorizationToken": token, "expiresAt": expires, "proxyEndpoint": proxy}]}),
                )
            }
        };
        let app = axum::Router::new().route("/", axum::routing::post(answer));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Endpoint {
            url: format!("http://{addr}"),
            calls,
            failing,
            lifetime,
            handed,
        }
    }

    /// The daemon's AWS environment: this endpoint for ECR, dummy keys, a region, nothing
    /// else (no instance metadata; empty config files in `dir`).
    /// When each token with this lifetime was handed out, oldest first.
    pub fn handed_with(&self, lifetime: i64) -> Vec<Instant> {
        let handed = self.handed.lock().expect("lock");
        handed
            .iter()
            .filter(|(_, l)| *l == lifetime)
            .map(|(at, _)| *at)
            .collect()
    }

    pub fn aws_env(&self, dir: &Path) -> Vec<(&'static str, String)> {
        let empty = dir.join("aws-config-empty");
        std::fs::write(&empty, "").expect("empty AWS config");
        let empty = empty.display().to_string();
        vec![
            ("AWS_ENDPOINT_URL_ECR", self.url.clone()),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "dummy-secret".to_string()),
            ("AWS_REGION", "eu-west-1".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
            ("AWS_CONFIG_FILE", empty.clone()),
            ("AWS_SHARED_CREDENTIALS_FILE", empty),
        ]
    }
}
