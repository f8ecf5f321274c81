//! Run reports: what happened in a run — every step and attempt, retries, breaker trips,
//! quarantines, rejected reports, the critical path and a timeline — as JSON, Markdown,
//! or one self-contained HTML file with an inline SVG timeline.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use baton_common::spec::Workstream;
use serde::Serialize;

use crate::store::{EventRow, RunRecord};

#[derive(Debug, Serialize)]
pub struct Report {
    pub run: RunInfo,
    pub summary: Summary,
    pub steps: Vec<StepReport>,
    /// The chain of steps that set the run's total time, in order.
    pub critical_path: Vec<String>,
    pub critical_path_ms: i64,
    pub retries: Vec<Note>,
    pub breaker_trips: Vec<Note>,
    pub quarantines: Vec<Note>,
    pub rejected_reports: Vec<Note>,
    /// What callers of the API did to the run (submit, cancel, release), and who.
    pub actions: Vec<Note>,
}

impl Report {
    /// The notes by kind, titled, in the order reports show them.
    fn note_sections(&self) -> [(&'static str, &[Note]); 5] {
        [
            ("Actions", &self.actions),
            ("Retries", &self.retries),
            ("Breaker trips", &self.breaker_trips),
            ("Quarantines", &self.quarantines),
            ("Rejected reports", &self.rejected_reports),
        ]
    }
}

#[derive(Debug, Serialize)]
pub struct RunInfo {
    pub id: String,
    pub workstream: String,
    pub state: String,
    pub reason: String,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub params: BTreeMap<String, String>,
    /// Who submitted the run.
    pub submitted_by: String,
    /// What its attempts reported in cost (dollars) and tokens, and its budget.
    pub cost_usd: f64,
    pub tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<baton_common::spec::Budget>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub steps: usize,
    pub steps_by_state: BTreeMap<String, usize>,
    /// Attempts made: pipelined ones dropped before they started are not among them.
    pub attempts: usize,
    /// Attempts that started pipelined behind their upstream steps on the same agent.
    pub pipelined: usize,
    /// Pipelined attempts dropped before they started (an upstream step failed).
    pub pipelined_dropped: usize,
    pub retries: usize,
    pub breaker_trips: usize,
    pub quarantines: usize,
    pub rejected_reports: usize,
}

#[derive(Debug, Serialize)]
pub struct StepReport {
    pub id: String,
    pub tool: String,
    pub state: String,
    pub needs: Vec<String>,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub reason: String,
    pub attempts: Vec<AttemptReport>,
    pub on_critical_path: bool,
    /// The files it left (`artifacts:`).
    pub artifacts: Vec<ArtifactReport>,
    /// For an approval step: the combined diff of the coding steps above it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub review: String,
}

#[derive(Debug, Serialize)]
pub struct ArtifactReport {
    pub path: String,
    pub size: i64,
    pub sha256: String,
}

#[derive(Debug, Serialize)]
pub struct AttemptReport {
    pub number: i64,
    pub agent: String,
    pub outcome: String,
    pub exit_code: Option<i64>,
    pub error_class: String,
    pub error: String,
    pub assigned_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    /// A pipelined start: the attempts (`step#number`) it was assigned to start after on
    /// its agent; empty when it was dispatched once its step was ready.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pipelined_after: Vec<String>,
}

impl AttemptReport {
    /// How it was started: "ready" (dispatched when its step was), or "after a#1".
    fn start(&self) -> String {
        if self.pipelined_after.is_empty() {
            "ready".into()
        } else {
            format!("after {}", self.pipelined_after.join(", "))
        }
    }
}

/// Something that happened, from the event log.
#[derive(Debug, Serialize)]
pub struct Note {
    pub at_ms: i64,
    pub step: String,
    pub message: String,
    /// Who caused it, when an API call did.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub actor: String,
}

impl Note {
    fn of(e: &EventRow) -> Note {
        Note { at_ms: e.at, step: e.step_id.clone(), message: e.message.clone(), actor: e.actor.clone() }
    }

    /// The message, with who caused it.
    fn text(&self) -> String {
        match (self.message.is_empty(), self.actor.is_empty()) {
            (_, true) => self.message.clone(),
            (true, false) => format!("by {}", self.actor),
            (false, false) => format!("{} (by {})", self.message, self.actor),
        }
    }
}

pub fn build(rec: &RunRecord, events: &[EventRow]) -> Report {
    let spec: Option<Workstream> = serde_json::from_str(&rec.run.spec).ok();
    let needs: HashMap<&str, Vec<String>> = spec
        .as_ref()
        .map(|w| w.steps.iter().map(|s| (s.id.as_str(), s.needs.clone())).collect())
        .unwrap_or_default();
    let mut attempts: HashMap<&str, Vec<AttemptReport>> = HashMap::new();
    let labels: HashMap<&str, String> =
        rec.attempts.iter().map(|a| (a.id.as_str(), format!("{}#{}", a.step_id, a.number))).collect();
    for a in &rec.attempts {
        let after: Vec<String> = serde_json::from_str(&a.follows).unwrap_or_default();
        attempts.entry(a.step_id.as_str()).or_default().push(AttemptReport {
            number: a.number,
            agent: a.agent_name.clone(),
            outcome: a.state.clone(),
            exit_code: a.exit_code,
            error_class: a.error_class.clone(),
            error: a.error.clone(),
            assigned_at_ms: a.assigned_at,
            started_at_ms: a.started_at,
            finished_at_ms: a.finished_at,
            duration_ms: a.finished_at.map(|f| f - a.started_at.unwrap_or(a.assigned_at)),
            pipelined_after: after
                .iter()
                .map(|id| labels.get(id.as_str()).cloned().unwrap_or(id.clone()))
                .collect(),
        });
    }
    let critical = critical_path(rec, &needs);
    let outputs: Vec<Option<serde_json::Value>> =
        rec.steps.iter().map(|s| s.result.as_deref().and_then(|r| serde_json::from_str(r).ok())).collect();
    let no_needs = Vec::new();
    let reviewed: Vec<baton_common::approval::Reviewed> = rec
        .steps
        .iter()
        .zip(&outputs)
        .map(|(s, o)| baton_common::approval::Reviewed {
            id: &s.step_id,
            tool: &s.tool,
            needs: needs.get(s.step_id.as_str()).unwrap_or(&no_needs),
            outputs: o.as_ref(),
        })
        .collect();
    let mut steps: Vec<StepReport> = rec
        .steps
        .iter()
        .map(|s| StepReport {
            id: s.step_id.clone(),
            tool: s.tool.clone(),
            state: s.state.clone(),
            needs: needs.get(s.step_id.as_str()).cloned().unwrap_or_default(),
            started_at_ms: s.started_at,
            finished_at_ms: s.finished_at,
            duration_ms: s.started_at.zip(s.finished_at).map(|(a, b)| b - a),
            reason: s.reason.clone(),
            attempts: attempts.remove(s.step_id.as_str()).unwrap_or_default(),
            on_critical_path: critical.contains(&s.step_id),
            artifacts: rec
                .artifacts
                .iter()
                .filter(|a| a.step_id == s.step_id)
                .map(|a| ArtifactReport { path: a.path.clone(), size: a.size, sha256: a.sha256.clone() })
                .collect(),
            review: if s.tool == baton_common::approval::TOOL {
                baton_common::approval::review_diff(&reviewed, &s.step_id)
            } else {
                String::new()
            },
        })
        .collect();
    steps.sort_by_key(|s| (s.started_at_ms.unwrap_or(i64::MAX), s.id.clone()));
    let notes =
        |kind: &str| -> Vec<Note> { events.iter().filter(|e| e.kind == kind).map(Note::of).collect() };
    let actions: Vec<Note> = events
        .iter()
        .filter(|e| !e.actor.is_empty())
        .map(|e| Note { message: format!("{}: {}", e.kind, e.message), ..Note::of(e) })
        .collect();
    let submitted_by =
        events.iter().find(|e| e.kind == "run_submitted").map(|e| e.actor.clone()).unwrap_or_default();
    let retries = notes("step_retry_wait");
    let breaker_trips = notes("breaker_opened");
    let quarantines = notes("run_quarantined");
    let rejected_reports = notes("report_rejected");
    let mut by_state = BTreeMap::new();
    for s in &rec.steps {
        *by_state.entry(s.state.clone()).or_default() += 1;
    }
    let start = rec.run.started_at;
    let critical_path_ms = match (critical.first(), critical.last()) {
        (Some(first), Some(last)) => {
            let begin = rec.steps.iter().find(|s| &s.step_id == first).and_then(|s| s.started_at);
            let end = rec.steps.iter().find(|s| &s.step_id == last).and_then(|s| s.finished_at);
            begin.zip(end).map(|(a, b)| b - a).unwrap_or(0)
        }
        _ => 0,
    };
    let dropped = rec
        .attempts
        .iter()
        .filter(|a| !a.follows.is_empty() && a.started_at.is_none() && a.state == "canceled")
        .count();
    Report {
        run: RunInfo {
            id: rec.run.id.clone(),
            workstream: rec.run.workstream.clone(),
            state: rec.run.state.clone(),
            reason: rec.run.reason.clone(),
            created_at_ms: rec.run.created_at,
            started_at_ms: start,
            finished_at_ms: rec.run.finished_at,
            duration_ms: start.zip(rec.run.finished_at).map(|(a, b)| b - a),
            params: crate::api::convert::shown_params(&rec.run.params),
            submitted_by,
            cost_usd: rec.run.cost_micros as f64 / 1e6,
            tokens: rec.run.tokens.max(0) as u64,
            budget: crate::api::convert::budget(&rec.run),
        },
        summary: Summary {
            steps: rec.steps.len(),
            steps_by_state: by_state,
            attempts: rec.attempts.len() - dropped,
            pipelined: rec.attempts.iter().filter(|a| !a.follows.is_empty()).count() - dropped,
            pipelined_dropped: dropped,
            retries: retries.len(),
            breaker_trips: breaker_trips.len(),
            quarantines: quarantines.len(),
            rejected_reports: rejected_reports.len(),
        },
        steps,
        critical_path: critical,
        critical_path_ms,
        retries,
        breaker_trips,
        quarantines,
        rejected_reports,
        actions,
    }
}

/// From the step that finished last, back through the need that finished last before
/// it, to a step that waited on nothing: the chain that set the run's length.
fn critical_path(rec: &RunRecord, needs: &HashMap<&str, Vec<String>>) -> Vec<String> {
    let finished: HashMap<&str, i64> = rec
        .steps
        .iter()
        .filter_map(|s| s.finished_at.filter(|_| s.started_at.is_some()).map(|f| (s.step_id.as_str(), f)))
        .collect();
    let Some((mut cur, _)) =
        finished.iter().max_by_key(|(id, f)| (**f, std::cmp::Reverse(**id))).map(|(k, v)| (*k, *v))
    else {
        return Vec::new();
    };
    let mut path = vec![cur.to_string()];
    while let Some(prev) = needs
        .get(cur)
        .and_then(|ns| {
            ns.iter()
                .filter_map(|n| finished.get(n.as_str()).map(|f| (n.as_str(), *f)))
                .max_by_key(|(_, f)| *f)
        })
        .map(|(n, _)| n)
    {
        if path.iter().any(|p| p == prev) {
            break;
        }
        path.push(prev.to_string());
        cur = prev;
    }
    path.reverse();
    path
}

fn span(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) if ms < 60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}

fn time(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

pub fn to_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// "$3.10 of $5.00, 4900 tokens", or `None` for a run that reported nothing and has no
/// budget.
fn cost_text(run: &RunInfo) -> Option<String> {
    if run.cost_usd == 0.0 && run.tokens == 0 && run.budget.is_none() {
        return None;
    }
    let b = run.budget.unwrap_or_default();
    let of_cost = b.max_cost_usd.map(|m| format!(" of ${m:.2}")).unwrap_or_default();
    let of_tokens = b.max_tokens.map(|m| format!(" of {m}")).unwrap_or_default();
    Some(format!("${:.2}{of_cost}, {} tokens{of_tokens}", run.cost_usd, run.tokens))
}

pub fn to_markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Run {} — {}\n", r.run.id, r.run.workstream);
    let _ = writeln!(o, "- **State:** {}", r.run.state);
    if !r.run.reason.is_empty() {
        let _ = writeln!(o, "- **Reason:** {}", r.run.reason);
    }
    let by =
        if r.run.submitted_by.is_empty() { String::new() } else { format!(" by {}", r.run.submitted_by) };
    let _ = writeln!(o, "- **Submitted:** {}{by}", time(r.run.created_at_ms));
    let _ = writeln!(o, "- **Duration:** {}", span(r.run.duration_ms));
    let states: Vec<String> = r.summary.steps_by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let _ = writeln!(o, "- **Steps:** {} ({})", r.summary.steps, states.join(", "));
    let _ = writeln!(
        o,
        "- **Attempts:** {} · **Retries:** {} · **Breaker trips:** {} · **Quarantines:** {} · **Rejected reports:** {}",
        r.summary.attempts,
        r.summary.retries,
        r.summary.breaker_trips,
        r.summary.quarantines,
        r.summary.rejected_reports
    );
    if let Some(cost) = cost_text(&r.run) {
        let _ = writeln!(o, "- **Cost:** {cost}");
    }
    if !r.run.params.is_empty() {
        let p: Vec<String> = r.run.params.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        let _ = writeln!(o, "- **Parameters:** {}", p.join(" "));
    }
    let _ = writeln!(o, "\n## Critical path ({})\n", span(Some(r.critical_path_ms)));
    let _ = writeln!(
        o,
        "{}\n",
        if r.critical_path.is_empty() { "(no step ran)".to_string() } else { r.critical_path.join(" → ") }
    );
    let _ = writeln!(o, "## Steps\n");
    let _ = writeln!(o, "| step | tool | state | attempts | duration | reason |");
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for s in &r.steps {
        let mark = if s.on_critical_path { " ★" } else { "" };
        let _ = writeln!(
            o,
            "| {}{mark} | {} | {} | {} | {} | {} |",
            md(&s.id),
            s.tool,
            s.state,
            s.attempts.len(),
            span(s.duration_ms),
            md(&s.reason)
        );
    }
    for s in r.steps.iter().filter(|s| !s.review.is_empty()) {
        let _ = writeln!(o, "\n## Review: {}\n\n```diff\n{}```", md(&s.id), s.review.replace("```", "` ` `"));
    }
    let _ = writeln!(o, "\n## Attempts\n");
    let _ = writeln!(o, "| step | # | agent | start | outcome | exit | class | duration | error |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
    for s in &r.steps {
        for a in &s.attempts {
            let exit = a.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {exit} | {} | {} | {} |",
                md(&s.id),
                a.number,
                md(&a.agent),
                md(&a.start()),
                a.outcome,
                a.error_class,
                span(a.duration_ms),
                md(&a.error)
            );
        }
    }
    if r.steps.iter().any(|s| !s.artifacts.is_empty()) {
        let _ = writeln!(o, "\n## Artifacts\n");
        let _ = writeln!(o, "| step | path | bytes | sha256 |");
        let _ = writeln!(o, "|---|---|---|---|");
        for s in &r.steps {
            for a in &s.artifacts {
                let _ = writeln!(o, "| {} | {} | {} | {} |", md(&s.id), md(&a.path), a.size, a.sha256);
            }
        }
    }
    for (title, notes) in r.note_sections() {
        if notes.is_empty() {
            continue;
        }
        let _ = writeln!(o, "\n## {title}\n");
        for n in notes {
            let step = if n.step.is_empty() { String::new() } else { format!(" `{}`", n.step) };
            let _ = writeln!(o, "- {}{step}: {}", time(n.at_ms), md(&n.text()));
        }
    }
    o
}

fn md(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn to_html(r: &Report) -> String {
    let mut o = String::new();
    let title = format!("Run {} — {}", r.run.id, r.run.workstream);
    let _ = write!(
        o,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\n\
body{{font-family:system-ui,sans-serif;margin:2rem;color:#1d2430;background:#fff}}\
h1{{font-size:1.4rem}}h2{{font-size:1.1rem;margin-top:2rem}}\
table{{border-collapse:collapse;font-size:.9rem}}td,th{{border:1px solid #d5dae1;padding:.3rem .6rem;text-align:left;vertical-align:top}}\
th{{background:#f1f4f8}}.state-succeeded,.state-reused{{color:#17803d}}.state-failed,.state-timed_out,.state-lost{{color:#b42318}}\
.state-skipped,.state-canceled{{color:#7a8190}}.crit{{font-weight:600}}\
.facts{{display:flex;gap:2rem;flex-wrap:wrap}}.facts div{{background:#f1f4f8;padding:.6rem 1rem;border-radius:6px}}\n\
</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    let _ = writeln!(
        o,
        "<div class=\"facts\"><div>State<br><b class=\"state-{0}\">{0}</b></div><div>Duration<br><b>{1}</b></div>\
<div>Steps<br><b>{2}</b></div><div>Attempts<br><b>{3}</b></div><div>Retries<br><b>{4}</b></div>\
<div>Breaker trips<br><b>{5}</b></div><div>Quarantines<br><b>{6}</b></div></div>",
        esc(&r.run.state),
        span(r.run.duration_ms),
        r.summary.steps,
        r.summary.attempts,
        r.summary.retries,
        r.summary.breaker_trips,
        r.summary.quarantines
    );
    if let Some(cost) = cost_text(&r.run) {
        let _ = writeln!(o, "<p>Cost: <b>{}</b></p>", esc(&cost));
    }
    if !r.run.reason.is_empty() {
        let _ = writeln!(o, "<p><b>Reason:</b> {}</p>", esc(&r.run.reason));
    }
    if !r.run.submitted_by.is_empty() {
        let _ = writeln!(o, "<p><b>Submitted by:</b> {}</p>", esc(&r.run.submitted_by));
    }
    let _ = writeln!(o, "<h2>Timeline</h2>\n{}", timeline_svg(r));
    let _ = writeln!(
        o,
        "<h2>Critical path ({})</h2>\n<p>{}</p>",
        span(Some(r.critical_path_ms)),
        esc(&r.critical_path.join(" → "))
    );
    let _ = writeln!(
        o,
        "<h2>Steps</h2>\n<table><tr><th>step</th><th>tool</th><th>state</th><th>attempts</th><th>duration</th><th>reason</th></tr>"
    );
    for s in &r.steps {
        let class = if s.on_critical_path { " class=\"crit\"" } else { "" };
        let _ = writeln!(
            o,
            "<tr><td{class}>{}</td><td>{}</td><td class=\"state-{}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.id),
            esc(&s.tool),
            esc(&s.state),
            esc(&s.state),
            s.attempts.len(),
            span(s.duration_ms),
            esc(&s.reason)
        );
    }
    let _ = writeln!(o, "</table>");
    for s in r.steps.iter().filter(|s| !s.review.is_empty()) {
        let _ = writeln!(o, "<h2>Review: {}</h2>\n<pre>{}</pre>", esc(&s.id), esc(&s.review));
    }
    let _ = writeln!(
        o,
        "<h2>Attempts</h2>\n<table><tr><th>step</th><th>#</th><th>agent</th><th>start</th><th>outcome</th><th>exit</th><th>class</th><th>duration</th><th>error</th></tr>"
    );
    for s in &r.steps {
        for a in &s.attempts {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"state-{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&s.id),
                a.number,
                esc(&a.agent),
                esc(&a.start()),
                esc(&a.outcome),
                esc(&a.outcome),
                a.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                esc(&a.error_class),
                span(a.duration_ms),
                esc(&a.error)
            );
        }
    }
    let _ = writeln!(o, "</table>");
    if r.steps.iter().any(|s| !s.artifacts.is_empty()) {
        let _ = writeln!(
            o,
            "<h2>Artifacts</h2>\n<table><tr><th>step</th><th>path</th><th>bytes</th><th>sha256</th></tr>"
        );
        for s in &r.steps {
            for a in &s.artifacts {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&s.id),
                    esc(&a.path),
                    a.size,
                    esc(&a.sha256)
                );
            }
        }
        let _ = writeln!(o, "</table>");
    }
    for (title, notes) in r.note_sections() {
        if notes.is_empty() {
            continue;
        }
        let _ = writeln!(o, "<h2>{title}</h2>\n<ul>");
        for n in notes {
            let _ = writeln!(
                o,
                "<li>{} <code>{}</code> {}</li>",
                esc(&time(n.at_ms)),
                esc(&n.step),
                esc(&n.text())
            );
        }
        let _ = writeln!(o, "</ul>");
    }
    let _ = writeln!(o, "</body></html>");
    o
}

impl AttemptReport {
    /// A pipelined attempt dropped before it started: nothing ran, nothing to draw.
    fn dropped(&self) -> bool {
        !self.pipelined_after.is_empty() && self.started_at_ms.is_none() && self.outcome == "canceled"
    }
}

/// One row per step, one bar per attempt, coloured by outcome; the critical path in bold.
fn timeline_svg(r: &Report) -> String {
    let rows: Vec<&StepReport> = r.steps.iter().filter(|s| s.attempts.iter().any(|a| !a.dropped())).collect();
    let t0 = rows.iter().flat_map(|s| s.attempts.iter().map(|a| a.assigned_at_ms)).min().unwrap_or(0);
    let t1 = rows
        .iter()
        .flat_map(|s| s.attempts.iter().map(|a| a.finished_at_ms.unwrap_or(a.assigned_at_ms)))
        .max()
        .unwrap_or(t0)
        .max(t0 + 1);
    let (label_w, bar_w, row_h) = (180.0, 720.0, 22.0);
    let width = label_w + bar_w + 50.0;
    let height = 30.0 + row_h * rows.len().max(1) as f64;
    let x = |t: i64| label_w + (t - t0) as f64 / (t1 - t0) as f64 * bar_w;
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
<rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"#fbfcfd\"/>\n"
    );
    for i in 0..=4 {
        let t = t0 + (t1 - t0) * i / 4;
        let _ = writeln!(
            o,
            "<line x1=\"{0:.1}\" y1=\"18\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#e3e7ed\"/><text x=\"{0:.1}\" y=\"12\" text-anchor=\"middle\" fill=\"#5b6472\">+{2}</text>",
            x(t),
            height,
            span(Some(t - t0))
        );
    }
    for (i, s) in rows.iter().enumerate() {
        let y = 24.0 + row_h * i as f64;
        let weight = if s.on_critical_path { "bold" } else { "normal" };
        let _ = writeln!(
            o,
            "<text x=\"4\" y=\"{:.1}\" font-weight=\"{weight}\" fill=\"#1d2430\">{}</text>",
            y + 13.0,
            esc(&s.id)
        );
        for a in s.attempts.iter().filter(|a| !a.dropped()) {
            let start = a.started_at_ms.unwrap_or(a.assigned_at_ms);
            let end = a.finished_at_ms.unwrap_or(t1);
            let color = match a.outcome.as_str() {
                "succeeded" => "#2f9e5b",
                "running" | "assigned" => "#3b7dd8",
                "canceled" => "#9aa3af",
                _ => "#d6453d",
            };
            let w = (x(end) - x(start)).max(2.0);
            let _ = writeln!(
                o,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" rx=\"3\" fill=\"{color}\"><title>{} attempt {} on {}: {} ({})</title></rect>",
                x(start),
                y + 2.0,
                row_h - 6.0,
                esc(&s.id),
                a.number,
                esc(&a.agent),
                esc(&a.outcome),
                span(a.duration_ms)
            );
        }
    }
    o.push_str("</svg>");
    o
}
