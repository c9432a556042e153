//! A throwaway PostgreSQL server: `initdb` in a temporary directory, `postgres` on a free
//! loopback port, stopped on drop. PostgreSQL refuses to run as root, so as root the server
//! runs as `nobody`. Fails (never skips) when the binaries are missing: `./scripts/test`
//! installs Debian's `postgresql`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Postgres {
    child: Option<Child>,
    pub url: String,
    _dir: tempfile::TempDir,
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|b| b.join("initdb").exists())
        .expect("PostgreSQL server binaries (/usr/lib/postgresql/*/bin); ./scripts/test installs Debian's postgresql")
}

fn as_postgres_user(bin: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl Postgres {
    pub async fn start() -> Postgres {
        use std::os::unix::fs::PermissionsExt;
        let bin = bin_dir();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let data = dir.path().join("data");
        let out = as_postgres_user(&bin.join("initdb"), root)
            .args([
                "-D",
                data.to_str().expect("utf-8"),
                "-U",
                "depwatch",
                "--auth=trust",
                "-E",
                "UTF8",
            ])
            .stdout(Stdio::null())
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = as_postgres_user(&bin.join("postgres"), root)
            .args(["-D", data.to_str().expect("utf-8"), "-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                &format!("unix_socket_directories={}", dir.path().display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        let url = format!("postgres://depwatch@127.0.0.1:{port}/postgres");
        let pg = Postgres {
            child: Some(child),
            url,
            _dir: dir,
        };
        let url = pg.url.clone();
        super::wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .ok()?;
                    tokio::spawn(conn);
                    client.simple_query("SELECT 1").await.ok().map(|_| ())
                }
            },
        )
        .await;
        pg
    }

    /// A fresh, empty database on this server, for one test.
    pub async fn database(&self, name: &str) -> String {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
            .simple_query(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        self.url.replace("/postgres", &format!("/{name}"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
