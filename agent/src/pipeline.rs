//! Pipelined attempts: assigned ahead of time to start on this agent when the
//! attempts they follow (`Assign.after`) have succeeded here.
//!
//! The agent remembers how its recent attempts ended. A queued pipelined attempt starts
//! once every attempt it follows succeeded; if one of them did not (or is unknown
//! here, as after a restart), it never starts and is reported canceled. Its input may
//! read their outputs: it is rendered here, with the same template code the controller
//! uses, from their results and the values the controller sent.

use std::collections::{HashMap, VecDeque};

use baton_common::template::{self, Ref};
use baton_common::{pb, proto};
use serde_json::Value;

/// How a recent attempt ended here.
#[derive(Debug, Clone)]
struct Ended {
    succeeded: bool,
    step_id: String,
    result: Option<String>,
}

/// The last attempts that ended on this agent, oldest forgotten first.
#[derive(Default)]
pub(crate) struct Outcomes {
    by_id: HashMap<String, Ended>,
    order: VecDeque<String>,
}

/// Whether a queued attempt may start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    Now,
    /// What it follows is still running or queued here.
    Later,
    /// What it follows did not succeed here (the reason).
    Never(String),
}

impl Outcomes {
    /// Far more than a pipelined attempt can be behind its predecessors.
    const CAP: usize = 4096;

    pub fn record(&mut self, f: &pb::AttemptFinished) {
        let Some(r) = &f.attempt else { return };
        let ended = Ended {
            succeeded: f.outcome == baton_common::outcome::Outcome::Succeeded.to_pb(),
            step_id: r.step_id.clone(),
            result: Some(proto::text_of_value(f.result.as_ref())).filter(|t| !t.is_empty()),
        };
        if self.by_id.insert(r.attempt_id.clone(), ended).is_none() {
            self.order.push_back(r.attempt_id.clone());
        }
        while self.order.len() > Self::CAP {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    /// Whether `a` may start now; `live` says whether an attempt runs or is queued here.
    pub fn readiness(&self, a: &pb::Assign, live: &dyn Fn(&str) -> bool) -> Readiness {
        let mut later = false;
        for id in &a.after {
            match self.by_id.get(id) {
                Some(e) if e.succeeded => {}
                Some(e) => {
                    return Readiness::Never(format!("attempt {id} of step {:?} did not succeed", e.step_id));
                }
                None if live(id) => later = true,
                None => {
                    return Readiness::Never(format!("attempt {id} it follows is not known to this agent"));
                }
            }
        }
        if later { Readiness::Later } else { Readiness::Now }
    }

    /// Renders a pipelined attempt's input and env in place, when the controller left
    /// them to the agent: outputs of the steps it follows from their results here,
    /// every other reference from the values sent with it.
    pub fn render(&self, a: &mut pb::Assign) -> Result<(), String> {
        let Some(req) = a.request.as_mut() else { return Ok(()) };
        if !req.render {
            return Ok(());
        }
        let values = req.values.as_ref().map(proto::json_object).unwrap_or_default();
        let lookup = |r: &Ref| -> Result<Value, String> {
            if let Ref::Output { step, name } = r
                && let Some(e) =
                    a.after.iter().filter_map(|id| self.by_id.get(id)).find(|e| &e.step_id == step)
            {
                return template::output_value(r, step, name, e.result.as_deref());
            }
            values.get(&r.to_string()).cloned().ok_or_else(|| format!("{r} is not set"))
        };
        let with = req.input.as_ref().map(proto::json_object).unwrap_or_default();
        let env: std::collections::BTreeMap<String, String> = req.env.clone().into_iter().collect();
        let (with, env) = baton_common::script::render_step(&req.tool, &with, &env, &lookup)?;
        req.input = Some(proto::structure(with));
        req.env = env.into_iter().collect();
        req.render = false;
        req.values = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_common::outcome::Outcome;

    fn finished(id: &str, step: &str, outcome: Outcome, result: Option<Value>) -> pb::AttemptFinished {
        pb::AttemptFinished {
            attempt: Some(pb::AttemptRef {
                attempt_id: id.into(),
                step_id: step.into(),
                ..Default::default()
            }),
            outcome: outcome.to_pb(),
            result: result.map(proto::value),
            ..Default::default()
        }
    }

    fn after(ids: &[&str]) -> pb::Assign {
        pb::Assign { after: ids.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn a_pipelined_attempt_waits_for_what_it_follows_and_never_starts_after_a_failure() {
        let mut o = Outcomes::default();
        let running = |id: &str| id == "b";
        assert_eq!(
            o.readiness(&after(&["a"]), &running),
            Readiness::Never("attempt a it follows is not known to this agent".into())
        );
        assert_eq!(o.readiness(&after(&["b"]), &running), Readiness::Later);
        o.record(&finished("b", "build", Outcome::Succeeded, None));
        assert_eq!(o.readiness(&after(&["b"]), &running), Readiness::Now);
        o.record(&finished("c", "test", Outcome::Failed, None));
        assert!(
            matches!(o.readiness(&after(&["b", "c"]), &running), Readiness::Never(why) if why.contains("\"test\""))
        );
    }

    #[test]
    fn a_pipelined_input_is_rendered_from_the_results_here_and_the_values_sent() {
        let mut o = Outcomes::default();
        o.record(&finished("b", "build", Outcome::Succeeded, Some(serde_json::json!({"version": "1.2"}))));
        let mut a = after(&["b"]);
        a.request = Some(pb::ExecutionRequest {
            tool: "shell".into(),
            input: Some(proto::structure(
                serde_json::json!({"run": "deploy ${{ steps.build.outputs.version }} to ${{ params.env }}"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )),
            env: [("V".to_string(), "${{ steps.build.outputs.version }}".to_string())].into(),
            render: true,
            values: Some(proto::structure(
                serde_json::json!({"params.env": "prod"}).as_object().cloned().unwrap_or_default(),
            )),
            ..Default::default()
        });
        o.render(&mut a).unwrap();
        let req = a.request.unwrap();
        assert!(!req.render);
        assert_eq!(req.env["V"], "1.2");
        // The values travel as variables, never pasted into the script.
        let run = proto::json_object(req.input.as_ref().unwrap())["run"].as_str().unwrap().to_string();
        assert!(!run.contains("1.2") && !run.contains("prod"), "{run}");
        assert_eq!(req.env["BATON_IN_1"], "1.2");
        assert_eq!(req.env["BATON_IN_2"], "prod");
        let mut missing = after(&["b"]);
        missing.request = Some(pb::ExecutionRequest {
            tool: "shell".into(),
            input: Some(proto::structure(
                serde_json::json!({"run": "echo ${{ steps.build.outputs.nope }}"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )),
            render: true,
            ..Default::default()
        });
        let e = o.render(&mut missing).unwrap_err();
        assert!(e.contains("steps.build.outputs.nope is not set"), "{e}");
    }
}
