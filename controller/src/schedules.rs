//! Schedules: a workstream started at the times of a cron expression (in a named time
//! zone) or at a fixed interval, by the leader only.
//!
//! Each schedule keeps `next_at`, the earliest scheduled time not yet handled. Every
//! scheduled time T becomes a submit with the request id `schedule:ID:T`, and submits
//! are idempotent by request id: a controller that crashed after starting T and before
//! moving `next_at` past it, or a new leader after a failover, submits T again and gets
//! the run that exists. So each scheduled time starts at most one run, and, unless its
//! policies skip it, exactly one.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::Submission;
use crate::store::{ScheduleRow, Store};

/// A scheduled time this much past counts as missed (the controller was down), and
/// `catchup` decides whether it still starts.
pub const MISFIRE_GRACE_MS: i64 = 2_000;
/// How often the leader looks for due schedules.
const TICK: Duration = Duration::from_millis(100);
/// Most scheduled times one pass starts for a schedule (with `catchup: all`).
const MAX_PER_PASS: usize = 1_000;

/// What to do when a scheduled time comes and the schedule's previous run is still
/// going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Start nothing for this time.
    Skip,
    /// Submit it now; it waits pending until the runs before it have ended.
    Queue,
    /// Cancel the previous run, then start.
    CancelPrevious,
    /// Start it anyway.
    Allow,
}

/// Which of the times missed while no controller led start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Catchup {
    None,
    Last,
    All,
}

impl FromStr for Overlap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(Overlap::Skip),
            "queue" => Ok(Overlap::Queue),
            "cancel_previous" => Ok(Overlap::CancelPrevious),
            "allow" => Ok(Overlap::Allow),
            _ => Err(format!("overlap {s:?}: one of skip, queue, cancel_previous, allow")),
        }
    }
}

impl FromStr for Catchup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Catchup::None),
            "last" => Ok(Catchup::Last),
            "all" => Ok(Catchup::All),
            _ => Err(format!("catchup {s:?}: one of none, last, all")),
        }
    }
}

/// When a schedule fires: a cron expression in a time zone, or an interval.
#[derive(Debug, Clone)]
pub enum When {
    Cron(Box<croner::Cron>, chrono_tz::Tz),
    Every(i64),
}

impl When {
    /// From a schedule's stored fields, checked.
    pub fn new(cron: &str, every_ms: Option<i64>, timezone: &str) -> Result<When, String> {
        match (cron.trim(), every_ms) {
            ("", Some(ms)) if ms >= 1000 => Ok(When::Every(ms)),
            ("", Some(_)) => Err("every: at least 1s".into()),
            ("", None) => Err("a schedule needs a cron expression or an interval (every)".into()),
            (expr, None) => {
                let tz: chrono_tz::Tz = timezone.parse().map_err(|_| {
                    format!("timezone {timezone:?}: not a known zone (e.g. Europe/Paris, UTC)")
                })?;
                let cron = croner::Cron::new(expr)
                    .with_seconds_optional()
                    .parse()
                    .map_err(|e| format!("cron {expr:?}: {e}"))?;
                Ok(When::Cron(Box::new(cron), tz))
            }
            (_, Some(_)) => Err("a schedule takes a cron expression or an interval, not both".into()),
        }
    }

    /// The first scheduled time strictly after `after_ms`.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            When::Every(ms) => after_ms.checked_add(*ms),
            When::Cron(cron, tz) => {
                let at = tz.timestamp_millis_opt(after_ms).single()?;
                cron.find_next_occurrence(&at, false).ok().map(|t| t.timestamp_millis())
            }
        }
    }

    /// The scheduled time a new (or resumed) schedule starts from.
    pub fn first_after(&self, now_ms: i64) -> Option<i64> {
        self.next_after(now_ms)
    }
}

/// Of the scheduled times from `next_at` up to `now`, those to start (per `catchup`),
/// and the first time after `now`.
pub fn due(when: &When, next_at: i64, now: i64, catchup: Catchup) -> (Vec<i64>, Option<i64>) {
    let mut times = Vec::new();
    let mut t = Some(next_at);
    while let Some(at) = t.filter(|&at| at <= now) {
        times.push(at);
        t = when.next_after(at);
        if times.len() > MAX_PER_PASS * 10 {
            // Far behind (an interval of seconds after a long outage): jump to now.
            t = when.next_after(now);
            break;
        }
    }
    let start = match catchup {
        Catchup::All => times.iter().rev().take(MAX_PER_PASS).rev().copied().collect(),
        Catchup::Last => times.last().copied().into_iter().collect(),
        Catchup::None => times.into_iter().filter(|&at| now - at <= MISFIRE_GRACE_MS).collect(),
    };
    (start, t)
}

/// The request id of a schedule's run for scheduled time `at`.
pub fn request_id(schedule: &str, at: i64) -> String {
    format!("schedule:{schedule}:{at}")
}

/// While this controller leads, starts the runs of due schedules.
pub async fn run(
    leadership: crate::leader::Leadership,
    store: Store,
    router: crate::router::Rules,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok((engine, _)) = leadership.engine() else { continue };
        let now = baton_common::time::now_ms();
        let due_rows = match store.due_schedules(now).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "reading schedules failed; trying again");
                continue;
            }
        };
        for row in due_rows {
            if let Err(e) = fire(&engine, &store, &router, row.clone(), now).await {
                warn!(schedule_id = %row.id, error = %e, "a scheduled run did not start; trying again");
            }
        }
    }
}

/// Handles the due times of one schedule.
async fn fire(
    engine: &crate::engine::EngineHandle,
    store: &Store,
    router: &crate::router::Rules,
    mut row: ScheduleRow,
    now: i64,
) -> Result<(), String> {
    let when = When::new(&row.cron, row.every_ms, &row.timezone)?;
    let overlap: Overlap = row.overlap.parse()?;
    let catchup: Catchup = row.catchup.parse()?;
    let (start, after) = due(&when, row.next_at, now, catchup);
    let next_at = after.unwrap_or(i64::MAX);
    for at in start {
        let previous_active = !row.last_run_id.is_empty()
            && store.run_is_active(&row.last_run_id).await.map_err(|e| e.to_string())?;
        if previous_active {
            match overlap {
                Overlap::Skip => {
                    info!(schedule_id = %row.id, at, previous = %row.last_run_id, "scheduled time skipped: the previous run is still going");
                    continue;
                }
                // Started now, it waits pending for the runs before it (see
                // `start_run`).
                Overlap::Queue => {}
                Overlap::CancelPrevious => {
                    let why = format!("canceled by schedule {}: the run for a newer time starts", row.id);
                    if let Err(e) = engine
                        .cancel(row.last_run_id.clone(), None, why, format!("schedule:{}", row.id))
                        .await
                    {
                        warn!(schedule_id = %row.id, previous = %row.last_run_id, error = %e, "canceling the previous run failed");
                    }
                }
                Overlap::Allow => {}
            }
        }
        row.last_run_id = start_run(engine, store, router, &row, at).await?;
    }
    store.schedule_progress(&row.id, next_at, &row.last_run_id).await.map_err(|e| e.to_string())
}

/// Starts the run of scheduled time `at` (or finds the one that was started for it).
pub async fn start_run(
    engine: &crate::engine::EngineHandle,
    store: &Store,
    router: &crate::router::Rules,
    row: &ScheduleRow,
    at: i64,
) -> Result<String, String> {
    let request_id = request_id(&row.id, at);
    if let Some(id) = store.run_by_request_id(&request_id).await.map_err(|e| e.to_string())? {
        return Ok(id);
    }
    let mut ws: baton_common::spec::Workstream =
        serde_json::from_str(&row.spec).map_err(|e| format!("stored spec: {e}"))?;
    // overlap: queue: the schedule's runs share a key of one slot, so each waits pending
    // for the one before it and they start oldest first (a workstream's own key stays).
    if row.overlap.parse::<Overlap>() == Ok(Overlap::Queue) && ws.concurrency.is_none() {
        ws.concurrency = Some(baton_common::spec::RunConcurrency {
            key: format!("schedule {}", row.id),
            limit: 1,
            on_conflict: baton_common::spec::OnConflict::Queue,
        });
    }
    let params: BTreeMap<String, String> = serde_json::from_str(&row.params).unwrap_or_default();
    let labels = BTreeMap::from([
        ("schedule".to_string(), row.id.clone()),
        ("schedule_at".to_string(), at.to_string()),
    ]);
    let when = Utc.timestamp_millis_opt(at).single().map(|t| t.to_rfc3339()).unwrap_or_default();
    let run = Submission {
        params,
        request_id,
        labels,
        name: format!("{} at {when}", ws.name),
        ..Submission::new(ws)
    };
    let rules = router.current();
    let admitted = tokio::task::spawn_blocking(move || run.admit(&rules))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let run_id = engine.submit(admitted, format!("schedule:{}", row.id)).await.map_err(|e| e.to_string())?;
    info!(schedule_id = %row.id, run_id = %run_id, at = %when, "scheduled run started");
    Ok(run_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn text(at: i64, tz: chrono_tz::Tz) -> String {
        tz.timestamp_millis_opt(at).unwrap().to_rfc3339()
    }

    #[test]
    fn cron_times_in_a_named_zone_keep_local_time_across_daylight_saving() {
        let when = When::new("30 2 * * *", None, "Europe/Paris").unwrap();
        let tz: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
        // 2026-03-29: 02:00 -> 03:00 in Paris; 02:30 does not exist that day.
        let mut t = ms("2026-03-27T12:00:00Z");
        let mut got = Vec::new();
        for _ in 0..4 {
            t = when.next_after(t).unwrap();
            got.push(text(t, tz));
        }
        assert_eq!(
            got,
            [
                "2026-03-28T02:30:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-30T02:30:00+02:00",
                "2026-03-31T02:30:00+02:00"
            ]
        );
        // 2026-10-25: 03:00 -> 02:00; 02:30 happens twice and starts once.
        let mut t = ms("2026-10-24T12:00:00Z");
        let mut got = Vec::new();
        for _ in 0..3 {
            t = when.next_after(t).unwrap();
            got.push(text(t, tz));
        }
        assert_eq!(
            got,
            ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00", "2026-10-27T02:30:00+01:00"]
        );
    }

    #[test]
    fn catchup_decides_which_missed_times_start() {
        let when = When::new("", Some(1000), "UTC").unwrap();
        let now = 10_500;
        let (all, next) = due(&when, 1_000, now, Catchup::All);
        assert_eq!(all, (1..=10).map(|s| s * 1000).collect::<Vec<_>>());
        assert_eq!(next, Some(11_000));
        assert_eq!(due(&when, 1_000, now, Catchup::Last).0, [10_000]);
        // Within the grace a time is on time, not missed.
        assert_eq!(due(&when, 1_000, now, Catchup::None).0, [9_000, 10_000]);
        assert!(due(&when, 11_000, now, Catchup::All).0.is_empty());
    }

    #[test]
    fn bad_schedules_are_refused_with_the_reason() {
        assert!(When::new("61 * * * *", None, "UTC").unwrap_err().starts_with("cron \"61 * * * *\""));
        assert!(When::new("* * * * *", None, "Mars/Olympus").unwrap_err().contains("not a known zone"));
        assert_eq!(When::new("", Some(10), "UTC").unwrap_err(), "every: at least 1s");
        assert!(When::new("* * * * *", Some(1000), "UTC").unwrap_err().contains("not both"));
        assert!("sometimes".parse::<Overlap>().is_err() && "later".parse::<Catchup>().is_err());
    }
}
