//! The same reports for Microsoft Teams (a Workflows webhook posting an Adaptive Card), Google
//! Chat (an incoming webhook's `cardsV2` message) and Discord (a webhook's embed), each
//! colour-coded like Slack's: green for success, red for failure, amber for timeouts,
//! rollbacks and drift. Each service's documented limits are kept (Discord's 256-character
//! titles and 1024-character field values, for one), so a long pod message never makes a
//! receiver refuse the whole message.

use serde_json::{json, Value};

use super::slack::Report;
use crate::domain::{human_duration, Tone};

/// At most `max` characters of `s`, with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    match s.chars().count() > max {
        true => {
            let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
            out.push('…');
            out
        }
        false => s.to_string(),
    }
}

/// The facts every message shows, as (title, value).
fn facts(r: &Report) -> Vec<(&'static str, String)> {
    let (from, to) = r.changed();
    let mut facts = vec![
        ("Service", r.workload()),
        ("Namespace", r.namespace.clone()),
        ("Image", format!("{from} → {to}")),
        ("Duration", human_duration(r.duration)),
    ];
    if !r.reason.is_empty() {
        facts.push(("Reason", r.reason.clone()));
    }
    if !r.checks.is_empty() {
        facts.push(("Checks", crate::domain::verify::summary(&r.checks)));
    }
    facts
}

impl Report {
    /// A Teams Workflows webhook's message: one Adaptive Card (schema 1.4), its container
    /// styled by the outcome (`good`, `attention`, `warning`).
    pub fn to_teams(&self) -> Value {
        let (style, text_colour) = match self.tone() {
            Tone::Good => ("good", "Good"),
            Tone::Bad => ("attention", "Attention"),
            Tone::Warning | Tone::Busy => ("warning", "Warning"),
            Tone::Neutral => ("default", "Default"),
        };
        let facts: Vec<Value> = facts(self)
            .into_iter()
            .map(|(t, v)| json!({"title": t, "value": cut(&v, 1000)}))
            .collect();
        json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": null,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [{
                        "type": "Container",
                        "style": style,
                        "items": [
                            {
                                "type": "TextBlock",
                                "text": cut(&self.title(), 200),
                                "weight": "Bolder",
                                "size": "Medium",
                                "color": text_colour,
                                "wrap": true,
                            },
                            {"type": "FactSet", "facts": facts},
                        ],
                    }],
                },
            }],
        })
    }

    /// A Google Chat incoming webhook's message: a text fallback and one card (`cardsV2`)
    /// whose outcome line is coloured with the Slack colour.
    pub fn to_google_chat(&self) -> Value {
        let widgets: Vec<Value> = std::iter::once(json!({
            "decoratedText": {
                "topLabel": "Outcome",
                "text": format!("<font color=\"{}\">{}</font>", self.colour(), self.outcome_word()),
            }
        }))
        .chain(facts(self).into_iter().map(|(t, v)| {
            json!({"decoratedText": {"topLabel": t, "text": cut(&escape_html(&v), 2000), "wrapText": true}})
        }))
        .collect();
        json!({
            "text": cut(&self.title(), 4000),
            "cardsV2": [{
                "cardId": "depwatch-deploy",
                "card": {
                    "header": {"title": cut(&self.title(), 200), "subtitle": "depwatch"},
                    "sections": [{"widgets": widgets}],
                },
            }],
        })
    }

    /// A Discord webhook's message: one embed, its colour the Slack colour as a number.
    pub fn to_discord(&self) -> Value {
        let colour =
            i64::from_str_radix(self.colour().trim_start_matches('#'), 16).unwrap_or_default();
        let fields: Vec<Value> = facts(self)
            .into_iter()
            .take(25)
            .map(|(t, v)| {
                let inline = matches!(t, "Service" | "Namespace" | "Duration");
                json!({"name": t, "value": cut(&v, 1024), "inline": inline})
            })
            .collect();
        json!({
            "content": cut(&self.title(), 2000),
            "allowed_mentions": {"parse": []},
            "embeds": [{
                "title": cut(&self.title(), 256),
                "color": colour,
                "fields": fields,
            }],
        })
    }
}

impl Report {
    /// The outcome in one word: the deploy's, or `held` and `released`.
    fn outcome_word(&self) -> String {
        match self.notice {
            super::slack::Notice::Deploy => self.outcome.to_string(),
            super::slack::Notice::Held => "held".into(),
            super::slack::Notice::Released => "released".into(),
            super::slack::Notice::Approval => "awaiting approval".into(),
        }
    }
}

/// Text as Google Chat's card markup shows it literally.
fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DeployOutcome, WorkloadKind};
    use std::time::Duration;

    fn report(outcome: DeployOutcome, reason: &str) -> Report {
        Report {
            notice: Default::default(),
            outcome,
            service: "web".into(),
            namespace: "prod".into(),
            kind: WorkloadKind::Deployment,
            from: "web=example.com/web:1.0".into(),
            to: "web=example.com/web:1.1".into(),
            duration: Duration::from_secs(42),
            reason: reason.into(),
            checks: Vec::new(),
        }
    }

    #[test]
    fn each_chat_is_coloured_by_the_outcome_and_keeps_its_limits() {
        let long = "CrashLoopBackOff: ".to_string() + &"x".repeat(5000);
        for (outcome, style, hex) in [
            (DeployOutcome::Succeeded, "good", 0x2eb886),
            (DeployOutcome::Failed, "attention", 0xd40e0d),
            (DeployOutcome::RolledBack, "warning", 0xdaa038),
        ] {
            let r = report(outcome, &long);
            let teams = r.to_teams();
            assert_eq!(
                teams["attachments"][0]["content"]["body"][0]["style"],
                style
            );
            let discord = r.to_discord();
            assert_eq!(discord["embeds"][0]["color"], hex);
            let reason = discord["embeds"][0]["fields"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["name"] == "Reason"))
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                reason["value"].as_str().map(|v| v.chars().count()),
                Some(1024)
            );
            let chat = r.to_google_chat();
            let first = &chat["cardsV2"][0]["card"]["sections"][0]["widgets"][0];
            assert!(first["decoratedText"]["text"]
                .as_str()
                .is_some_and(|t| t.contains(&format!("#{hex:06x}"))));
        }
        // Markup in a reason is shown, not interpreted, in Google Chat.
        let chat = report(DeployOutcome::Failed, "<b>bad</b>").to_google_chat();
        let text = chat.to_string();
        assert!(text.contains("&lt;b&gt;bad&lt;/b&gt;"), "{text}");
    }
}
