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
    pub port: u16,
    socket_dir: PathBuf,
    data: PathBuf,
    root: bool,
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

/// A certificate authority and a server certificate for `localhost` it signed, made with the
/// `openssl` command, for a server that speaks TLS.
pub struct Certs {
    pub dir: PathBuf,
    /// The CA's certificate (PEM): what `sslrootcert` names.
    pub ca: PathBuf,
    /// Another CA's certificate, which did not sign the server's.
    pub other_ca: PathBuf,
}

fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    /// A CA, a second CA, and `server.crt`/`server.key` for DNS name `localhost` only.
    pub fn make(dir: &Path) -> Certs {
        std::fs::create_dir_all(dir).expect("certs dir");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for name in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            let (key, crt, subj) = (
                format!("{name}.key"),
                format!("{name}.crt"),
                format!("/CN=depwatch test {name}"),
            );
            args.extend([
                "-keyout",
                &key,
                "-out",
                &crt,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&args, dir);
        }
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(&args, dir);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
            dir,
        );
        Certs {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.crt"),
            other_ca: dir.join("other-ca.crt"),
        }
    }
}

impl Postgres {
    pub async fn start() -> Postgres {
        Postgres::start_with(None).await
    }

    /// A server that accepts only TLS connections over TCP, with `certs`' server certificate.
    pub async fn start_tls(certs: &Certs) -> Postgres {
        Postgres::start_with(Some(certs)).await
    }

    async fn start_with(tls: Option<&Certs>) -> Postgres {
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
        if let Some(certs) = tls {
            use std::os::unix::fs::PermissionsExt;
            for f in ["server.crt", "server.key"] {
                let to = data.join(f);
                std::fs::copy(certs.dir.join(f), &to).expect("copy cert");
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
                if root {
                    std::os::unix::fs::chown(&to, Some(65534), Some(65534)).expect("chown");
                }
            }
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .expect("postgresql.conf");
            std::io::Write::write_all(&mut conf, b"ssl = on\n").expect("ssl on");
            // TLS or nothing over TCP; the socket (for the test's own set-up) stays open.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .expect("pg_hba.conf");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let url = format!("postgres://depwatch@127.0.0.1:{port}/postgres");
        let mut pg = Postgres {
            child: None,
            url,
            port,
            socket_dir: dir.path().to_path_buf(),
            data,
            root,
            _dir: dir,
        };
        pg.spawn();
        pg.accepting().await;
        pg
    }

    fn spawn(&mut self) {
        let child = as_postgres_user(&bin_dir().join("postgres"), self.root)
            .args([
                "-D",
                self.data.to_str().expect("utf-8"),
                "-p",
                &self.port.to_string(),
            ])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.socket_dir.display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
    }

    /// Stop the server (a fast shutdown): every connection to it fails until [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    /// Start the stopped server again, on the same port with the same data.
    pub async fn restart(&mut self) {
        self.spawn();
        self.accepting().await;
    }

    async fn accepting(&self) {
        let admin = self.admin();
        super::wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || {
                let admin = admin.clone();
                async move {
                    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.ok()?;
                    tokio::spawn(conn);
                    client.simple_query("SELECT 1").await.ok().map(|_| ())
                }
            },
        )
        .await;
    }

    /// The test's own connection: through the Unix socket, which never needs TLS.
    fn admin(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.port)
            .user("depwatch")
            .dbname("postgres");
        c
    }

    /// A fresh, empty database on this server, for one test.
    pub async fn database(&self, name: &str) -> String {
        let (client, conn) = self
            .admin()
            .connect(tokio_postgres::NoTls)
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
