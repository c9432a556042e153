//! The status page: one server-rendered HTML page embedded in the binary, readable without
//! JavaScript and live with it (server-sent events trigger a refresh of the table body).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Html;
use serde::Deserialize;
use utoipa::IntoParams;

use super::api::{view, ServiceView};
use super::HttpState;
use crate::domain::{ServiceStatus, Tone, WorkloadKind};
use crate::store::{DeployRecord, ServiceFilter, ServicesQuery};

/// An image reference escaped, with break opportunities after `/`, `:` and `@` only, so a
/// narrow column wraps it between its parts, never in the middle of a name or a tag.
fn image(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        out.push_str(&esc(c.encode_utf8(&mut [0; 4])));
        if matches!(c, '/' | ':' | '@' | ',') {
            out.push_str("<wbr>");
        }
    }
    out
}

/// Escaped text whose `backticked` parts (commands, in advice and messages) are shown as code.
fn prose(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for (i, part) in s.split('`').enumerate() {
        // Odd parts were between backticks; a lone trailing backtick stays as it is.
        if i % 2 == 1 && s.matches('`').count() > i {
            out.push_str("<code>");
            out.push_str(&esc(part));
            out.push_str("</code>");
        } else {
            if i % 2 == 1 {
                out.push('`');
            }
            out.push_str(&esc(part));
        }
    }
    out
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Shown, not obeyed: a bidirectional control or a zero-width character in a tag or
            // a file name would reorder or hide what the page says.
            c if crate::safefs::hidden(c) => out.push_str(&c.escape_default().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// The colour class of an outcome.
fn tone_class(tone: Tone) -> &'static str {
    match tone {
        Tone::Good => "ok",
        Tone::Bad => "bad",
        Tone::Warning => "warn",
        Tone::Busy => "busy",
        Tone::Neutral => "neutral",
    }
}

/// The colour class of a service's status.
fn status_class(status: ServiceStatus) -> &'static str {
    match status {
        ServiceStatus::Succeeded => "ok",
        ServiceStatus::Failed
        | ServiceStatus::RollbackFailed
        | ServiceStatus::Invalid
        | ServiceStatus::Unreadable
        | ServiceStatus::Rejected => "bad",
        ServiceStatus::RolledBack
        | ServiceStatus::TimedOut
        | ServiceStatus::Drifted
        | ServiceStatus::Unverified
        | ServiceStatus::Missing
        | ServiceStatus::WaitingForApi
        | ServiceStatus::Paused => "warn",
        ServiceStatus::Applied => "neutral",
        ServiceStatus::Deploying | ServiceStatus::Verifying | ServiceStatus::Retry => "busy",
        ServiceStatus::AwaitingApproval => "warn",
        ServiceStatus::Pending | ServiceStatus::Unmanaged | ServiceStatus::Held => "idle",
    }
}

fn duration(d: &DeployRecord) -> String {
    let (Ok(start), Some(Ok(end))) = (
        d.started_at.parse::<jiff::Timestamp>(),
        d.ended_at.as_deref().map(str::parse::<jiff::Timestamp>),
    ) else {
        return "…".into();
    };
    let ms = end.as_millisecond() - start.as_millisecond();
    crate::domain::human_duration(std::time::Duration::from_millis(ms.max(0) as u64))
}

fn short_time(t: &str) -> String {
    t.get(..19).unwrap_or(t).replace('T', " ")
}

/// The last deploy's cell: when, how it ended and how long it took.
fn last_cell(s: &ServiceView) -> String {
    s.last_deploy
        .as_ref()
        .map(|d| {
            format!(
                "{} UTC<br><small>{} · {}</small>",
                esc(&short_time(&d.started_at)),
                esc(d.outcome.label()),
                duration(d)
            )
        })
        .unwrap_or_else(|| "—".into())
}

/// A dot for each recent deploy, coloured by its outcome.
fn dots(history: &[DeployRecord]) -> String {
    history
        .iter()
        .map(|d| {
            format!(
                "<span class=\"dot {}\" title=\"{} {} → {}\"></span>",
                tone_class(d.outcome.tone()),
                esc(d.outcome.label()),
                esc(&short_time(&d.started_at)),
                esc(&d.to_image)
            )
        })
        .collect()
}

fn row(s: &ServiceView, history: &[DeployRecord]) -> String {
    let (last, dots) = (last_cell(s), dots(history));
    // The word the CLI and the API use; the longer words as a tooltip.
    let status = if s.suspended {
        format!("{} (suspended)", s.status.as_str())
    } else {
        s.status_shown()
    };
    let (asks, why) = s.desired_cell();
    let desired = match why {
        _ if !s.pinned.is_empty() => format!(
            "{}<br><small class=\"pin\">pinned: failed, not deployed again until the file changes</small>",
            image(&asks)
        ),
        Some(why) => format!("{}<br><small class=\"pin\">{}</small>", image(&asks), esc(why)),
        None => image(&asks),
    };
    let reason = if s.next_step.is_empty() {
        prose(&s.message)
    } else {
        format!(
            "{}<div class=\"todo\"><b>What to do:</b> {}</div>",
            prose(&s.message),
            prose(&s.next_step)
        )
    };
    let running = if s.running.is_empty() {
        &s.deployed
    } else {
        &s.running
    };
    format!(
        "<tr data-service=\"{ns}/{name}\" data-status=\"{code}\"><td class=\"svc\">{name}<br><small>{ns}{kind}</small></td>\
         <td data-label=\"Status\"><span class=\"badge {tone}\" title=\"{label}\">{status}</span></td>\
         <td class=\"img\" data-label=\"Desired\">{desired}</td>\
         <td class=\"img\" data-label=\"Running\">{running}</td><td data-label=\"Last deploy\">{last}</td>\
         <td class=\"msg\" data-label=\"Reason\">{reason}</td><td data-label=\"Recent\">{dots}</td></tr>",
        ns = esc(&s.namespace),
        name = esc(&s.name),
        kind = match s.kind {
            WorkloadKind::Deployment => String::new(),
            kind => format!(" · {kind}"),
        },
        code = s.status,
        tone = status_class(s.status),
        status = esc(&status),
        running = image(&running.to_string()),
        label = esc(s.status.label()),
    )
}

/// Rows for files refused for their names, after the services (`?status=refused` shows only
/// them).
async fn refused_rows(state: &HttpState, filter: Option<&str>) -> String {
    if filter.is_some_and(|f| f != "refused") {
        return String::new();
    }
    // The first page only, whatever the number of files: the rest through the paged API.
    let (files, total) = state
        .store
        .refused_page("", REFUSED_ON_PAGE)
        .await
        .unwrap_or_default();
    let more = match total.saturating_sub(files.len()) {
        0 => String::new(),
        n => format!(
            "<tr data-status=\"refused\"><td colspan=\"7\" class=\"msg\">{n} more refused file names: see <a href=\"/api/v1/refused-files?limit=1000\">/api/v1/refused-files</a> (paged)</td></tr>"
        ),
    };
    let rows: String = files
        .iter()
        .map(|f| {
            let name = std::path::Path::new(&f.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| f.path.clone());
            format!(
                "<tr data-status=\"refused\"><td class=\"svc\">{}<br><small>file name refused</small></td>\
                 <td data-label=\"Status\"><span class=\"badge bad\" title=\"nothing is read from this file\">refused</span></td>\
                 <td class=\"msg\" data-label=\"Reason\" colspan=\"5\">{}<div class=\"todo\"><b>What to do:</b> rename or remove the file</div></td></tr>",
                esc(&name),
                prose(&f.reason)
            )
        })
        .collect();
    rows + &more
}

/// Refused file names the page shows at most.
const REFUSED_ON_PAGE: usize = 50;

async fn rows(state: &HttpState, filter: Option<&str>) -> String {
    let refused = refused_rows(state, filter).await;
    if filter == Some("refused") {
        return refused;
    }
    services_rows(state, filter).await + &refused
}

/// Services the page shows at most; the rest through the paged API.
const SERVICES_ON_PAGE: usize = 200;

async fn services_rows(state: &HttpState, filter: Option<&str>) -> String {
    let Ok(parsed) = ServiceFilter::parse(filter) else {
        return nothing_is(state, filter.unwrap_or_default()).await;
    };
    let query = ServicesQuery {
        after: None,
        filter: parsed,
        limit: SERVICES_ON_PAGE,
    };
    let page = match state.store.services_page(&query).await {
        Ok(page) => page,
        Err(e) => {
            return format!(
                "<tr><td colspan=\"7\" class=\"empty\">The record cannot be read: {}</td></tr>",
                esc(&e.to_string())
            )
        }
    };
    let (records, total) = (page.rows, page.total);
    if records.is_empty() {
        return match parsed {
            ServiceFilter::All => "<tr><td colspan=\"7\" class=\"empty\">No services yet: write a dependency file to start.</td></tr>".into(),
            _ => nothing_is(state, filter.unwrap_or_default()).await,
        };
    }
    let more = total.saturating_sub(records.len());
    let mut out = String::new();
    for r in records {
        let history = state
            .store
            .history(Some(&r.key()), 8)
            .await
            .unwrap_or_default();
        let mut v = view(state, r).await;
        v.next_step = crate::advice::with_flags(&v.next_step, &state.cli_flags);
        out.push_str(&row(&v, &history));
    }
    if more > 0 {
        out.push_str(&more_services(more, filter));
    }
    out
}

/// The row after the first [`SERVICES_ON_PAGE`] services: how many more, and where they are.
fn more_services(more: usize, filter: Option<&str>) -> String {
    let query = match filter.filter(|f| !f.is_empty()) {
        Some(f) => format!(
            "&amp;{}",
            esc(&form_urlencoded::Serializer::new(String::new())
                .append_pair("status", f)
                .finish())
        ),
        None => String::new(),
    };
    format!(
        "<tr><td colspan=\"7\" class=\"msg\">{more} more services: see <a href=\"/api/v1/services?limit=1000{query}\">/api/v1/services</a> (paged), or <code>depwatch status</code></td></tr>"
    )
}

/// The row for a filter that keeps no service, with a link to all of them.
async fn nothing_is(state: &HttpState, filter: &str) -> String {
    let all = ServicesQuery {
        limit: 0,
        ..ServicesQuery::default()
    };
    let total = state
        .store
        .services_page(&all)
        .await
        .map(|page| page.total)
        .unwrap_or_default();
    if total == 0 {
        return "<tr><td colspan=\"7\" class=\"empty\">No services yet: write a dependency file to start.</td></tr>".into();
    }
    format!(
        "<tr><td colspan=\"7\" class=\"empty\">No service is {}. <a href=\"/\">Show all {total}</a></td></tr>",
        esc(filter)
    )
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PageQuery {
    /// Return only the table rows (used by the page's live refresh).
    pub rows: Option<u8>,
    /// Only services with this status (e.g. `failed`), or `suspended`.
    pub status: Option<String>,
}

const STYLE: &str = "
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4rem;margin:0 0 .2rem}p.sub{color:#666;margin:0 0 1.2rem}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 3px rgba(0,0,0,.08)}
th,td{padding:.55rem .7rem;border-bottom:1px solid #eee;text-align:left;vertical-align:top;font-size:.9rem}
th{background:#f3f3f5;font-weight:600}td.img{font-family:ui-monospace,monospace;font-size:.8rem}
td.msg{max-width:28rem;color:#444;font-size:.8rem}small{color:#777}td.svc{font-weight:600}
.badge{padding:.15rem .5rem;border-radius:1rem;font-size:.8rem;color:#fff;white-space:nowrap}
.ok{background:#2eb886}.bad{background:#d40e0d}.warn{background:#daa038}.busy{background:#3b82f6}.idle{background:#999}.neutral{background:#a0a0a0}
.dot{display:inline-block;width:.7rem;height:.7rem;border-radius:50%;margin-right:.2rem}
td.empty{color:#777;text-align:center;padding:2rem}
td.img{overflow-wrap:normal;word-break:normal}code{font-family:ui-monospace,monospace;background:#f3f3f5;padding:0 .2em;border-radius:3px}.pin{color:#b45309}
.todo{margin-top:.35rem;padding:.3rem .5rem;background:#fff7e6;border-left:3px solid #daa038;color:#333}
@media (max-width:720px){
body{margin:.8rem}table,thead,tbody,tr,td{display:block;width:auto}thead{display:none}
tr{margin:0 0 .8rem;border:1px solid #e5e5e5;border-radius:.4rem;background:#fff}
td{border:0;padding:.3rem .7rem}td.msg{max-width:none}
td[data-label]::before{content:attr(data-label);display:block;font-size:.7rem;color:#888;text-transform:uppercase}
}
";

const SCRIPT: &str = "
(function(){
  if(!window.EventSource)return;
  var busy=false;
  function refresh(){
    if(busy)return;busy=true;
    var q=new URLSearchParams(location.search);q.set('rows','1');
    fetch('/?'+q.toString()).then(function(r){return r.text()}).then(function(t){
      document.getElementById('rows').innerHTML=t;
      document.getElementById('live').textContent='live';
    }).finally(function(){busy=false});
  }
  var es=new EventSource('/api/v1/events');
  es.addEventListener('change',refresh);
  es.onerror=function(){document.getElementById('live').textContent='reconnecting…'};
})();
";

/// The status page.
#[utoipa::path(get, path = "/", tag = "status page", params(PageQuery),
    responses((status = 200, description = "the status page (HTML)", content_type = "text/html")))]
pub async fn status_page(
    State(state): State<Arc<HttpState>>,
    Query(q): Query<PageQuery>,
) -> Html<String> {
    let body = rows(&state, q.status.as_deref()).await;
    if q.rows.is_some() {
        return Html(body);
    }
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>depwatch</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript><style>{STYLE}</style></head><body>\
         <h1>depwatch</h1><p class=\"sub\">What runs where · <span id=\"live\">updated {now} UTC</span></p>\
         <table><thead><tr><th>Service</th><th>Status</th><th>Desired</th><th>Running</th>\
         <th>Last deploy</th><th>Reason</th><th>Recent</th></tr></thead><tbody id=\"rows\">{body}</tbody></table>\
         <script>{SCRIPT}</script></body></html>",
        now = esc(&short_time(&crate::store::now())),
    ))
}

#[cfg(test)]
mod words {
    use super::*;

    #[test]
    fn commands_show_as_code_and_images_break_only_between_their_parts() {
        assert_eq!(
            prose("run `depwatch retry prod/web` <now>"),
            "run <code>depwatch retry prod/web</code> &lt;now&gt;"
        );
        assert_eq!(prose("a lone ` stays"), "a lone ` stays");
        assert_eq!(
            image("registry.example.com/team/web:1.2.3"),
            "registry.example.com/<wbr>team/<wbr>web:<wbr>1.2.3"
        );
    }
}
