//! Budgets: the cost and tokens attempts report (their `baton_cost_usd` and
//! `baton_tokens` outputs) added up per step and per run, and the run held
//! (quarantined) when they pass its budget or a step's. Its running coding (`aider`)
//! steps are stopped then, as failed: a release with a raised budget runs them again.

use baton_common::state::{RunState, StepState};

use super::EngineError;
use super::model::Model;
use super::runs::{end_step, quarantine};

/// How a budget quarantine's reason begins.
const EXCEEDED: &str = "budget exceeded: ";

/// What an attempt's result reports: (cost in dollars, tokens), when it reports either.
pub(super) fn usage(result: &str) -> Option<(f64, f64)> {
    // Most results report neither: they are not parsed.
    if !result.contains("\"baton_cost_usd\"") && !result.contains("\"baton_tokens\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(result).ok()?;
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).filter(|n| n.is_finite() && *n >= 0.0);
    let (cost, tokens) = (num("baton_cost_usd"), num("baton_tokens"));
    (cost.is_some() || tokens.is_some()).then(|| (cost.unwrap_or(0.0), tokens.unwrap_or(0.0)))
}

fn micros(usd: f64) -> i64 {
    (usd * 1e6).round().min(i64::MAX as f64) as i64
}

impl Model {
    /// Adds what an attempt of step `idx` reported to the step's and the run's totals.
    pub(super) fn add_usage(&mut self, run_id: &str, idx: usize, cost_usd: f64, tokens: f64) {
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let (m, t) = (micros(cost_usd), tokens.round().min(i64::MAX as f64) as i64);
        run.cost_micros = run.cost_micros.saturating_add(m);
        run.tokens = run.tokens.saturating_add(t);
        let step = &mut run.steps[idx];
        step.cost_micros = step.cost_micros.saturating_add(m);
        step.tokens = step.tokens.saturating_add(t);
        self.pending.runs.insert(run_id.to_string());
        self.pending.steps.insert((run_id.to_string(), idx));
    }

    /// Holds the run when step `idx` or the run has passed its budget.
    pub(super) fn check_budget(&mut self, run_id: &str, idx: usize) {
        let Some(run) = self.runs.get(run_id) else { return };
        if !matches!(run.state, RunState::Running | RunState::Pending) {
            return;
        }
        let step = &run.steps[idx];
        let over_step = run.spec.steps[idx]
            .budget
            .and_then(|b| b.exceeded(step.cost_micros as f64 / 1e6, step.tokens.max(0) as u64))
            .map(|w| format!("{EXCEEDED}step {:?} {w}", run.step_id(idx)));
        let over_run = || {
            run.budget()
                .and_then(|b| b.exceeded(run.cost_micros as f64 / 1e6, run.tokens.max(0) as u64))
                .map(|w| format!("{EXCEEDED}{w}"))
        };
        let Some(reason) = over_step.or_else(over_run) else { return };
        let coding: Vec<(usize, String)> = run
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.tool == "aider")
            .filter_map(|(i, s)| s.current.clone().map(|a| (i, a)))
            .collect();
        for (i, attempt_id) in coding {
            if self.attempts.get(&attempt_id).is_none_or(|a| a.state.is_terminal()) {
                continue;
            }
            self.cancel_attempt(&attempt_id, &reason);
            if let Some(run) = self.runs.get_mut(run_id) {
                end_step(&mut self.pending, run, i, StepState::Failed, "step_failed", &reason);
            }
        }
        if let Some(run) = self.runs.get_mut(run_id) {
            quarantine(&mut self.pending, run, &reason);
        }
    }

    /// Sets a new budget on a run a release resumes (millionths of a dollar, tokens).
    /// A run held for its budget must come back under it.
    pub(super) fn raise_budget(
        &mut self,
        run_id: &str,
        max_micros: Option<i64>,
        max_tokens: Option<i64>,
    ) -> Result<(), EngineError> {
        let Some(run) = self.runs.get_mut(run_id) else { return Ok(()) };
        if run.state != RunState::Quarantined {
            return Ok(());
        }
        let micros = max_micros.or(run.budget_micros);
        let tokens = max_tokens.or(run.budget_tokens);
        let budget = super::state::budget_of(run.spec.budget, micros, tokens);
        let over = budget.and_then(|b| b.exceeded(run.cost_micros as f64 / 1e6, run.tokens.max(0) as u64));
        if run.reason.starts_with(EXCEEDED)
            && let Some(w) = over
        {
            return Err(EngineError::Conflict(format!(
                "run {} is over its budget ({w}): release it with a higher one (baton runs release RUN --raise-budget USD or --raise-tokens N)",
                run.id
            )));
        }
        if (micros, tokens) != (run.budget_micros, run.budget_tokens) {
            run.budget_micros = micros;
            run.budget_tokens = tokens;
            self.pending.runs.insert(run_id.to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_report_cost_and_tokens() {
        assert_eq!(usage(r#"{"baton_cost_usd": 3, "x": 1}"#), Some((3.0, 0.0)));
        assert_eq!(usage(r#"{"baton_tokens": 2450, "baton_cost_usd": 0.25}"#), Some((0.25, 2450.0)));
        assert_eq!(usage(r#"{"baton_cost_usd": -1}"#), None);
        assert_eq!(usage(r#"{"cost": 3}"#), None);
    }
}
