//! The run, step and attempt state machines as pure transition functions.
//!
//! Every state change in the engine goes through `transition`, so an illegal change is
//! an error instead of a silent overwrite.

use thiserror::Error;

/// An attempted state change that the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("illegal {machine} transition {from} -> {to}")]
pub struct TransitionError {
    pub machine: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

/// A name (or a protos' value, as `#N`) that is not one of the enum's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown {machine} {name:?}")]
pub struct UnknownState {
    pub machine: &'static str,
    pub name: String,
}

/// An enum of named values, stored and shown by name, with the matching enum of the
/// protos: `from_pb` refuses a value it does not know (or "unspecified"), so a newer
/// peer's value is an error, never taken for another.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// The value of the protos' enum field `v`.
            pub fn from_pb(v: i32) -> Result<Self, $crate::state::UnknownState> {
                match $crate::pb::$name::try_from(v) {
                    $(Ok($crate::pb::$name::$variant) => Ok($name::$variant),)+
                    _ => Err($crate::state::UnknownState { machine: $what, name: format!("#{v}") }),
                }
            }

            /// The protos' value (as their enum fields hold it).
            pub fn to_pb(self) -> i32 {
                let v = match self { $($name::$variant => $crate::pb::$name::$variant),+ };
                v as i32
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::state::UnknownState;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::state::UnknownState { machine: $what, name: s.to_string() }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use named_enum;

macro_rules! state_enum {
    ($(#[$meta:meta])* $name:ident, $machine:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        named_enum!($(#[$meta])* $name, $machine, { $($variant => $text),+ });

        impl $name {
            /// Moves to `to` when the machine allows it.
            pub fn transition(self, to: $name) -> Result<$name, TransitionError> {
                if self.can_become(to) {
                    Ok(to)
                } else {
                    Err(TransitionError { machine: $machine, from: self.as_str(), to: to.as_str() })
                }
            }
        }
    };
}

state_enum!(
    /// `pending → running → succeeded | failed | quarantined | canceled` (`pending →
    /// succeeded` when every step was skipped by its condition before any ran);
    /// `quarantined → running` (release) or `→ canceled`; `failed | canceled → running`
    /// when a caller retries the run.
    RunState, "run state", {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Quarantined => "quarantined",
        Canceled => "canceled",
    }
);

impl RunState {
    /// Final: nothing changes a run in this state any more, unless a caller retries a
    /// failed or canceled one (`RetryRun`).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }

    fn can_become(self, to: Self) -> bool {
        use RunState::*;
        matches!(
            (self, to),
            (Pending, Running | Succeeded | Failed | Quarantined | Canceled)
                | (Running, Succeeded | Failed | Quarantined | Canceled)
                | (Quarantined, Running | Canceled)
                | (Failed | Canceled, Running)
        )
    }
}

state_enum!(
    /// `waiting → ready → running → succeeded`; on failure `running → retry_wait → ready`
    /// or `→ failed`; `skipped` when an upstream step failed; `canceled`.
    /// `failed → ready` only when an operator releases a quarantined run; `failed |
    /// canceled | skipped → waiting` when a caller retries a failed or canceled run.
    /// `reused` (taken over from the run a rerun repeats) is where a step starts and
    /// stays; `ready → cached` when an earlier attempt with the same cache key stands.
    /// A `for_each` step makes no attempt: `ready → waiting` when it expands (it waits
    /// for its expansions), `ready → succeeded` when they have all succeeded. An
    /// `approval` step makes no attempt: `ready → awaiting_approval → succeeded`
    /// (approved) `| failed` (rejected) `| canceled`.
    StepState, "step state", {
        Waiting => "waiting",
        Ready => "ready",
        Running => "running",
        RetryWait => "retry_wait",
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
        Canceled => "canceled",
        Reused => "reused",
        Cached => "cached",
        AwaitingApproval => "awaiting_approval",
    }
);

/// How many step states there are (for counts indexed by state).
pub const STEP_STATES: usize = 11;

impl StepState {
    /// Final for the run as it stands (a release or a retry may still revive it).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Skipped | Self::Canceled | Self::Reused | Self::Cached
        )
    }

    /// Its outputs are there for the steps that need it: it succeeded in this run, in
    /// the run this one reruns (`reused`), or in an earlier attempt with the same cache
    /// key (`cached`).
    pub fn is_success(self) -> bool {
        matches!(self, Self::Succeeded | Self::Reused | Self::Cached)
    }

    fn can_become(self, to: Self) -> bool {
        use StepState::*;
        matches!(
            (self, to),
            (Waiting, Ready | Skipped | Canceled)
                | (Ready, Running | Failed | Skipped | Canceled)
                | (Running, Succeeded | RetryWait | Failed | Canceled)
                | (RetryWait, Ready | Failed | Canceled)
                | (Failed, Ready)
                | (Failed | Canceled | Skipped, Waiting)
                | (Ready, Cached | Waiting | Succeeded | AwaitingApproval)
                | (AwaitingApproval, Succeeded | Failed | Canceled)
        )
    }
}

state_enum!(
    /// One execution of a step on one agent:
    /// `assigned → running → succeeded | failed | timed_out | canceled | lost`.
    /// A result may arrive without a start report (the start was lost with a stream),
    /// so every final state is also reachable from `assigned`.
    AttemptState, "attempt state", {
        Assigned => "assigned",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        TimedOut => "timed_out",
        Canceled => "canceled",
        Lost => "lost",
    }
);

impl AttemptState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Assigned | Self::Running)
    }

    fn can_become(self, to: Self) -> bool {
        use AttemptState::*;
        matches!(
            (self, to),
            (Assigned, Running) | (Assigned | Running, Succeeded | Failed | TimedOut | Canceled | Lost)
        )
    }
}

state_enum!(
    /// An agent as the controller sees it: `connected ⇄ disconnected`; either `→ lost`
    /// once its lease runs out; `lost → connected` when it comes back. `connected →
    /// connected` is a new session replacing the old one.
    AgentState, "agent state", {
        Connected => "connected",
        Disconnected => "disconnected",
        Lost => "lost",
    }
);

impl AgentState {
    fn can_become(self, to: Self) -> bool {
        use AgentState::*;
        matches!((self, to), (_, Connected) | (Connected, Disconnected) | (Connected | Disconnected, Lost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn run_legal_transitions() {
        use RunState::*;
        for (a, b) in [
            (Pending, Running),
            (Pending, Succeeded),
            (Pending, Canceled),
            (Pending, Failed),
            (Pending, Quarantined),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Quarantined),
            (Running, Canceled),
            (Quarantined, Running),
            (Quarantined, Canceled),
            (Failed, Running),
            (Canceled, Running),
        ] {
            assert_eq!(a.transition(b), Ok(b), "{a} -> {b}");
        }
    }

    #[test]
    fn run_illegal_transitions() {
        use RunState::*;
        for (a, b) in [
            (Running, Pending),
            (Running, Running),
            (Quarantined, Succeeded),
            (Quarantined, Failed),
            (Succeeded, Running),
            (Failed, Pending),
            (Canceled, Succeeded),
        ] {
            let err = a.transition(b).unwrap_err();
            assert_eq!(err.to_string(), format!("illegal run state transition {a} -> {b}"));
        }
        // A retry brings a failed or canceled run back to running; nothing else moves a
        // final run.
        for t in [Succeeded, Failed, Canceled] {
            for &to in RunState::ALL.iter().filter(|&&to| !(t != Succeeded && to == Running)) {
                assert!(t.transition(to).is_err(), "{t} is terminal but became {to}");
            }
        }
    }

    #[test]
    fn step_legal_transitions() {
        use StepState::*;
        for (a, b) in [
            (Waiting, Ready),
            (Waiting, Skipped),
            (Waiting, Canceled),
            (Ready, Running),
            (Ready, Failed),
            (Ready, Skipped),
            (Ready, Canceled),
            (Running, Succeeded),
            (Running, RetryWait),
            (Running, Failed),
            (Running, Canceled),
            (RetryWait, Ready),
            (RetryWait, Failed),
            (RetryWait, Canceled),
            (Failed, Ready),
            (Failed, Waiting),
            (Canceled, Waiting),
            (Skipped, Waiting),
            (Ready, Cached),
            (Ready, Waiting),
            (Ready, Succeeded),
        ] {
            assert_eq!(a.transition(b), Ok(b), "{a} -> {b}");
        }
    }

    #[test]
    fn step_illegal_transitions() {
        use StepState::*;
        for (a, b) in [
            (Waiting, Running),
            (Waiting, Succeeded),
            (Running, Ready),
            (Running, Waiting),
            (RetryWait, Running),
            (Succeeded, Ready),
            (Succeeded, Failed),
            (Canceled, Ready),
            (Skipped, Ready),
            (Failed, Succeeded),
        ] {
            assert!(a.transition(b).is_err(), "{a} -> {b} must be rejected");
        }
        assert_eq!(StepState::ALL.len(), STEP_STATES);
        for &to in StepState::ALL {
            assert!(Succeeded.transition(to).is_err());
            assert!(Reused.transition(to).is_err());
            assert!(Cached.transition(to).is_err());
            assert!(to == Waiting || Canceled.transition(to).is_err());
        }
    }

    #[test]
    fn attempt_transitions() {
        use AttemptState::*;
        assert_eq!(Assigned.transition(Running), Ok(Running));
        for end in [Succeeded, Failed, TimedOut, Canceled, Lost] {
            assert_eq!(Assigned.transition(end), Ok(end));
            assert_eq!(Running.transition(end), Ok(end));
            assert!(end.is_terminal());
            for &to in AttemptState::ALL {
                assert!(end.transition(to).is_err(), "{end} -> {to} must be rejected");
            }
        }
        assert!(Running.transition(Assigned).is_err());
        assert!(Running.transition(Running).is_err());
        assert!(Assigned.transition(Assigned).is_err());
    }

    #[test]
    fn agent_transitions() {
        use AgentState::*;
        for (a, b) in [
            (Connected, Disconnected),
            (Connected, Lost),
            (Disconnected, Lost),
            (Lost, Connected),
            (Disconnected, Connected),
            (Connected, Connected),
        ] {
            assert_eq!(a.transition(b), Ok(b), "{a} -> {b}");
        }
        for (a, b) in [(Lost, Disconnected), (Lost, Lost), (Disconnected, Disconnected)] {
            assert!(a.transition(b).is_err(), "{a} -> {b}");
        }
    }

    #[test]
    fn names_round_trip() {
        for &s in RunState::ALL {
            assert_eq!(s.as_str().parse::<RunState>(), Ok(s));
        }
        for &s in StepState::ALL {
            assert_eq!(s.as_str().parse::<StepState>(), Ok(s));
        }
        for &s in AttemptState::ALL {
            assert_eq!(s.as_str().parse::<AttemptState>(), Ok(s));
        }
        assert!("bogus".parse::<RunState>().is_err());
    }

    proptest! {
        /// Over random sequences of requested changes, a final attempt state never moves
        /// again and every accepted change is one the machine lists.
        #[test]
        fn attempt_final_states_absorb(seq in proptest::collection::vec(0usize..7, 1..40)) {
            let mut s = AttemptState::Assigned;
            for i in seq {
                let to = AttemptState::ALL[i];
                if let Ok(next) = s.transition(to) {
                    prop_assert!(!s.is_terminal());
                    s = next;
                }
            }
        }

        /// A final run leaves its state only for `running` (a retry), and only from
        /// `failed` or `canceled`: a succeeded run never moves again.
        #[test]
        fn run_final_states_absorb(seq in proptest::collection::vec(0usize..6, 1..40)) {
            let mut s = RunState::Pending;
            for i in seq {
                if let Ok(next) = s.transition(RunState::ALL[i]) {
                    if s.is_terminal() {
                        prop_assert!(s != RunState::Succeeded && next == RunState::Running);
                    }
                    s = next;
                }
            }
        }
    }
}
