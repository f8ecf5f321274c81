//! Retry policy: what happens after an attempt fails. Pure, so the engine's decisions
//! are testable without clocks or randomness.

use serde::{Deserialize, Serialize};

use crate::outcome::FailureClass;

/// A step's retry policy, with the workstream's defaults already applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts the step may spend on its own failures, the first one included.
    pub max_attempts: u32,
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
    /// 0..=1: each delay is shortened by up to this fraction, at random.
    pub jitter: f64,
    /// Failure classes that are retried at all.
    pub retry_on: Vec<FailureClass>,
    /// Exit codes that fail the step at once, whatever budget is left.
    pub fail_fast_exit_codes: Vec<i32>,
    /// Attempts lost with their agent that the step survives. They do not spend
    /// `max_attempts`: losing an agent is not the step's fault.
    pub max_agent_lost: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_ms: 1_000,
            max_ms: 60_000,
            multiplier: 2.0,
            jitter: 0.2,
            retry_on: FailureClass::RETRIED.to_vec(),
            fail_fast_exit_codes: Vec::new(),
            max_agent_lost: 3,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Try again after this many milliseconds.
    Retry { delay_ms: u64 },
    /// The step has failed for good, for this reason.
    Fail { reason: String },
}

/// The facts a decision is made from.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    pub class: FailureClass,
    pub exit_code: Option<i32>,
    /// The step's own failed attempts so far, this one included (losses excluded).
    pub own_failures: u32,
    /// Attempts lost with their agent so far, this one included.
    pub lost: u32,
}

impl RetryPolicy {
    /// Decides the step's fate after `f`. `random` in [0, 1) draws the jitter.
    pub fn decide(&self, f: Failure, random: f64) -> Decision {
        if !self.retry_on.contains(&f.class) {
            return Decision::Fail { reason: format!("{} is not retried", f.class) };
        }
        if f.class == FailureClass::AgentLost {
            return if f.lost <= self.max_agent_lost {
                Decision::Retry { delay_ms: 0 }
            } else {
                Decision::Fail {
                    reason: format!("lost {} agents (max_agent_lost is {})", f.lost, self.max_agent_lost),
                }
            };
        }
        if let Some(code) = f.exit_code
            && self.fail_fast_exit_codes.contains(&code)
        {
            return Decision::Fail { reason: format!("exit code {code} is in fail_fast_exit_codes") };
        }
        if f.own_failures >= self.max_attempts {
            // With one attempt allowed there was never a retry to speak of.
            let reason = if self.max_attempts == 1 {
                String::new()
            } else {
                format!("no retries left ({} of {} attempts used)", f.own_failures, self.max_attempts)
            };
            return Decision::Fail { reason };
        }
        Decision::Retry { delay_ms: self.backoff(f.own_failures, random) }
    }

    /// Delay before the retry that follows the `n`-th own failure (1-based):
    /// `initial * multiplier^(n-1)`, capped at `max`, minus jitter.
    pub fn backoff(&self, n: u32, random: f64) -> u64 {
        let exp = self.multiplier.powi(n.saturating_sub(1).min(64) as i32);
        let base = (self.initial_ms as f64 * exp).min(self.max_ms as f64);
        let cut = self.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0);
        (base * (1.0 - cut)).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_ms: 100,
            max_ms: 1_000,
            multiplier: 3.0,
            jitter: 0.5,
            ..Default::default()
        }
    }

    fn failure(class: FailureClass, own: u32, lost: u32) -> Failure {
        Failure { class, exit_code: Some(1), own_failures: own, lost }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = policy();
        assert_eq!(p.backoff(1, 0.0), 100);
        assert_eq!(p.backoff(2, 0.0), 300);
        assert_eq!(p.backoff(3, 0.0), 900);
        assert_eq!(p.backoff(4, 0.0), 1_000);
        assert_eq!(p.backoff(40, 0.0), 1_000);
        assert_eq!(p.backoff(2, 1.0), 150, "full jitter draw halves the delay at jitter 0.5");
    }

    #[test]
    fn retries_until_the_budget_is_spent() {
        let p = policy();
        assert_eq!(
            p.decide(failure(FailureClass::NonzeroExit, 1, 0), 0.0),
            Decision::Retry { delay_ms: 100 }
        );
        assert_eq!(
            p.decide(failure(FailureClass::NonzeroExit, 2, 0), 0.0),
            Decision::Retry { delay_ms: 300 }
        );
        let Decision::Fail { reason } = p.decide(failure(FailureClass::NonzeroExit, 3, 0), 0.0) else {
            panic!()
        };
        assert_eq!(reason, "no retries left (3 of 3 attempts used)");
    }

    #[test]
    fn classes_not_listed_fail_at_once() {
        let p = RetryPolicy { retry_on: vec![FailureClass::Timeout], ..policy() };
        assert!(matches!(p.decide(failure(FailureClass::NonzeroExit, 1, 0), 0.0), Decision::Fail { .. }));
        assert!(matches!(p.decide(failure(FailureClass::Timeout, 1, 0), 0.0), Decision::Retry { .. }));
        assert!(matches!(p.decide(failure(FailureClass::AgentLost, 0, 1), 0.0), Decision::Fail { .. }));
    }

    #[test]
    fn agent_losses_have_their_own_budget() {
        let p = RetryPolicy { max_attempts: 1, max_agent_lost: 2, ..policy() };
        // The step's own budget is spent by nothing: losses retry at once.
        assert_eq!(p.decide(failure(FailureClass::AgentLost, 0, 1), 0.5), Decision::Retry { delay_ms: 0 });
        assert_eq!(p.decide(failure(FailureClass::AgentLost, 0, 2), 0.5), Decision::Retry { delay_ms: 0 });
        assert!(matches!(p.decide(failure(FailureClass::AgentLost, 0, 3), 0.5), Decision::Fail { .. }));
    }

    #[test]
    fn fail_fast_exit_codes_skip_the_remaining_budget() {
        let p = RetryPolicy { fail_fast_exit_codes: vec![2], ..policy() };
        let f = Failure { class: FailureClass::NonzeroExit, exit_code: Some(2), own_failures: 1, lost: 0 };
        let Decision::Fail { reason } = p.decide(f, 0.0) else { panic!() };
        assert_eq!(reason, "exit code 2 is in fail_fast_exit_codes");
        let f = Failure { exit_code: Some(1), ..f };
        assert!(matches!(p.decide(f, 0.0), Decision::Retry { .. }));
    }

    proptest! {
        /// Delays stay within [base * (1 - jitter), base] and never exceed max.
        #[test]
        fn jitter_stays_in_bounds(n in 1u32..20, r in 0.0f64..1.0) {
            let p = policy();
            let d = p.backoff(n, r) as f64;
            let base = p.backoff(n, 0.0) as f64;
            prop_assert!(d <= base && d <= p.max_ms as f64);
            prop_assert!(d >= (base * (1.0 - p.jitter)).floor());
        }
    }
}
