//! The kubelet's image pulls, for real (`depwatch sim --registries`): a pod whose image names a
//! registry on loopback is pulled by a real manifest HEAD, with the pod's own pull secrets, as a
//! kubelet would resolve it. A registry's 404 becomes `ErrImagePull` then `ImagePullBackOff`
//! with the registry's answer; refused credentials the same with "unauthorized". Images of
//! other registries follow the image rules, as without the flag.
//!
//! The controller is synchronous: it asks [`Puller::pull`], which answers from what is known and
//! starts the HEAD in the background the first time; the pod stays `ContainerCreating` until
//! the answer is in.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use serde_json::Value;

use super::store::{ObjKey, Store};
use crate::registry::reference::parse_docker_config;
use crate::registry::{Answer, Credentials, ImageRef, Registries};

/// What the kubelet knows of one image pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pull {
    /// Asked; no answer yet.
    Pending,
    Pulled,
    /// Failed, with what the registry said.
    Failed(String),
}

/// Real pulls from loopback registries. Cheap to clone.
#[derive(Clone)]
pub struct Puller {
    store: Arc<Store>,
    runtime: tokio::runtime::Handle,
    registries: Registries,
    /// By `(namespace, pull secrets, image)`: a pod with other secrets may be answered otherwise.
    /// A failure is kept for [`RETRY_PULL`], then the image is pulled again (as a kubelet's
    /// back-off does: an image pushed meanwhile is found).
    known: Arc<DashMap<PullKey, (Pull, std::time::Instant)>>,
}

/// `(namespace, the pod's pull secrets, image)`.
type PullKey = (String, String, String);

/// How long a failed pull stands before the kubelet tries again.
const RETRY_PULL: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether an image's registry is on loopback (the only registries the sim reaches).
pub fn on_loopback(image: &ImageRef) -> bool {
    let host = image
        .registry
        .rsplit_once(':')
        .map_or(image.registry.as_str(), |(h, _)| h);
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// The pod's `imagePullSecrets` names.
fn secret_names(pod: &Value) -> Vec<String> {
    pod["spec"]["imagePullSecrets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(String::from))
        .collect()
}

/// The kubelet's words for a failed pull.
fn failure(image: &str, answer: &Answer) -> Option<String> {
    let why = match answer {
        Answer::Found { .. } => return None,
        Answer::Missing { .. } => "not found".to_string(),
        Answer::NeedsCredentials(_) => "unauthorized: authentication required".to_string(),
        Answer::Denied(why) if why.starts_with("unauthorized") => why.clone(),
        Answer::Denied(why) => format!("unauthorized: {why}"),
        Answer::Unavailable { why, .. } | Answer::Unchecked(why) => why.clone(),
    };
    Some(format!(
        "failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": {why}"
    ))
}

impl Puller {
    pub fn new(store: Arc<Store>, runtime: tokio::runtime::Handle) -> Self {
        Puller {
            store,
            runtime,
            registries: Registries::new(),
            known: Arc::default(),
        }
    }

    /// The pull of `image` for `pod`: `None` when the image is not on a loopback registry
    /// (the image rules decide).
    pub fn pull(&self, pod: &Value, image: &str) -> Option<Pull> {
        let parsed = ImageRef::parse(image).ok().filter(on_loopback)?;
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        let secrets = secret_names(pod);
        let key = (namespace.to_string(), secrets.join(","), image.to_string());
        let stale = |(pull, at): &(Pull, std::time::Instant)| {
            matches!(pull, Pull::Failed(_)) && at.elapsed() >= RETRY_PULL
        };
        if let Some(known) = self.known.get(&key).filter(|k| !stale(k)) {
            return Some(known.0.clone());
        }
        // While the pull is under way, a failure stands (a first pull is pending).
        let standing = match self.known.get(&key).map(|k| k.0.clone()) {
            Some(failed @ Pull::Failed(_)) => failed,
            _ => Pull::Pending,
        };
        self.known
            .insert(key.clone(), (standing.clone(), std::time::Instant::now()));
        let this = self.clone();
        let creds = self.credentials(namespace, &secrets, &parsed);
        let image = image.to_string();
        self.runtime.spawn(async move {
            let answer = this.registries.check(&parsed, creds.as_ref()).await;
            let pull = failure(&image, &answer).map_or(Pull::Pulled, Pull::Failed);
            this.known.insert(key, (pull, std::time::Instant::now()));
        });
        Some(standing)
    }

    /// The credentials the pod's pull secrets hold for the image's registry.
    fn credentials(
        &self,
        namespace: &str,
        secrets: &[String],
        image: &ImageRef,
    ) -> Option<Credentials> {
        let mut all: HashMap<String, Credentials> = HashMap::new();
        for name in secrets {
            let key = ObjKey::new(super::resources::secrets(), namespace, name);
            let Some(secret) = self.store.get(&key) else {
                continue;
            };
            let encoded = secret["data"][".dockerconfigjson"]
                .as_str()
                .unwrap_or_default();
            let Ok(bytes) =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded)
            else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes);
            for (host, c) in parse_docker_config(&text).unwrap_or_default() {
                all.entry(host).or_insert(c);
            }
        }
        all.remove(&image.registry.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_are_pulled_and_failures_read_as_the_kubelet_says() {
        let local = ImageRef::parse("127.0.0.1:5000/team/web:1.0").expect("image");
        let remote = ImageRef::parse("registry.example.com/team/web:1.0").expect("image");
        assert!(on_loopback(&local) && !on_loopback(&remote));
        let m = failure(
            "127.0.0.1:5000/team/web:1.0",
            &Answer::Missing { closest: vec![] },
        )
        .expect("failed");
        assert!(m.ends_with(": not found"), "{m}");
        let d = failure(
            "x",
            &Answer::Denied("127.0.0.1:5000 refused the credentials".into()),
        )
        .expect("failed");
        assert!(d.contains("unauthorized: 127.0.0.1:5000 refused"), "{d}");
        assert_eq!(failure("x", &Answer::Found { digest: None }), None);
    }
}
