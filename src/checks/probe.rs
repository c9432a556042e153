//! Taking samples: an HTTP check asks a path on the workload's Service through the API
//! server's service proxy (a landing host with only a kubeconfig can ask), or a URL directly;
//! a Prometheus check runs an instant query against `--prometheus-url`. Every answer is read
//! up to a cap, within a deadline, and anything quoted from it is escaped.

use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::Value;

use crate::domain::verify::{
    fmt_value, Check, HttpCheck, HttpTarget, Probe, PromCheck, Sample, Verification,
};

/// The most of an answer read: a health or version page, a query's result.
const CAP: usize = 256 * 1024;
/// The longest one sample may take.
const MAX_WAIT: Duration = Duration::from_secs(10);
/// The most samples in flight at once across the daemon: a thousand services baking sixteen
/// checks every 100 ms would otherwise ask the API server's proxy, the services and
/// Prometheus without bound. More wait their turn (the wait is not counted against a sample).
pub const MAX_IN_FLIGHT: usize = 32;

/// Takes samples. Cheap to clone.
#[derive(Clone)]
pub struct Prober {
    kube: kube::Client,
    http: reqwest::Client,
    prometheus: Option<reqwest::Url>,
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
}

/// What one sample is about.
pub struct Target<'a> {
    pub namespace: &'a str,
    /// The workload's name: its Service's, unless the check names another.
    pub workload: &'a str,
    /// The version being deployed, for `versionField`.
    pub version: &'a str,
}

impl Prober {
    pub fn new(kube: kube::Client, prometheus: Option<reqwest::Url>) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(MAX_WAIT)
            .build()
            .unwrap_or_default();
        Prober {
            kube,
            http,
            prometheus,
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// One round: a sample of each check, taken together.
    pub async fn round(
        &self,
        v: &Verification,
        target: &Target<'_>,
        baselines: &[Option<f64>],
    ) -> Vec<Sample> {
        let wait = v.interval.min(MAX_WAIT);
        let samples = v.checks.iter().enumerate().map(|(i, c)| {
            let baseline = baselines.get(i).copied().flatten();
            async move {
                // The semaphore is never closed; without a permit the sample goes anyway.
                let _turn = self.in_flight.acquire().await.ok();
                match tokio::time::timeout(wait, self.sample(c, target, baseline)).await {
                    Ok(s) => s,
                    Err(_) => Sample::Fail {
                        value: "no answer".into(),
                        why: format!("no answer within {}", crate::domain::human_duration(wait)),
                    },
                }
            }
        });
        futures::future::join_all(samples).await
    }

    /// The value of each check's baseline query now (None for checks without one, or when
    /// it gave nothing).
    pub async fn baselines(&self, v: &Verification) -> Vec<Option<f64>> {
        let values = v.checks.iter().map(|c| async move {
            let q = c.baseline_query()?;
            let _turn = self.in_flight.acquire().await.ok();
            let why = match tokio::time::timeout(MAX_WAIT, self.query(q)).await {
                Ok(Ok(v)) => return v,
                Ok(Err(why)) => why,
                Err(_) => format!("no answer within {}", crate::domain::human_duration(MAX_WAIT)),
            };
            tracing::warn!(check = %c.name, %why, "the baseline was not measured; the check's samples fail until one is");
            None
        });
        futures::future::join_all(values).await
    }

    async fn sample(&self, c: &Check, target: &Target<'_>, baseline: Option<f64>) -> Sample {
        match &c.probe {
            Probe::Http(h) => self.http_sample(h, target).await,
            Probe::Prometheus(p) => self.prom_sample(p, baseline).await,
        }
    }

    async fn http_sample(&self, h: &HttpCheck, target: &Target<'_>) -> Sample {
        let got = match &h.target {
            HttpTarget::Service {
                service,
                port,
                path,
            } => {
                let name = service.as_deref().unwrap_or(target.workload);
                let svc = match port {
                    Some(p) => format!("{name}:{p}"),
                    None => name.to_string(),
                };
                let uri = format!(
                    "/api/v1/namespaces/{}/services/{svc}/proxy{path}",
                    target.namespace
                );
                self.through_proxy(&uri).await
            }
            HttpTarget::Url(u) => self.direct(u).await,
        };
        let (status, body) = match got {
            Ok(answer) => answer,
            Err(why) => {
                return Sample::Fail {
                    value: "no answer".into(),
                    why,
                }
            }
        };
        judge_http(h, status, &body, target.version)
    }

    async fn through_proxy(&self, uri: &str) -> Result<(u16, Vec<u8>), String> {
        let req = http::Request::get(uri)
            .body(kube::client::Body::from(Vec::new()))
            .map_err(|e| format!("bad request: {e}"))?;
        let res = self
            .kube
            .send(req)
            .await
            .map_err(|e| format!("the API server's service proxy: {e}"))?;
        let status = res.status().as_u16();
        let body = http_body_util::Limited::new(res.into_body(), CAP)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body.to_vec()))
    }

    async fn direct(&self, url: &str) -> Result<(u16, Vec<u8>), String> {
        let res = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| crate::domain::error_chain(&e.without_url()))?;
        let status = res.status().as_u16();
        Ok((status, read_capped(res).await?))
    }

    async fn prom_sample(&self, p: &PromCheck, baseline: Option<f64>) -> Sample {
        match self.query(&p.query).await {
            Err(why) => Sample::NoData { why },
            Ok(None) => Sample::NoData {
                why: "the query returned no series".into(),
            },
            Ok(Some(v)) => match p.condition.judge(v, baseline) {
                Ok(()) => Sample::Pass {
                    value: fmt_value(v),
                },
                Err(why) => Sample::Fail {
                    value: fmt_value(v),
                    why,
                },
            },
        }
    }

    /// An instant query's single value; None when it returned nothing (or NaN).
    pub async fn query(&self, q: &str) -> Result<Option<f64>, String> {
        let Some(base) = &self.prometheus else {
            return Err("no --prometheus-url is set".into());
        };
        let url = base
            .join("api/v1/query")
            .map_err(|e| format!("--prometheus-url: {e}"))?;
        let res = self
            .http
            .get(url)
            .query(&[("query", q)])
            .send()
            .await
            .map_err(|e| {
                format!(
                    "Prometheus: {}",
                    crate::domain::error_chain(&e.without_url())
                )
            })?;
        let status = res.status().as_u16();
        let body = read_capped(res).await?;
        prom_value(status, &body)
    }
}

async fn read_capped(mut res: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = res
        .chunk()
        .await
        .map_err(|e| format!("reading the answer: {}", e.without_url()))?
    {
        if out.len() + chunk.len() > CAP {
            return Err(format!("the answer is more than {} KiB", CAP / 1024));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A short, printable excerpt of an answer.
fn excerpt(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body).chars().take(80).collect();
    crate::safefs::escape(text.trim())
}

/// Judge an HTTP answer (pure).
pub fn judge_http(h: &HttpCheck, status: u16, body: &[u8], version: &str) -> Sample {
    let value = format!("HTTP {status}");
    if status / 100 != h.expect_class {
        let said = excerpt(body);
        let said = match said.is_empty() {
            true => String::new(),
            false => format!(": {said}"),
        };
        return Sample::Fail {
            value: value.clone(),
            why: format!("{value}, expected {}xx{said}", h.expect_class),
        };
    }
    if let Some(want) = &h.body_contains {
        if !String::from_utf8_lossy(body).contains(want.as_str()) {
            return Sample::Fail {
                value,
                why: format!(
                    "the answer does not contain `{}`",
                    crate::safefs::escape(want)
                ),
            };
        }
    }
    let Some(field) = &h.version_field else {
        return Sample::Pass { value };
    };
    let json: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            return Sample::Fail {
                value,
                why: format!("the answer is not JSON, so it has no `{field}`"),
            }
        }
    };
    let found = field.split('.').try_fold(&json, |v, k| v.get(k));
    let said = match found {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) | None => {
            return Sample::NoData {
                why: format!("the answer has no text field `{field}`"),
            }
        }
    };
    match said == version {
        true => Sample::Pass { value: said },
        false => {
            let said = crate::safefs::escape(&said);
            Sample::Fail {
                value: said.clone(),
                why: format!("`{field}` says {said}, expected {version}"),
            }
        }
    }
}

/// The single value of a Prometheus instant-query answer (pure).
pub fn prom_value(status: u16, body: &[u8]) -> Result<Option<f64>, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| format!("Prometheus answered HTTP {status} without JSON"))?;
    if v["status"] != "success" {
        let e = v["error"].as_str().unwrap_or("no reason given");
        return Err(format!(
            "Prometheus refused the query (HTTP {status}): {}",
            crate::safefs::escape(e)
        ));
    }
    let data = &v["data"];
    let number = |pair: &Value| -> Result<Option<f64>, String> {
        let text = pair[1]
            .as_str()
            .ok_or("Prometheus gave a sample without a value")?;
        let n: f64 = text
            .parse()
            .map_err(|_| "Prometheus gave a value that is not a number".to_string())?;
        Ok(n.is_finite().then_some(n))
    };
    match data["resultType"].as_str() {
        Some("scalar") => number(&data["result"]),
        Some("vector") => {
            let series = data["result"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            match series {
                [] => Ok(None),
                [one] => number(&one["value"]),
                many => Err(format!(
                    "the query returned {} series; a check needs one value (aggregate it, e.g. with sum())",
                    many.len()
                )),
            }
        }
        other => Err(format!(
            "the query returned a {}; a check needs an instant vector or a scalar",
            other.unwrap_or("result of no type")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many services baking at once never have more than [`MAX_IN_FLIGHT`] samples out, and
    /// the ones that wait their turn still pass.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn samples_in_flight_are_bounded_across_every_bake() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let now = std::sync::Arc::new(AtomicUsize::new(0));
        let peak = std::sync::Arc::new(AtomicUsize::new(0));
        let (n, p) = (now.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (n, p) = (n.clone(), p.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let inside = n.fetch_add(1, SeqCst) + 1;
                    p.fetch_max(inside, SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    n.fetch_sub(1, SeqCst);
                    let _ = sock
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        let prober = Prober::new(kube::Client::try_from(config).expect("client"), None);
        let check = Check {
            name: "up".into(),
            probe: Probe::Http(HttpCheck {
                target: HttpTarget::Url(format!("http://{addr}/healthz")),
                expect_class: 2,
                body_contains: None,
                version_field: None,
            }),
            no_data: Default::default(),
        };
        let v = Verification {
            checks: vec![check; 16],
            bake: Duration::ZERO,
            interval: Duration::from_secs(2),
            failure_limit: 1,
        };
        let target = Target {
            namespace: "prod",
            workload: "web",
            version: "1",
        };
        let rounds = (0..4).map(|_| prober.round(&v, &target, &[]));
        let all: Vec<Sample> = futures::future::join_all(rounds).await.concat();
        assert_eq!(all.len(), 64);
        assert!(
            all.iter().all(|s| matches!(s, Sample::Pass { .. })),
            "{all:?}"
        );
        let peak = peak.load(SeqCst);
        assert!(peak <= MAX_IN_FLIGHT, "{peak} samples at once");
        assert!(peak > 1, "they still go together");
    }

    fn http(expect: u16, body: Option<&str>, field: Option<&str>) -> HttpCheck {
        HttpCheck {
            target: HttpTarget::Service {
                service: None,
                port: None,
                path: "/".into(),
            },
            expect_class: expect,
            body_contains: body.map(String::from),
            version_field: field.map(String::from),
        }
    }

    #[test]
    fn http_answers_are_judged_on_status_body_and_version() {
        let ok = |s: &Sample| matches!(s, Sample::Pass { .. });
        assert!(ok(&judge_http(&http(2, None, None), 200, b"ok", "1.0")));
        let s = judge_http(&http(2, None, None), 500, b"unhealthy\x1b[2J", "1.0");
        let Sample::Fail { why, .. } = s else {
            panic!("500 fails");
        };
        assert_eq!(why, "HTTP 500, expected 2xx: unhealthy\\u{1b}[2J");
        assert!(ok(&judge_http(
            &http(2, Some("ok"), None),
            200,
            b"all ok",
            "1"
        )));
        assert!(!ok(&judge_http(
            &http(2, Some("ok"), None),
            200,
            b"bad",
            "1"
        )));
        let v = http(2, None, Some("build.version"));
        assert!(ok(&judge_http(
            &v,
            200,
            br#"{"build":{"version":"1.4.2"}}"#,
            "1.4.2"
        )));
        let Sample::Fail { why, .. } =
            judge_http(&v, 200, br#"{"build":{"version":"1.4.1"}}"#, "1.4.2")
        else {
            panic!("an old version fails");
        };
        assert_eq!(why, "`build.version` says 1.4.1, expected 1.4.2");
        assert!(matches!(
            judge_http(&v, 200, br#"{"other":1}"#, "1.4.2"),
            Sample::NoData { .. }
        ));
    }

    #[test]
    fn prometheus_answers_give_one_value_or_say_why_not() {
        let vector = |r: &str| {
            format!(r#"{{"status":"success","data":{{"resultType":"vector","result":{r}}}}}"#)
        };
        assert_eq!(
            prom_value(
                200,
                vector(r#"[{"metric":{},"value":[1,"0.042"]}]"#).as_bytes()
            ),
            Ok(Some(0.042))
        );
        assert_eq!(prom_value(200, vector("[]").as_bytes()), Ok(None));
        assert_eq!(
            prom_value(
                200,
                vector(r#"[{"metric":{},"value":[1,"NaN"]}]"#).as_bytes()
            ),
            Ok(None)
        );
        let two = vector(
            r#"[{"metric":{"a":"1"},"value":[1,"1"]},{"metric":{"a":"2"},"value":[1,"2"]}]"#,
        );
        assert!(prom_value(200, two.as_bytes())
            .expect_err("two")
            .contains("2 series"));
        assert_eq!(
            prom_value(
                200,
                br#"{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}"#
            ),
            Ok(Some(3.0))
        );
        let e =
            prom_value(400, br#"{"status":"error","error":"parse error"}"#).expect_err("refused");
        assert!(
            e.contains("refused the query (HTTP 400): parse error"),
            "{e}"
        );
        assert!(prom_value(502, b"<html>")
            .expect_err("html")
            .contains("without JSON"));
    }
}
