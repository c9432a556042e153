//! The daemon's JSON log lines, each parsed strictly: every object's keys once (a field named
//! `message` beside the event's own message is a duplicate key most JSON readers resolve by
//! dropping one). The run covers a deploy, a refusal at plan, a rolled-back crash, drift, an
//! invalid file, a deleted workload and a stop.

mod common;

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::domain::{ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::json;

/// A JSON value that refuses an object naming a key twice, at any depth.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

#[test]
fn the_strict_reader_finds_duplicates_at_any_depth() {
    assert!(serde_json::from_str::<Strict>(r#"{"a":1,"b":{"c":[{"d":2}]}}"#).is_ok());
    assert!(serde_json::from_str::<Strict>(r#"{"a":1,"a":2}"#).is_err());
    assert!(serde_json::from_str::<Strict>(r#"{"f":{"message":"x","message":"y"}}"#).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_log_line_names_each_key_once() {
    let env = Env::new(SimConfig::default()).await;
    for name in ["web", "api"] {
        env.deployment(
            "shop",
            name,
            &[(name, &format!("example.com/{name}:1.0"))],
            1,
        )
        .await;
    }
    let daemon = env.daemon(&["--log-format", "json"]).await;
    let store = env.store();
    let status_of = |name: &'static str, want: ServiceStatus| {
        let store = store.clone();
        async move {
            let key = ServiceKey::new(name, "shop").expect("key");
            wait_for(
                &format!("{name} {want}"),
                Duration::from_secs(60),
                || async {
                    store
                        .service(&key)
                        .await
                        .ok()
                        .flatten()
                        .filter(|r| r.status == want)
                },
            )
            .await
        }
    };
    env.write_dep("web_shop.dep", "1.1\n");
    status_of("web", ServiceStatus::Succeeded).await;
    env.write_dep("api_shop.dep", "1.1-crash\n");
    status_of("api", ServiceStatus::RolledBack).await;
    env.write_dep("nope_shop.dep", "1.0\n");
    env.write_dep("bad_shop.dep", "kind: [\n");
    // Drift: the image changed behind depwatch's back.
    Api::<Deployment>::namespaced(env.client.clone(), "shop")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {
                "containers": [{"name": "web", "image": "example.com/web:9.9"}]}}}})),
        )
        .await
        .expect("patch");
    status_of("web", ServiceStatus::Drifted).await;
    Api::<Deployment>::namespaced(env.client.clone(), "shop")
        .delete("api", &Default::default())
        .await
        .expect("delete");
    status_of("api", ServiceStatus::Missing).await;
    wait_for("the refusals logged", Duration::from_secs(30), || {
        let log = daemon.log_text();
        async move { (log.contains("nope") && log.contains("bad_shop.dep")).then_some(()) }
    })
    .await;
    let log = daemon.log_text();
    daemon.stop();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 10, "{log}");
    for line in lines {
        if let Err(e) = serde_json::from_str::<Strict>(line) {
            panic!("{e}: {line}");
        }
    }
}
