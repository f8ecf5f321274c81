//! Following a run: a live progress view on a terminal, one line per event otherwise,
//! one JSON object per event with `-o json|jsonl`. Survives controller restarts by
//! resuming from the last event seen.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use baton_common::pb;
use baton_common::state::{RunState, StepState};
use indicatif::{ProgressBar, ProgressStyle};

use crate::Failure;
use crate::client::{self, Client, Target};
use crate::output::{self, Format};

/// Follows `run_id` from `from_seq` until the run ends. Exit code 0 when it succeeded.
/// `target` (the `--controller` list) is where to look for the leader again after a
/// failover. `known`: the run as the caller just read it, if it did.
///
/// Watched from its first event, a run's steps are learnt from its events: reading the
/// whole run first (a big one takes tens of milliseconds, while it starts) is left to
/// the end, for the final table.
pub async fn watch(
    c: &mut Client,
    target: &Target,
    run_id: &str,
    from_seq: i64,
    format: Format,
    known: Option<pb::Run>,
) -> Result<u8, Failure> {
    let run = match known {
        Some(run) => Some(run),
        None if from_seq <= 1 => None,
        None => Some(get(c, run_id).await?),
    };
    let mut view = View::new(format, run.as_ref());
    let mut events = client::Watch::new(target, run_id, from_seq);
    loop {
        match events.next(c).await {
            Ok(Some(client::Watched::Event(ev))) => {
                view.event(&ev);
                // A held run waits for an operator: stop watching, say how. (An old
                // quarantine, since released, is just history.)
                if ev.kind == "run_quarantined"
                    && let run = get(c, run_id).await?
                    && run.state == RunState::Quarantined.to_pb()
                {
                    view.finish(&run);
                    eprintln!(
                        "run {run_id} is quarantined: {}\nrelease it with `baton runs release {run_id}` or cancel it with `baton runs cancel {run_id}`",
                        ev.message
                    );
                    return Ok(3);
                }
            }
            Ok(Some(client::Watched::Reconnecting(note))) => view.note(&note),
            Ok(None) => break,
            Err(e) => {
                view.clear();
                return Err(e.into());
            }
        }
    }
    let run = get(c, run_id).await?;
    view.finish(&run);
    Ok(if run.state == RunState::Succeeded.to_pb() { 0 } else { 1 })
}

/// The run as its table shows it (without each step's needs).
async fn get(c: &mut Client, run_id: &str) -> Result<pb::Run, Failure> {
    let req = pb::GetRunRequest { run_id: run_id.to_string(), view: pb::RunView::Summary as i32 };
    let run = c.get_run(req).await?.into_inner().run;
    run.ok_or_else(|| Failure::Other(anyhow::anyhow!("run {run_id} not found")))
}

/// Runs with more steps than this are shown as a summary, not one line per event.
const BIG_RUN: u64 = 50;

struct View {
    format: Format,
    bar: Option<ProgressBar>,
    states: HashMap<String, String>,
    /// Steps per state and the running ones, kept as events come (a big run's events
    /// must not each cost a pass over all its steps).
    counts: BTreeMap<String, u64>,
    running: std::collections::BTreeSet<String>,
    total: u64,
    /// Expected time to the end from the latest event, when known.
    eta_ms: i64,
    /// A big run: notable events only, and a summary line at every tenth of the way.
    big: bool,
    /// The last tenth a summary line was printed for.
    tenth: u64,
}

impl View {
    /// A view of `run` as read, or (`None`) of a run known only by its events to come.
    fn new(format: Format, run: Option<&pb::Run>) -> View {
        let mut states = HashMap::new();
        let mut counts = BTreeMap::new();
        let mut running = std::collections::BTreeSet::new();
        let steps = run.map_or(&[][..], |r| r.steps.as_slice());
        for s in steps {
            let state = output::step_state(s.state);
            *counts.entry(state.clone()).or_default() += 1;
            if state == "running" {
                running.insert(s.id.clone());
            }
            states.insert(s.id.clone(), state);
        }
        let total = steps.len() as u64;
        let bar = (format == Format::Text && crate::style::live()).then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let eta_ms = run.and_then(|r| r.progress.as_ref()).map_or(-1, |p| output::dur(&p.eta));
        let big = total > BIG_RUN;
        let mut v = View { format, bar, states, counts, running, total, eta_ms, big, tenth: 0 };
        v.refresh();
        v
    }

    fn event(&mut self, ev: &pb::RunEvent) {
        // A run known by its events learns its size from the first.
        if let Some(p) = &ev.progress
            && u64::from(p.total) > self.total
        {
            self.total = u64::from(p.total);
            self.big = self.total > BIG_RUN;
        }
        let step_state = output::step_state(ev.step_state);
        if !ev.step_id.is_empty() && !step_state.is_empty() {
            if step_state == "running" {
                self.running.insert(ev.step_id.clone());
            } else {
                self.running.remove(&ev.step_id);
            }
            *self.counts.entry(step_state.clone()).or_default() += 1;
            if let Some(old) = self.states.insert(ev.step_id.clone(), step_state)
                && let Some(n) = self.counts.get_mut(&old)
            {
                *n = n.saturating_sub(1);
            }
        }
        // Events read back from the log carry no ETA; a live one updates it.
        if let Some(eta) = ev.progress.as_ref().and_then(|p| p.eta.as_ref()) {
            self.eta_ms = baton_common::proto::duration_millis(eta);
        }
        match self.format {
            Format::Json | Format::Jsonl => output::print_json(Format::Jsonl, ev),
            Format::Yaml => output::print_json(Format::Yaml, ev),
            Format::Text => {
                if !self.big || notable(ev) {
                    let line = line(ev);
                    match &self.bar {
                        Some(bar) => bar.println(line),
                        None => out!("{line}"),
                    }
                }
                if self.big && self.bar.is_none() {
                    let tenth = self.done() * 10 / self.total.max(1);
                    if tenth > self.tenth {
                        self.tenth = tenth;
                        out!("{}", crate::style::fit(&self.summary()));
                    }
                }
                self.refresh();
            }
        }
    }

    fn done(&self) -> u64 {
        self.counts
            .iter()
            .filter(|(s, _)| s.parse::<StepState>().is_ok_and(StepState::is_terminal))
            .map(|(_, n)| n)
            .sum()
    }

    /// Counts per state and the running steps, on one line.
    fn summary(&self) -> String {
        let mut counts: Vec<String> =
            self.counts.iter().filter(|(_, n)| **n > 0).map(|(s, n)| format!("{n} {s}")).collect();
        // Steps no event has named yet are waiting.
        let unseen = self.total.saturating_sub(self.states.len() as u64);
        if unseen > 0 && !self.states.is_empty() {
            counts.push(format!("{unseen} not started"));
        }
        let mut line = format!("progress: {}/{} steps done ({})", self.done(), self.total, counts.join(", "));
        let running = self.running();
        if !running.is_empty() {
            line.push_str(&format!("; {running}"));
        }
        line
    }

    /// `running: a, b, c, d +N`, or empty.
    fn running(&self) -> String {
        let shown: Vec<&str> = self.running.iter().take(4).map(String::as_str).collect();
        let more = self.running.len().saturating_sub(shown.len());
        let mut msg = if shown.is_empty() { String::new() } else { format!("running: {}", shown.join(", ")) };
        if more > 0 {
            msg.push_str(&format!(" +{more}"));
        }
        msg
    }

    fn refresh(&mut self) {
        let Some(bar) = &self.bar else { return };
        bar.set_length(self.total);
        bar.set_position(self.done());
        let mut msg = self.running();
        if self.big {
            let failed = self.counts.get("failed").copied().unwrap_or(0);
            if failed > 0 {
                msg = format!("{failed} failed  {msg}");
            }
        }
        if self.eta_ms > 0 {
            msg.push_str(&format!("  eta {}", output::span(self.eta_ms)));
        }
        bar.set_message(msg);
    }

    fn note(&self, msg: &str) {
        match (&self.bar, self.format) {
            (Some(bar), _) => bar.println(msg),
            (None, Format::Text) => out!("{msg}"),
            _ => eprintln!("{msg}"),
        }
    }

    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// The final per-step summary (text only; JSON watchers get events alone).
    fn finish(&mut self, run: &pb::Run) {
        self.clear();
        if self.format != Format::Text {
            return;
        }
        out!();
        output::steps(&run.steps);
        let elapsed = run.progress.as_ref().map_or(0, |p| output::dur(&p.elapsed).max(0));
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for s in &run.steps {
            *counts.entry(output::step_state(s.state)).or_default() += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
        out!();
        out_raw!(
            "run {} {} in {} ({})",
            run.id,
            crate::style::state(&output::run_state(run.state)),
            output::span(elapsed),
            counts.join(", ")
        );
        if !run.reason.is_empty() && run.state != RunState::Succeeded.to_pb() {
            out_raw!(": {}", run.reason);
        }
        out!();
        // What the failing steps printed last, so that a failure reads without `runs logs`.
        for s in run.steps.iter().filter(|s| s.state == StepState::Failed.to_pb()).take(5) {
            let Some(a) = s.attempts.last() else { continue };
            let lines: Vec<&str> = a.output_tail.lines().collect();
            let exit = a.exit_code.map(|c| format!(", exit {c}")).unwrap_or_default();
            out!();
            let why = if a.error.is_empty() { String::new() } else { format!(": {}", a.error) };
            out!("step {} failed (attempt {}{exit}){why}", s.id, a.number);
            for l in &lines[lines.len().saturating_sub(5)..] {
                out!("  | {}", crate::style::fit(l));
            }
        }
    }
}

/// Whether an event of a big run gets a line of its own: what went wrong or changed
/// the run, not the routine progress of its steps.
fn notable(ev: &pb::RunEvent) -> bool {
    let k = ev.kind.as_str();
    k.starts_with("run_")
        || ["failed", "lost", "timed_out", "quarantin", "retry", "breaker", "canceled", "rejected"]
            .iter()
            .any(|w| k.contains(w))
}

/// One event as a line of text.
fn line(ev: &pb::RunEvent) -> String {
    let t = output::time(output::ms(&ev.at));
    let clock = t.get(11..19).unwrap_or(&t);
    let mut s = format!("{clock}  #{:<4} {:<16}", ev.seq, ev.kind);
    if !ev.step_id.is_empty() {
        s.push_str(&format!(" {}", ev.step_id));
        if ev.step_state != 0 {
            s.push_str(&format!(" [{}]", output::step_state(ev.step_state)));
        }
    } else if ev.run_state != 0 {
        s.push_str(&format!(" run [{}]", output::run_state(ev.run_state)));
    }
    if !ev.message.is_empty() {
        s.push_str(&format!("  {}", ev.message));
    }
    let states = [output::step_state(ev.step_state), output::run_state(ev.run_state)];
    crate::style::event_line(&s, &[states[0].as_str(), states[1].as_str()])
}
