//! `for_each`: a step that expands at run time into one step per item of a list an
//! upstream step produced, and ends when its expansions have.
//!
//! When a `for_each` step becomes ready it makes no attempt. It expands instead: its
//! expansions `ID[0]`, `ID[1]`, ... are appended to the run's spec and steps, with the
//! step's own needs, and are ready at once; the step itself waits for them (they are
//! added to its needs), so the steps after it wait for all of them. The grown spec, the
//! new step rows and the `step_expanded` event are one commit: a restart finds the run
//! expanded or not, never half. Once every expansion has succeeded the step succeeds
//! with the list of their outputs; when one fails, the usual skip rule applies to it.

use std::sync::Arc;

use baton_common::spec::{self, MAX_FOR_EACH, MAX_STEPS, StepSpec, Workstream};
use baton_common::state::StepState;
use baton_common::template::{self, Ref};
use serde_json::Value;
use tracing::info;

use super::dispatch::output_of;
use super::model::Model;
use super::runs::{Done, check_done, end_step, set_step, skip_downstream};
use super::state::Step;

impl Model {
    /// A ready `for_each` step: expands it, or, once its expansions have ended, ends it.
    pub(super) fn fan_out(&mut self, run_id: &str, idx: usize) {
        let Some(run) = self.runs.get(run_id) else { return };
        if run.spec.steps[idx].expanded.is_some() {
            self.join(run_id, idx);
        } else {
            match self.items(run_id, idx) {
                Ok(items) => self.expand(run_id, idx, items),
                Err(e) => self.fail_unstarted(run_id, idx, &format!("for_each: {e}")),
            }
        }
    }

    /// The list `for_each` step `idx` expands over, or why it cannot.
    fn items(&self, run_id: &str, idx: usize) -> Result<Vec<Value>, String> {
        let run = self.runs.get(run_id).ok_or("run not found")?;
        let spec = &run.spec.steps[idx];
        let r = spec.for_each.as_deref().map(spec::for_each_ref).ok_or("no list to expand over")??;
        let Ref::Output { step, name } = &r else {
            return Err(format!("${{{{ {r} }}}} is not a step output"));
        };
        let items = match output_of(run, idx, &r, step, name, &[])? {
            Value::Array(items) => items,
            other => {
                return Err(format!("${{{{ {r} }}}} is {}, not a list", template::kind_of(&other)));
            }
        };
        if items.len() > MAX_FOR_EACH {
            return Err(format!("${{{{ {r} }}}} has {} items; the limit is {MAX_FOR_EACH}", items.len()));
        }
        if run.steps.len() + items.len() > MAX_STEPS {
            return Err(format!(
                "its {} items would make the run {} steps; the limit is {MAX_STEPS}",
                items.len(),
                run.steps.len() + items.len()
            ));
        }
        Ok(items)
    }

    /// Expands ready `for_each` step `idx` into one step per item; with no items it
    /// succeeds at once.
    fn expand(&mut self, run_id: &str, idx: usize, items: Vec<Value>) {
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let p = &mut self.pending;
        let template = run.spec.steps[idx].clone();
        let first = run.steps.len();
        let count = items.len();
        let ids: Vec<String> = (0..count).map(|i| spec::item_id(&template.id, i)).collect();
        {
            let spec = Arc::make_mut(&mut run.spec);
            for (i, (item, id)) in items.into_iter().zip(&ids).enumerate() {
                spec.steps.push(StepSpec {
                    id: id.clone(),
                    group: Some(template.id.clone()),
                    item: Some(item),
                    index: Some(i as u32),
                    for_each: None,
                    expanded: None,
                    condition: None,
                    ..template.clone()
                });
            }
            let t = &mut spec.steps[idx];
            t.needs.extend(ids.iter().cloned());
            t.expanded = Some(count as u32);
        }
        let upstream = run.needs[idx].clone();
        for i in 0..count {
            let j = first + i;
            let mut step = Step::new(run.steps[idx].tool.clone(), run.steps[idx].placement.clone(), &[]);
            step.ready_since = Some(p.now);
            step.ready_us = Some(p.now_us);
            run.steps.push(step);
            run.needs.push(upstream.clone());
            run.dependents.push(vec![idx]);
            for &u in &upstream {
                run.dependents[u].push(j);
            }
            run.templated.push(run.templated[idx]);
            run.estimates.push(run.estimates[idx]);
            run.counts[StepState::Ready as usize] += 1;
            run.open += 1;
            p.steps.insert((run.id.clone(), j));
        }
        run.needs[idx].extend(first..first + count);
        run.topo = super::progress::topo_order(&run.needs);
        p.specs.insert(run.id.clone());
        let source = template.for_each.as_deref().unwrap_or_default().trim();
        let msg = match count {
            0 => format!("for_each: {source} is an empty list: no items"),
            _ => format!("for_each: {count} items from {source}: {}", shown(&ids)),
        };
        if count > 0 && set_step(p, run, idx, StepState::Waiting) {
            let step = &mut run.steps[idx];
            step.waiting_on = count as u32;
            step.ready_since = None;
            step.ready_us = None;
        }
        p.event(run, "step_expanded", Some(idx), None, msg);
        info!(run_id, step_id = %template.id, items = count, "step expanded");
        if count == 0 {
            return self.step_done(run_id, idx, Some("[]".into()), Done::Joined("for_each: no items".into()));
        }
        for j in first..first + count {
            self.enqueue(run_id, j);
        }
    }

    /// `for_each` step `idx` is ready again: its expansions have ended. It succeeds
    /// with the list of their outputs when they all succeeded, else it is skipped (it
    /// only gets here then when it runs whatever happened upstream).
    fn join(&mut self, run_id: &str, idx: usize) {
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let id = run.step_id(idx).to_string();
        let members: Vec<usize> = run.needs[idx]
            .iter()
            .copied()
            .filter(|&j| Workstream::is_item_of(&run.spec.steps[j], &id))
            .collect();
        if let Some(&bad) = members.iter().find(|&&j| !run.steps[j].state.is_success()) {
            let p = &mut self.pending;
            let why = format!("expansion {:?} {}", run.step_id(bad), run.steps[bad].state);
            end_step(p, run, idx, StepState::Skipped, "step_skipped", &why);
            skip_downstream(p, run, idx, &format!("upstream step {id:?} was skipped"));
            check_done(p, run);
            return;
        }
        let outputs: Vec<Value> = members
            .iter()
            .map(|&j| {
                run.steps[j]
                    .result
                    .as_deref()
                    .and_then(|r| serde_json::from_str(r).ok())
                    .unwrap_or(Value::Null)
            })
            .collect();
        let result = Value::Array(outputs).to_string();
        let why = format!("for_each: all {} expansions succeeded", members.len());
        self.step_done(run_id, idx, Some(result), Done::Joined(why));
    }
}

/// Step ids for a message: the first few, and how many more.
fn shown(ids: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = ids.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if ids.len() > SHOWN {
        text.push_str(&format!(" and {} more", ids.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use baton_common::pb;
    use baton_common::pb::controller_message::Msg as Down;
    use serde_json::{Value, json};

    use super::super::testkit::{Kit, config};

    const SPEC: &str = "name: w\nsteps:\n  - {id: list, tool: shell, with: {run: 'true'}}\n  - {id: fan, needs: list, tool: shell, for_each: '${{ steps.list.outputs.files }}', with: {run: 'echo ${{ item }} ${{ index }}'}}\n  - {id: after, needs: fan, tool: shell, with: {run: 'echo ${{ steps.fan.outputs.n }}'}}\n";

    fn kit() -> Kit {
        let mut k = Kit::new(crate::engine::EngineConfig { pipeline: false, ..config() });
        k.connect("a", 1, 8);
        k
    }

    /// The attempts sent, each with the values its script reads (`BATON_IN_n`, in order).
    fn sent(k: &mut Kit) -> Vec<(pb::AttemptRef, Vec<String>)> {
        let mut out = Vec::new();
        for m in k.take_sent(1) {
            if let Down::Assign(a) = m {
                let env = a.request.map(|r| r.env).unwrap_or_default();
                let mut vars: Vec<(&String, &String)> =
                    env.iter().filter(|(k, _)| k.starts_with("BATON_IN_")).collect();
                vars.sort();
                let values = vars.into_iter().map(|(_, v)| v.clone()).collect();
                out.extend(a.attempt.map(|r| (r, values)));
            }
        }
        out
    }

    fn run_list(k: &mut Kit, files: Value) -> String {
        let run = k.submit(SPEC);
        let list = sent(k).pop().expect("list is sent").0;
        assert_eq!(list.step_id, "list");
        k.finished_with("a", 1, &list, "succeeded", "", json!({ "files": files }));
        run
    }

    /// A step's state and reason as stored (an ended run is no longer in memory).
    fn stored(k: &Kit, run: &str, step: &str) -> (String, String) {
        let snap = k.stored_run(run);
        let row = snap.steps.iter().find(|s| s.step_id == step).expect("step row");
        (row.state.clone(), row.reason.clone())
    }

    #[test]
    fn a_for_each_step_expands_over_its_upstream_list_durably_and_joins_their_outputs() {
        let mut k = kit();
        let run = run_list(&mut k, json!(["a", {"k": 1}, "c"]));
        let fan = sent(&mut k);
        let ids: Vec<&str> = fan.iter().map(|(r, _)| r.step_id.as_str()).collect();
        assert_eq!(ids, ["fan[0]", "fan[1]", "fan[2]"]);
        assert_eq!(fan[0].1, ["a", "0"], "item and index reach the script");
        assert_eq!(fan[1].1, [r#"{"k":1}"#, "1"]);
        assert_eq!(k.step(&run, "fan"), "waiting");
        assert!(k.events(&run).contains(&"step_expanded".to_string()));
        // The expansion is in the rows: a restart finds the same run.
        let again = k.rebuilt_from(k.snapshot());
        assert_eq!(again.fingerprint(), k.model.fingerprint());
        assert_eq!(again.runs[&run].spec.steps.len(), 6);
        for (i, (r, _)) in fan.iter().enumerate().rev() {
            k.finished_with("a", 1, r, "succeeded", "", json!({ "n": i }));
        }
        assert_eq!(k.step(&run, "fan"), "succeeded");
        assert_eq!(stored(&k, &run, "fan").1, "for_each: all 3 expansions succeeded");
        let after = sent(&mut k);
        assert_eq!(after[0].0.step_id, "after");
        assert_eq!(after[0].1, ["[0,1,2]"], "the join is the list of the expansions' outputs, in item order");
        k.finished("a", 1, &after[0].0, "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
    }

    #[test]
    fn an_empty_list_expands_into_nothing_and_the_step_succeeds() {
        let mut k = kit();
        let run = run_list(&mut k, json!([]));
        let after = sent(&mut k);
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].1, ["[]"]);
        assert_eq!(stored(&k, &run, "fan").0, "succeeded");
    }

    #[test]
    fn a_source_that_is_not_a_list_or_too_long_fails_the_step_naming_it() {
        let mut k = kit();
        let run = run_list(&mut k, json!("a.txt"));
        assert_eq!(
            stored(&k, &run, "fan"),
            ("failed".into(), "for_each: ${{ steps.list.outputs.files }} is a string, not a list".into())
        );
        assert_eq!(k.run_state(&run), "failed");

        let long: Vec<u32> = (0..=baton_common::spec::MAX_FOR_EACH as u32).collect();
        let run = run_list(&mut k, json!(long));
        assert_eq!(
            stored(&k, &run, "fan").1,
            "for_each: ${{ steps.list.outputs.files }} has 1025 items; the limit is 1024"
        );
        assert!(sent(&mut k).is_empty(), "nothing expanded");
    }

    #[test]
    fn a_failed_expansion_skips_the_join_and_what_follows_and_cancel_takes_the_rest() {
        let mut k = kit();
        let run = run_list(&mut k, json!([1, 2, 3]));
        let fan = sent(&mut k);
        k.finished("a", 1, &fan[0].0, "succeeded", "");
        k.finished("a", 1, &fan[1].0, "failed", "nonzero_exit");
        k.finished("a", 1, &fan[2].0, "succeeded", "");
        assert_eq!(stored(&k, &run, "fan"), ("skipped".into(), "upstream step \"fan[1]\" failed".into()));
        assert_eq!(stored(&k, &run, "after").0, "skipped");
        assert_eq!(k.run_state(&run), "failed");

        // Canceling a for_each step cancels its open expansions.
        let run = run_list(&mut k, json!([1, 2]));
        let fan = sent(&mut k);
        k.finished("a", 1, &fan[0].0, "succeeded", "");
        k.apply(super::super::model::Input::Cancel {
            run_id: run.clone(),
            step_id: Some("fan".into()),
            reason: String::new(),
            actor: "t".into(),
            reply: 5,
        });
        k.settle();
        assert_eq!(stored(&k, &run, "fan[1]").0, "canceled");
        assert_eq!(stored(&k, &run, "fan").0, "canceled");
        assert_eq!(stored(&k, &run, "after").0, "skipped");
        let stops = k.take_sent(1).into_iter().filter(|m| matches!(m, Down::Cancel(_))).count();
        assert_eq!(stops, 1, "fan[1]'s attempt is stopped");
    }
}
