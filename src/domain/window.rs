//! Deploy windows: when a save may go. A window is a cron schedule of starts, a duration and
//! a named time zone; an `allow` window is a time when deploys may go, a `deny` window one when
//! they may not. Pure: decided from the windows and the time alone.

use std::fmt;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// Whether a window lets deploys go or holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Allow,
    Deny,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Allow => "allow",
            Kind::Deny => "deny",
        }
    }
}

/// One window: from each start its schedule gives, for `duration`, in `zone`.
#[derive(Debug, Clone)]
pub struct Window {
    pub kind: Kind,
    /// The schedule as written (five fields: minute hour day-of-month month day-of-week).
    pub cron: String,
    schedule: jiff_cron::Schedule,
    pub duration: Duration,
    pub zone_name: String,
    zone: TimeZone,
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, &self.cron, self.duration, &self.zone_name)
            == (other.kind, &other.cron, other.duration, &other.zone_name)
    }
}

impl Eq for Window {}

/// The longest window: a week (a longer hold is a freeze, which has its own file).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Window {
    /// A window from its parts, or what is wrong with one of them (`cron`, `duration` or
    /// `timeZone`, with the reason).
    pub fn new(
        kind: Kind,
        cron: &str,
        duration: Duration,
        zone_name: &str,
    ) -> Result<Window, (&'static str, String)> {
        let fields = cron.split_whitespace().count();
        if fields != 5 {
            return Err((
                "cron",
                format!("{fields} fields; expected five: minute hour day-of-month month day-of-week, e.g. \"0 18 * * Fri\""),
            ));
        }
        // The crate's schedules begin with seconds: a window starts on the minute.
        let schedule: jiff_cron::Schedule =
            format!("0 {cron}")
                .parse()
                .map_err(|e: jiff_cron::error::Error| {
                    let e: String = e
                        .to_string()
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(120)
                        .collect();
                    ("cron", format!("not a cron schedule ({e})"))
                })?;
        if duration.is_zero() || duration > MAX_DURATION {
            return Err(("duration", "expected from 1m to 7d".to_string()));
        }
        let zone = TimeZone::get(zone_name).map_err(|_| {
            (
                "timeZone",
                "not a time zone this machine knows; expected an IANA name such as Europe/Berlin or UTC".to_string(),
            )
        })?;
        Ok(Window {
            kind,
            cron: cron.to_string(),
            schedule,
            duration,
            zone_name: zone_name.to_string(),
            zone,
        })
    }

    fn span(&self) -> jiff::SignedDuration {
        jiff::SignedDuration::try_from(self.duration).unwrap_or(jiff::SignedDuration::ZERO)
    }

    /// The end of this window if it is open at `t`: its latest start at or before `t`, when
    /// that start is less than a duration ago.
    fn open_at(&self, t: Timestamp) -> Option<Timestamp> {
        // Starts fall on whole seconds; the iterator's way back gives those before its time.
        let just_after = t.checked_add(jiff::SignedDuration::from_secs(1)).ok()?;
        let last = self
            .schedule
            .after(just_after.to_zoned(self.zone.clone()))
            .next_back()?
            .timestamp();
        let end = last.checked_add(self.span()).ok()?;
        (last <= t && end > t).then_some(end)
    }

    /// The first start after `t`.
    fn next_start(&self, t: Timestamp) -> Option<Timestamp> {
        let from = t.to_zoned(self.zone.clone());
        self.schedule.after(from).next().map(|z| z.timestamp())
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} \"{}\" for {} ({})",
            self.kind.as_str(),
            self.cron,
            crate::domain::human_duration(self.duration),
            self.zone_name
        )
    }
}

/// Whether a deploy may go now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Held: until when (in the zone of the window that decides it), and why.
    Held {
        until: Option<Zoned>,
        why: String,
    },
}

impl Gate {
    /// "held until Mon 09:00 Europe/Berlin: deny \"0 18 * * Fri\" for 2d 15h (Europe/Berlin)".
    pub fn message(&self) -> String {
        match self {
            Gate::Open => String::new(),
            Gate::Held {
                until: Some(u),
                why,
            } => format!(
                "held until {} {}: {why}",
                u.strftime("%a %Y-%m-%d %H:%M"),
                u.time_zone().iana_name().unwrap_or("UTC")
            ),
            Gate::Held { until: None, why } => format!("held: {why}"),
        }
    }

    /// When it opens, as a timestamp.
    pub fn until(&self) -> Option<Timestamp> {
        match self {
            Gate::Held { until, .. } => until.as_ref().map(Zoned::timestamp),
            Gate::Open => None,
        }
    }
}

/// How many times [`decide`] steps to a window's edge looking for an open moment.
const MAX_STEPS: usize = 1000;
/// How far ahead [`decide`] looks for an open moment.
const HORIZON: jiff::SignedDuration = jiff::SignedDuration::from_hours(366 * 24);

/// Whether a deploy may go at `now`: never inside a deny window; with allow windows, only
/// inside one. When held, the first moment both hold, found by stepping from edge to edge.
pub fn decide(windows: &[Window], now: Timestamp) -> Gate {
    let allows: Vec<&Window> = windows.iter().filter(|w| w.kind == Kind::Allow).collect();
    let mut t = now;
    let mut why: Option<(String, TimeZone)> = None;
    for _ in 0..MAX_STEPS {
        if t.duration_since(now) > HORIZON {
            break;
        }
        let denied = windows
            .iter()
            .filter(|w| w.kind == Kind::Deny)
            .filter_map(|w| Some((w.open_at(t)?, w)))
            .max_by_key(|(end, _)| *end);
        if let Some((end, w)) = denied {
            why.get_or_insert_with(|| (format!("in the deny window {w}"), w.zone.clone()));
            t = end;
            continue;
        }
        let allowed = allows.is_empty() || allows.iter().any(|w| w.open_at(t).is_some());
        if allowed {
            return match why {
                None => Gate::Open,
                Some((why, zone)) => Gate::Held {
                    until: Some(t.to_zoned(zone)),
                    why,
                },
            };
        }
        let next = allows
            .iter()
            .filter_map(|w| Some((w.next_start(t)?, *w)))
            .min_by_key(|(start, _)| *start);
        let Some((start, w)) = next else {
            break;
        };
        why.get_or_insert_with(|| {
            let all: Vec<String> = allows.iter().map(ToString::to_string).collect();
            (
                format!("outside every allow window ({})", all.join("; ")),
                w.zone.clone(),
            )
        });
        t = start;
    }
    let why = why.map_or_else(|| "no window is open".to_string(), |(w, _)| w);
    Gate::Held {
        until: None,
        why: format!("no window opens within a year; {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(kind: Kind, cron: &str, hours: u64, zone: &str) -> Window {
        Window::new(kind, cron, Duration::from_secs(hours * 3600), zone).expect("window")
    }

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    fn until(g: &Gate) -> String {
        g.until().map(|t| t.to_string()).unwrap_or_default()
    }

    #[test]
    fn windows_hold_and_release_at_their_edges() {
        // No deploys from Friday 18:00 to Monday 09:00 in Berlin (63 hours).
        let weekend = w(Kind::Deny, "0 18 * * Fri", 63, "Europe/Berlin");
        // Deploys only on weekdays 09:00-17:00 in New York.
        let office = w(Kind::Allow, "0 9 * * Mon-Fri", 8, "America/New_York");
        let cases: &[(&[&Window], &str, &str)] = &[
            // 2026-12-04 is a Friday; Berlin is UTC+1 in December.
            (&[&weekend], "2026-12-04T16:59:00Z", ""),
            (&[&weekend], "2026-12-04T17:00:00Z", "2026-12-07T08:00:00Z"),
            (&[&weekend], "2026-12-06T12:00:00Z", "2026-12-07T08:00:00Z"),
            (&[&weekend], "2026-12-07T08:00:00Z", ""),
            // New York is UTC-5 in December: 09:00 there is 14:00Z.
            (&[&office], "2026-12-07T15:00:00Z", ""),
            (&[&office], "2026-12-07T13:59:00Z", "2026-12-07T14:00:00Z"),
            (&[&office], "2026-12-07T22:00:00Z", "2026-12-08T14:00:00Z"),
            // Friday evening in New York: the next allow is Monday's.
            (&[&office], "2026-12-04T23:00:00Z", "2026-12-07T14:00:00Z"),
            // Both: Monday 14:00Z is inside the allow window and after the deny ended.
            (
                &[&weekend, &office],
                "2026-12-05T10:00:00Z",
                "2026-12-07T14:00:00Z",
            ),
        ];
        for (windows, now, want) in cases {
            let windows: Vec<Window> = windows.iter().map(|w| (*w).clone()).collect();
            let g = decide(&windows, at(now));
            assert_eq!(until(&g), *want, "{now}: {g:?}");
            assert_eq!(g == Gate::Open, want.is_empty(), "{now}: {g:?}");
        }
    }

    #[test]
    fn windows_follow_their_zone_across_daylight_saving_changes() {
        // A daily deny from 18:00 for 15 hours, in Berlin: 17:00Z in winter, 16:00Z in summer.
        let night = w(Kind::Deny, "0 18 * * *", 15, "Europe/Berlin");
        let g = decide(std::slice::from_ref(&night), at("2026-03-28T16:30:00Z"));
        assert_eq!(g, Gate::Open, "winter: 17:30 in Berlin");
        let g = decide(std::slice::from_ref(&night), at("2026-03-29T16:30:00Z"));
        assert_eq!(
            until(&g),
            "2026-03-30T07:00:00Z",
            "summer since that morning: 18:30 in Berlin, held until 09:00 (07:00Z)"
        );
        // The night the clocks go back: 18:00 on 2026-10-24 is 16:00Z; 15 hours later is
        // 07:00Z, which is 08:00 in Berlin by then.
        let g = decide(std::slice::from_ref(&night), at("2026-10-24T20:00:00Z"));
        assert_eq!(until(&g), "2026-10-25T07:00:00Z");
        assert!(g.message().starts_with("held until Sun 2026-10-25 08:00 Europe/Berlin: in the deny window deny \"0 18 * * *\""), "{}", g.message());
        // A start the clocks skip (02:30 on the morning they go forward) is not a start.
        let skipped = w(Kind::Deny, "30 2 * * *", 1, "Europe/Berlin");
        let g = decide(std::slice::from_ref(&skipped), at("2026-03-29T01:10:00Z"));
        assert_eq!(g, Gate::Open, "03:10 summer time, and no 02:30 that night");
    }

    #[test]
    fn a_window_that_never_opens_holds_without_an_end() {
        // Allowed only on 30 February.
        let never = w(Kind::Allow, "0 9 30 2 *", 1, "UTC");
        let g = decide(&[never], at("2026-12-06T10:00:00Z"));
        assert_eq!(g.until(), None);
        assert!(
            g.message()
                .starts_with("held: no window opens within a year"),
            "{}",
            g.message()
        );
        // An always-on deny window (every minute, for an hour) likewise.
        let always = w(Kind::Deny, "* * * * *", 1, "UTC");
        let g = decide(&[always], at("2026-12-06T10:00:00Z"));
        assert_eq!(g.until(), None);
    }

    #[test]
    fn bad_parts_are_named() {
        let bad = |cron: &str, secs: u64, zone: &str| {
            Window::new(Kind::Deny, cron, Duration::from_secs(secs), zone).expect_err("bad")
        };
        assert_eq!(bad("0 18 * *", 60, "UTC").0, "cron");
        assert_eq!(bad("0 25 * * *", 60, "UTC").0, "cron");
        assert_eq!(bad("0 18 * * Fri", 0, "UTC").0, "duration");
        assert_eq!(bad("0 18 * * Fri", 8 * 24 * 3600, "UTC").0, "duration");
        assert_eq!(bad("0 18 * * Fri", 60, "Mars/Olympus").0, "timeZone");
    }
}
