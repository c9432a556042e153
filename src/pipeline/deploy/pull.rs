//! The registry credentials the kubelet would pull a workload's images with: the pod
//! template's `imagePullSecrets`, then its ServiceAccount's, read from the cluster (GET only,
//! cached for half a minute, so a burst reads each Secret once). A Secret that cannot be read
//! is skipped: the pre-flight then asks anonymously, and the registry's answer says why.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{Api, Client};
use tokio::time::Instant;

use super::workload::Pull;
use crate::registry::reference::parse_docker_config;
use crate::registry::Credentials;

const KEEP: Duration = Duration::from_secs(30);

type Creds = Arc<HashMap<String, Credentials>>;
/// What was read, when.
type Kept<T> = Arc<DashMap<(String, String), (Instant, T)>>;

#[derive(Clone)]
pub struct PullSecrets {
    client: Client,
    /// `(namespace, secret)` → its credentials by registry host.
    secrets: Kept<Creds>,
    /// `(namespace, service account)` → its pull secrets' names.
    accounts: Kept<Arc<Vec<String>>>,
}

impl PullSecrets {
    pub fn new(client: Client) -> Self {
        PullSecrets {
            client,
            secrets: Arc::default(),
            accounts: Arc::default(),
        }
    }

    /// Credentials by registry host, the template's own secrets first.
    pub async fn for_pods(&self, namespace: &str, pull: &Pull) -> HashMap<String, Credentials> {
        let mut names = pull.secrets.clone();
        names.extend(
            self.account(namespace, &pull.service_account)
                .await
                .iter()
                .cloned(),
        );
        let mut out = HashMap::new();
        for name in names {
            for (host, creds) in self.secret(namespace, &name).await.iter() {
                out.entry(host.clone()).or_insert_with(|| creds.clone());
            }
        }
        out
    }

    async fn account(&self, namespace: &str, name: &str) -> Arc<Vec<String>> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(hit) = self.accounts.get(&key).filter(|e| e.0.elapsed() < KEEP) {
            return hit.1.clone();
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let names: Vec<String> = match api.get_opt(name).await {
            Ok(sa) => sa
                .and_then(|sa| sa.image_pull_secrets)
                .into_iter()
                .flatten()
                .map(|r| r.name)
                .filter(|n| !n.is_empty())
                .collect(),
            Err(e) => {
                tracing::debug!(namespace, account = name, error = %e, "cannot read the ServiceAccount's pull secrets");
                Vec::new()
            }
        };
        let names = Arc::new(names);
        self.accounts.insert(key, (Instant::now(), names.clone()));
        names
    }

    async fn secret(&self, namespace: &str, name: &str) -> Creds {
        let key = (namespace.to_string(), name.to_string());
        if let Some(hit) = self.secrets.get(&key).filter(|e| e.0.elapsed() < KEEP) {
            return hit.1.clone();
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let creds = match api.get_opt(name).await {
            Ok(Some(secret)) => credentials_of(&secret).unwrap_or_else(|why| {
                tracing::warn!(namespace, secret = name, %why, "a pull secret that is not a docker config is skipped");
                HashMap::new()
            }),
            Ok(None) => HashMap::new(),
            Err(e) => {
                tracing::debug!(namespace, secret = name, error = %e, "cannot read a pull secret");
                HashMap::new()
            }
        };
        let creds = Arc::new(creds);
        self.secrets.insert(key, (Instant::now(), creds.clone()));
        creds
    }
}

/// The credentials a `kubernetes.io/dockerconfigjson` (or older `dockercfg`) Secret holds.
pub fn credentials_of(secret: &Secret) -> Result<HashMap<String, Credentials>, String> {
    let data = secret.data.as_ref().ok_or("no data")?;
    let bytes = data
        .get(".dockerconfigjson")
        .or_else(|| data.get(".dockercfg"))
        .ok_or("no .dockerconfigjson")?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| "not UTF-8".to_string())?;
    parse_docker_config(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_secret_yields_its_registries() {
        let config = r#"{"auths":{"127.0.0.1:5000":{"username":"ci","password":"s3cret"}}}"#;
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, config)}
        }))
        .expect("secret");
        let creds = credentials_of(&secret).expect("parses");
        assert_eq!(creds["127.0.0.1:5000"].username, "ci");
        let opaque: Secret =
            serde_json::from_value(serde_json::json!({"data": {"token": "eA=="}})).expect("secret");
        assert!(credentials_of(&opaque).is_err());
    }
}
