//! Every RPC of the API port and what a caller needs to make it. An RPC missing here
//! is refused to everyone (a test checks that the table covers the whole API).

use baton_common::auth::Role;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health probes.
    Public,
    /// Any valid credential.
    Authenticated,
    /// An identity whose role includes this one.
    Role(Role),
    /// A join token (and nothing else): enrollment.
    JoinToken,
}

const BATON: &str = "/baton.v1.BatonService/";
const AGENT: &str = "/baton.v1.AgentService/";
const ADMIN: &str = "/baton.v1.AdminService/";

/// The table: (service prefix, method, need).
pub const RPCS: &[(&str, &str, Need)] = &[
    (BATON, "SubmitRun", Need::Role(Role::Submitter)),
    (BATON, "GetRun", Need::Role(Role::Reader)),
    (BATON, "ListRuns", Need::Role(Role::Reader)),
    (BATON, "CancelRun", Need::Role(Role::Operator)),
    (BATON, "ReleaseRun", Need::Role(Role::Operator)),
    // The engine checks the step's own role (operator unless the step names another).
    (BATON, "DecideApproval", Need::Role(Role::Reader)),
    (BATON, "RetryRun", Need::Role(Role::Operator)),
    (BATON, "RerunRun", Need::Role(Role::Submitter)),
    (BATON, "ListCache", Need::Role(Role::Reader)),
    (BATON, "PurgeCache", Need::Role(Role::Operator)),
    (BATON, "ListArtifacts", Need::Role(Role::Reader)),
    (BATON, "CreateSchedule", Need::Role(Role::Submitter)),
    (BATON, "ListSchedules", Need::Role(Role::Reader)),
    (BATON, "GetSchedule", Need::Role(Role::Reader)),
    (BATON, "PauseSchedule", Need::Role(Role::Operator)),
    (BATON, "ResumeSchedule", Need::Role(Role::Operator)),
    (BATON, "DeleteSchedule", Need::Role(Role::Operator)),
    (BATON, "TriggerSchedule", Need::Role(Role::Submitter)),
    (BATON, "GetArtifact", Need::Role(Role::Reader)),
    (BATON, "DeleteRun", Need::Role(Role::Operator)),
    (BATON, "WatchRun", Need::Role(Role::Reader)),
    (BATON, "WatchRuns", Need::Role(Role::Reader)),
    (BATON, "GetLogs", Need::Role(Role::Reader)),
    (BATON, "GetReport", Need::Role(Role::Reader)),
    (BATON, "ListAgents", Need::Role(Role::Reader)),
    (BATON, "GetLeader", Need::Role(Role::Reader)),
    (BATON, "DrainAgent", Need::Role(Role::Operator)),
    (BATON, "ReloadRouter", Need::Role(Role::Operator)),
    (BATON, "ListBreakers", Need::Role(Role::Reader)),
    (BATON, "ResetBreaker", Need::Role(Role::Operator)),
    (AGENT, "Connect", Need::Role(Role::Agent)),
    (AGENT, "Enroll", Need::JoinToken),
    (AGENT, "UploadArtifact", Need::Role(Role::Agent)),
    (AGENT, "FetchInputs", Need::Role(Role::Agent)),
    (ADMIN, "WhoAmI", Need::Authenticated),
    (ADMIN, "CreateToken", Need::Role(Role::Admin)),
    (ADMIN, "ListTokens", Need::Role(Role::Admin)),
    (ADMIN, "RevokeToken", Need::Role(Role::Admin)),
    (ADMIN, "CreateJoinToken", Need::Role(Role::Admin)),
    (ADMIN, "RevokeAgent", Need::Role(Role::Admin)),
    (ADMIN, "SetSecret", Need::Role(Role::Admin)),
    (ADMIN, "ListSecrets", Need::Role(Role::Operator)),
    (ADMIN, "DeleteSecret", Need::Role(Role::Admin)),
    ("/grpc.health.v1.Health/", "Check", Need::Public),
    ("/grpc.health.v1.Health/", "Watch", Need::Public),
    ("/grpc.reflection.v1.ServerReflection/", "ServerReflectionInfo", Need::Role(Role::Reader)),
    ("/grpc.reflection.v1alpha.ServerReflection/", "ServerReflectionInfo", Need::Role(Role::Reader)),
];

/// What a call to `path` (`/package.Service/Method`) needs; `None` for an RPC that is
/// not in the table.
pub fn need_of(path: &str) -> Option<Need> {
    RPCS.iter()
        .find(|(service, method, _)| path.strip_prefix(service) == Some(method))
        .map(|(_, _, need)| *need)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every method of every service the controller serves is in the table, and the
    /// table names no method that does not exist.
    #[test]
    fn the_table_covers_every_rpc_of_the_api_port() {
        let mut paths = Vec::new();
        for set in [
            baton_common::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let fds = prost_types::FileDescriptorSet::decode(set).unwrap();
            for file in fds.file {
                for svc in &file.service {
                    for m in &svc.method {
                        paths.push(format!("/{}.{}/{}", file.package(), svc.name(), m.name()));
                    }
                }
            }
        }
        for p in &paths {
            assert!(need_of(p).is_some(), "{p} is not in the table of RPCs");
        }
        for (service, method, _) in RPCS {
            let p = format!("{service}{method}");
            assert!(paths.contains(&p), "the table names {p}, which the API does not have");
        }
        assert_eq!(need_of("/baton.v1.BatonService/Nope"), None);
        assert_eq!(need_of("/baton.v1.BatonService/SubmitRunX"), None);
    }
}
