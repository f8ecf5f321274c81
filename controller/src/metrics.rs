//! The controller's metrics, declared in one place.

use std::sync::Arc;

use baton_common::metrics::{COUNTS, DURATIONS, Family, Histogram, LATENCY};

pub struct Metrics {
    pub runs: Family,
    pub steps: Family,
    pub attempts: Family,
    pub dispatch_latency: Histogram,
    pub pipelined: Family,
    pub step_duration: Histogram,
    pub cost: Family,
    pub tokens: Family,
    pub breakers: Family,
    pub agents: Family,
    pub heartbeats: Family,
    pub heartbeats_late: Family,
    pub fenced: Family,
    pub invariant_violations: Family,
    pub commit_seconds: Histogram,
    pub commit_batch: Histogram,
    pub events: Family,
    pub pruned_runs: Family,
    pub pruned_rows: Family,
    pub database_bytes: Family,
    pub build: Family,
    pub leader: Family,
    pub slots: Family,
    pub process: baton_common::metrics::ProcessMetrics,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics {
            runs: Family::gauge("baton_runs", "Runs by state.", &["state"]),
            steps: Family::gauge("baton_steps", "Steps of active runs by state.", &["state"]),
            attempts: Family::counter(
                "baton_attempts_total",
                "Attempts that ended, by outcome and failure class.",
                &["outcome", "error_class"],
            ),
            dispatch_latency: Histogram::new(
                "baton_dispatch_latency_seconds",
                "From a step becoming ready to its attempt starting on an agent (pipelined starts, which begin on their agent before the controller knows the step is ready, are counted apart).",
                &[],
                LATENCY,
            ),
            pipelined: Family::counter(
                "baton_pipelined_starts_total",
                "Steps that ran on an attempt assigned ahead of time to the agent of their dependencies (started there when those succeeded).",
                &[],
            ),
            step_duration: Histogram::new(
                "baton_step_duration_seconds",
                "Duration of attempts that ran to an end, by tool.",
                &["tool"],
                DURATIONS,
            ),
            cost: Family::counter(
                "baton_cost_usd_total",
                "Cost attempts reported (their baton_cost_usd output: aider's usage), by tool.",
                &["tool"],
            ),
            tokens: Family::counter(
                "baton_tokens_total",
                "Tokens attempts reported (their baton_tokens output: aider's usage), by tool.",
                &["tool"],
            ),
            breakers: Family::gauge("baton_breakers", "Circuit breakers by state.", &["state"]),
            agents: Family::gauge(
                "baton_agents",
                "Agents by state (connected, disconnected, lost).",
                &["state"],
            ),
            heartbeats: Family::counter("baton_heartbeats_total", "Heartbeats received from agents.", &[]),
            heartbeats_late: Family::counter(
                "baton_heartbeats_late_total",
                "Agent messages that came more than two heartbeat intervals (idle ones: idle intervals) after the previous one.",
                &[],
            ),
            fenced: Family::counter(
                "baton_results_fenced_total",
                "Reports (results, starts, heartbeats, output) rejected for a stale lease.",
                &[],
            ),
            invariant_violations: Family::counter(
                "baton_invariant_violations_total",
                "Illegal state transitions the engine refused (each one is a bug; the run's events name it).",
                &[],
            ),
            commit_seconds: Histogram::new(
                "baton_store_commit_seconds",
                "Time to commit one batch of state changes.",
                &[],
                LATENCY,
            ),
            commit_batch: Histogram::new(
                "baton_store_commit_batch_size",
                "Rows and events written per commit.",
                &[],
                COUNTS,
            ),
            events: Family::counter("baton_run_events_total", "Run events committed.", &[]),
            pruned_runs: Family::counter(
                "baton_pruned_runs_total",
                "Finished runs deleted because their retention passed.",
                &[],
            ),
            pruned_rows: Family::counter(
                "baton_pruned_rows_total",
                "Rows (runs, steps, attempts, events, output chunks) deleted with pruned runs.",
                &[],
            ),
            database_bytes: Family::gauge(
                "baton_database_bytes",
                "Size of the database (SQLite: its file without the WAL).",
                &[],
            ),
            build: baton_common::metrics::build_info("baton-controller"),
            leader: Family::gauge(
                "baton_leader",
                "1 while this controller leads, 0 while it stands by.",
                &[],
            ),
            slots: Family::gauge(
                "baton_agent_slots",
                "Slots of the connected agents: in use, and in all.",
                &["state"],
            ),
            process: Default::default(),
        })
    }

    pub fn render(&self) -> String {
        self.process.refresh();
        let mut families = vec![
            &self.build,
            &self.leader,
            &self.runs,
            &self.steps,
            &self.attempts,
            &self.cost,
            &self.tokens,
            &self.breakers,
            &self.agents,
            &self.slots,
            &self.heartbeats,
            &self.heartbeats_late,
            &self.fenced,
            &self.pipelined,
            &self.invariant_violations,
            &self.events,
            &self.pruned_runs,
            &self.pruned_rows,
            &self.database_bytes,
        ];
        families.extend(self.process.families());
        let histograms =
            [&self.dispatch_latency, &self.step_duration, &self.commit_seconds, &self.commit_batch];
        baton_common::metrics::render(&families, &histograms)
    }
}
