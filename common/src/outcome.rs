//! How an attempt ended and why it failed: one enum each, shared by the agent (which
//! reports them), the retry policy and the breakers (which choose by them), the store
//! (which keeps their names) and the protos.

use crate::state::named_enum;

named_enum!(
    /// How an attempt ended, as its agent reports it.
    Outcome, "outcome", {
        Succeeded => "succeeded",
        Failed => "failed",
        TimedOut => "timed_out",
        Canceled => "canceled",
    }
);

named_enum!(
    /// Why an attempt failed.
    FailureClass, "failure class", {
        NonzeroExit => "nonzero_exit",
        Timeout => "timeout",
        AgentLost => "agent_lost",
        ToolError => "tool_error",
        Canceled => "canceled",
        MergeConflict => "merge_conflict",
    }
);

impl FailureClass {
    /// The classes a tool's failure can have, which policies may name (`canceled` is
    /// the controller's own doing, never retried nor counted).
    pub const REPORTED: &'static [FailureClass] = &[
        FailureClass::NonzeroExit,
        FailureClass::Timeout,
        FailureClass::AgentLost,
        FailureClass::ToolError,
        FailureClass::MergeConflict,
    ];

    /// The classes retried by default: all a tool reports but a merge conflict, which
    /// the same merge would meet again.
    pub const RETRIED: &'static [FailureClass] =
        &[FailureClass::NonzeroExit, FailureClass::Timeout, FailureClass::AgentLost, FailureClass::ToolError];

    /// `REPORTED` as a list for messages: `nonzero_exit, timeout, ...`.
    pub fn known() -> String {
        Self::REPORTED.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// A policy's class by name; the error lists the known ones.
    pub fn parse_reported(s: &str) -> Result<FailureClass, String> {
        match s.parse::<FailureClass>() {
            Ok(c) if Self::REPORTED.contains(&c) => Ok(c),
            _ => Err(format!("unknown failure class {s:?} (known: {})", Self::known())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_proto_values_round_trip() {
        for &c in FailureClass::ALL {
            assert_eq!(c.as_str().parse::<FailureClass>(), Ok(c));
            assert_eq!(FailureClass::from_pb(c.to_pb()), Ok(c));
        }
        for &o in Outcome::ALL {
            assert_eq!(Outcome::from_pb(o.to_pb()), Ok(o));
        }
    }

    #[test]
    fn unknown_and_unspecified_proto_values_are_errors() {
        assert!(Outcome::from_pb(0).is_err());
        let e = Outcome::from_pb(99).unwrap_err().to_string();
        assert_eq!(e, "unknown outcome \"#99\"");
        assert!(FailureClass::from_pb(0).is_err());
        assert!(FailureClass::parse_reported("canceled").unwrap_err().contains("unknown failure class"));
    }
}
