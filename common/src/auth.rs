//! Roles: what an identity may do. Each user role includes the ones before it
//! (`reader` < `submitter` < `operator` < `admin`); `agent` is apart from them and may
//! only speak the agent protocol, as itself.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An agent process: only `AgentService`, only as itself.
    Agent,
    /// Reads runs, logs, reports, agents and breakers.
    Reader,
    /// A reader that also starts runs.
    Submitter,
    /// A submitter that also cancels and releases runs, drains agents, resets breakers
    /// and reloads the router.
    Operator,
    /// Everything, including tokens, agent enrollment and secrets.
    Admin,
}

/// The roles a user (API token or client certificate) may hold, weakest first.
pub const USER_ROLES: [Role; 4] = [Role::Reader, Role::Submitter, Role::Operator, Role::Admin];

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Reader => "reader",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether an identity with this role may do what `needed` may.
    pub fn includes(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Agent, Role::Agent) => true,
            (Role::Agent, _) | (_, Role::Agent) => false,
            (have, need) => have >= need,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "agent" => Ok(Role::Agent),
            "reader" => Ok(Role::Reader),
            "submitter" => Ok(Role::Submitter),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => {
                Err(format!("unknown role {other:?} (roles: agent, reader, submitter, operator, admin)"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_roles_include_the_weaker_ones_and_agent_stands_apart() {
        assert!(Role::Admin.includes(Role::Reader) && Role::Operator.includes(Role::Submitter));
        assert!(!Role::Submitter.includes(Role::Operator) && !Role::Reader.includes(Role::Submitter));
        assert!(Role::Agent.includes(Role::Agent));
        assert!(!Role::Admin.includes(Role::Agent) && !Role::Agent.includes(Role::Reader));
        for r in USER_ROLES.iter().chain([Role::Agent].iter()) {
            assert_eq!(r.as_str().parse::<Role>(), Ok(*r));
        }
        assert!("root".parse::<Role>().unwrap_err().contains("unknown role \"root\""));
    }
}
