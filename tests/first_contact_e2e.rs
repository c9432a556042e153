//! What a team meets in its first week, through the binary: refused files that go away, file
//! names that are not quite right, and messages that say what to do.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::depfile::ServiceKey;
use depwatch::domain::ServiceStatus;
use depwatch::sim::SimConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_file_that_is_deleted_is_no_longer_reported() {
    let env = Env::new(SimConfig::default()).await;
    env.write_dep("web_qa.dep", "1.0\n");
    env.write_dep("api_prod.dep", "version: [\n");
    let daemon = env.daemon(&["--namespaces", "prod"]).await;
    let store = env.store();
    for (name, ns) in [("web", "qa"), ("api", "prod")] {
        let key = ServiceKey::new(name, ns).expect("key");
        wait_for(
            &format!("{key} refused"),
            Duration::from_secs(30),
            || async {
                let r = store.service(&key).ok()??;
                (r.status == ServiceStatus::Invalid).then_some(())
            },
        )
        .await;
    }
    std::fs::remove_file(env.deps.join("web_qa.dep")).expect("rm");
    std::fs::remove_file(env.deps.join("api_prod.dep")).expect("rm");
    for (name, ns) in [("web", "qa"), ("api", "prod")] {
        let key = ServiceKey::new(name, ns).expect("key");
        wait_for(
            &format!("{key} no longer managed"),
            Duration::from_secs(30),
            || async {
                let r = store.service(&key).ok()??;
                (r.status == ServiceStatus::Unmanaged).then_some(())
            },
        )
        .await;
    }
    drop(daemon);
}
