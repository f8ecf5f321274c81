//! Circuit breakers: `closed → open` after N consecutive counted failures or a failure
//! rate over a window (with a minimum count); `open → half_open` after a cooldown;
//! `half_open` admits a few probes; a probe's success closes it, its failure opens it
//! again. Pure: time comes in as Unix milliseconds.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::outcome::FailureClass;

/// When a breaker trips and recovers, and which failure classes it counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Opens after this many counted failures in a row; 0 turns the rule off.
    pub consecutive_failures: u32,
    /// Opens when this fraction of the results in the window are counted failures;
    /// 0 turns the rule off.
    pub failure_rate: f64,
    /// The window of the rate rule, in milliseconds.
    pub window_ms: u64,
    /// The rate rule needs at least this many results in the window.
    pub min_requests: u32,
    /// How long an open breaker stays open before it lets probes through.
    pub cooldown_ms: u64,
    /// Attempts let through at once while half-open.
    pub half_open_probes: u32,
    /// Failure classes that count against the tool. A shell step's non-zero exit is
    /// the user's failure, not the tool's, so it is not counted by default.
    pub count: Vec<FailureClass>,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window_ms: 60_000,
            min_requests: 10,
            cooldown_ms: 30_000,
            half_open_probes: 1,
            count: vec![FailureClass::ToolError, FailureClass::Timeout],
        }
    }
}

impl BreakerPolicy {
    /// Checks the numbers; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(format!("failure_rate must be within 0..1, not {}", self.failure_rate));
        }
        if self.half_open_probes == 0 {
            return Err("half_open_probes must be at least 1".into());
        }
        for c in &self.count {
            if !FailureClass::REPORTED.contains(c) {
                return Err(format!("count: {c} is not a tool's failure (known: {})", FailureClass::known()));
            }
        }
        Ok(())
    }
}

crate::state::named_enum!(
    /// `closed → open → half_open → closed | open`.
    BreakerState, "breaker state", {
        Closed => "closed",
        Open => "open",
        HalfOpen => "half_open",
    }
);

impl BreakerState {
    pub fn parse(s: &str) -> Option<BreakerState> {
        s.parse().ok()
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    pub state: BreakerState,
    pub consecutive: u32,
    pub opened_at: i64,
    /// Probes let through and not yet answered, while half-open.
    pub probes: u32,
    /// Recent results: (time, counted failure).
    window: VecDeque<(i64, bool)>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new()
    }
}

impl Breaker {
    pub fn new() -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            consecutive: 0,
            opened_at: 0,
            probes: 0,
            window: VecDeque::new(),
        }
    }

    /// A breaker restored from its persisted state (the window starts empty).
    pub fn restored(state: BreakerState, consecutive: u32, opened_at: i64) -> Breaker {
        Breaker { state, consecutive, opened_at, ..Breaker::new() }
    }

    /// Whether a new attempt may go through now.
    pub fn admits(&self, p: &BreakerPolicy) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => self.probes < p.half_open_probes,
        }
    }

    /// An attempt went through.
    pub fn on_dispatch(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probes += 1;
        }
    }

    /// A probe let through ended without a result that says anything of the tool (it
    /// was canceled): its place goes to the next probe.
    pub fn on_abandoned(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probes = self.probes.saturating_sub(1);
        }
    }

    /// When the breaker leaves `open` (it admits probes from then on).
    pub fn reopens_at(&self, p: &BreakerPolicy) -> i64 {
        self.opened_at.saturating_add(p.cooldown_ms as i64)
    }

    /// A result: `None` for success, else the failure class. Returns the new state when
    /// it changed.
    pub fn on_result(
        &mut self,
        p: &BreakerPolicy,
        now: i64,
        failure: Option<FailureClass>,
    ) -> Option<BreakerState> {
        let counted = match failure {
            None => false,
            Some(class) if p.count.contains(&class) => true,
            // Not the tool's fault: neither a success nor a failure.
            Some(_) => {
                self.probes = self.probes.saturating_sub(1);
                return None;
            }
        };
        match self.state {
            BreakerState::HalfOpen => {
                let to = if counted { BreakerState::Open } else { BreakerState::Closed };
                self.enter(to, now);
                Some(to)
            }
            BreakerState::Open => None,
            BreakerState::Closed => {
                self.window.push_back((now, counted));
                let horizon = now - p.window_ms as i64;
                while self.window.front().is_some_and(|(t, _)| *t < horizon) {
                    self.window.pop_front();
                }
                if !counted {
                    self.consecutive = 0;
                    return None;
                }
                self.consecutive += 1;
                let by_count = p.consecutive_failures > 0 && self.consecutive >= p.consecutive_failures;
                let failed = self.window.iter().filter(|(_, f)| *f).count();
                let by_rate = p.failure_rate > 0.0
                    && self.window.len() >= p.min_requests.max(1) as usize
                    && failed as f64 / self.window.len() as f64 >= p.failure_rate;
                if by_count || by_rate {
                    self.enter(BreakerState::Open, now);
                    Some(BreakerState::Open)
                } else {
                    None
                }
            }
        }
    }

    /// Time passing: an open breaker whose cooldown is over becomes half-open.
    pub fn tick(&mut self, p: &BreakerPolicy, now: i64) -> Option<BreakerState> {
        if self.state == BreakerState::Open && now >= self.reopens_at(p) {
            self.enter(BreakerState::HalfOpen, now);
            return Some(BreakerState::HalfOpen);
        }
        None
    }

    /// Closes the breaker by hand.
    pub fn reset(&mut self, now: i64) -> bool {
        let changed = self.state != BreakerState::Closed;
        self.enter(BreakerState::Closed, now);
        changed
    }

    fn enter(&mut self, to: BreakerState, now: i64) {
        self.state = to;
        self.probes = 0;
        match to {
            BreakerState::Open => self.opened_at = now,
            BreakerState::Closed => {
                self.consecutive = 0;
                self.window.clear();
            }
            BreakerState::HalfOpen => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window_ms: 1_000,
            min_requests: 6,
            cooldown_ms: 500,
            half_open_probes: 1,
            count: vec![FailureClass::ToolError, FailureClass::Timeout],
        }
    }

    #[test]
    fn opens_after_consecutive_counted_failures() {
        let p = policy();
        let mut b = Breaker::new();
        assert_eq!(b.on_result(&p, 1, Some(FailureClass::ToolError)), None);
        assert_eq!(b.on_result(&p, 2, Some(FailureClass::Timeout)), None);
        assert_eq!(b.on_result(&p, 3, Some(FailureClass::ToolError)), Some(BreakerState::Open));
        assert!(!b.admits(&p));
        assert_eq!(b.opened_at, 3);
    }

    #[test]
    fn uncounted_classes_and_successes_break_the_streak() {
        let p = policy();
        let mut b = Breaker::new();
        b.on_result(&p, 1, Some(FailureClass::ToolError));
        b.on_result(&p, 2, Some(FailureClass::ToolError));
        assert_eq!(b.on_result(&p, 3, Some(FailureClass::NonzeroExit)), None, "not counted");
        assert_eq!(b.consecutive, 2, "neutral: neither resets nor counts");
        b.on_result(&p, 4, None);
        assert_eq!(b.consecutive, 0);
        assert_eq!(b.on_result(&p, 5, Some(FailureClass::ToolError)), None);
        assert_eq!(b.state, BreakerState::Closed);
    }

    #[test]
    fn opens_on_failure_rate_over_the_window_with_a_minimum_count() {
        let p = BreakerPolicy { consecutive_failures: 0, ..policy() };
        let mut b = Breaker::new();
        // Alternating: 50% failures, but only once six results are in.
        let mut opened = None;
        for i in 0..6 {
            let failure = (i % 2 == 0).then_some(FailureClass::ToolError);
            if let Some(s) = b.on_result(&p, 100 + i, failure) {
                opened = Some((i, s));
            }
        }
        assert_eq!(opened, None, "the sixth result is a success: 3/6 is reached only with a failure");
        assert_eq!(b.on_result(&p, 110, Some(FailureClass::ToolError)), Some(BreakerState::Open));
        // Old results leave the window.
        let mut b = Breaker::new();
        for i in 0..5 {
            b.on_result(&p, i, Some(FailureClass::ToolError).filter(|_| i % 2 == 0));
        }
        assert_eq!(
            b.on_result(&p, 5_000, Some(FailureClass::ToolError)),
            None,
            "the window holds one result"
        );
    }

    #[test]
    fn cooldown_half_open_probe_then_close_or_reopen() {
        let p = BreakerPolicy { half_open_probes: 2, ..policy() };
        let mut b = Breaker::new();
        for t in 0..3 {
            b.on_result(&p, t, Some(FailureClass::ToolError));
        }
        assert_eq!(b.tick(&p, 400), None);
        assert_eq!(b.tick(&p, 502), Some(BreakerState::HalfOpen));
        assert!(b.admits(&p));
        b.on_dispatch();
        b.on_dispatch();
        assert!(!b.admits(&p), "two probes at most");
        assert_eq!(b.on_result(&p, 600, Some(FailureClass::Timeout)), Some(BreakerState::Open));
        assert_eq!(b.opened_at, 600);
        assert_eq!(b.tick(&p, 1_100), Some(BreakerState::HalfOpen));
        b.on_dispatch();
        assert_eq!(b.on_result(&p, 1_200, None), Some(BreakerState::Closed));
        assert!(b.admits(&p));
        assert_eq!(b.consecutive, 0);
    }

    #[test]
    fn reset_closes() {
        let p = policy();
        let mut b = Breaker::restored(BreakerState::Open, 3, 10);
        assert!(!b.admits(&p));
        assert!(b.reset(20));
        assert!(b.admits(&p));
        assert!(!b.reset(30));
    }

    #[test]
    fn policy_check_names_the_field() {
        let bad = BreakerPolicy { failure_rate: 1.5, ..policy() };
        assert!(bad.check().unwrap_err().contains("failure_rate"));
        let bad = BreakerPolicy { count: vec![FailureClass::Canceled], ..policy() };
        assert!(bad.check().unwrap_err().contains("count: canceled is not a tool's failure"));
        let e = serde_norway::from_str::<BreakerPolicy>("count: [oops]").unwrap_err().to_string();
        assert!(e.contains("unknown failure class \"oops\""), "{e}");
    }

    proptest! {
        /// Whatever the results, an open breaker admits nothing until its cooldown has
        /// passed, and a closed one admits everything.
        #[test]
        fn open_admits_nothing_before_cooldown(events in proptest::collection::vec((0u8..4, 0i64..300), 1..80)) {
            let p = policy();
            let mut b = Breaker::new();
            let mut now = 0;
            for (kind, dt) in events {
                now += dt;
                b.tick(&p, now);
                match kind {
                    0 => { b.on_result(&p, now, None); }
                    1 => { b.on_result(&p, now, Some(FailureClass::ToolError)); }
                    2 => { b.on_result(&p, now, Some(FailureClass::NonzeroExit)); }
                    _ => { if b.admits(&p) { b.on_dispatch(); } }
                }
                match b.state {
                    BreakerState::Open => {
                        prop_assert!(!b.admits(&p));
                        prop_assert!(now < b.reopens_at(&p) || b.tick(&p, now).is_some());
                    }
                    BreakerState::Closed => prop_assert!(b.admits(&p)),
                    BreakerState::HalfOpen => prop_assert!(b.probes <= p.half_open_probes),
                }
            }
        }
    }
}
