//! The doing half of ECR pull secrets, two tasks the daemon owns and ends at shutdown:
//! - [`refresh_tokens`] asks ECR for a token at start, then at half of each token's remaining
//!   lifetime. A failed fetch, or a token that is stale on arrival (expired, or about to), backs
//!   off (1 s, doubling to five minutes; see [`super::after_fetch`]), is counted
//!   (`depwatch_ecr_refresh_failures_total{step="token",reason}`), logged with its next try and
//!   shown by `/readyz`; the current token keeps serving meanwhile, and a stale one is never
//!   written to a Secret.
//! - [`keep_secrets`] watches the Secrets of the name (cluster-wide, or in each exact
//!   `--namespaces`), and after every change of token, of the namespaces deployed to, or of a
//!   Secret (a deletion), writes what [`super::decide`] says: create, or patch depwatch's own.
//!   A Secret someone else made is never overwritten. Writes pass the leader's fence.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::aws::TokenSource;
use super::{
    decide, desired, hosts_served, namespaces_wanted, retry_in, secret_json, usable, Desired,
    EcrPullSecrets, Health, Next, Token, View, Write, MANAGED_BY, MANAGER,
};
use crate::domain::human_duration;
use crate::metrics::Metrics;

/// Watch events of the Secrets of the name, each with its scope (`None`: cluster-wide).
type ScopedEvents = BoxStream<'static, (Option<String>, Result<Event<Secret>, watcher::Error>)>;

/// The field manager of depwatch's writes.
const FIELD_MANAGER: &str = "depwatch";

/// Fetch tokens until `stop`.
pub async fn refresh_tokens(ecr: EcrPullSecrets, metrics: Metrics, stop: CancellationToken) {
    metrics.ecr_failures_start();
    let source = tokio::select! {
        _ = stop.cancelled() => return,
        s = TokenSource::load() => s,
    };
    tracing::info!(
        secret = ecr.name(),
        region = source.region().unwrap_or("(none)"),
        "ECR pull secrets: asking ECR for tokens (GetAuthorizationToken)"
    );
    let mut failures = 0u32;
    loop {
        let fetched = tokio::select! {
            _ = stop.cancelled() => return,
            r = source.fetch() => r,
        };
        let wait = after_fetch(&ecr, &metrics, fetched, &mut failures);
        ecr.fetched_once();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Keep what a fetch brought (or say why it failed); how long until the next one.
fn after_fetch(
    ecr: &EcrPullSecrets,
    metrics: &Metrics,
    fetched: Result<Token, String>,
    failures: &mut u32,
) -> Duration {
    let now = Timestamp::now();
    match super::after_fetch(now, fetched, *failures) {
        Next::Take { token, wait } => {
            *failures = 0;
            let next = now.checked_add(wait).unwrap_or(Timestamp::MAX);
            let shown = next.round(jiff::Unit::Second).unwrap_or(next);
            tracing::info!(registry = %token.host, expires_at = %token.expires_at, next_refresh = %shown, "ECR token fetched");
            ecr.update_health(Health::token_fetched);
            ecr.set_token(token);
            wait
        }
        Next::Fail {
            reason,
            why,
            failures: n,
            wait,
            stale,
        } => {
            *failures = n;
            metrics.ecr_failure("token", reason.as_str());
            tracing::warn!(error = %why, failures = n, retry_in = %human_duration(wait), "fetching an ECR token failed; deploys go on, and the pull secrets keep the current token until it expires");
            ecr.update_health(|h| h.token_failed(n, why, now, stale));
            wait
        }
    }
}

/// What [`keep_secrets`] needs.
pub struct Keeper {
    pub ecr: EcrPullSecrets,
    pub client: kube::Client,
    /// `--namespaces`: exact names are watched one by one; a Secret outside is never adopted.
    pub bounds: Arc<crate::bounds::Bounds>,
    pub fence: crate::fence::Fence,
    pub metrics: Metrics,
}

/// How one write ended.
enum Done {
    Ok,
    /// Raced with another writer (or the Secret went): look again shortly.
    Again,
    Failed,
}

/// Keep the Secrets until `stop`.
pub async fn keep_secrets(k: Keeper, stop: CancellationToken) {
    let mut events = k.events();
    let mut tokens = k.ecr.subscribe();
    let mut view = View::default();
    let (mut retry, mut failures, mut warned) = (None::<Instant>, 0u32, false);
    loop {
        let later = async {
            match retry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => match e {
                Some((scope, Ok(event))) => view.apply(scope.as_deref(), event),
                Some((scope, Err(e))) => {
                    if !std::mem::replace(&mut warned, true) {
                        let scope = scope.as_deref().unwrap_or("the cluster");
                        tracing::warn!(secret = k.ecr.name(), %scope, error = %e, "cannot watch the ECR pull secrets (does depwatch's role grant list and watch of secrets? see deploy/kubernetes/components/ecr); retrying with backoff, and writing them meanwhile");
                    }
                }
                None => return,
            },
            changed = tokens.changed() => if changed.is_err() { return },
            _ = k.ecr.woken() => {}
            _ = later => {}
        }
        retry = match k.reconcile(&mut view).await {
            Some(Done::Ok) | None => None,
            Some(Done::Again) => Some(Instant::now() + Duration::from_secs(1)),
            Some(Done::Failed) => {
                failures += 1;
                Some(Instant::now() + retry_in(failures))
            }
        };
        if retry.is_none() {
            failures = 0;
        }
    }
}

impl Keeper {
    /// Watch events of the Secrets of the name: cluster-wide, or in each exact namespace.
    fn events(&self) -> ScopedEvents {
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", self.ecr.name()));
        let scopes: Vec<Option<String>> = match self.bounds.exact_namespaces() {
            Some(names) => names.into_iter().map(Some).collect(),
            None => vec![None],
        };
        let streams = scopes.into_iter().map(|scope| {
            let api: Api<Secret> = match &scope {
                Some(ns) => Api::namespaced(self.client.clone(), ns),
                None => Api::all(self.client.clone()),
            };
            watcher::watcher(api, config.clone())
                .default_backoff()
                .map(move |e| (scope.clone(), e))
                .boxed()
        });
        futures::stream::select_all(streams).boxed()
    }

    /// Write what differs from what should be; how the writes went (`None`: nothing to do yet,
    /// or the fence closed).
    async fn reconcile(&self, view: &mut View) -> Option<Done> {
        // An expired token opens nothing: the Secrets keep what they hold until a fresh one.
        let token = self.ecr.token().filter(|t| usable(t, Timestamp::now()))?;
        if view.listing() {
            return None;
        }
        let deployed = self.ecr.deployed();
        let served = hosts_served(&token.host, deployed.values().flatten().map(String::as_str));
        let adopted: BTreeSet<String> = view
            .managed_namespaces()
            .filter(|ns| self.bounds.check_namespace(ns).is_ok())
            .map(String::from)
            .collect();
        let want = desired(&token, &served);
        let mut worst = Done::Ok;
        for ns in namespaces_wanted(&deployed, &adopted, &served) {
            let done = match decide(view.get(&ns), &want) {
                Write::Current => {
                    self.ecr.update_health(|h| {
                        h.secret_errors.remove(&ns);
                        h.foreign.remove(&ns);
                    });
                    Done::Ok
                }
                Write::Foreign => self.refuse(&ns),
                write => self.write(&ns, &write, &want, view).await?,
            };
            worst = match (worst, done) {
                (Done::Failed, _) | (_, Done::Failed) => Done::Failed,
                (Done::Again, _) | (_, Done::Again) => Done::Again,
                _ => Done::Ok,
            };
        }
        Some(worst)
    }

    /// A Secret of the name that is not depwatch's: said once, never overwritten.
    fn refuse(&self, ns: &str) -> Done {
        let mut new = false;
        self.ecr
            .update_health(|h| new = h.foreign.insert(ns.to_string()));
        if new {
            tracing::warn!(secret = self.ecr.name(), namespace = ns, "a Secret of this name that depwatch did not make (no label {MANAGED_BY}={MANAGER}) is left alone: delete it (or choose another --ecr-pull-secret) for depwatch to keep the ECR credentials there");
        }
        Done::Ok
    }

    /// Create or patch one namespace's Secret; `None` when the fence refuses the write.
    async fn write(
        &self,
        ns: &str,
        write: &Write,
        want: &Desired,
        view: &mut View,
    ) -> Option<Done> {
        let name = self.ecr.name();
        self.fence
            .check(&format!("writing Secret {name} in {ns}"))
            .ok()?;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let result = match write {
            Write::Create => {
                let body: Secret = serde_json::from_value(secret_json(name, want, None)).ok()?;
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                api.create(&pp, &body).await
            }
            Write::Patch { resource_version } => {
                let body = secret_json(name, want, resource_version.as_deref());
                let pp = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                api.patch(name, &pp, &Patch::Merge(body)).await
            }
            Write::Current | Write::Foreign => return Some(Done::Ok),
        };
        Some(match result {
            Ok(secret) => {
                view.record(&secret);
                self.written(ns, write);
                Done::Ok
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.reread(&api, ns, view).await;
                Done::Again
            }
            Err(kube::Error::Api(s)) if s.code == 404 && *write == Write::Create => {
                tracing::debug!(
                    namespace = ns,
                    "the namespace is gone: no ECR pull secret there"
                );
                self.ecr.forget(ns);
                Done::Ok
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                view.forget(ns);
                Done::Again
            }
            Err(e) => self.failed(ns, &e),
        })
    }

    fn written(&self, ns: &str, write: &Write) {
        self.ecr.update_health(|h| {
            h.secret_errors.remove(ns);
            h.foreign.remove(ns);
        });
        let secret = self.ecr.name();
        match write {
            Write::Create => tracing::info!(secret, namespace = ns, "ECR pull secret created"),
            _ => tracing::info!(secret, namespace = ns, "ECR pull secret refreshed"),
        }
    }

    /// After a conflict: what is there now.
    async fn reread(&self, api: &Api<Secret>, ns: &str, view: &mut View) {
        match api.get_opt(self.ecr.name()).await {
            Ok(Some(secret)) => view.record(&secret),
            Ok(None) => view.forget(ns),
            Err(e) => {
                tracing::debug!(namespace = ns, error = %e, "cannot read the ECR pull secret")
            }
        }
    }

    fn failed(&self, ns: &str, e: &kube::Error) -> Done {
        let why = match e {
            kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
            other => other.to_string(),
        };
        self.metrics.ecr_failure("secret", "error");
        tracing::warn!(secret = self.ecr.name(), namespace = ns, error = %why, "cannot write the ECR pull secret; trying again");
        self.ecr.update_health(|h| {
            h.secret_errors.insert(ns.to_string(), why);
        });
        Done::Failed
    }
}
