//! The checks of a submit that need no engine state: parameters, the references of
//! every template, and the routing of every step. They run before the submit reaches
//! the engine's actor (on the blocking pool, with the parsing), so that a large spec
//! does not hold up scheduling; the actor checks only what it alone knows (secrets,
//! the agents of a pool).

use std::collections::BTreeMap;

use baton_common::spec::Workstream;
use baton_common::template::{self, Ref};

use super::EngineError;
use crate::router::{Route, Router};

/// A run to create: a parsed spec and what the submit gave with it.
#[derive(Debug, Clone)]
pub struct Submission {
    pub spec: Workstream,
    pub params: BTreeMap<String, String>,
    /// The client's id of the submit (may be empty).
    pub request_id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Observed durations of its steps, for the ETA.
    pub estimates: crate::store::Estimates,
    /// For a rerun: the run it repeats and what it takes over from it.
    pub rerun: Option<Rerun>,
    /// Run every step, whatever the step cache holds.
    pub no_cache: bool,
    /// Higher first when slots are scarce (default 0).
    pub priority: i32,
}

/// What a rerun takes over from the run it repeats.
#[derive(Debug, Clone, Default)]
pub struct Rerun {
    /// The run it repeats.
    pub of: String,
    /// Steps taken over (`reused`), by id, with their stored results.
    pub reused: BTreeMap<String, Option<String>>,
}

/// A submission that passed [`Submission::admit`]: parameters complete, each step
/// routed with the rule's defaults folded into its spec.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub(super) run: Submission,
    /// Per step, in spec order.
    pub(super) routes: Vec<Route>,
    /// The secrets its templates use, as (step id, reference, secret name).
    pub(super) secrets: Vec<(String, String, String)>,
}

impl Submission {
    /// `spec` with nothing else given.
    pub fn new(spec: Workstream) -> Submission {
        Submission {
            spec,
            params: BTreeMap::new(),
            request_id: String::new(),
            name: String::new(),
            labels: BTreeMap::new(),
            estimates: Default::default(),
            rerun: None,
            no_cache: false,
            priority: 0,
        }
    }

    /// Fills in declared parameter defaults and checks what needs no engine state:
    /// every declared parameter is set and every given one declared, every
    /// `${{ params.X }}` is set, and every step routes to a tool whose input it fits.
    /// The error names the step or parameter.
    pub fn admit(mut self, router: &Router) -> Result<Admitted, EngineError> {
        let invalid = EngineError::Invalid;
        let (spec, params) = (&mut self.spec, &mut self.params);
        for (name, default) in &spec.params {
            if params.contains_key(name) {
                continue;
            }
            let Some(d) = default else {
                return Err(invalid(format!(
                    "params.{name} has no default and was not given (--param {name}=...)"
                )));
            };
            params.insert(name.clone(), d.clone());
        }
        if !spec.params.is_empty()
            && let Some(extra) = params.keys().find(|k| !spec.params.contains_key(*k))
        {
            return Err(invalid(format!("params.{extra} is not declared under params")));
        }
        if let Some((name, _)) = params.iter().find(|(_, v)| v.contains('\0')) {
            return Err(invalid(format!("params.{name}: the value holds a NUL byte")));
        }
        let mut secrets = Vec::new();
        for s in &spec.steps {
            for v in std::iter::once(serde_json::Value::Object(s.with.clone()))
                .chain(s.env.values().map(|v| serde_json::Value::String(v.clone())))
            {
                for r in template::refs(&v).map_err(invalid)? {
                    match &r {
                        Ref::Param(p) if !params.contains_key(p) => {
                            return Err(invalid(format!(
                                "step {:?}: ${{{{ {r} }}}} is not set (--param {p}=...)",
                                s.id
                            )));
                        }
                        Ref::Secret(name) => secrets.push((s.id.clone(), r.to_string(), name.clone())),
                        _ => {}
                    }
                }
            }
        }
        let mut routes = Vec::with_capacity(spec.steps.len());
        for s in &mut spec.steps {
            let route = router.resolve(s).map_err(|e| invalid(format!("step {:?}: {e}", s.id)))?;
            baton_common::script::check_input(&route.tool, &s.with)
                .map_err(|e| invalid(format!("step {:?}: {e}", s.id)))?;
            routes.push(route);
        }
        Ok(Admitted { run: self, routes, secrets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(yaml: &str, params: &[(&str, &str)], router: &str) -> Result<Admitted, String> {
        let spec = baton_common::spec::parse("t.yaml", yaml).map_err(|e| e.to_string())?;
        let router = Router::from_json(router).map_err(|e| e.to_string())?;
        let params = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Submission { params, ..Submission::new(spec) }.admit(&router).map_err(|e| e.to_string())
    }

    const NO_RULES: &str = r#"{"rules": []}"#;

    #[test]
    fn parameters_get_their_defaults_and_must_be_declared_and_set() {
        let spec = "name: w\nparams: {env: prod, who: null}\nsteps:\n  - {id: a, tool: shell, with: {run: 'echo ${{ params.env }}'}}\n";
        let ok = admit(spec, &[("who", "me")], NO_RULES).unwrap();
        assert_eq!(ok.run.params["env"], "prod");
        assert_eq!(
            admit(spec, &[], NO_RULES).unwrap_err(),
            "params.who has no default and was not given (--param who=...)"
        );
        assert_eq!(
            admit(spec, &[("who", "me"), ("whom", "x")], NO_RULES).unwrap_err(),
            "params.whom is not declared under params"
        );
        assert_eq!(
            admit(spec, &[("who", "a\0b")], NO_RULES).unwrap_err(),
            "params.who: the value holds a NUL byte"
        );
        let undeclared = "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'echo ${{ params.x }}'}}\n";
        assert_eq!(
            admit(undeclared, &[], NO_RULES).unwrap_err(),
            "step \"a\": ${{ params.x }} is not set (--param x=...)"
        );
    }

    #[test]
    fn steps_are_routed_once_with_the_rule_defaults_folded_in() {
        let router = r#"{"rules": [{"match": {"kind": "build"}, "tool": "shell", "labels": {"os": "linux"}, "with": {"run": "make"}}]}"#;
        let spec = "name: w\nsteps:\n  - {id: b, kind: build}\n  - {id: n, tool: noop}\n";
        let ok = admit(spec, &[], router).unwrap();
        assert_eq!(ok.routes[0].tool, "shell");
        assert_eq!(ok.routes[0].placement.rule, Some(0));
        assert_eq!(ok.routes[0].placement.describe_labels(), "label os=linux");
        assert_eq!(ok.run.spec.steps[0].with["run"], "make", "the rule's input is folded into the spec");
        assert_eq!(ok.routes[1], Route { tool: "noop".into(), placement: Default::default() });
        let unrouted = "name: w\nsteps:\n  - {id: x, kind: deploy}\n";
        assert_eq!(
            admit(unrouted, &[], router).unwrap_err(),
            "step \"x\": no router rule maps kind \"deploy\" to a tool"
        );
    }

    #[test]
    fn secrets_are_collected_for_the_engine_to_check() {
        let spec = "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'curl -H ${{ secrets.TOKEN }}'}}\n";
        let ok = admit(spec, &[], NO_RULES).unwrap();
        assert_eq!(ok.secrets, vec![("a".into(), "secrets.TOKEN".into(), "TOKEN".into())]);
    }
}
