//! A throwaway Prometheus: Debian's `prometheus` scraping the simulated cluster's pod counters
//! (`/sim/metrics`) every second, its data in a temporary directory, on a free loopback port,
//! killed on drop. Fails (never skips) when the binary is missing: `./scripts/test` installs it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Prometheus {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Prometheus {
    /// Start one scraping `sim` (`127.0.0.1:PORT`), ready to answer queries.
    pub async fn scraping(sim: std::net::SocketAddr) -> Prometheus {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(sim).await {
                Ok(p) => return p,
                Err(why) => last = why,
            }
        }
        panic!("Prometheus did not start: {last}");
    }

    async fn try_start(sim: std::net::SocketAddr) -> Result<Prometheus, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: sim\n    metrics_path: /sim/metrics\n    \
                 static_configs:\n      - targets: ['{sim}']\n"
            ),
        )
        .expect("write config");
        let data = dir.path().join("data");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus runs; ./scripts/test installs Debian's prometheus");
        let mut p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let flags = format!("{}/api/v1/status/flags", p.url);
        let ours = data.display().to_string();
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = p.child.try_wait() {
                let log = std::fs::read_to_string(p._dir.path().join("log")).unwrap_or_default();
                return Err(format!("exited: {log}"));
            }
            if let Ok(r) = http.get(&flags).send().await {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                // Another server that won the port would name another data directory.
                if v["data"]["storage.tsdb.path"] == ours.as_str() {
                    return Ok(p);
                }
                return Err("another server answers on the port".into());
            }
            if tokio::time::Instant::now() > give_up {
                return Err("no answer within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The value of an instant query, when it has one.
    pub async fn value(&self, query: &str) -> Option<f64> {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
