//! Printing API objects as text tables, JSON or YAML, to stdout.

use std::time::{Duration, UNIX_EPOCH};

use baton_common::breaker::BreakerState;
use baton_common::state::{AgentState, RunState, StepState};
use baton_common::{pb, proto};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Jsonl,
    Yaml,
}

/// Writes to stdout and flushes. When the reader went away (`baton runs show X | head
/// -1`) the program ends quietly with 0, as other Unix tools do; any other failure to
/// write is one line on stderr and exit 1.
pub fn write_out(bytes: &[u8]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// One document: pretty JSON for `json`, one line for `jsonl`, YAML for `yaml` (the
/// same fields and values as the JSON).
pub fn print_json<T: Serialize + ?Sized>(format: Format, value: &T) {
    let text = match format {
        Format::Json => serde_json::to_string_pretty(value).map_err(|e| e.to_string()),
        Format::Yaml => serde_norway::to_string(value)
            .map(|t| format!("---\n{}", t.trim_end()))
            .map_err(|e| e.to_string()),
        _ => serde_json::to_string(value).map_err(|e| e.to_string()),
    };
    match text {
        Ok(t) => out!("{t}"),
        Err(e) => eprintln!("error: cannot encode the output: {e}"),
    }
}

/// A list: one document holding the array for `json` and `yaml`, one object per line
/// for `jsonl`.
fn print_list<T: Serialize>(format: Format, items: &[T]) {
    match format {
        Format::Jsonl => items.iter().for_each(|i| print_json(format, i)),
        _ => print_json(format, items),
    }
}

/// Unix milliseconds of an optional timestamp; 0 when unset.
pub fn ms(t: &Option<proto::Timestamp>) -> i64 {
    t.as_ref().map_or(0, proto::millis)
}

/// Milliseconds of an optional span; -1 when unset.
pub fn dur(d: &Option<proto::Duration>) -> i64 {
    d.as_ref().map_or(-1, proto::duration_millis)
}

/// The name of an enum value of the protos: empty for unspecified, `unknown(N)` for a
/// value this client does not know.
fn named<S: Copy>(
    v: i32,
    from: fn(i32) -> Result<S, baton_common::state::UnknownState>,
    name: fn(S) -> &'static str,
) -> String {
    match from(v) {
        Ok(s) => name(s).to_string(),
        Err(_) if v == 0 => String::new(),
        Err(_) => format!("unknown({v})"),
    }
}

pub fn run_state(v: i32) -> String {
    named(v, RunState::from_pb, RunState::as_str)
}

pub fn step_state(v: i32) -> String {
    named(v, StepState::from_pb, StepState::as_str)
}

fn agent_state(v: i32) -> String {
    named(v, AgentState::from_pb, AgentState::as_str)
}

fn breaker_state(v: i32) -> String {
    named(v, BreakerState::from_pb, BreakerState::as_str)
}

/// Unix milliseconds as UTC `YYYY-MM-DDTHH:MM:SSZ`; `-` for unset.
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

/// A span of milliseconds, short: `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub fn span(ms: i64) -> String {
    if ms < 0 {
        return "-".into();
    }
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// Columns aligned to their widest cell; the last column is not padded.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let parts: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| if i == last { c } else { format!("{c:<w$}", w = widths[i]) })
            .collect();
        out!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub fn runs(format: Format, runs: &[pb::RunSummary]) {
    if format != Format::Text {
        return print_list(format, runs);
    }
    let rows = runs
        .iter()
        .map(|r| {
            let p = r.progress.clone().unwrap_or_default();
            vec![
                r.id.clone(),
                r.workstream.clone(),
                run_state(r.state),
                format!("{}/{}", p.done, p.total),
                time(ms(&r.created_at)),
                span(dur(&p.elapsed)),
                r.reason.clone(),
            ]
        })
        .collect();
    table(&["ID", "WORKSTREAM", "STATE", "STEPS", "CREATED", "ELAPSED", "REASON"], rows);
}

pub fn run(format: Format, run: &pb::Run) {
    if format != Format::Text {
        return print_json(format, run);
    }
    let p = run.progress.clone().unwrap_or_default();
    out!("Run:        {}", run.id);
    out!("Workstream: {}", run.workstream);
    out!("State:      {}", run_state(run.state));
    if !run.reason.is_empty() {
        out!("Reason:     {}", run.reason);
    }
    out!("Created:    {}", time(ms(&run.created_at)));
    out!("Elapsed:    {}", span(dur(&p.elapsed)));
    out!("Progress:   {}/{} steps done ({:.0}%)", p.done, p.total, p.percent);
    if !run.name.is_empty() {
        out!("Name:       {}", run.name);
    }
    if !run.labels.is_empty() {
        let mut labels: Vec<String> = run.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        out!("Labels:     {}", labels.join(", "));
    }
    if run.priority != 0 {
        out!("Priority:   {}", run.priority);
    }
    if let Some(cost) = cost_line(run) {
        out!("Cost:       {cost}");
    }
    if !run.rerun_of.is_empty() {
        out!("Rerun of:   {}", run.rerun_of);
    }
    if !run.reruns.is_empty() {
        out!("Reruns:     {}", run.reruns.join(", "));
    }
    // Secret params come masked from the controller.
    let params = run.params.as_ref().map(proto::json_object).unwrap_or_default();
    if !params.is_empty() {
        out!("Params:");
        for (k, v) in &params {
            out!("  {k} = {}", scalar(v));
        }
    }
    out!();
    steps(&run.steps);
    let outputs: Vec<(&str, serde_json::Value)> = run
        .steps
        .iter()
        .filter_map(|s| s.result.as_ref().map(|r| (s.id.as_str(), proto::json(r))))
        .filter(|(_, v)| !v.is_null())
        .collect();
    if !outputs.is_empty() {
        out!();
        out!("Outputs:");
        for (step, v) in outputs {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        out!("  {step}.{k} = {}", scalar(&v));
                    }
                }
                v => out!("  {step} = {}", scalar(&v)),
            }
        }
    }
    let files: Vec<(&str, &pb::ArtifactInfo)> =
        run.steps.iter().flat_map(|s| s.artifacts.iter().map(move |a| (s.id.as_str(), a))).collect();
    if !files.is_empty() {
        out!();
        out!("Artifacts:");
        for (step, a) in files {
            out!("  {step}: {} ({} bytes, sha256 {})", a.path, a.size, &a.sha256[..12.min(a.sha256.len())]);
        }
    }
    // An approval step waiting for its decision shows what it approves: the changes of
    // the coding steps above it.
    let waiting = StepState::AwaitingApproval.to_pb();
    for gate in run.steps.iter().filter(|s| s.state == waiting) {
        let diff = review(run, &gate.id);
        if !diff.is_empty() {
            out!();
            out!("Review for {}:", gate.id);
            for line in diff.lines() {
                out!("  {line}");
            }
        }
    }
}

/// The combined diff approval step `gate` of `run` shows (see `approval::review_diff`).
pub fn review(run: &pb::Run, gate: &str) -> String {
    let outputs: Vec<Option<serde_json::Value>> =
        run.steps.iter().map(|s| s.result.as_ref().map(proto::json)).collect();
    let steps: Vec<baton_common::approval::Reviewed> = run
        .steps
        .iter()
        .zip(&outputs)
        .map(|(s, o)| baton_common::approval::Reviewed {
            id: &s.id,
            tool: &s.tool,
            needs: &s.needs,
            outputs: o.as_ref(),
        })
        .collect();
    baton_common::approval::review_diff(&steps, gate)
}

/// A JSON value on one line: strings bare (cut at 200 characters), the rest as JSON.
fn scalar(v: &serde_json::Value) -> String {
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let one_line = text.replace('\n', "\\n");
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// The per-step summary: state, attempts, duration and why it is where it is.
pub fn steps(steps: &[pb::Step]) {
    // Attempts by id, as `step#number`, to say what a pipelined one started after.
    let labels: std::collections::HashMap<&str, String> = steps
        .iter()
        .flat_map(|s| s.attempts.iter().map(move |a| (a.id.as_str(), format!("{}#{}", s.id, a.number))))
        .collect();
    let rows = steps
        .iter()
        .map(|s| {
            let start = match s.attempts.last() {
                None => "-".to_string(),
                Some(a) if a.after.is_empty() => "ready".to_string(),
                Some(a) => {
                    let after: Vec<&str> = a
                        .after
                        .iter()
                        .map(|id| labels.get(id.as_str()).map_or(id.as_str(), |l| l.as_str()))
                        .collect();
                    format!("after {}", after.join(","))
                }
            };
            let (started, finished) = (ms(&s.started_at), ms(&s.finished_at));
            let duration =
                if started > 0 && finished >= started { span(finished - started) } else { "-".into() };
            let agent = s.attempts.last().map(|a| a.agent_name.clone()).unwrap_or_default();
            let exit = s
                .attempts
                .last()
                .and_then(|a| a.exit_code)
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into());
            vec![
                s.id.clone(),
                s.tool.clone(),
                step_state(s.state),
                s.attempt_count.to_string(),
                duration,
                if agent.is_empty() { "-".into() } else { agent },
                start,
                exit,
                s.reason.clone(),
            ]
        })
        .collect();
    table(&["STEP", "TOOL", "STATE", "ATTEMPTS", "DURATION", "AGENT", "START", "EXIT", "REASON"], rows);
}

/// Writes log chunks to stdout: raw for one step, or line by line with a `step | `
/// prefix when several steps' output is mixed; or as objects for programs.
pub struct LogPrinter {
    prefixed: bool,
    format: Format,
    partial: std::collections::HashMap<String, Vec<u8>>,
}

impl LogPrinter {
    /// For programs (`-o json|jsonl|yaml`) each chunk is one object, as it arrives.
    pub fn new(prefixed: bool, format: Format) -> LogPrinter {
        LogPrinter { prefixed, format, partial: Default::default() }
    }

    pub fn chunk(&mut self, c: &pb::LogChunk) {
        match self.format {
            Format::Text => {}
            Format::Yaml => return print_json(Format::Yaml, c),
            _ => return print_json(Format::Jsonl, c),
        }
        if !self.prefixed {
            return write_out(&c.data);
        }
        let buf = self.partial.entry(c.step_id.clone()).or_default();
        buf.extend_from_slice(&c.data);
        let mut lines = Vec::new();
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            lines.extend_from_slice(c.step_id.as_bytes());
            lines.extend_from_slice(b" | ");
            lines.extend(buf.drain(..=i));
        }
        if !lines.is_empty() {
            write_out(&lines);
        }
    }

    /// Prints what is left of unterminated lines.
    pub fn finish(&mut self) {
        let mut lines = Vec::new();
        for (step, rest) in self.partial.drain() {
            if !rest.is_empty() {
                lines.extend_from_slice(step.as_bytes());
                lines.extend_from_slice(b" | ");
                lines.extend(rest);
                lines.push(b'\n');
            }
        }
        if !lines.is_empty() {
            write_out(&lines);
        }
    }
}

pub fn cache(format: Format, entries: &[pb::CacheEntry]) {
    if format != Format::Text {
        return print_list(format, entries);
    }
    let rows = entries
        .iter()
        .map(|e| {
            vec![
                e.key[..12.min(e.key.len())].to_string(),
                e.workstream.clone(),
                e.step_id.clone(),
                e.run_id.clone(),
                time(ms(&e.created_at)),
                time(ms(&e.expires_at)),
            ]
        })
        .collect();
    table(&["KEY", "WORKSTREAM", "STEP", "RUN", "CREATED", "EXPIRES"], rows);
}

/// When a schedule fires, in words.
fn schedule_when(s: &pb::Schedule) -> String {
    match &s.every {
        Some(d) => format!(
            "every {}",
            baton_common::time::format_duration(std::time::Duration::from_millis(
                proto::duration_millis(d).max(0) as u64
            ))
        ),
        None => format!("{} ({})", s.cron, s.timezone),
    }
}

pub fn schedules(format: Format, list: &[pb::Schedule]) {
    if format != Format::Text {
        return print_list(format, list);
    }
    let rows = list
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.workstream.clone(),
                schedule_when(s),
                if s.paused { "paused".into() } else { time(ms(&s.next_at)) },
                s.overlap.clone(),
                s.catchup.clone(),
                if s.last_run_id.is_empty() { "-".into() } else { s.last_run_id.clone() },
            ]
        })
        .collect();
    table(&["ID", "WORKSTREAM", "WHEN", "NEXT", "OVERLAP", "CATCHUP", "LAST RUN"], rows);
}

pub fn schedule(format: Format, s: &pb::Schedule) {
    if format != Format::Text {
        return print_json(format, s);
    }
    out!("Schedule:   {}", s.id);
    out!("Workstream: {}", s.workstream);
    out!("When:       {}", schedule_when(s));
    out!("State:      {}", if s.paused { "paused" } else { "active" });
    out!("Overlap:    {}", s.overlap);
    out!("Catch-up:   {}", s.catchup);
    if !s.last_run_id.is_empty() {
        out!("Last run:   {}", s.last_run_id);
    }
    let params = s.params.as_ref().map(proto::json_object).unwrap_or_default();
    for (k, v) in &params {
        out!("Param:      {k} = {}", scalar(v));
    }
    if !s.upcoming.is_empty() {
        out!("Next:");
        for t in &s.upcoming {
            out!("  {}", time(ms(&Some(*t))));
        }
    }
}

pub fn artifacts(format: Format, artifacts: &[pb::ArtifactInfo]) {
    if format != Format::Text {
        return print_list(format, artifacts);
    }
    let rows = artifacts
        .iter()
        .map(|a| {
            vec![
                a.step_id.clone(),
                a.path.clone(),
                a.size.to_string(),
                a.sha256[..12.min(a.sha256.len())].to_string(),
                time(ms(&a.created_at)),
            ]
        })
        .collect();
    table(&["STEP", "PATH", "BYTES", "SHA256", "STORED"], rows);
}

pub fn breakers(format: Format, breakers: &[pb::Breaker]) {
    if format != Format::Text {
        return print_list(format, breakers);
    }
    let rows = breakers
        .iter()
        .map(|b| {
            vec![
                b.tool.clone(),
                if b.agent_name.is_empty() { "(all agents)".into() } else { b.agent_name.clone() },
                breaker_state(b.state),
                b.consecutive_failures.to_string(),
                time(ms(&b.opened_at)),
                time(ms(&b.half_open_at)),
            ]
        })
        .collect();
    table(&["TOOL", "AGENT", "STATE", "FAILURES IN A ROW", "OPENED", "PROBES FROM"], rows);
}

pub fn agents(format: Format, agents: &[pb::Agent]) {
    if format != Format::Text {
        return print_list(format, agents);
    }
    let now = baton_common::time::now_ms();
    let rows = agents
        .iter()
        .map(|a| {
            let tools: Vec<String> = a.tools.iter().map(|t| format!("{}@{}", t.name, t.version)).collect();
            let mut labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            vec![
                a.name.clone(),
                if a.draining {
                    format!("{} (draining)", agent_state(a.state))
                } else {
                    agent_state(a.state)
                },
                format!("{}/{}", a.slots_used, a.slots),
                format!("{} ago", span(now - ms(&a.last_seen))),
                tools.join(","),
                if labels.is_empty() { "-".into() } else { labels.join(",") },
                a.id.clone(),
            ]
        })
        .collect();
    table(&["NAME", "STATE", "SLOTS", "LAST SEEN", "TOOLS", "LABELS", "ID"], rows);
}

pub fn secrets(format: Format, secrets: &[pb::SecretInfo]) {
    if format != Format::Text {
        return print_list(format, secrets);
    }
    let rows = secrets
        .iter()
        .map(|s| vec![s.name.clone(), time(ms(&s.created_at)), time(ms(&s.updated_at)), s.updated_by.clone()])
        .collect();
    table(&["NAME", "CREATED", "UPDATED", "UPDATED BY"], rows);
}

pub fn tokens(format: Format, tokens: &[pb::TokenInfo]) {
    if format != Format::Text {
        return print_list(format, tokens);
    }
    let now = baton_common::time::now_ms();
    let rows = tokens
        .iter()
        .map(|t| {
            let state = if t.revoked_at.is_some() {
                "revoked"
            } else if t.expires_at.is_some() && ms(&t.expires_at) <= now {
                "expired"
            } else {
                "active"
            };
            vec![
                t.name.clone(),
                t.role.clone(),
                state.to_string(),
                time(ms(&t.created_at)),
                if t.expires_at.is_some() { time(ms(&t.expires_at)) } else { "never".into() },
                t.created_by.clone(),
                t.id.clone(),
            ]
        })
        .collect();
    table(&["NAME", "ROLE", "STATE", "CREATED", "EXPIRES", "CREATED BY", "ID"], rows);
}

/// "$3.10 of $5.00, 4900 tokens": what a run's attempts reported and its budget; `None`
/// when it reported nothing and has no budget.
pub fn cost_line(run: &pb::Run) -> Option<String> {
    let b = run.budget.as_ref();
    if run.cost_usd == 0.0 && run.tokens == 0 && b.is_none() {
        return None;
    }
    let mut text = format!("${:.2}", run.cost_usd);
    if let Some(max) = b.and_then(|b| b.max_cost_usd) {
        text.push_str(&format!(" of ${max:.2}"));
    }
    text.push_str(&format!(", {} tokens", run.tokens));
    if let Some(max) = b.and_then(|b| b.max_tokens) {
        text.push_str(&format!(" of {max}"));
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_short() {
        assert_eq!(span(850), "850ms");
        assert_eq!(span(12_340), "12.3s");
        assert_eq!(span(245_000), "4m05s");
        assert_eq!(span(7_380_000), "2h03m");
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
