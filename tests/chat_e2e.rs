//! Teams, Google Chat and Discord end to end through the binary: each receiver on loopback
//! checks the payload shape its service documents, and answers as that service does when the
//! shape is wrong (400), so a message depwatch would have lost is a failed test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon::Env;
use common::{key, wait_for};
use depwatch::domain::ServiceStatus;
use depwatch::sim::SimConfig;
use serde_json::Value;

/// What a receiver took: the body and whether its shape was the service's.
type Taken = Arc<Mutex<Vec<(Value, Result<(), String>)>>>;

fn text_within(v: &Value, max: usize, what: &str) -> Result<String, String> {
    let s = v.as_str().ok_or(format!("{what} is not text"))?;
    match s.chars().count() <= max {
        true => Ok(s.to_string()),
        false => Err(format!("{what} longer than {max}")),
    }
}

/// Teams Workflows: a `message` whose attachments hold Adaptive Cards.
fn teams_shape(b: &Value) -> Result<(), String> {
    if b["type"] != "message" {
        return Err("type is not message".into());
    }
    let a = b["attachments"].as_array().ok_or("no attachments")?;
    let card = a.first().ok_or("no attachment")?;
    if card["contentType"] != "application/vnd.microsoft.card.adaptive" {
        return Err("contentType is not an Adaptive Card".into());
    }
    let c = &card["content"];
    if c["type"] != "AdaptiveCard" || c["version"].as_str().is_none() {
        return Err("content is not an AdaptiveCard with a version".into());
    }
    let body = c["body"].as_array().ok_or("no body")?;
    let container = body.first().ok_or("empty body")?;
    if ![
        "default",
        "emphasis",
        "good",
        "attention",
        "warning",
        "accent",
    ]
    .contains(&container["style"].as_str().unwrap_or("default"))
    {
        return Err("unknown container style".into());
    }
    for item in container["items"].as_array().ok_or("no items")? {
        match item["type"].as_str() {
            Some("TextBlock") => {
                text_within(&item["text"], 10_000, "TextBlock.text")?;
            }
            Some("FactSet") => {
                for f in item["facts"].as_array().ok_or("no facts")? {
                    text_within(&f["title"], 1000, "fact title")?;
                    text_within(&f["value"], 10_000, "fact value")?;
                }
            }
            other => return Err(format!("unexpected element {other:?}")),
        }
    }
    Ok(())
}

/// Google Chat: text and/or `cardsV2`, each with a cardId and a card of sections of widgets.
fn google_chat_shape(b: &Value) -> Result<(), String> {
    text_within(&b["text"], 4096, "text")?;
    for c in b["cardsV2"].as_array().ok_or("no cardsV2")? {
        text_within(&c["cardId"], 255, "cardId")?;
        let sections = c["card"]["sections"].as_array().ok_or("no sections")?;
        for s in sections {
            for w in s["widgets"].as_array().ok_or("no widgets")? {
                let d = w["decoratedText"]
                    .as_object()
                    .ok_or("a widget that is not decoratedText")?;
                text_within(&d["text"], 10_000, "decoratedText.text")?;
            }
        }
    }
    Ok(())
}

/// Discord: content of at most 2000 characters and at most 10 embeds within their limits.
fn discord_shape(b: &Value) -> Result<(), String> {
    text_within(&b["content"], 2000, "content")?;
    let embeds = b["embeds"].as_array().ok_or("no embeds")?;
    if embeds.len() > 10 {
        return Err("more than 10 embeds".into());
    }
    for e in embeds {
        text_within(&e["title"], 256, "embed title")?;
        let colour = e["color"].as_u64().ok_or("colour is not a number")?;
        if colour > 0xFFFFFF {
            return Err("colour out of range".into());
        }
        let fields = e["fields"].as_array().ok_or("no fields")?;
        if fields.len() > 25 {
            return Err("more than 25 fields".into());
        }
        for f in fields {
            text_within(&f["name"], 256, "field name")?;
            text_within(&f["value"], 1024, "field value")?;
        }
    }
    Ok(())
}

/// A receiver on loopback for one service; its URL.
async fn receiver(taken: Taken, shape: fn(&Value) -> Result<(), String>) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let taken = taken.clone();
            async move {
                let verdict = shape(&body);
                let code = match verdict {
                    Ok(()) => axum::http::StatusCode::OK,
                    Err(_) => axum::http::StatusCode::BAD_REQUEST,
                };
                taken.lock().expect("lock").push((body, verdict));
                code
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/hook")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_google_chat_and_discord_get_each_outcome_in_their_own_shape() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    let (teams, chat, discord): (Taken, Taken, Taken) = Default::default();
    let teams_url = receiver(teams.clone(), teams_shape).await;
    let chat_url = receiver(chat.clone(), google_chat_shape).await;
    let discord_url = receiver(discord.clone(), discord_shape).await;
    let _daemon = env
        .daemon(&[
            "--rollout-timeout",
            "20s",
            "--teams-webhook",
            &teams_url,
            "--google-chat-webhook",
            &chat_url,
            "--discord-webhook",
            &discord_url,
        ])
        .await;
    let k = key("web", "prod");
    env.write_dep("web_prod.dep", "1.1\n");
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;
    // A crash: rolled back, amber, with the pod's own reason.
    env.write_dep("web_prod.dep", "1.2-crash\n");
    env.wait_status(&k, ServiceStatus::RolledBack, Duration::from_secs(30))
        .await;
    for (name, taken) in [
        ("Teams", &teams),
        ("Google Chat", &chat),
        ("Discord", &discord),
    ] {
        let got = wait_for(
            &format!("{name}'s rollback message"),
            Duration::from_secs(20),
            || async {
                let t = taken.lock().expect("lock").clone();
                t.iter()
                    .any(|(b, _)| {
                        b.to_string()
                            .contains("rolled back the deploy of web (prod)")
                    })
                    .then_some(t)
            },
        )
        .await;
        for (body, verdict) in &got {
            assert!(verdict.is_ok(), "{name}: {verdict:?} in {body}");
        }
        assert!(
            got[0].0.to_string().contains("deployed web (prod)"),
            "{name}: {}",
            got[0].0
        );
        assert!(
            got.iter()
                .any(|(b, _)| b.to_string().contains("CrashLoopBackOff")),
            "{name}: the pod's own reason"
        );
    }
    // Colour-coded like Slack: green, red for the failure, amber for the rollback.
    let of = |taken: &Taken, words: &str| {
        taken
            .lock()
            .expect("lock")
            .iter()
            .find(|(b, _)| b.to_string().contains(words))
            .map(|(b, _)| b.clone())
            .unwrap_or_default()
    };
    let style = |b: Value| b["attachments"][0]["content"]["body"][0]["style"].clone();
    assert_eq!(style(of(&teams, "deployed web")), "good");
    assert_eq!(style(of(&teams, "failed to deploy")), "attention");
    assert_eq!(style(of(&teams, "rolled back the deploy")), "warning");
    let colour = |b: Value| b["embeds"][0]["color"].clone();
    assert_eq!(colour(of(&discord, "deployed web")), 0x2eb886);
    assert_eq!(colour(of(&discord, "failed to deploy")), 0xd40e0d);
    assert_eq!(colour(of(&discord, "rolled back the deploy")), 0xdaa038);
    assert!(of(&chat, "rolled back the deploy")
        .to_string()
        .contains("#daa038"));
    // No webhook URL is ever logged.
    let logs = env.daemon_logs();
    for url in [&teams_url, &chat_url, &discord_url] {
        assert!(!logs.contains(url.as_str()), "a webhook URL in the logs");
    }
}
