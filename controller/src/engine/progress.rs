//! Progress of a run: step counts by state, percent done, elapsed time, and an ETA
//! from observed durations (the same step in earlier runs of the workstream, else its
//! tool), assuming what can run in parallel does.

use baton_common::state::{AttemptState, STEP_STATES, StepState};
use baton_common::{pb, proto};

use super::state::{Attempt, IdMap, Run};

/// How often a run's ETA is recomputed at most (it walks the whole DAG).
const ETA_EVERY_MS: i64 = 250;

/// Steps in an order where every step comes after the steps it needs.
pub(super) fn topo_order(run_needs: &[Vec<usize>]) -> Vec<usize> {
    let n = run_needs.len();
    let mut indegree: Vec<usize> = run_needs.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, needs) in run_needs.iter().enumerate() {
        for &j in needs {
            dependents[j].push(i);
        }
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut k = 0;
    while k < order.len() {
        let i = order[k];
        k += 1;
        for &d in &dependents[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                order.push(d);
            }
        }
    }
    order
}

/// Progress from step counts by state (indexed as `StepState`), without times.
pub(crate) fn of_counts(counts: &[u32; STEP_STATES], total: u32) -> pb::Progress {
    let mut by_state = std::collections::HashMap::new();
    let mut done = 0;
    for &state in StepState::ALL {
        let n = counts[state as usize];
        if n > 0 {
            by_state.insert(state.as_str().to_string(), n);
            if state.is_terminal() {
                done += n;
            }
        }
    }
    pb::Progress {
        total,
        done,
        steps_by_state: by_state,
        percent: percent(done, total),
        elapsed: None,
        eta: None,
    }
}

/// `done` of `total` in percent.
pub(crate) fn percent(done: u32, total: u32) -> f64 {
    if total == 0 { 0.0 } else { f64::from(done) * 100.0 / f64::from(total) }
}

impl Run {
    /// Current progress; `eta_ms` is -1 when some open step has no estimate.
    pub(super) fn progress(&mut self, attempts: &IdMap<Attempt>, now: i64) -> pb::Progress {
        let start = self.started_at.unwrap_or(self.created_at);
        let end = self.finished_at.unwrap_or(now);
        let eta_ms = if self.state.is_terminal() {
            0
        } else {
            if self.eta.is_none_or(|(at, _)| now - at >= ETA_EVERY_MS) {
                self.eta = Some((now, self.finish_estimate(attempts, now)));
            }
            match self.eta {
                Some((_, Some(finish))) => (finish - now).max(0),
                _ => -1,
            }
        };
        pb::Progress {
            elapsed: Some(proto::duration(end - start)),
            eta: (eta_ms >= 0).then(|| proto::duration(eta_ms)),
            ..of_counts(&self.counts, self.steps.len() as u32)
        }
    }

    /// When the run should end (Unix ms), if every open step has an estimate.
    fn finish_estimate(&self, attempts: &IdMap<Attempt>, now: i64) -> Option<i64> {
        let mut finish = vec![now; self.steps.len()];
        let mut end = now;
        for &i in &self.topo {
            let s = &self.steps[i];
            if s.state.is_terminal() {
                continue;
            }
            let est = self.estimates[i]?;
            finish[i] = match s.state {
                StepState::Running => {
                    let started = s
                        .current
                        .as_ref()
                        .and_then(|id| attempts.get(id))
                        .map(|a| {
                            if a.state == AttemptState::Running {
                                a.started_at.unwrap_or(a.assigned_at)
                            } else {
                                now
                            }
                        })
                        .unwrap_or(now);
                    (started + est).max(now)
                }
                _ => {
                    let after_needs = self.needs[i].iter().map(|&j| finish[j]).max().unwrap_or(now);
                    after_needs.max(s.next_attempt_at.unwrap_or(now)).max(now) + est
                }
            };
            end = end.max(finish[i]);
        }
        Some(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topo_order_puts_needs_first() {
        // 0 needs 2, 2 needs 1.
        let order = topo_order(&[vec![2], vec![], vec![1]]);
        assert_eq!(order, vec![1, 2, 0]);
    }
}
