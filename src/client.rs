//! The operator commands as the CLI runs them: against the local record, or a running daemon's
//! API with `--api URL --token-file F`. Both print the same views the same way.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::cli::{Output, ServiceArgs, Target};
use crate::domain::approval::Vote;
use crate::domain::{Images, ServiceKey, VoteKind, WorkloadKind};
use crate::http::api::{Accepted, ServiceDetail, ServiceView};
use crate::operator::{self, Caller};
use crate::store::{DeployRecord, Store};

/// An operator command that did not work; the message says why and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

impl From<crate::store::StoreError> for ClientError {
    fn from(e: crate::store::StoreError) -> Self {
        ClientError(e.to_string())
    }
}

impl From<operator::OperatorError> for ClientError {
    fn from(e: operator::OperatorError) -> Self {
        ClientError(e.to_string())
    }
}

/// A running daemon's API.
pub struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// `:8080`, `host:8080` or a full URL, as a base URL.
pub fn api_base(api: &str) -> String {
    let api = api.trim().trim_end_matches('/');
    if api.contains("://") {
        api.to_string()
    } else if let Some(port) = api.strip_prefix(':') {
        format!("http://127.0.0.1:{port}")
    } else {
        format!("http://{api}")
    }
}

/// The token in a client token file: the token alone, or the first `name:token` line of a
/// daemon's token file. Comments and blank lines are skipped.
pub fn read_token(path: &Path) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ClientError(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| ClientError(format!("the token file {} is empty", path.display())))?;
    let token = line.split_once(':').map_or(line, |(_, t)| t.trim());
    if token.is_empty() {
        return Err(ClientError(format!(
            "the token file {} has no token after the name",
            path.display()
        )));
    }
    Ok(token.to_string())
}

impl Remote {
    pub fn new(api: &str, token_file: Option<&Path>) -> Result<Remote, ClientError> {
        let token = token_file.map(read_token).transpose()?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("depwatch/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError(format!("cannot build an HTTP client: {e}")))?;
        Ok(Remote {
            base: api_base(api),
            token,
            http,
        })
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        what: &str,
        sent: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ClientError> {
        let base = &self.base;
        let resp =
            sent.map_err(|e| ClientError(format!("cannot reach the depwatch API at {base}: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            // The server's words may carry what came from outside (a tag, a file name):
            // shown, never obeyed by the terminal.
            let why = crate::safefs::escape(
                &serde_json::from_str::<crate::http::ErrorBody>(&body)
                    .map(|e| e.error)
                    .unwrap_or(body),
            );
            let hint = if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
                " (changes need --token-file)"
            } else {
                ""
            };
            return Err(ClientError(format!(
                "the depwatch API at {base} answered {status} to {what}: {why}{hint}"
            )));
        }
        resp.json().await.map_err(|e| {
            ClientError(format!(
                "the depwatch API at {base} sent unexpected JSON for {what}: {e}"
            ))
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let sent = self.http.get(format!("{}{path}", self.base)).send().await;
        self.answer(&format!("GET {path}"), sent).await
    }

    /// A page of a list, and the path of the next page when the answer's `Link` names one.
    async fn get_page<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(T, Option<String>), ClientError> {
        let sent = self.http.get(format!("{}{path}", self.base)).send().await;
        let next = sent.as_ref().ok().and_then(|r| {
            r.headers()
                .get_all(reqwest::header::LINK)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(link_next)
        });
        Ok((self.answer(&format!("GET {path}"), sent).await?, next))
    }

    async fn post(&self, path: &str) -> Result<String, ClientError> {
        let mut req = self.http.post(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let sent = req.send().await;
        let accepted: Accepted = self.answer(&format!("POST {path}"), sent).await?;
        Ok(accepted.message)
    }
}

/// The local record, read-only.
fn reading(t: &Target) -> Result<Store, ClientError> {
    Ok(Store::open_for_reading(
        &t.state_dir,
        t.database_url.as_deref(),
    )?)
}

/// The local record, to change.
async fn writing(t: &Target) -> Result<Store, ClientError> {
    Ok(Store::open_for_writing(&t.state_dir, t.database_url.as_deref()).await?)
}

fn remote(t: &Target) -> Result<Option<Remote>, ClientError> {
    t.api
        .as_deref()
        .map(|api| Remote::new(api, t.token_file.as_deref()))
        .transpose()
}

/// Every service, as the API shows them (a local read never asks the cluster what runs).
pub async fn services(t: &Target) -> Result<Vec<ServiceView>, ClientError> {
    if let Some(r) = remote(t)? {
        return all_pages(&r).await;
    }
    let store = reading(t)?;
    let mut out = Vec::new();
    for record in store.services().await? {
        let last = store
            .history(Some(&record.key()), 1)
            .await?
            .into_iter()
            .next();
        // Without the daemon's watch, what runs is what the record last saw running (drift
        // since is recorded by the daemon as it happens).
        let running = record.deployed.clone();
        out.push(ServiceView::new(record, running, last));
    }
    Ok(out)
}

/// Services asked for per page when `status` reads them through the API.
const SERVICES_PAGE: usize = 1000;

/// The path of a `Link` header's `rel="next"` target, if it names one on this server (a
/// path, never another host).
pub fn link_next(header: &str) -> Option<String> {
    header.split(',').find_map(|link| {
        let (target, params) = link.trim().split_once(';')?;
        let path = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let next = params.split(';').any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_whitespace()
                        .any(|r| r == "next")
            })
        });
        (next && path.starts_with('/') && !path.starts_with("//")).then(|| path.to_string())
    })
}

/// Every service, page after page as the API's `Link` headers lead: `status` lists them all,
/// as an operator expects, while each answer stays one page. A page that adds no service
/// ends the walk (a server that ignores paging is read once, never in a loop).
async fn all_pages(r: &Remote) -> Result<Vec<ServiceView>, ClientError> {
    let mut out: Vec<ServiceView> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut path = Some(format!("/api/v1/services?limit={SERVICES_PAGE}"));
    while let Some(p) = path {
        let (rows, next): (Vec<ServiceView>, _) = r.get_page(&p).await?;
        let before = out.len();
        out.extend(
            rows.into_iter()
                .filter(|v| seen.insert((v.namespace.clone(), v.name.clone()))),
        );
        path = next.filter(|_| out.len() > before);
    }
    Ok(out)
}

/// Refused file names `status` lists at most.
pub const REFUSED_SHOWN: usize = 50;

/// The first files in the dependency directory refused for their names (at most
/// [`REFUSED_SHOWN`], plus one to tell that there are more).
pub async fn refused_files(t: &Target) -> Result<Vec<crate::store::RefusedFile>, ClientError> {
    let limit = REFUSED_SHOWN + 1;
    if let Some(r) = remote(t)? {
        return r.get(&format!("/api/v1/refused-files?limit={limit}")).await;
    }
    Ok(reading(t)?.refused_page("", limit).await?.0)
}

/// The refused files, for the end of `status`'s table: the first [`REFUSED_SHOWN`].
pub fn render_refused(files: &[crate::store::RefusedFile]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let mut out =
        String::from("\nRefused file names (nothing is read from them; rename or remove them):\n");
    for f in files.iter().take(REFUSED_SHOWN) {
        out.push_str(&format!("  {}\n", crate::safefs::escape(&f.reason)));
    }
    if files.len() > REFUSED_SHOWN {
        out.push_str("  … and more: GET /api/v1/refused-files (paged) lists them all\n");
    }
    out
}

/// A service's deploys, newest first, and the kind of its workload; an unknown service is an
/// error.
pub async fn history(
    t: &Target,
    key: &ServiceKey,
    limit: usize,
) -> Result<(WorkloadKind, Vec<DeployRecord>), ClientError> {
    if let Some(r) = remote(t)? {
        let deploys = remote_history(&r, key, limit).await?;
        // A forgotten service's history is kept: its rows answer without the service.
        let detail: Result<ServiceDetail, _> = r
            .get(&format!("/api/v1/services/{}/{}", key.namespace, key.name))
            .await;
        return match (detail, deploys.first()) {
            (Ok(d), _) => Ok((d.service.kind, deploys)),
            (Err(_), Some(row)) => Ok((row_kind(row), deploys)),
            (Err(e), None) => Err(e),
        };
    }
    let store = reading(t)?;
    let history = store.history(Some(key), limit).await?;
    match (store.service(key).await?, history.first()) {
        (Some(record), _) => Ok((record.kind, history)),
        (None, Some(row)) => Ok((row_kind(row), history)),
        (None, None) => Err(ClientError(format!(
            "service {key} is not in the record and has no history (see `depwatch status` for the services depwatch manages)"
        ))),
    }
}

/// Up to `limit` deploys of a service through the API, newest first, page after page (a
/// page holds at most 1000).
async fn remote_history(
    r: &Remote,
    key: &ServiceKey,
    limit: usize,
) -> Result<Vec<DeployRecord>, ClientError> {
    let mut out: Vec<DeployRecord> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut path = Some(format!(
        "/api/v1/deploys?service={}/{}&limit={}",
        key.namespace,
        key.name,
        limit.clamp(1, 1000)
    ));
    while let Some(p) = path.filter(|_| out.len() < limit) {
        let (rows, next): (Vec<DeployRecord>, _) = r.get_page(&p).await?;
        let before = out.len();
        out.extend(rows.into_iter().filter(|d| seen.insert(d.id)));
        path = next.filter(|_| out.len() > before);
    }
    out.truncate(limit);
    Ok(out)
}

/// The kind a history row names (a Deployment when the row predates kinds).
fn row_kind(row: &DeployRecord) -> WorkloadKind {
    row.kind.parse().unwrap_or_default()
}

/// The line above `history`'s table: which workload, where.
pub fn history_heading(key: &ServiceKey, kind: WorkloadKind) -> String {
    format!(
        "{} in {}\n",
        crate::domain::Shown(kind, &key.name),
        key.namespace
    )
}

/// An operator action.
#[derive(Debug, Clone)]
pub enum Action {
    Retry,
    Rollback {
        to: Option<i64>,
    },
    Promote,
    /// Break-glass, with the reason.
    DeployNow(String),
    /// An approver's word on the save awaiting approval, with a comment.
    Vote(VoteKind, String),
    Suspend,
    Resume,
    Forget,
}

/// Run an action locally or through the API; the answer says what happens next.
pub async fn act(a: &ServiceArgs, action: Action) -> Result<String, ClientError> {
    let key = a.key().map_err(ClientError)?;
    if let Some(r) = remote(&a.target)? {
        let base = format!("/api/v1/services/{}/{}", key.namespace, key.name);
        let path = match &action {
            Action::Retry => format!("{base}/retry"),
            Action::Rollback { to: None } => format!("{base}/rollback"),
            Action::Rollback { to: Some(id) } => format!("{base}/rollback?to={id}"),
            Action::Promote => format!("{base}/promote"),
            Action::DeployNow(reason) => {
                let q: String = form_urlencoded::Serializer::new(String::new())
                    .append_pair("reason", reason)
                    .finish();
                format!("{base}/deploy-now?{q}")
            }
            Action::Vote(kind, comment) => {
                let q: String = form_urlencoded::Serializer::new(String::new())
                    .append_pair("comment", comment)
                    .finish();
                let verb = match kind {
                    VoteKind::Reject => "reject",
                    _ => "approve",
                };
                format!("{base}/{verb}?{q}")
            }
            Action::Suspend => format!("{base}/suspend"),
            Action::Resume => format!("{base}/resume"),
            Action::Forget => format!("{base}/forget"),
        };
        return r.post(&path).await;
    }
    let store = writing(&a.target).await?;
    // An approval is a control: its approver is the Unix user running the command, not
    // whatever `$USER` says.
    let actor = match action {
        Action::Vote(..) => crate::safefs::current_user(),
        _ => operator::local_actor(),
    };
    let caller = Caller {
        actor: &actor,
        root: None,
    };
    Ok(match action {
        Action::Retry => operator::retry(&store, &key, caller).await?,
        Action::Rollback { to } => operator::rollback(&store, &key, to, caller).await?,
        Action::Promote => operator::promote(&store, &key, caller).await?,
        Action::DeployNow(reason) => operator::deploy_now(&store, &key, &reason, caller).await?,
        Action::Vote(kind, comment) => operator::vote(&store, &key, kind, &comment, caller).await?,
        Action::Suspend => operator::suspend(&store, &key, true, caller).await?,
        Action::Resume => operator::suspend(&store, &key, false, caller).await?,
        Action::Forget => operator::forget(&store, &key, caller).await?,
    })
}

/// Images for a table cell: the image alone for one container, `-` for none.
fn cell(images: &Images) -> String {
    images.cell()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.replace(['\n', '\r'], " ")
    }
}

/// Columns padded to their widest cell.
pub fn table(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| crate::safefs::escape(c)).collect())
        .collect();
    let columns = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        // Cells hold what came from outside (tags, reasons, file names): shown, never acted on.
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn structured<T: serde::Serialize>(value: &T, output: Output) -> Result<String, ClientError> {
    let text = match output {
        Output::Yaml => serde_saphyr::to_string(value)
            .map_err(|e| ClientError(format!("cannot print YAML: {e}")))?,
        _ => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| ClientError(format!("cannot print JSON: {e}")))?,
    };
    Ok(structured_escapes(&text))
}

/// JSON or YAML text with every character a terminal would act on or hide
/// ([`crate::safefs::hidden`]: escape sequences, DEL, C1 controls, bidirectional and
/// zero-width characters) written as a `\uXXXX` escape; the layout's newlines and tabs stay.
/// In JSON, and in YAML's double-quoted strings, the escape is the same character (the output
/// still parses to the same values); elsewhere in YAML it is shown as written. The encoders
/// escape some of these and leave the rest (bidirectional controls, C1) raw.
pub fn structured_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if crate::safefs::hidden(c) => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// `depwatch status` output.
pub fn render_services(services: &[ServiceView], output: Output) -> Result<String, ClientError> {
    if matches!(output, Output::Json | Output::Yaml) {
        return structured(&services, output);
    }
    let wide = output == Output::Wide;
    let mut head = vec![
        "SERVICE",
        "KIND",
        "STATUS",
        "DESIRED",
        "DEPLOYED",
        "PINNED",
        "SUSPENDED",
    ];
    if wide {
        head.extend(["RUNNING", "LAST GOOD", "UPDATED"]);
    }
    head.push("REASON");
    if wide {
        head.push("NEXT STEP");
    }
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for s in services {
        let mut row = vec![
            s.key(),
            s.kind.to_string(),
            s.status_shown(),
            match s.desired_cell() {
                (shown, Some(why)) => format!("{shown} ({why})"),
                (shown, None) => shown,
            },
            cell(&s.deployed),
            cell(&s.pinned),
            if s.suspended { "yes" } else { "no" }.into(),
        ];
        if wide {
            row.extend([cell(&s.running), cell(&s.last_good), or_dash(&s.updated_at)]);
        }
        row.push(or_dash(&s.message));
        if wide {
            row.push(or_dash(&s.next_step));
        }
        rows.push(row);
    }
    Ok(table(&rows))
}

/// `depwatch history` output.
pub fn render_history(history: &[DeployRecord], output: Output) -> Result<String, ClientError> {
    if matches!(output, Output::Json | Output::Yaml) {
        return structured(&history, output);
    }
    let wide = output == Output::Wide;
    let mut head = vec!["ID", "STARTED", "OUTCOME", "TRIGGER"];
    if wide {
        head.extend(["ACTOR", "ENDED", "REQUEST"]);
    }
    head.extend(["FROM", "TO", "MESSAGE"]);
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for d in history {
        let mut row = vec![
            d.id.to_string(),
            d.started_at.clone(),
            d.outcome.to_string(),
            d.trigger.to_string(),
        ];
        if wide {
            row.extend([
                or_dash(&d.actor),
                or_dash(d.ended_at.as_deref().unwrap_or_default()),
                or_dash(&d.request_id),
            ]);
        }
        row.extend([
            cell(&Images::parse(&d.from_image)),
            cell(&Images::parse(&d.to_image)),
            or_dash(&d.message),
        ]);
        rows.push(row);
    }
    Ok(table(&rows))
}

/// The service's latest approval rows (requests, approvals, rejections), oldest first.
pub async fn approvals(t: &Target, key: &ServiceKey) -> Result<Vec<Vote>, ClientError> {
    if let Some(r) = remote(t)? {
        return r
            .get(&format!(
                "/api/v1/services/{}/{}/approvals",
                key.namespace, key.name
            ))
            .await;
    }
    Ok(reading(t)?.votes(key).await?)
}

/// The approvals part of `history`: who asked, approved and rejected what, newest first, at
/// most `limit` rows; empty when the service never needed approval.
pub fn render_approvals(votes: &[Vote], limit: usize) -> String {
    let shown: Vec<&Vote> = votes
        .iter()
        .rev()
        .filter(|v| v.kind != VoteKind::Recorded)
        .take(limit)
        .collect();
    if shown.is_empty() {
        return String::new();
    }
    let head = ["AT", "WORD", "BY", "ASKS", "CONTENT", "COMMENT"];
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for v in shown {
        rows.push(vec![
            v.at.clone(),
            v.kind.to_string(),
            or_dash(&v.actor),
            or_dash(&v.images),
            or_dash(v.hash.get(..12).unwrap_or(&v.hash)),
            or_dash(&v.comment),
        ]);
    }
    format!("\nApprovals, newest first:\n{}", table(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_addresses_are_written_like_listen_addresses() {
        assert_eq!(api_base(":8080"), "http://127.0.0.1:8080");
        assert_eq!(api_base("10.0.0.5:8080/"), "http://10.0.0.5:8080");
        assert_eq!(api_base("https://dw.example"), "https://dw.example");
    }

    #[test]
    fn a_token_file_holds_a_token_or_a_named_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t");
        for (text, want) in [
            ("s3cret-token\n", "s3cret-token"),
            ("# mine\nci:s3cret-token\nother:x\n", "s3cret-token"),
        ] {
            std::fs::write(&p, text).expect("write");
            assert_eq!(read_token(&p).expect(text), want);
        }
        std::fs::write(&p, "\n# nothing\n").expect("write");
        assert!(read_token(&p).expect_err("empty").0.contains("is empty"));
    }

    #[test]
    fn the_next_page_is_a_path_on_this_server_named_by_rel_next() {
        for (header, want) in [
            (
                "</api/v1/services?limit=2&after=prod%2Fweb>; rel=\"next\"",
                Some("/api/v1/services?limit=2&after=prod%2Fweb"),
            ),
            ("</a?after=1>;rel=next", Some("/a?after=1")),
            (
                "</first>; rel=\"prev\", </second>; rel=\"prev next\"",
                Some("/second"),
            ),
            ("</a>; rel=\"prev\"", None),
            ("<https://elsewhere.example/a>; rel=\"next\"", None),
            ("<//elsewhere.example/a>; rel=\"next\"", None),
            ("/a; rel=\"next\"", None),
            ("", None),
        ] {
            assert_eq!(link_next(header).as_deref(), want, "{header}");
        }
    }

    #[test]
    fn structured_output_escapes_what_a_terminal_would_obey_and_parses_the_same() {
        for (text, want) in [
            ("[\"plain\"]", "[\"plain\"]"),
            ("[\n\t\"a\\u001b[2K\"\n]", "[\n\t\"a\\u001b[2K\"\n]"),
            ("\"x\u{7f}y\u{9b}z\"", "\"x\\u007Fy\\u009Bz\""),
            ("\"web\u{202e}ved\"", "\"web\\u202Eved\""),
            ("- we\u{200b}b\u{feff}\n", "- we\\u200Bb\\uFEFF\n"),
            ("\"a\rb\"", "\"a\\u000Db\""),
        ] {
            assert_eq!(structured_escapes(text), want, "{text:?}");
        }
        let hostile =
            "1.1\u{1b}[1A\u{1b}[2K \u{1b}]0;pwned\u{7} \u{9b}31m web\u{202e}ved\u{2066}\u{200d}";
        let view = ServiceView {
            namespace: "prod".into(),
            name: "web".into(),
            message: hostile.into(),
            ..ServiceView::default()
        };
        for output in [Output::Json, Output::Yaml] {
            let text = render_services(std::slice::from_ref(&view), output).expect("render");
            assert!(
                !text.chars().any(|c| crate::safefs::hidden(c) && c != '\n'),
                "{output:?}: {text:?}"
            );
        }
        let json = render_services(std::slice::from_ref(&view), Output::Json).expect("json");
        let back: Vec<ServiceView> = serde_json::from_str(&json).expect("json parses");
        assert_eq!(back[0].message, hostile, "JSON keeps the text exactly");
        // YAML quotes a string with control characters in double quotes, where the escape is
        // the character.
        let yaml = render_services(&[view], Output::Yaml).expect("yaml");
        let back: Vec<ServiceView> = serde_saphyr::from_str(&yaml).expect("yaml parses");
        assert_eq!(back[0].message, hostile, "{yaml}");
    }

    #[test]
    fn tables_show_the_pin_and_the_suspension() {
        let view = ServiceView {
            namespace: "prod".into(),
            name: "web".into(),
            status: crate::domain::ServiceStatus::RolledBack,
            desired: Images::parse("web=r/web:2"),
            deployed: Images::parse("web=r/web:1"),
            pinned: Images::parse("web=r/web:2"),
            suspended: true,
            message: "ImagePullBackOff: no such tag\nsecond line".into(),
            next_step: "run it".into(),
            ..ServiceView::default()
        };
        let out = render_services(std::slice::from_ref(&view), Output::Table).expect("table");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        for want in [
            "PINNED",
            "SUSPENDED",
            "REASON",
            "prod/web",
            "rolled_back",
            "r/web:2",
            "yes",
        ] {
            assert!(out.contains(want), "{want}: {out}");
        }
        assert!(!out.contains("NEXT STEP"));
        let wide = render_services(std::slice::from_ref(&view), Output::Wide).expect("wide");
        assert!(
            wide.contains("NEXT STEP") && wide.contains("run it"),
            "{wide}"
        );
        let yaml = render_services(std::slice::from_ref(&view), Output::Yaml).expect("yaml");
        assert!(yaml.contains("pinned: web=r/web:2"), "{yaml}");
        let json = render_services(&[view], Output::Json).expect("json");
        let back: Vec<ServiceView> = serde_json::from_str(&json).expect("json parses");
        assert_eq!(back[0].pinned, Images::parse("web=r/web:2"));
    }
}
