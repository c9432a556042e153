//! A throwaway container registry: Debian's `docker-registry` (the CNCF distribution server)
//! serving from a temporary directory on a free loopback port, optionally behind an htpasswd
//! realm (user `ci`, password `s3cret`), killed on drop. Fails (never skips) when the binaries
//! are missing: `./scripts/test` installs Debian's `docker-registry` and `apache2-utils`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

pub const USER: &str = "ci";
pub const PASSWORD: &str = "s3cret";
/// The media type of the manifests [`Registry::push`] uploads.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// A response header carrying this registry's own token, so that the readiness check can
/// tell our server from another one that won a race for the port.
const ID_HEADER: &str = "X-Depwatch-Registry";

pub struct Registry {
    child: Child,
    port: u16,
    auth: bool,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

/// How one start attempt ended.
enum Outcome {
    Ready,
    /// The server exited before answering; its log.
    Exited(String),
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A bcrypt htpasswd file for [`USER`], made with `htpasswd -Bbn`.
fn write_htpasswd(dir: &Path) -> PathBuf {
    let out = Command::new("htpasswd")
        .args(["-Bbn", USER, PASSWORD])
        .output()
        .expect("htpasswd runs; ./scripts/test installs Debian's apache2-utils");
    assert!(
        out.status.success(),
        "htpasswd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("htpasswd");
    std::fs::write(&path, out.stdout).expect("write htpasswd");
    path
}

/// A YAML scalar for `s` (a JSON string is a valid double-quoted YAML scalar).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

fn config_yaml(dir: &Path, port: u16, htpasswd: Option<&Path>) -> String {
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {root}\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: depwatch-test\n  \
         headers:\n    {ID_HEADER}: [{id}]\n",
        root = quoted(&dir.join("data").to_string_lossy()),
        id = quoted(&dir.to_string_lossy()),
    );
    if let Some(path) = htpasswd {
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: depwatch-test\n    path: {}\n",
            quoted(&path.to_string_lossy())
        ));
    }
    yaml
}

fn spawn(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("registry log");
    Command::new("docker-registry")
        .arg("serve")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("docker-registry runs; ./scripts/test installs Debian's docker-registry")
}

/// Whether our own server (its token in [`ID_HEADER`]) answers `url` with `want`. A short
/// probe: a port taken by something that never answers must not stall the wait.
async fn probe(http: reqwest::Client, url: String, token: String, want: u16) -> bool {
    let request = http.get(&url).timeout(Duration::from_secs(2));
    let Ok(resp) = request.send().await else {
        return false;
    };
    let ours = resp.headers().get(ID_HEADER).and_then(|v| v.to_str().ok());
    resp.status().as_u16() == want && ours == Some(token.as_str())
}

/// Pick a free port, write the config for it and start the server: the port and the child.
fn launch(dir: &Path, htpasswd: Option<&Path>) -> (u16, Child) {
    let port = free_port();
    let config = dir.join("config.yml");
    std::fs::write(&config, config_yaml(dir, port, htpasswd)).expect("write config");
    (port, spawn(&config, &dir.join("registry.log")))
}

impl Registry {
    /// A fresh, empty registry that answers `GET /v2/` (200, or 401 when `auth`).
    pub async fn start(auth: bool) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let htpasswd = auth.then(|| write_htpasswd(dir.path()));
        let (port, child) = launch(dir.path(), htpasswd.as_deref());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        let mut registry = Registry {
            child,
            port,
            auth,
            http,
            dir,
        };
        // Another process may take the port between our probe and the server's bind.
        for attempt in 1.. {
            match registry.answers().await {
                Outcome::Ready => break,
                Outcome::Exited(log) if log.contains("address already in use") && attempt < 5 => {
                    (registry.port, registry.child) =
                        launch(registry.dir.path(), htpasswd.as_deref());
                }
                Outcome::Exited(log) => panic!("docker-registry exited:\n{log}"),
            }
        }
        registry
    }

    /// Wait (30 s at most) until our own server answers `/v2/`, or exits.
    async fn answers(&mut self) -> Outcome {
        let url = self.url("/v2/");
        let token = self.dir.path().to_string_lossy().into_owned();
        let want = if self.auth { 401 } else { 200 };
        let log = self.dir.path().join("registry.log");
        let what = "docker-registry to answer /v2/";
        super::wait_for(what, Duration::from_secs(30), || {
            let exited = self.child.try_wait().expect("try_wait").is_some();
            let probe = probe(self.http.clone(), url.clone(), token.clone(), want);
            let log = &log;
            async move {
                if exited {
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    return Some(Outcome::Exited(log));
                }
                probe.await.then_some(Outcome::Ready)
            }
        })
        .await
    }

    /// `127.0.0.1:PORT`: the registry's host, as image references and docker configs name it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// The realm's user and password (checked only when started with `auth`).
    pub fn credentials(&self) -> (String, String) {
        (USER.to_string(), PASSWORD.to_string())
    }

    /// A docker `config.json` (what a `kubernetes.io/dockerconfigjson` Secret holds) with
    /// this registry's credentials, as `kubectl create secret docker-registry` writes it.
    pub fn docker_config_json(&self) -> String {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        serde_json::json!({
            "auths": { self.addr(): { "username": USER, "password": PASSWORD, "auth": auth } }
        })
        .to_string()
    }

    /// A request to this registry, with basic auth when it has a realm.
    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        if self.auth {
            req.basic_auth(USER, Some(PASSWORD))
        } else {
            req
        }
    }

    /// Upload a blob (a monolithic upload: POST, then PUT with the digest); its descriptor.
    async fn upload_blob(&self, repo: &str, media_type: &str, bytes: Vec<u8>) -> serde_json::Value {
        let digest = digest(&bytes);
        let size = bytes.len();
        let started = self
            .request(
                reqwest::Method::POST,
                &self.url(&format!("/v2/{repo}/blobs/uploads/")),
            )
            .send()
            .await
            .expect("start upload");
        assert_eq!(started.status().as_u16(), 202, "start upload: {started:?}");
        let location = started.headers()["Location"]
            .to_str()
            .expect("Location")
            .to_string();
        let location = if location.starts_with('/') {
            self.url(&location)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let done = self
            .request(
                reqwest::Method::PUT,
                &format!("{location}{sep}digest={digest}"),
            )
            .header("Content-Type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .expect("finish upload");
        assert_eq!(done.status().as_u16(), 201, "finish upload: {done:?}");
        serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size })
    }

    /// Push a small image as `repo:tag` (an OCI manifest over a config naming the tag and one
    /// empty tar layer); the manifest's digest as the registry reports it.
    pub async fn push(&self, repo: &str, tag: &str) -> String {
        self.push_build(repo, tag, "").await
    }

    /// [`Self::push`] of another build under the same tag (`build` goes in a label): the tag
    /// moves to a new digest, as a re-pushed mutable tag does.
    pub async fn push_build(&self, repo: &str, tag: &str, build: &str) -> String {
        // An empty tar archive: two zero blocks.
        let layer_bytes = vec![0u8; 1024];
        let mut labels = serde_json::json!({ "depwatch.test/image": format!("{repo}:{tag}") });
        if !build.is_empty() {
            labels["depwatch.test/build"] = build.into();
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": labels },
            "rootfs": { "type": "layers", "diff_ids": [digest(&layer_bytes)] },
        });
        let config = self
            .upload_blob(repo, OCI_CONFIG, config.to_string().into_bytes())
            .await;
        let layer = self.upload_blob(repo, OCI_LAYER, layer_bytes).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": [layer],
        })
        .to_string();
        let local = digest(manifest.as_bytes());
        let resp = self
            .request(
                reqwest::Method::PUT,
                &self.url(&format!("/v2/{repo}/manifests/{tag}")),
            )
            .header("Content-Type", OCI_MANIFEST)
            .body(manifest)
            .send()
            .await
            .expect("put manifest");
        assert_eq!(resp.status().as_u16(), 201, "put manifest: {resp:?}");
        let reported = resp.headers()["Docker-Content-Digest"]
            .to_str()
            .expect("digest");
        assert_eq!(
            reported, local,
            "the registry's digest of the manifest's bytes"
        );
        reported.to_string()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
