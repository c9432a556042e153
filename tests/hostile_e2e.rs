//! Hostile files, names and directories, each through the real binary against the simulated
//! cluster: a clear error naming the file, 0 PATCHes, nothing echoed from the content, other
//! services still deploy, memory bounded, the daemon responsive.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::sim::SimConfig;

/// A string that must never appear in a log line, a record or an API answer.
const MARKER: &str = "Zq9SECRETq9Z";

/// What a case must end as.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// The service's record has this status and its message contains the text.
    Refused(&'static str, &'static str),
    /// The file is not a dependency file at all: no record, nothing deployed.
    Ignored,
    /// A neighbour that is fine: it deploys `example.com/<name>:<this tag>`.
    Deploys(&'static str),
}

struct Case {
    /// The service (Deployment) name, suffixed per phase; the file is `<name>_<ns>.dep`
    /// unless the setup says otherwise.
    name: &'static str,
    setup: fn(&Path, &Path, &str),
    expect: Expect,
    /// The namespace of the Deployment a mistake could patch.
    ns: &'static str,
    /// Whether that Deployment exists (a case about a missing one says no).
    deployment: bool,
}

impl Default for Case {
    /// The usual case: a Deployment of that name in `prod` that a mistake could patch.
    fn default() -> Self {
        Case {
            name: "",
            setup: |_, _, _| {},
            expect: Expect::Ignored,
            ns: "prod",
            deployment: true,
        }
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("cstr");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

fn file(deps: &Path, name: &str) -> std::path::PathBuf {
    deps.join(format!("{name}_prod.dep"))
}

fn write(path: &Path, content: impl AsRef<[u8]>) {
    std::fs::write(path, content).expect("write");
}

const KUBECONFIG_TEXT: &str = "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: https://10.0.0.1\n  name: Zq9SECRETq9Z\nusers:\n- name: admin\n  user:\n    token: Zq9SECRETq9Z\n";

fn cases() -> Vec<Case> {
    use Expect::*;
    let outside_msg = "outside the dependency directory";
    vec![
        Case {
            name: "fifo",
            setup: |d, _, n| mkfifo(&file(d, n)),
            expect: Refused("unreadable", "named pipe (FIFO)"),
            ..Case::default()
        },
        Case {
            name: "link-fifo",
            setup: |d, _, n| {
                mkfifo(&d.join(".fifo"));
                symlink(d.join(".fifo"), file(d, n)).expect("link")
            },
            expect: Refused("unreadable", "named pipe"),
            ..Case::default()
        },
        Case {
            name: "socket",
            setup: |d, _, n| {
                std::os::unix::net::UnixListener::bind(file(d, n))
                    .map(std::mem::forget)
                    .expect("bind")
            },
            expect: Refused("unreadable", "a socket"),
            ..Case::default()
        },
        Case {
            name: "dev-zero",
            setup: |d, _, n| symlink("/dev/zero", file(d, n)).expect("link"),
            expect: Refused("unreadable", outside_msg),
            ..Case::default()
        },
        Case {
            name: "dev-urandom",
            setup: |d, _, n| symlink("/dev/urandom", file(d, n)).expect("link"),
            expect: Refused("unreadable", outside_msg),
            ..Case::default()
        },
        Case {
            name: "etc-passwd",
            setup: |d, _, n| symlink("/etc/passwd", file(d, n)).expect("link"),
            expect: Refused("unreadable", outside_msg),
            ..Case::default()
        },
        Case {
            name: "proc-environ",
            setup: |d, _, n| symlink("/proc/self/environ", file(d, n)).expect("link"),
            expect: Refused("unreadable", outside_msg),
            ..Case::default()
        },
        Case {
            name: "outside-secret",
            setup: |d, o, n| {
                write(&o.join("secret"), format!("token: {MARKER}\n"));
                symlink(o.join("secret"), file(d, n)).expect("link")
            },
            expect: Refused("unreadable", outside_msg),
            ..Case::default()
        },
        Case {
            name: "outside-kubeconfig",
            setup: |d, o, n| {
                write(&o.join("kubeconfig"), KUBECONFIG_TEXT);
                symlink(o.join("kubeconfig"), file(d, n)).expect("link")
            },
            expect: Refused("unreadable", outside_msg),
            ..Case::default()
        },
        Case {
            name: "relative-escape",
            setup: |d, o, n| {
                write(&o.join("v"), "9.9.9\n");
                let rel = format!(
                    "{}{}",
                    "../".repeat(24),
                    o.join("v").display().to_string().trim_start_matches('/')
                );
                symlink(rel, file(d, n)).expect("link")
            },
            expect: Refused("unreadable", outside_msg),
            ..Case::default()
        },
        Case {
            name: "link-to-root",
            setup: |d, _, n| symlink("/", file(d, n)).expect("link"),
            expect: Refused("unreadable", outside_msg),
            ..Case::default()
        },
        Case {
            name: "dangling",
            setup: |d, _, n| symlink(d.join("nowhere"), file(d, n)).expect("link"),
            expect: Refused("unreadable", "does not exist"),
            ..Case::default()
        },
        Case {
            name: "loop",
            setup: |d, _, n| {
                symlink(d.join(".loop-b"), d.join(".loop-a")).expect("a");
                symlink(d.join(".loop-a"), d.join(".loop-b")).expect("b");
                symlink(d.join(".loop-a"), file(d, n)).expect("link")
            },
            expect: Refused("unreadable", "cannot read"),
            ..Case::default()
        },
        Case {
            name: "sparse-8g",
            setup: |d, _, n| {
                let f = std::fs::File::create(file(d, n)).expect("create");
                f.set_len(8 << 30).expect("sparse")
            },
            expect: Refused("unreadable", "over the 1024-byte limit"),
            ..Case::default()
        },
        Case {
            name: "just-over-cap",
            setup: |d, _, n| write(&file(d, n), format!("1.0.1\n#{}\n", "x".repeat(1020))),
            expect: Refused("unreadable", "1028 bytes, over the 1024-byte limit"),
            ..Case::default()
        },
        Case {
            name: "at-cap",
            setup: |d, _, n| write(&file(d, n), format!("1.0.1\n#{}\n", "x".repeat(1016))),
            expect: Deploys("1.0.1"),
            ..Case::default()
        },
        Case {
            name: "dir-named-dep",
            setup: |d, _, n| std::fs::create_dir(file(d, n)).expect("mkdir"),
            expect: Ignored,
            ..Case::default()
        },
        Case {
            name: "binary",
            setup: |d, _, n| write(&file(d, n), [0u8, 159, 146, 150, 0xff, 0xfe, 0, 1]),
            expect: Refused("invalid", "not UTF-8"),
            ..Case::default()
        },
        Case {
            name: "passwd-copy",
            setup: |d, _, n| {
                write(
                    &file(d, n),
                    std::fs::read("/etc/passwd")
                        .unwrap_or_else(|_| b"root:x:0:0:root:/root:/bin/bash\n".to_vec())
                        .into_iter()
                        .take(1000)
                        .collect::<Vec<u8>>(),
                )
            },
            expect: Refused("invalid", "_prod.dep"),
            ..Case::default()
        },
        Case {
            name: "kubeconfig-copy",
            setup: |d, _, n| write(&file(d, n), KUBECONFIG_TEXT),
            expect: Refused("invalid", "an unknown field"),
            ..Case::default()
        },
        Case {
            name: "token-with-space",
            setup: |d, _, n| write(&file(d, n), format!("ghp_{MARKER} {MARKER}\n")),
            expect: Refused("invalid", "contains spaces"),
            ..Case::default()
        },
        Case {
            name: "long-tag",
            setup: |d, _, n| write(&file(d, n), format!("{}\n", MARKER.repeat(40))),
            expect: Refused("invalid", "not a valid tag"),
            ..Case::default()
        },
        Case {
            name: "yaml-bomb",
            setup: |d, _, n| {
                write(&file(d, n), "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n")
            },
            expect: Refused("invalid", "not a valid dependency file"),
            ..Case::default()
        },
        Case {
            name: "yaml-deep",
            setup: |d, _, n| {
                write(
                    &file(d, n),
                    format!("images: {}{}\n", "[".repeat(480), "]".repeat(480)),
                )
            },
            expect: Refused("invalid", "not a valid dependency file"),
            ..Case::default()
        },
        Case {
            name: "empty",
            setup: |d, _, n| write(&file(d, n), ""),
            expect: Refused("invalid", "the file is empty"),
            ..Case::default()
        },
        Case {
            name: "hardlink-secret",
            setup: |d, o, n| {
                write(&o.join("hard"), format!("{MARKER}: {MARKER}\n"));
                if std::fs::hard_link(o.join("hard"), file(d, n)).is_err() {
                    std::fs::copy(o.join("hard"), file(d, n)).expect("copy");
                }
            },
            expect: Refused("invalid", "an unknown field"),
            ..Case::default()
        },
        Case {
            name: "evil-image",
            setup: |d, _, n| write(&file(d, n), "evil.example.net/x:1\n"),
            expect: Refused("invalid", "image evil.example.net/x:1 is not allowed"),
            ..Case::default()
        },
        Case {
            name: "evil-repository",
            setup: |d, _, n| {
                write(
                    &file(d, n),
                    "repository: evil.example.net/x\nversion: 1.0.1\n",
                )
            },
            expect: Refused("invalid", "repository evil.example.net/x matches none"),
            ..Case::default()
        },
        Case {
            name: "evil-map",
            setup: |d, _, n| {
                write(
                    &file(d, n),
                    "images:\n  evil-map: example.com/ok:1\n  side: evil.example.net/s:1\n",
                )
            },
            expect: Refused("invalid", "evil.example.net/s:1 is not allowed"),
            ..Case::default()
        },
        Case {
            name: "runs-evil",
            setup: |d, _, n| write(&file(d, n), "2.0.0\n"),
            expect: Refused(
                "failed",
                "is not allowed: its repository evil.example.net/runs-evil",
            ),
            ..Case::default()
        },
        Case {
            name: "paymnets",
            setup: |d, _, n| write(&file(d, n), "1.0.1\n"),
            expect: Refused("failed", "(did you mean payments-"),
            ns: "prod",
            deployment: false,
        },
        Case {
            name: "kube-proxy",
            setup: |d, _, n| write(&d.join(format!("{n}_kube-system.dep")), "1.0.1\n"),
            expect: Refused(
                "invalid",
                "namespace kube-system is not one depwatch may deploy to",
            ),
            ns: "kube-system",
            deployment: true,
        },
        Case {
            name: "team-typo",
            setup: |d, _, n| write(&d.join(format!("{n}_team-aa.dep")), "1.0.1\n"),
            expect: Refused(
                "failed",
                "namespace team-aa does not exist (did you mean team-a?)",
            ),
            ns: "team-a",
            deployment: true,
        },
        Case {
            name: "newline-name",
            setup: |d, _, _| write(&d.join("x\nINFO forged line_prod.dep"), "1.0.1\n"),
            expect: Ignored,
            ..Case::default()
        },
        Case {
            name: "ansi-name",
            setup: |d, _, _| write(&d.join("\u{1b}[31mred_prod.dep"), "1.0.1\n"),
            expect: Ignored,
            ..Case::default()
        },
        Case {
            name: "dot-dir",
            setup: |d, _, n| {
                std::fs::create_dir_all(d.join(".hidden")).expect("mkdir");
                write(&d.join(".hidden").join(format!("{n}_prod.dep")), "1.0.1\n")
            },
            expect: Ignored,
            ..Case::default()
        },
        Case {
            name: "walk-outside",
            setup: |d, o, n| {
                std::fs::create_dir_all(o.join("tree")).expect("mkdir");
                write(&o.join(format!("tree/{n}_prod.dep")), "1.0.1\n");
                symlink(o.join("tree"), d.join("outside-tree")).expect("link")
            },
            expect: Ignored,
            ..Case::default()
        },
        Case {
            name: "seed-last-zero",
            setup: |d, _, n| {
                write(&file(d, n), "1.0.1\n");
                symlink("/dev/zero", d.join(format!("{n}_prod.last"))).expect("link")
            },
            expect: Deploys("1.0.1"),
            ..Case::default()
        },
        Case {
            name: "inside-chain",
            setup: |d, _, n| {
                std::fs::create_dir_all(d.join("real")).expect("mkdir");
                write(&d.join("real/v"), "1.0.1\n");
                symlink(d.join("real/v"), d.join("hop")).expect("hop");
                symlink(d.join("hop"), file(d, n)).expect("link")
            },
            expect: Deploys("1.0.1"),
            ..Case::default()
        },
        Case {
            name: "configmap",
            setup: |d, _, n| {
                let ts = d.join("..2026_11_23_00_00_00.000000001");
                std::fs::create_dir_all(&ts).expect("mkdir");
                write(&ts.join(format!("{n}_prod.dep")), "1.0.1\n");
                symlink(&ts, d.join("..data")).expect("data");
                symlink(format!("..data/{n}_prod.dep"), file(d, n)).expect("link")
            },
            expect: Deploys("1.0.1"),
            ..Case::default()
        },
        Case {
            name: "linked-subdir",
            setup: |d, _, n| {
                std::fs::create_dir_all(d.join(".store/team")).expect("mkdir");
                write(&d.join(format!(".store/team/{n}_prod.dep")), "1.0.1\n");
                symlink(d.join(".store/team"), d.join("team-link")).expect("link")
            },
            expect: Deploys("1.0.1"),
            ..Case::default()
        },
    ]
}

async fn check_case(env: &Env, case: &Case, suffix: &str) {
    let name = format!("{}{suffix}", case.name);
    match case.expect {
        Expect::Refused(status, text) => {
            // On a timeout, what the record holds for the service says which step went wrong.
            let seen = std::sync::Mutex::new(String::from("no record"));
            let record = common::wait_for_or(
                &format!("{name}: status {status} with {text:?}"),
                Duration::from_secs(30),
                || async {
                    let all = env.store().services().await.ok()?;
                    let mine = all.into_iter().find(|r| r.name == name)?;
                    *seen.lock().expect("seen") =
                        format!("{} {:?}", mine.status.as_str(), mine.message);
                    (mine.status.as_str() == status && mine.message.contains(text)).then_some(mine)
                },
                || format!("the record holds: {}", seen.lock().expect("seen")),
            )
            .await;
            assert!(
                !record.message.contains(MARKER),
                "{name}: the record echoes content: {}",
                record.message
            );
            // A file-level refusal names the file; a deploy failure is on the service's own
            // record and history.
            assert!(
                status == "failed" || record.message.contains(&name),
                "{name}: the message names the file or service: {}",
                record.message
            );
        }
        Expect::Ignored => {
            let all = env.store().services().await.expect("store");
            assert!(
                !all.iter().any(|r| r.name == name),
                "{name}: no record expected"
            );
        }
        Expect::Deploys(tag) => {
            let image = format!("example.com/{name}:{tag}");
            env.wait_image(case.ns, &name, &image).await;
        }
    }
    if case.deployment && !matches!(case.expect, Expect::Deploys(_)) {
        assert_eq!(env.patches(case.ns, &name), 0, "{name}: nothing patched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_are_refused_clearly_and_cost_nothing() {
    let env = Env::new(SimConfig::default()).await;
    let outside = tempfile::tempdir().expect("outside");
    let all = cases();
    assert!(all.len() >= 40, "{} cases", all.len());
    // Every case has a Deployment a mistake could patch, twice: files present at start-up (-a),
    // and files that appear while running (-b).
    for suffix in ["-a", "-b"] {
        for case in all.iter().filter(|c| c.deployment) {
            let name = format!("{}{suffix}", case.name);
            let image = if case.name == "runs-evil" {
                format!("evil.example.net/{name}:1.0.0")
            } else {
                format!("example.com/{name}:1.0.0")
            };
            env.deployment(case.ns, &name, &[(&name, &image)], 1).await;
        }
        let payments = format!("payments{suffix}");
        env.deployment("prod", &payments, &[(&payments, "example.com/p:1.0.0")], 1)
            .await;
    }
    env.deployment(
        "prod",
        "canary",
        &[("canary", "example.com/canary:1.0.0")],
        1,
    )
    .await;

    let phase = |suffix: &'static str| {
        let deps = env.deps.clone();
        let outside = outside.path().join(suffix);
        std::fs::create_dir_all(&outside).expect("outside dir");
        let sub = deps.join(format!("set{suffix}"));
        std::fs::create_dir_all(&sub).expect("set dir");
        for case in cases() {
            (case.setup)(&sub, &outside, &format!("{}{suffix}", case.name));
        }
    };
    phase("-a");
    let args = [
        "--namespaces",
        "prod,team-*",
        "--allowed-images",
        "example.com/*",
        "--max-file-size",
        "1KiB",
        "--resync",
        "1h",
    ];
    let daemon = env.daemon(&args).await;
    phase("-b");
    env.write_dep("canary_prod.dep", "1.0.1\n");
    env.wait_image("prod", "canary", "example.com/canary:1.0.1")
        .await;

    for suffix in ["-a", "-b"] {
        for case in &all {
            check_case(&env, case, suffix).await;
        }
    }
    // No namespace created for the typo.
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(env.client.clone());
    assert!(
        namespaces.get_opt("team-aa").await.expect("get").is_none(),
        "depwatch never creates a namespace"
    );

    // Responsive, bounded, and nothing leaked or forged.
    let http = reqwest::Client::new();
    let url = daemon.http_url();
    let health = tokio::time::timeout(
        Duration::from_secs(5),
        http.get(format!("{url}/healthz")).send(),
    )
    .await
    .expect("/healthz answers at once")
    .expect("healthz");
    assert!(health.status().is_success());
    let services = http
        .get(format!("{url}/api/v1/services"))
        .send()
        .await
        .expect("services")
        .text()
        .await
        .expect("body");
    assert!(!services.contains(MARKER), "the API echoes file content");
    assert!(!services.contains("root:x:0"), "the API echoes /etc/passwd");
    let log = daemon.log_text();
    assert!(!log.contains(MARKER), "the log echoes file content");
    assert!(!log.contains("root:x:0"), "the log echoes /etc/passwd");
    assert!(
        !log.lines().any(|l| l.starts_with("INFO forged")),
        "a file name forged a log line"
    );
    assert!(
        !log.contains('\u{1b}'),
        "a file name put an escape sequence in the log"
    );
    assert!(
        log.contains("x\\nINFO forged line_prod.dep"),
        "the odd name is reported, escaped"
    );
    let peak = common::peak_rss_mib(daemon.pid());
    assert!(peak > 0.0 && peak < 150.0, "peak RSS {peak:.0} MiB");
    daemon.stop();
}

const TOKEN_A: &str = "token-a-0123456789";
const TOKEN_B: &str = "token-b-0123456789";

/// One hostile or borderline request and the status it must get.
struct Request {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
    status: u16,
    /// Text the answer must contain.
    says: &'static str,
}

fn deploy_body(service: &str, ns: &str, field: &str, value: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"service": service, "namespace": ns, field: value}))
        .expect("json")
}

fn auth(token: &str) -> (&'static str, Vec<u8>) {
    ("authorization", format!("Bearer {token}").into_bytes())
}

fn requests() -> Vec<Request> {
    let ok = |v: &str| deploy_body("api", "prod", "version", v);
    let r = |what, headers, body, status, says| Request {
        what,
        method: "POST",
        path: "/api/v1/deploys",
        headers,
        body,
        status,
        says,
    };
    vec![
        r(
            "lower-case bearer",
            vec![("authorization", format!("bearer {TOKEN_A}").into_bytes())],
            ok("1.0.1"),
            202,
            "\"id\"",
        ),
        r(
            "upper-case BEARER",
            vec![("authorization", format!("BEARER {TOKEN_A}").into_bytes())],
            ok("1.0.2"),
            202,
            "\"id\"",
        ),
        r(
            "basic scheme",
            vec![("authorization", b"Basic dXNlcjpwYXNz".to_vec())],
            ok("1.0.3"),
            401,
            "Bearer",
        ),
        r(
            "empty bearer",
            vec![("authorization", b"Bearer ".to_vec())],
            ok("1.0.3"),
            401,
            "Bearer",
        ),
        r(
            "wrong token",
            vec![auth("token-x-0123456789")],
            ok("1.0.3"),
            401,
            "not valid",
        ),
        r(
            "token prefix",
            vec![auth(&TOKEN_A[..10])],
            ok("1.0.3"),
            401,
            "not valid",
        ),
        r(
            "non-ASCII key",
            vec![
                auth(TOKEN_A),
                ("idempotency-key", "ключ".as_bytes().to_vec()),
            ],
            ok("1.0.3"),
            400,
            "printable ASCII",
        ),
        r(
            "tab in key",
            vec![auth(TOKEN_A), ("idempotency-key", b"a\tb".to_vec())],
            ok("1.0.3"),
            400,
            "printable ASCII",
        ),
        r(
            "long key",
            vec![auth(TOKEN_A), ("idempotency-key", vec![b'k'; 201])],
            ok("1.0.3"),
            400,
            "longer than 200",
        ),
        r(
            "namespace out of bounds",
            vec![auth(TOKEN_A)],
            deploy_body("kube-proxy", "kube-system", "version", "1.0.0"),
            403,
            "not one depwatch may deploy to",
        ),
        r(
            "image out of bounds",
            vec![auth(TOKEN_A)],
            deploy_body("api", "prod", "image", "evil.example.net/x:1"),
            403,
            "evil.example.net/x",
        ),
        r(
            "body over 64 KiB",
            vec![auth(TOKEN_A)],
            vec![b' '; 70 * 1024],
            413,
            "larger than",
        ),
        r(
            "not JSON",
            vec![auth(TOKEN_A)],
            b"{\"service\":".to_vec(),
            400,
            "not valid JSON",
        ),
        r(
            "unknown field",
            vec![auth(TOKEN_A)],
            br#"{"service":"api","namespace":"prod","version":"1","x":1}"#.to_vec(),
            422,
            "invalid deploy request",
        ),
        r(
            "space in version",
            vec![auth(TOKEN_A)],
            ok("1.0 .4"),
            422,
            "contains spaces",
        ),
        r(
            "5 MB value",
            vec![auth(TOKEN_A)],
            ok(&"9".repeat(5 << 20)),
            413,
            "larger than",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_answers_and_cost_nothing() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    env.write_dep("api_prod.dep", "1.0.0\n");
    let tokens = env.dir.path().join("tokens");
    std::fs::write(&tokens, format!("a:{TOKEN_A}\nb:{TOKEN_B}\n")).expect("tokens");
    let daemon = env
        .daemon(&[
            "--api-token-file",
            tokens.to_str().expect("utf-8"),
            "--namespaces",
            "prod",
            "--allowed-images",
            "example.com/*",
        ])
        .await;
    let url = daemon.http_url();
    let http = reqwest::Client::new();
    let table = requests();
    assert!(table.len() >= 15);
    for req in &table {
        let mut b = http.request(
            req.method.parse().expect("method"),
            format!("{url}{}", req.path),
        );
        for (name, value) in &req.headers {
            b = b.header(
                *name,
                reqwest::header::HeaderValue::from_bytes(value).expect("header"),
            );
        }
        let resp = match b.body(req.body.clone()).send().await {
            Ok(r) => r,
            // The server answers 413 after the cap and closes: a client still sending may see
            // the connection cut instead of the answer. Either way nothing was accepted.
            Err(e) if req.status == 413 && e.is_request() => continue,
            Err(e) => panic!("{}: {e}", req.what),
        };
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, req.status, "{}: {text}", req.what);
        assert!(text.contains(req.says), "{}: {text}", req.what);
    }
    // Nothing refused reached a file: the file holds the last accepted version.
    wait_for("the accepted requests", Duration::from_secs(20), || async {
        (env.image("prod", "api").await == "example.com/api:1.0.2").then_some(())
    })
    .await;
    assert!(!env.deps.join("kube-proxy_kube-system.dep").exists());

    // Idempotency keys are scoped per token: the same key from two holders is two requests;
    // from one holder with another body it is a conflict.
    let post = |token: &'static str, key: &'static str, version: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            http.post(format!("{url}/api/v1/deploys"))
                .bearer_auth(token)
                .header("Idempotency-Key", key)
                .body(deploy_body("api", "prod", "version", version))
                .send()
                .await
                .expect("post")
        }
    };
    let a = post(TOKEN_A, "release-7", "1.1.0").await;
    assert_eq!(a.status().as_u16(), 202);
    let a: serde_json::Value = a.json().await.expect("json");
    let b = post(TOKEN_B, "release-7", "1.1.1").await;
    assert_eq!(b.status().as_u16(), 202, "another holder's key is its own");
    let b: serde_json::Value = b.json().await.expect("json");
    assert_ne!(a["id"], b["id"]);
    let again = post(TOKEN_A, "release-7", "1.1.0").await;
    let again: serde_json::Value = again.json().await.expect("json");
    assert_eq!(again["id"], a["id"], "the same request again");
    assert_eq!(
        post(TOKEN_A, "release-7", "1.2.0").await.status().as_u16(),
        409
    );

    // A FIFO planted at the file cannot stall the unauthenticated request view.
    let id = b["id"].as_str().expect("id").to_string();
    wait_for(
        "the last request to settle",
        Duration::from_secs(20),
        || async {
            let v: serde_json::Value = http
                .get(format!("{url}/api/v1/requests/{id}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["status"] != "pending").then_some(())
        },
    )
    .await;
    std::fs::remove_file(env.deps.join("api_prod.dep")).expect("rm");
    mkfifo(&env.deps.join("api_prod.dep"));
    let view = tokio::time::timeout(
        Duration::from_secs(5),
        http.get(format!("{url}/api/v1/requests/{id}")).send(),
    )
    .await
    .expect("the request view answers with a FIFO in place")
    .expect("view");
    assert_eq!(view.status().as_u16(), 200);
    std::fs::remove_file(env.deps.join("api_prod.dep")).expect("rm fifo");

    // The old predictable temporary names, planted as links to a victim, are never followed.
    let victim = env.dir.path().join("victim");
    std::fs::write(&victim, "untouched").expect("victim");
    let pid = daemon.pid();
    for name in [
        format!(".api_prod.dep.depwatch-{pid}"),
        ".api_prod.dep.tmp".into(),
    ] {
        symlink(&victim, env.deps.join(name)).expect("plant");
    }
    assert_eq!(
        post(TOKEN_A, "release-8", "1.3.0").await.status().as_u16(),
        202
    );
    env.wait_image("prod", "api", "example.com/api:1.3.0").await;
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "untouched"
    );

    // Event streams are capped; the cap answers 503, and other routes still work.
    let mut streams = Vec::new();
    for _ in 0..depwatch::http::MAX_EVENT_STREAMS {
        let s = http
            .get(format!("{url}/api/v1/events"))
            .send()
            .await
            .expect("stream");
        assert_eq!(s.status().as_u16(), 200);
        streams.push(s);
    }
    let over = http
        .get(format!("{url}/api/v1/events"))
        .send()
        .await
        .expect("over");
    assert_eq!(over.status().as_u16(), 503);
    drop(streams);
    wait_for("a stream slot to free", Duration::from_secs(10), || async {
        let s = http.get(format!("{url}/api/v1/events")).send().await.ok()?;
        (s.status().as_u16() == 200).then_some(())
    })
    .await;

    // A client that never finishes its headers is cut off; the server keeps serving.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("partial");
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a slow-loris connection is closed by the header timeout"
    );
    let health = http
        .get(format!("{url}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert!(health.status().is_success());

    // Tokens are never logged.
    let log = daemon.log_text();
    assert!(
        !log.contains(TOKEN_A) && !log.contains(TOKEN_B),
        "a token was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_survives_its_directory_being_deleted_replaced_or_swapped() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    // A git-sync layout: the root given to depwatch is a symlink swapped to each checkout.
    let base = env.dir.path().join("git");
    let checkout = |rev: &str, web: &str| {
        let d = base.join(format!(".worktrees/{rev}"));
        std::fs::create_dir_all(&d).expect("checkout");
        std::fs::write(d.join("web_prod.dep"), web).expect("web");
        std::fs::write(d.join("api_prod.dep"), "1.0.0\n").expect("api");
        d
    };
    let link = base.join("deps");
    symlink(checkout("r1", "1.0.1\n"), &link).expect("link");
    let args = [
        "run".to_string(),
        "--deps".into(),
        link.display().to_string(),
        "--state-dir".into(),
        env.state.display().to_string(),
        "--kubeconfig".into(),
        env.kubeconfig.display().to_string(),
        "--resync".into(),
        "1h".into(),
    ];
    let daemon = env.daemon_with(&args, &[], env.dir.path()).await;
    env.wait_image("prod", "web", "example.com/web:1.0.1").await;
    let url = daemon.http_url();
    let http = reqwest::Client::new();

    // Swap the root link atomically, as git-sync does.
    let r2 = checkout("r2", "1.0.2\n");
    let tmp = base.join("deps.tmp");
    symlink(&r2, &tmp).expect("tmp link");
    std::fs::rename(&tmp, &link).expect("swap");
    env.wait_image("prod", "web", "example.com/web:1.0.2").await;
    // The old checkout is gone; changes in the new one are seen by the new watch.
    std::fs::remove_dir_all(base.join(".worktrees/r1")).expect("rm r1");
    std::fs::write(r2.join("web_prod.dep"), "1.0.3\n").expect("edit");
    env.wait_image("prod", "web", "example.com/web:1.0.3").await;

    let web_key = depwatch::domain::ServiceKey::new("web", "prod").expect("key");
    wait_for("web 1.0.3 healthy", Duration::from_secs(30), || async {
        let r = env.store().service(&web_key).await.ok()??;
        (r.status.as_str() == "succeeded" && r.deployed.to_string().contains("1.0.3")).then_some(())
    })
    .await;

    // The root disappears: not ready, with the reason; nothing is forgotten.
    std::fs::remove_file(&link).expect("rm link");
    let reason = wait_for(
        "/readyz to say the directory is missing",
        Duration::from_secs(10),
        || async {
            let r = http.get(format!("{url}/readyz")).send().await.ok()?;
            let code = r.status().as_u16();
            let text = r.text().await.ok()?;
            (code == 503 && text.contains("is missing")).then_some(text)
        },
    )
    .await;
    assert!(reason.contains("deps"), "{reason}");
    let store = env.store();
    let web = store.service(&web_key).await;
    assert_eq!(
        web.expect("store").expect("record").status.as_str(),
        "succeeded",
        "a missing directory forgets nothing"
    );

    // Recreated as a plain directory with a new version: watched again at once.
    std::fs::create_dir(&link).expect("mkdir");
    std::fs::write(link.join("web_prod.dep"), "1.0.4\n").expect("web");
    std::fs::write(link.join("api_prod.dep"), "1.0.0\n").expect("api");
    env.wait_image("prod", "web", "example.com/web:1.0.4").await;
    wait_for("/readyz ok again", Duration::from_secs(10), || async {
        let r = http.get(format!("{url}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    std::fs::write(link.join("api_prod.dep"), "1.0.5\n").expect("api");
    env.wait_image("prod", "api", "example.com/api:1.0.5").await;

    // Replaced by rename: the old directory moved away, a new one moved in.
    let fresh = env.dir.path().join("fresh");
    std::fs::create_dir(&fresh).expect("fresh");
    std::fs::write(fresh.join("web_prod.dep"), "1.0.6\n").expect("web");
    std::fs::write(fresh.join("api_prod.dep"), "1.0.5\n").expect("api");
    std::fs::rename(&link, env.dir.path().join("old")).expect("move away");
    std::fs::rename(&fresh, &link).expect("move in");
    env.wait_image("prod", "web", "example.com/web:1.0.6").await;
    assert_eq!(env.patches("prod", "api"), 1, "api changed once: 1.0.5");
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    // A directory and database left world-readable by a lax umask or an old version.
    std::fs::create_dir(&env.state).expect("state");
    std::fs::set_permissions(&env.state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::write(env.state.join("depwatch.db"), b"").expect("db");
    std::fs::set_permissions(
        env.state.join("depwatch.db"),
        std::fs::Permissions::from_mode(0o666),
    )
    .expect("chmod");
    env.write_dep("web_prod.dep", "1.0.1\n");
    let daemon = env.daemon(&[]).await;
    env.wait_image("prod", "web", "example.com/web:1.0.1").await;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&env.state), 0o700);
    // Files are 0600, directories (the read-barrier's) 0700: nobody else reads either.
    for entry in std::fs::read_dir(&env.state).expect("list").flatten() {
        let want = if entry.path().is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&entry.path()), want, "{}", entry.path().display());
    }
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_service_resumes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new(SimConfig::default()).await;
    let daemon = env.daemon(&["--http-max-connections", "3"]).await;
    let addr = daemon.http_url().trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    // Beyond the cap, the connections kept for probes answer /healthz and /readyz only.
    let probe = |path: &'static str| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            String::from_utf8_lossy(&buf).into_owned()
        }
    };
    let healthz = probe("/healthz").await;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    let busy = probe("/api/v1/services").await;
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    assert!(busy.contains("probes"), "{busy}");
    for _ in 0..depwatch::http::PROBE_RESERVE {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    // The server holds the cap and the reserve; one more is closed at once, unanswered.
    let mut extra = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the excess connection is closed unanswered: {:?}",
        String::from_utf8_lossy(&buf)
    );
    // A slot frees when a client leaves; the daemon serves again.
    idle.clear();
    let http = reqwest::Client::new();
    let url = daemon.http_url();
    wait_for(
        "a request to be served again",
        Duration::from_secs(10),
        || async {
            let r = http.get(format!("{url}/healthz")).send().await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    assert!(daemon.log_text().contains("too many HTTP connections"));
    daemon.stop();
}

/// How to start the daemon so that file permissions apply to it: as root (which reads and
/// writes everything) through setpriv as `nobody`, else directly. The binary is copied where
/// that user can run it, and the environment's directory and kubeconfig are opened to it.
fn unprivileged(env: &Env) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let open = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    open(env.dir.path(), 0o777);
    open(&env.kubeconfig, 0o644);
    let binary = env.dir.path().join("depwatch");
    std::fs::copy(env!("CARGO_BIN_EXE_depwatch"), &binary).expect("copy binary");
    let binary = binary.display().to_string();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ]
        .map(String::from)
        .into_iter()
        .chain([binary])
        .collect()
    } else {
        vec![binary]
    }
}

fn unprivileged_args(env: &Env) -> Vec<String> {
    [
        "run",
        "--deps",
        env.deps.to_str().expect("utf-8"),
        "--state-dir",
        env.dir.path().join("state-nobody").to_str().expect("utf-8"),
        "--kubeconfig",
        env.kubeconfig.to_str().expect("utf-8"),
        "--resync",
        "1h",
    ]
    .map(String::from)
    .to_vec()
}

/// A file unreadable at start-up is reported as such, and read as soon as a chmod makes it
/// readable (no save, no resync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_file_is_reported_and_read_once_permissions_allow() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    std::fs::set_permissions(&env.deps, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let program = unprivileged(&env);
    let dep = env.deps.join("web_prod.dep");
    std::fs::write(&dep, "1.0.1\n").expect("write");
    std::fs::set_permissions(&dep, std::fs::Permissions::from_mode(0o000)).expect("chmod 000");
    let program: Vec<&str> = program.iter().map(String::as_str).collect();
    let daemon = env
        .daemon_via(&program, &unprivileged_args(&env), &[], env.dir.path())
        .await;
    let url = daemon.http_url();
    let http = reqwest::Client::new();
    let view = wait_for("web to be unreadable", Duration::from_secs(20), || async {
        let v: serde_json::Value = http
            .get(format!("{url}/api/v1/services/prod/web"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (v["service"]["status"] == "unreadable").then_some(v)
    })
    .await;
    let message = view["service"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("web_prod.dep") && message.contains("ermission denied"),
        "{message}"
    );
    assert_eq!(env.patches("prod", "web"), 0);
    std::fs::set_permissions(&dep, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
    env.wait_image("prod", "web", "example.com/web:1.0.1").await;
    daemon.stop();
}

/// A read-only dependency directory (a ConfigMap volume, a read-only mount): API deploy
/// requests answer 409 with a hint, not 500, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_writes_to_a_read_only_directory_answer_409_with_a_hint() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.write_dep("web_prod.dep", "1.0.0\n");
    let program = unprivileged(&env);
    std::fs::set_permissions(&env.deps, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let tokens = env.dir.path().join("tokens");
    std::fs::write(&tokens, format!("a:{TOKEN_A}\n")).expect("tokens");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut args = unprivileged_args(&env);
    args.extend(["--api-token-file".to_string(), tokens.display().to_string()]);
    let program: Vec<&str> = program.iter().map(String::as_str).collect();
    let daemon = env.daemon_via(&program, &args, &[], env.dir.path()).await;
    let url = daemon.http_url();
    let resp = reqwest::Client::new()
        .post(format!("{url}/api/v1/deploys"))
        .bearer_auth(TOKEN_A)
        .body(deploy_body("web", "prod", "version", "1.0.1"))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 409);
    let text = resp.text().await.expect("body");
    assert!(text.contains("read-only"), "{text}");
    assert!(text.contains("ConfigMap"), "{text}");
    assert_eq!(
        std::fs::read_to_string(env.deps.join("web_prod.dep")).expect("read"),
        "1.0.0\n"
    );
    assert_eq!(env.patches("prod", "web"), 0);
    daemon.stop();
}

/// 100,000 files refused for their names: the page and the API answer one bounded page each,
/// and 50 page loads at once keep the daemon's memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_refused_files_cost_one_page_each_load() {
    const FILES: usize = 100_000;
    let env = common::daemon::Env::new(depwatch::sim::SimConfig::default()).await;
    for i in 0..FILES {
        std::fs::write(env.deps.join(format!("bad-name-{i:06}.dep")), "").expect("file");
    }
    let daemon = env.daemon(&[]).await;
    let url = daemon.http_url();
    let http = reqwest::Client::new();
    common::wait_for(
        "every file refused",
        std::time::Duration::from_secs(300),
        || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http
                    .get(format!("{url}/api/v1/refused-files?limit=1"))
                    .send()
                    .await
                    .ok()?;
                let total: usize = r
                    .headers()
                    .get("x-total-count")?
                    .to_str()
                    .ok()?
                    .parse()
                    .ok()?;
                (total == FILES).then_some(())
            }
        },
    )
    .await;
    let r = http
        .get(format!("{url}/api/v1/refused-files"))
        .send()
        .await
        .expect("get");
    let link = r
        .headers()
        .get("link")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let page: Vec<serde_json::Value> = r.json().await.expect("json");
    assert_eq!(page.len(), 100, "a default page");
    let next = link.expect("a next page");
    assert!(
        next.contains("after=") && next.contains("rel=\"next\""),
        "{next}"
    );
    let loads = (0..50).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let page = http.get(format!("{url}/")).send().await.expect("page");
            page.bytes().await.expect("body").len()
        }
    });
    let sizes = futures::future::join_all(loads).await;
    assert!(sizes.iter().all(|s| *s < 512 * 1024), "{:?}", &sizes[..3]);
    let peak = common::peak_rss_mib(daemon.pid());
    assert!(peak < 300.0, "peak RSS {peak:.0} MiB");
}
