//! Printing API objects as text tables or JSON. JSON goes to stdout only.

use std::time::{Duration, UNIX_EPOCH};

use baton_common::pb;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Jsonl,
}

/// One JSON document (pretty for `json`, one line for `jsonl`).
pub fn print_json<T: Serialize + ?Sized>(format: Format, value: &T) {
    let text = match format {
        Format::Json => serde_json::to_string_pretty(value),
        _ => serde_json::to_string(value),
    };
    match text {
        Ok(t) => println!("{t}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

/// A list: one document holding the array for `json`, one object per line for `jsonl`.
fn print_list<T: Serialize>(format: Format, items: &[T]) {
    match format {
        Format::Jsonl => items.iter().for_each(|i| print_json(format, i)),
        _ => print_json(format, items),
    }
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

fn table(header: &[&str], rows: Vec<Vec<String>>) {
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
        println!("{}", parts.join("  ").trim_end());
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
                r.state.clone(),
                format!("{}/{}", p.done, p.total),
                time(r.created_at_ms),
                span(p.elapsed_ms),
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
    println!("Run:        {}", run.id);
    println!("Workstream: {}", run.workstream);
    println!("State:      {}", run.state);
    if !run.reason.is_empty() {
        println!("Reason:     {}", run.reason);
    }
    println!("Created:    {}", time(run.created_at_ms));
    println!("Elapsed:    {}", span(p.elapsed_ms));
    println!("Progress:   {}/{} steps done ({:.0}%)", p.done, p.total, p.percent);
    println!();
    steps(&run.steps);
}

/// The per-step summary: state, attempts, duration and why it is where it is.
pub fn steps(steps: &[pb::Step]) {
    let rows = steps
        .iter()
        .map(|s| {
            let duration = if s.started_at_ms > 0 && s.finished_at_ms >= s.started_at_ms {
                span(s.finished_at_ms - s.started_at_ms)
            } else {
                "-".into()
            };
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
                s.state.clone(),
                s.attempt_count.to_string(),
                duration,
                if agent.is_empty() { "-".into() } else { agent },
                exit,
                s.reason.clone(),
            ]
        })
        .collect();
    table(&["STEP", "TOOL", "STATE", "ATTEMPTS", "DURATION", "AGENT", "EXIT", "REASON"], rows);
}

/// Writes log chunks to stdout: raw for one step, or line by line with a `step | `
/// prefix when several steps' output is mixed.
pub struct LogPrinter {
    prefixed: bool,
    partial: std::collections::HashMap<String, Vec<u8>>,
}

impl LogPrinter {
    pub fn new(prefixed: bool) -> LogPrinter {
        LogPrinter { prefixed, partial: Default::default() }
    }

    pub fn chunk(&mut self, c: &pb::LogChunk) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if !self.prefixed {
            let _ = out.write_all(&c.data);
            let _ = out.flush();
            return;
        }
        let buf = self.partial.entry(c.step_id.clone()).or_default();
        buf.extend_from_slice(&c.data);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let _ = write!(out, "{} | ", c.step_id);
            let _ = out.write_all(&line);
        }
        let _ = out.flush();
    }

    /// Prints what is left of unterminated lines.
    pub fn finish(&mut self) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for (step, rest) in self.partial.drain() {
            if !rest.is_empty() {
                let _ = write!(out, "{step} | ");
                let _ = out.write_all(&rest);
                let _ = writeln!(out);
            }
        }
    }
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
                b.state.clone(),
                b.consecutive_failures.to_string(),
                time(b.opened_at_ms),
                time(b.half_open_at_ms),
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
                if a.draining { format!("{} (draining)", a.state) } else { a.state.clone() },
                format!("{}/{}", a.slots_used, a.slots),
                format!("{} ago", span(now - a.last_seen_ms)),
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
        .map(|s| vec![s.name.clone(), time(s.created_at_ms), time(s.updated_at_ms), s.updated_by.clone()])
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
            let state = if t.revoked_at_ms > 0 {
                "revoked"
            } else if t.expires_at_ms > 0 && t.expires_at_ms <= now {
                "expired"
            } else {
                "active"
            };
            vec![
                t.name.clone(),
                t.role.clone(),
                state.to_string(),
                time(t.created_at_ms),
                if t.expires_at_ms > 0 { time(t.expires_at_ms) } else { "never".into() },
                t.created_by.clone(),
                t.id.clone(),
            ]
        })
        .collect();
    table(&["NAME", "ROLE", "STATE", "CREATED", "EXPIRES", "CREATED BY", "ID"], rows);
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
