//! Dispatch: ready steps to free agent slots, as Assign messages after commit.

use baton_common::state::{AttemptState, RunState, StepState};
use baton_common::{pb, proto};
use std::collections::HashMap;

use baton_common::time::{format_duration, ms};
use tracing::debug;

use std::collections::{BTreeMap, VecDeque};

use baton_common::script;
use baton_common::template::{self, Ref};
use serde_json::{Map, Value};

use super::model::{Model, Pending};
use super::runs::{check_done, end_step, set_run, set_step, skip_downstream};
use super::state::{Agent, Attempt};
use crate::router::Strategy;
use baton_common::spec::When;

/// The concurrency key a router rule's `max_concurrent` counts its tool's attempts by.
pub(super) fn tool_key(tool: &str) -> String {
    format!("tool {tool}")
}

/// A step's rendered `with` and `env`, and the secret values (secrets, secret
/// parameters) rendered into them. For a pipelined attempt whose input reads outputs
/// its predecessors have not reported yet, `with` and `env` are the step's templates
/// and `values` holds the value of every other reference in them: its agent renders
/// them (see `ExecutionRequest.render`).
pub(super) struct Input {
    with: Map<String, Value>,
    env: BTreeMap<String, String>,
    redact: Vec<String>,
    values: Option<Map<String, Value>>,
    /// For a step with `cache:`, what its key hashes.
    cache_source: Option<String>,
    /// The concurrency keys its attempt holds (set at dispatch).
    concurrency: Vec<String>,
}

impl Input {
    /// The step's cache key: hex SHA-256 of its tool with its rendered input and env
    /// (secret values masked), or with its own `cache.key`.
    pub(super) fn cache_key(&self) -> Option<String> {
        use sha2::Digest;
        let source = self.cache_source.as_ref()?;
        let digest = sha2::Sha256::digest(source.as_bytes());
        Some(digest.iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl Model {
    /// Queues a ready step for dispatch, once its `if:` holds (and, for `when:
    /// on_failure`, a step it needs did not succeed); else it is skipped now, and a
    /// condition that cannot be evaluated fails it. A `for_each`
    /// step is not queued: it expands (after its `if:`), or, ready again once expanded,
    /// ends with its expansions.
    pub(super) fn enqueue(&mut self, run_id: &str, idx: usize) {
        let Some(run) = self.runs.get(run_id) else { return };
        // Made ready earlier in the same input, and ended since (its run was stopped);
        // or its run waits for its key (its ready steps are queued when it starts).
        if run.steps[idx].state != StepState::Ready || run.queued {
            return;
        }
        let spec = &run.spec.steps[idx];
        if spec.expanded.is_some() {
            return self.fan_out(run_id, idx);
        }
        if spec.condition.is_some() || spec.when == When::OnFailure {
            match self.skip_reason(run_id, idx) {
                Ok(None) => {}
                Ok(Some(why)) => return self.skip_step(run_id, idx, &why),
                Err(e) => return self.fail_unstarted(run_id, idx, &format!("if: {e}")),
            }
        }
        let Some(run) = self.runs.get(run_id) else { return };
        if run.spec.steps[idx].for_each.is_some() {
            return self.fan_out(run_id, idx);
        }
        if run.steps[idx].tool == baton_common::approval::TOOL {
            return self.await_approval(run_id, idx);
        }
        let tool = run.steps[idx].tool.clone();
        let entry = (run_id.to_string(), run.priority, idx);
        self.ready.entry(tool).or_default().push_back(entry);
    }

    /// Assigns ready steps to agents with free slots: per tool, higher run priority
    /// first, and runs of a priority in turn, each its oldest ready step (see
    /// [`super::queue::ReadyQueue`]); the tool whose queue holds the highest priority
    /// goes first. A step no agent may take now (labels, fixed agents) is passed over,
    /// not waited on, so it does not hold up the steps behind it.
    pub(super) fn dispatch(&mut self) {
        /// Steps passed over in a row before the rest of a queue waits for next time.
        const SCAN: usize = 256;
        let mut ready = std::mem::take(&mut self.ready);
        let mut tools: Vec<(i32, String)> =
            ready.iter().map(|(tool, q)| (q.top_priority().unwrap_or(0), tool.clone())).collect();
        tools.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, tool) in &tools {
            let Some(queue) = ready.get_mut(tool) else { continue };
            let mut passed = VecDeque::new();
            while let Some((run_id, priority, idx)) = queue.pop_front() {
                let dispatchable = self.runs.get(&run_id).is_some_and(|r| {
                    r.steps[idx].state == StepState::Ready
                        && (r.failing.is_none() || r.spec.steps[idx].when != When::OnSuccess)
                        && matches!(r.state, RunState::Pending | RunState::Running)
                });
                if !dispatchable {
                    continue;
                }
                if !self.agents.values().any(|a| a.can_take(tool) || self.can_prefetch(a, tool)) {
                    queue.push_front((run_id, priority, idx));
                    break;
                }
                // A matrix step's max_parallel: its next expansion waits for one to end.
                if self
                    .runs
                    .get(&run_id)
                    .and_then(|r| r.group_running(idx))
                    .is_some_and(|(n, limit)| n >= limit)
                {
                    passed.push_back((run_id, priority, idx));
                    if passed.len() >= SCAN {
                        break;
                    }
                    continue;
                }
                // A concurrency key whose slots are all held: it waits for one.
                let keys = match self.concurrency_block(&run_id, idx) {
                    Ok((Some(_), _)) => {
                        passed.push_back((run_id, priority, idx));
                        if passed.len() >= SCAN {
                            break;
                        }
                        continue;
                    }
                    Ok((None, keys)) => keys,
                    Err(e) => {
                        self.fail_unstarted(&run_id, idx, &format!("concurrency.key: {e}"));
                        continue;
                    }
                };
                match self.place(&run_id, idx) {
                    Some(agent_id) => match self.render_input(&run_id, idx, &[]) {
                        Ok(input) => match self.cached(&run_id, &input) {
                            Some(entry) => self.step_cached(&run_id, idx, &entry),
                            None => self.assign(
                                &run_id,
                                idx,
                                &agent_id,
                                Input { concurrency: keys, ..input },
                                Vec::new(),
                            ),
                        },
                        Err(e) => self.fail_unstarted(&run_id, idx, &format!("input: {e}")),
                    },
                    None => {
                        passed.push_back((run_id, priority, idx));
                        if passed.len() >= SCAN {
                            break;
                        }
                    }
                }
            }
            // Back in front, in their order: O(passed), whatever the queue's length.
            while let Some(p) = passed.pop_back() {
                queue.push_front(p);
            }
        }
        ready.retain(|_, q| !q.is_empty());
        // Steps queued while dispatching go after the older ones.
        for (tool, q) in std::mem::take(&mut self.ready) {
            ready.entry(tool).or_default().append(q);
        }
        self.ready = ready;
    }

    /// The unexpired cache entry for a step's input, unless its run was submitted with
    /// `--no-cache`.
    fn cached(&self, run_id: &str, input: &Input) -> Option<crate::store::CacheRow> {
        if self.runs.get(run_id).is_none_or(|r| r.no_cache) {
            return None;
        }
        let now = self.now();
        input.cache_key().and_then(|k| self.cache.get(&k)).filter(|e| e.expires_at > now).cloned()
    }

    /// Why ready step `idx` is not to run: its `if:` is false, or it runs `on_failure`
    /// and every step it needs succeeded. `None`: it runs.
    fn skip_reason(&self, run_id: &str, idx: usize) -> Result<Option<String>, String> {
        let Some(run) = self.runs.get(run_id) else { return Ok(None) };
        let spec = &run.spec.steps[idx];
        if spec.when == When::OnFailure && run.needs[idx].iter().all(|&j| run.steps[j].state.is_success()) {
            return Ok(Some("skipped: no step it needs failed (when: on_failure)".into()));
        }
        let Some(text) = &spec.condition else { return Ok(None) };
        let cond = baton_common::expr::parse(text)?;
        let lookup = |r: &Ref| plain_value(run, idx, r, "a condition");
        Ok((!cond.holds(&lookup)?).then(|| format!("skipped: condition false ({})", text.trim())))
    }

    /// Why ready step `idx` may not start now for a concurrency key (every slot of its
    /// step's `concurrency:` key, or of its tool's `max_concurrent`, is held), and the
    /// keys its attempt would hold.
    pub(super) fn concurrency_block(
        &self,
        run_id: &str,
        idx: usize,
    ) -> Result<(Option<String>, Vec<String>), String> {
        let Some(run) = self.runs.get(run_id) else { return Ok((None, Vec::new())) };
        let mut keys = Vec::new();
        if let Some(c) = &run.spec.steps[idx].concurrency {
            let key = template::render_text(&c.key, &|r| plain_value(run, idx, r, "a concurrency key"))?;
            keys.push((key, c.limit));
        }
        let step = &run.steps[idx];
        if let Some(limit) = step.placement.max_concurrent {
            let key = match &step.placement.max_concurrent_per {
                None => tool_key(&step.tool),
                Some(per) => {
                    let value = match run.spec.steps[idx].with.get(per) {
                        None | Some(Value::Null) => "(unset)".to_string(),
                        Some(Value::String(s)) => {
                            template::render_text(s, &|r| plain_value(run, idx, r, "a concurrency key"))?
                        }
                        Some(v) => v.to_string(),
                    };
                    format!("{} {per} {value}", tool_key(&step.tool))
                }
            };
            keys.push((key, limit));
        }
        let mut why = None;
        for (key, limit) in &keys {
            let Some(held) = self.holders.get(key).filter(|h| h.len() >= *limit as usize) else { continue };
            let by: Vec<String> = held
                .iter()
                .filter_map(|a| self.attempts.get(a))
                .take(3)
                .map(|a| format!("run {} step {}", a.run_id, a.step_id))
                .collect();
            why = Some(format!("concurrency key {key}: {}/{limit} in use by {}", held.len(), by.join(", ")));
            break;
        }
        Ok((why, keys.into_iter().map(|(k, _)| k).collect()))
    }

    /// Skips ready step `idx` (its condition is false): the steps that need it follow
    /// the usual rule; the run does not fail for it.
    fn skip_step(&mut self, run_id: &str, idx: usize, why: &str) {
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let p = &mut self.pending;
        end_step(p, run, idx, StepState::Skipped, "step_skipped", why);
        let below = format!("upstream step {:?} was skipped", run.step_id(idx));
        skip_downstream(p, run, idx, &below);
        check_done(p, run);
    }

    /// The step's `with` and `env` with `${{ ... }}` replaced by upstream outputs and
    /// run parameters; outputs of the steps in `defer` (the predecessors of a pipelined
    /// attempt) are left for its agent to fill in.
    pub(super) fn render_input(&self, run_id: &str, idx: usize, defer: &[usize]) -> Result<Input, String> {
        let Some(run) = self.runs.get(run_id) else { return Err("run not found".into()) };
        let spec = &run.spec.steps[idx];
        let tool = run.steps[idx].tool.as_str();
        if !run.templated[idx] && spec.cache.as_ref().is_none_or(|c| c.key.is_none()) {
            let (with, env) = (spec.with.clone(), spec.env.clone());
            let cache_source = spec.cache.as_ref().map(|_| cache_source(tool, &with, &env, &[]));
            return Ok(Input {
                with,
                env,
                redact: Vec::new(),
                values: None,
                cache_source,
                concurrency: Vec::new(),
            });
        }
        let secret = std::cell::RefCell::new(Vec::new());
        let values = std::cell::RefCell::new(Map::new());
        let deferred = std::cell::Cell::new(false);
        let lookup = |r: &Ref| -> Result<Value, String> {
            let v = match r {
                Ref::Param(p) => {
                    let v = run.params.get(p).ok_or(format!("{r} is not set"))?;
                    if run.spec.secret_params.contains(p) {
                        secret.borrow_mut().push(v.clone());
                    }
                    Value::String(v.clone())
                }
                Ref::Secret(name) => {
                    let v =
                        self.secrets.get(name).ok_or(format!("{r} is not set (no secret named {name:?})"))?;
                    secret.borrow_mut().push(v.clone());
                    Value::String(v.clone())
                }
                Ref::Matrix(name) => {
                    Value::String(spec.matrix.get(name).ok_or(format!("{r} is not set"))?.clone())
                }
                Ref::Item(name) => template::item_value(r, name, spec.item.as_ref())?,
                Ref::Index => {
                    spec.index.map(Value::from).ok_or(format!("{r} is only set in a for_each step"))?
                }
                Ref::Output { step, name } => {
                    if let Some(j) = run.upstream(idx, step)
                        && defer.contains(&j)
                    {
                        deferred.set(true);
                        // A stand-in that every place a reference may stand accepts.
                        return Ok(Value::String("0".into()));
                    }
                    output_of(run, idx, r, step, name, defer)?
                }
            };
            values.borrow_mut().insert(r.to_string(), v.clone());
            Ok(v)
        };
        let (with, env) = script::render_step(tool, &spec.with, &spec.env, &lookup)?;
        let own_key = match spec.cache.as_ref().and_then(|c| c.key.as_deref()) {
            Some(k) => Some(template::render_text(k, &lookup)?),
            None => None,
        };
        let redact = secret.into_inner();
        if deferred.get() {
            let (with, env) = (spec.with.clone(), spec.env.clone());
            return Ok(Input {
                with,
                env,
                redact,
                values: Some(values.into_inner()),
                cache_source: None,
                concurrency: Vec::new(),
            });
        }
        let cache_source = spec.cache.as_ref().map(|_| match &own_key {
            Some(k) => format!("{tool}\0key\0{k}"),
            None => cache_source(tool, &with, &env, &redact),
        });
        Ok(Input { with, env, redact, values: None, cache_source, concurrency: Vec::new() })
    }

    /// Creates attempt N+1 of a step on `agent_id` and queues its Assign: a ready step
    /// (`after` empty), or a waiting one pipelined after the attempts `after` of its
    /// unfinished dependencies, all on that agent.
    pub(super) fn assign(
        &mut self,
        run_id: &str,
        idx: usize,
        agent_id: &str,
        input: Input,
        after: Vec<String>,
    ) {
        let Input { with, env, mut redact, values, concurrency, .. } = input;
        let pipelined = !after.is_empty();
        let now = self.now();
        // Env values whose names look secret are masked like secrets; the agent masks
        // what the step was given, the controller every secret.
        let patterned: Vec<String> = env
            .iter()
            .filter(|(k, _)| self.cfg.redact_env.iter().any(|p| baton_common::redact::env_matches(k, p)))
            .map(|(_, v)| v.clone())
            .collect();
        let redactor = self.redactor(run_id, &patterned);
        redact.extend(patterned);
        redact.retain(|v| v.len() >= baton_common::redact::MIN_LEN);
        redact.sort();
        redact.dedup();
        let attempt_id = self.time_ordered_id();
        // A fresh unguessable lease token.
        let lease_token = format!("{:032x}", self.random_u128());
        let (Some(run), Some(agent)) = (self.runs.get_mut(run_id), self.agents.get_mut(agent_id)) else {
            return;
        };
        let Some(session) = agent.session.as_ref().map(|s| s.id) else {
            return;
        };
        let p = &mut self.pending;
        let ready_at = if pipelined { None } else { run.steps[idx].ready_us };
        if pipelined {
            // It stays waiting until its predecessors' results are accepted.
            p.steps.insert((run.id.clone(), idx));
        } else if !set_step(p, run, idx, StepState::Running) {
            return;
        }
        if run.state == RunState::Pending && set_run(p, run, RunState::Running) {
            run.started_at = Some(now);
            p.event(run, "run_started", None, None, "");
        }
        let spec = &run.spec.steps[idx];
        let step = &mut run.steps[idx];
        step.attempts += 1;
        if !pipelined {
            step.started_at.get_or_insert(now);
            step.reason.clear();
        }
        let attempt = Attempt {
            // Time-ordered: a new attempt's key lands at the end of the store's index,
            // not on a random page.
            id: attempt_id,
            run_id: run_id.to_string(),
            step_idx: idx,
            step_id: spec.id.clone(),
            number: step.attempts,
            agent_id: agent.id.clone(),
            agent_name: agent.name.clone(),
            lease_token,
            state: AttemptState::Assigned,
            exit_code: None,
            error_class: None,
            error: String::new(),
            result: None,
            output_tail: String::new(),
            assigned_at: now,
            started_at: None,
            finished_at: None,
            // The deadline counts from the start the agent reports (the attempt may
            // wait in the agent's queue first).
            deadline_at: None,
            reported: false,
            output_bytes: 0,
            sent_at: None,
            ready_at,
            redactor,
            after,
            concurrency,
        };
        for key in &attempt.concurrency {
            self.holders.entry(key.clone()).or_default().insert(attempt.id.clone());
        }
        step.attempt_ids.push(attempt.id.clone());
        step.current = Some(attempt.id.clone());
        let step_tool = step.tool.clone();
        let request = pb::ExecutionRequest {
            tool: step.tool.clone(),
            input: Some(proto::structure(with)),
            env: env.into_iter().collect(),
            timeout: spec.timeout_ms.map(|t| proto::duration(t as i64)),
            kill_grace: Some(proto::duration(ms(self.cfg.kill_grace))),
            // A little past the cap, so the controller sees that there was more and
            // marks the cut.
            max_output_bytes: self.cfg.max_output_bytes + 1024,
            redact,
            traceparent: baton_common::trace::trace_id(run_id)
                .map(|t| baton_common::trace::traceparent(t, baton_common::trace::attempt_span(&attempt.id)))
                .unwrap_or_default(),
            render: values.is_some(),
            values: values.map(proto::structure),
            inputs: spec
                .inputs
                .iter()
                .map(|i| pb::StepInputs { from_step: i.from.clone(), patterns: i.artifacts.clone() })
                .collect(),
            artifacts: spec.artifacts.clone(),
            optional_artifacts: optional_artifacts(&step_tool, spec, self.cfg.keeps_artifacts),
        };
        // Work for a free slot goes out at once, and so does a pipelined attempt (it
        // must be there before its predecessors end); a queue top-up for a busy agent
        // may share a later commit.
        let send = if agent.free_slots() > 0 || pipelined { Pending::send } else { Pending::send_prefetch };
        send(
            p,
            session,
            pb::controller_message::Msg::Assign(pb::Assign {
                attempt: Some(attempt.attempt_ref()),
                number: attempt.number,
                request: Some(request),
                after: attempt.after.clone(),
            }),
        );
        let msg = if pipelined {
            let names: Vec<String> = attempt
                .after
                .iter()
                .filter_map(|id| self.attempts.get(id))
                .map(|a| format!("{}#{}", a.step_id, a.number))
                .collect();
            format!(
                "attempt {} on agent {}, pipelined: it starts there when {} succeed{}",
                attempt.number,
                agent.name,
                names.join(", "),
                if names.len() == 1 { "s" } else { "" }
            )
        } else {
            format!("attempt {} on agent {}", attempt.number, agent.name)
        };
        p.event(run, "attempt_assigned", Some(idx), Some(&attempt), msg);
        p.attempts.insert(attempt.id.clone());
        agent.running.insert(attempt.id.clone());
        if pipelined {
            for before in &attempt.after {
                self.followers.entry(before.clone()).or_default().push(attempt.id.clone());
            }
        }
        let id = attempt.id.clone();
        let tool = step_tool;
        debug!(run_id, step_id = %attempt.step_id, attempt_id = %attempt.id, agent = %agent.name, "assigned");
        self.attempts.insert(attempt.id.clone(), attempt);
        if pipelined {
            self.hold(agent_id, &id);
        }
        self.pipe_agents.insert(agent_id.to_string());
        self.breakers_on_dispatch(&tool, agent_id);
    }
}

impl Model {
    /// The agent a ready step goes to now, by its router rule (the `auto` strategy when
    /// no rule matches), or `None` when no agent may take it.
    fn place(&mut self, run_id: &str, idx: usize) -> Option<String> {
        let run = self.runs.get(run_id)?;
        let step = &run.steps[idx];
        let (tool, rule) = (step.tool.as_str(), &step.placement);
        let admitted = |a: &&Agent| self.breakers_admit(tool, &a.id) && rule.admits(&a.name, &a.labels);
        let mut eligible: Vec<&Agent> =
            self.agents.values().filter(|a| a.can_take(tool)).filter(admitted).collect();
        if eligible.is_empty() {
            // Everyone is busy: queue it on an agent whose attempts of this tool are
            // short, so that it starts the moment a slot frees there.
            eligible = self.agents.values().filter(|a| self.can_prefetch(a, tool)).filter(admitted).collect();
        }
        if eligible.is_empty() {
            return None;
        }
        match rule.strategy {
            Strategy::Fixed => rule
                .agents
                .iter()
                .find_map(|name| eligible.iter().find(|a| &a.name == name))
                .map(|a| a.id.clone()),
            Strategy::RoundRobin => {
                let key = rule.rule.unwrap_or(usize::MAX);
                eligible.sort_by(|a, b| a.name.cmp(&b.name));
                let last = self.round_robin.get(&key);
                let next = eligible
                    .iter()
                    .find(|a| last.is_none_or(|l| a.name > *l))
                    .or_else(|| eligible.first())
                    .map(|a| (a.id.clone(), a.name.clone()));
                next.map(|(id, name)| {
                    self.round_robin.insert(key, name);
                    id
                })
            }
            Strategy::Auto => eligible
                .iter()
                .max_by(|a, b| {
                    self.auto_score(a, tool)
                        .total_cmp(&self.auto_score(b, tool))
                        .then_with(|| b.name.cmp(&a.name))
                })
                .map(|a| a.id.clone()),
        }
    }

    /// Whether `a` may hold one more attempt of `tool` beyond its slots: it is full, its
    /// queue is not, and its recent attempts of the tool are short (long work must not
    /// wait behind long work while other agents free up).
    pub(super) fn can_prefetch(&self, a: &Agent, tool: &str) -> bool {
        // Enough queued per slot to cover a few commits' latency with short tools.
        const QUEUED_PER_SLOT: usize = 4;
        a.takes_work()
            && a.has_tool(tool)
            && a.running.len() < (1 + QUEUED_PER_SLOT) * a.slots as usize
            && self.is_short(a, tool)
    }

    /// Whether `a`'s recent attempts of `tool` are short (under 100 ms, three at least).
    pub(super) fn is_short(&self, a: &Agent, tool: &str) -> bool {
        const SHORT_MS: f64 = 100.0;
        self.stats
            .get(&(a.id.clone(), tool.to_string()))
            .is_some_and(|s| s.samples >= 3 && s.latency_ms < SHORT_MS)
    }

    /// `auto`: a closed breaker before a half-open one, then most free slots, then the
    /// best recent success rate, then the lowest recent duration.
    fn auto_score(&self, a: &Agent, tool: &str) -> f64 {
        let probing = self
            .breakers
            .get(&(tool.to_string(), a.id.clone()))
            .is_some_and(|b| b.state != baton_common::breaker::BreakerState::Closed);
        let stats = self.stats.get(&(a.id.clone(), tool.to_string())).copied().unwrap_or_default();
        let closed = if probing { 0.0 } else { 1.0 };
        closed * 1e9 + f64::from(a.free_slots()) * 1e5 + stats.success * 1e3
            - stats.latency_ms.min(999_999.0) / 1e3
    }

    /// Records an attempt's outcome for the `auto` strategy (moving averages).
    pub(super) fn record_stats(&mut self, agent_id: &str, tool: &str, succeeded: bool, duration_ms: i64) {
        const ALPHA: f64 = 0.2;
        let s = self.stats.entry((agent_id.to_string(), tool.to_string())).or_default();
        let ok = if succeeded { 1.0 } else { 0.0 };
        if s.samples == 0 {
            s.success = ok;
            s.latency_ms = duration_ms as f64;
        } else {
            s.success += ALPHA * (ok - s.success);
            s.latency_ms += ALPHA * (duration_ms as f64 - s.latency_ms);
        }
        s.samples += 1;
    }

    /// Why no agent takes a ready step of `tool` now, if breakers are the cause: there
    /// are agents with the tool, and breakers shut every one of them out.
    pub(super) fn breaker_block(&self, tool: &str) -> Option<String> {
        let candidates: Vec<&Agent> =
            self.agents.values().filter(|a| a.session.is_some() && a.has_tool(tool)).collect();
        if candidates.is_empty() || candidates.iter().any(|a| self.breakers_admit(tool, &a.id)) {
            return None;
        }
        let tool_key = (tool.to_string(), String::new());
        if let Some(b) = self.breakers.get(&tool_key)
            && !b.admits(self.cfg.breakers.policy(tool, false))
        {
            return Some(format!("the breaker of tool {tool} is {}", b.state));
        }
        let mut names: Vec<&str> = candidates.iter().map(|a| a.name.as_str()).collect();
        names.sort();
        Some(format!(
            "the breakers of tool {tool} are open on every agent that has it ({})",
            names.join(", ")
        ))
    }

    /// Why a ready step is not running yet: "no agent with tool aider and label
    /// gpu=true", breakers, busy agents.
    fn ready_reason(&self, run: &super::state::Run, idx: usize) -> String {
        let step = &run.steps[idx];
        let (tool, rule) = (step.tool.as_str(), &step.placement);
        let matching: Vec<&Agent> =
            self.agents.values().filter(|a| a.has_tool(tool) && rule.admits(&a.name, &a.labels)).collect();
        let mut wanted = format!("tool {tool}");
        let labels = rule.describe_labels();
        if !labels.is_empty() {
            wanted.push_str(&format!(" and {labels}"));
        }
        if rule.strategy == Strategy::Fixed {
            wanted.push_str(&format!(" among {}", rule.agents.join(", ")));
        }
        if matching.is_empty() {
            return format!("no agent with {wanted}");
        }
        let usable: Vec<&&Agent> = matching.iter().filter(|a| a.takes_work()).collect();
        if usable.is_empty() {
            return format!(
                "no connected agent with {wanted} ({} known but disconnected or draining)",
                matching.len()
            );
        }
        if let Some(why) = self.breaker_block(tool) {
            return format!("waiting: {why}");
        }
        if usable.iter().all(|a| a.free_slots() == 0) {
            return format!("waiting for a free slot: all {} agents with {wanted} are busy", usable.len());
        }
        if !usable.iter().any(|a| self.breakers_admit(tool, &a.id)) {
            return format!("waiting: breakers are open for every agent with {wanted}");
        }
        String::new()
    }

    /// Why each open step of an active run is not running (or not finished) yet.
    pub(super) fn wait_reasons(&self, run_id: &str) -> HashMap<String, String> {
        let mut out = HashMap::new();
        let Some(run) = self.runs.get(run_id) else { return out };
        for (idx, step) in run.steps.iter().enumerate() {
            let why = match step.state {
                StepState::Waiting if run.spec.steps[idx].expanded.is_some() => {
                    let n = run.spec.steps[idx].expanded.unwrap_or(0);
                    format!("for_each: {} of its {n} expansions still to end", step.waiting_on)
                }
                StepState::Waiting => {
                    let pending: Vec<&str> = run.needs[idx]
                        .iter()
                        .filter(|&&j| !run.steps[j].state.is_success())
                        .map(|&j| run.step_id(j))
                        .collect();
                    match step.current.as_ref().and_then(|id| self.attempts.get(id)) {
                        Some(a) => format!(
                            "waiting for {}; pipelined: attempt {} on agent {} starts there when they succeed",
                            pending.join(", "),
                            a.number,
                            a.agent_name
                        ),
                        None => format!("waiting for {}", pending.join(", ")),
                    }
                }
                StepState::Ready if run.state == RunState::Quarantined => "run is quarantined".to_string(),
                StepState::Ready if run.queued => run.reason.clone(),
                StepState::Ready => match (run.group_running(idx), self.concurrency_block(run_id, idx)) {
                    (Some((n, limit)), _) if n >= limit => {
                        format!("{n} of its group's expansions are running (max_parallel {limit})")
                    }
                    (_, Ok((Some(why), _))) => format!("waiting: {why}"),
                    _ => self.ready_reason(run, idx),
                },
                StepState::AwaitingApproval => step.reason.clone(),
                StepState::RetryWait => {
                    let left = (step.next_attempt_at.unwrap_or(0) - self.now()).max(0) as u64;
                    format!("retry in {}", format_duration(std::time::Duration::from_millis(left)))
                }
                StepState::Running => match step.current.as_ref().and_then(|id| self.attempts.get(id)) {
                    Some(a) if a.state == AttemptState::Assigned => {
                        format!("assigned to agent {}, not started yet", a.agent_name)
                    }
                    Some(a) => format!("running on agent {}", a.agent_name),
                    None => String::new(),
                },
                _ => continue,
            };
            if !why.is_empty() {
                out.insert(run.step_id(idx).to_string(), why);
            }
        }
        out
    }
}

/// What a step's cache key hashes: its tool, its rendered input and its env, with the
/// secret values in them masked (a changed secret does not change the key, nor does the
/// key tell anything of it).
fn cache_source(
    tool: &str,
    with: &Map<String, Value>,
    env: &BTreeMap<String, String>,
    secrets: &[String],
) -> String {
    let mut text = format!("{tool}\0{}\0{}", Value::Object(with.clone()), serde_json::json!(env));
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(s.as_str(), "***");
    }
    text
}

/// The value of reference `r` for step `idx` in what is not a step's input (a
/// condition, a concurrency key: `what`): anything but secrets.
pub(super) fn plain_value(run: &super::state::Run, idx: usize, r: &Ref, what: &str) -> Result<Value, String> {
    let spec = &run.spec.steps[idx];
    match r {
        Ref::Param(p) => run.params.get(p).map(|v| Value::String(v.clone())).ok_or(format!("{r} is not set")),
        Ref::Matrix(m) => {
            spec.matrix.get(m).map(|v| Value::String(v.clone())).ok_or(format!("{r} is not set"))
        }
        Ref::Secret(_) => Err(format!("{r}: {what} may not read secrets")),
        Ref::Item(name) => template::item_value(r, name, spec.item.as_ref()),
        Ref::Index => spec.index.map(Value::from).ok_or(format!("{r} is only set in a for_each step")),
        Ref::Output { step, name } => output_of(run, idx, r, step, name, &[]),
    }
}

/// The value of output reference `r` for step `idx`: of the upstream step `step`, or
/// of a matrix or `for_each` step, the list of its expansions' values in their order.
pub(super) fn output_of(
    run: &super::state::Run,
    idx: usize,
    r: &Ref,
    step: &str,
    name: &str,
    defer: &[usize],
) -> Result<Value, String> {
    if let Some(j) = run.upstream(idx, step) {
        let result = run.steps[j].result.as_deref();
        if run.spec.steps[j].for_each.is_none() {
            return template::output_value(r, step, name, result);
        }
        // A for_each step's result is the list of its expansions' outputs.
        let result = result.ok_or(format!("step {step:?} produced no outputs"))?;
        let list: Vec<Value> = serde_json::from_str(result).unwrap_or_default();
        let values = list
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let text = (!v.is_null()).then(|| v.to_string());
                template::output_value(r, &baton_common::spec::item_id(step, i), name, text.as_deref())
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Value::Array(values));
    }
    let members = run.group_members(step);
    if members.is_empty() {
        return Err(format!("no step {step:?} upstream"));
    }
    if members.iter().any(|j| defer.contains(j)) {
        return Err(format!("{r} is read when every expansion has ended"));
    }
    let values = members
        .iter()
        .map(|&j| template::output_value(r, run.step_id(j), name, run.steps[j].result.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(values))
}

/// The files an attempt uploads if it made them: an isolated aider attempt's patch,
/// when this controller keeps artifacts.
fn optional_artifacts(tool: &str, spec: &baton_common::spec::StepSpec, keeps: bool) -> Vec<String> {
    let isolated = spec.with.get("isolate").and_then(|v| v.as_str()) != Some("none");
    if keeps && tool == "aider" && isolated && spec.with.contains_key("repo") {
        vec!["baton.patch".to_string()]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use baton_common::pb::controller_message::Msg as Down;

    use super::super::testkit::{Kit, config};

    const ONE: &str = "name: w\nsteps:\n  - {id: x, tool: shell, with: {run: 'true'}}\n";

    fn pinned_to(agent: &str) -> crate::router::Router {
        crate::router::Router::from_json(&format!(
            r#"{{"rules": [{{"match": {{"tool": "shell"}}, "strategy": "fixed", "agents": ["{agent}"]}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn an_input_reads_the_outputs_of_a_step_further_up_than_its_needs() {
        let mut k = Kit::new(super::super::EngineConfig { pipeline: false, ..config() });
        k.connect("x", 1, 1);
        k.submit(
            "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n  - {id: b, tool: shell, needs: [a], with: {run: 'true'}}\n  - {id: c, tool: shell, needs: [b], with: {run: 'echo ${{ steps.a.outputs.n }}'}}\n",
        );
        for _ in 0..2 {
            let r = k.assigns(1).remove(0);
            k.started("x", 1, &r);
            k.finished("x", 1, &r, "succeeded", "");
        }
        let sent = k.sent.remove(&1).unwrap_or_default();
        // A shell step gets values through its environment, never in its script.
        let envs: Vec<_> = sent
            .into_iter()
            .filter_map(|m| match m {
                Down::Assign(a) => a.request.map(|r| r.env.into_values().collect::<Vec<_>>()),
                _ => None,
            })
            .collect();
        assert_eq!(envs, [vec!["1".to_string()]], "c rendered with a's outputs, two steps up");
    }

    #[test]
    fn a_step_keeps_the_placement_it_was_submitted_with_across_a_reload_and_a_restart() {
        let cfg =
            super::super::EngineConfig { router: crate::router::Rules::new(pinned_to("one")), ..config() };
        let mut k = Kit::new(cfg.clone());
        let run = k.submit(ONE);
        let row = k.commits.iter().flat_map(|b| &b.steps).last().cloned().unwrap();
        assert_eq!(row.route, r#"{"rule":0,"strategy":"fixed","agents":["one"]}"#, "stored at submit");
        // The rules change before any agent is up: the waiting step keeps its own.
        cfg.router.replace(pinned_to("two"));
        k.connect("two", 1, 1);
        assert!(k.assigns(1).is_empty(), "the new rules do not move a step of an earlier run");
        assert!(k.model.wait_reasons(&run)["x"].contains("among one"), "{:?}", k.model.wait_reasons(&run));
        // Rebuilt from its rows, the model still has the step's placement.
        let again = k.rebuilt_from(k.snapshot());
        assert_eq!(again.runs[&run].steps[0].placement.agents, ["one"]);
        k.connect("one", 2, 1);
        assert_eq!(k.assigns(2).len(), 1);
        // A run submitted after the reload follows the new rules.
        k.submit(ONE);
        assert_eq!(k.assigns(1).len(), 1);
    }

    #[test]
    fn a_step_stored_without_a_placement_gets_its_rules_placement_at_load() {
        let cfg =
            super::super::EngineConfig { router: crate::router::Rules::new(pinned_to("one")), ..config() };
        let mut k = Kit::new(cfg.clone());
        let run = k.submit(ONE);
        let mut snap = k.snapshot();
        snap.steps.iter_mut().for_each(|s| s.route.clear());
        let again = k.rebuilt_from(snap);
        let step = &again.runs[&run].steps[0];
        assert_eq!(
            (step.placement.agents.as_slice(), step.placement.rule),
            (&["one".to_string()][..], Some(0))
        );
        assert_eq!(
            again.runs[&run].step_row(0).route,
            r#"{"rule":0,"strategy":"fixed","agents":["one"]}"#,
            "written on its next change"
        );
    }

    #[test]
    fn an_assign_goes_out_only_once_its_attempt_is_committed() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let run = k.submit(ONE);
        assert!(k.sent_early.iter().all(|m| !matches!(m, Down::Assign(_))), "{:?}", k.sent_early);
        let a = k.assigns(1);
        assert_eq!(a.len(), 1);
        assert_eq!(k.step(&run, "x"), "running");
        assert!(k.commits.iter().any(|b| {
            b.attempts.iter().any(|r| r.id == a[0].attempt_id && r.lease_token == a[0].lease_token)
        }));
    }

    #[test]
    fn the_auto_strategy_picks_the_agent_with_more_free_slots() {
        let mut k = Kit::new(config());
        k.connect("small", 1, 1);
        k.connect("big", 2, 3);
        k.submit(ONE);
        assert!(k.assigns(1).is_empty());
        assert_eq!(k.assigns(2).len(), 1);
    }

    #[test]
    fn an_agent_gets_no_more_than_its_slots_until_one_frees() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let run = k.submit(
            "name: w\nsteps:\n  - {id: x, tool: shell, with: {run: 'true'}}\n  - {id: y, tool: shell, with: {run: 'true'}}\n",
        );
        let first = k.assigns(1);
        assert_eq!(first.len(), 1);
        k.started("a", 1, &first[0]);
        k.finished("a", 1, &first[0], "succeeded", "");
        let second = k.assigns(1);
        assert_eq!(second.len(), 1, "the next step goes out when the slot frees");
        assert_ne!(second[0].step_id, first[0].step_id);
        k.finished("a", 1, &second[0], "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
    }
}
