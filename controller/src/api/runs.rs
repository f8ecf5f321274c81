//! `baton.v1.BatonService`: submit, inspect, watch and cancel runs; list agents.

use std::collections::BTreeMap;
use std::pin::Pin;

use baton_common::pb;
use baton_common::spec;
use baton_common::state::RunState;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::ApiError;
use super::convert;
use crate::auth::Identity;
use crate::engine::{EngineError, Submission};
use crate::leader::Leadership;
use crate::store::{Estimates, RunFilter, Store, StoreError};
use baton_common::spec::MAX_SPEC_BYTES;

/// The range of a run's priority, either way from 0.
const MAX_PRIORITY: i32 = 1000;

/// The longest comment on an approval.
const MAX_COMMENT_BYTES: usize = 4096;

pub struct RunApi {
    leadership: Leadership,
    router: crate::router::Rules,
    store: Store,
    logs: crate::logs::Logs,
    router_path: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
    /// Watches and follows run on tasks the controller waits for before it stops.
    tasks: tokio_util::task::TaskTracker,
    estimates: EstimateCache,
    artifacts: Option<crate::artifacts::Artifacts>,
}

/// Duration estimates per workstream, read from the history at most once per
/// [`EstimateCache::FRESH`]: they only feed the ETA, and a burst of submits (a thousand
/// runs at once) would otherwise run the history queries once each (a tenth of the
/// controller's CPU in such a burst).
#[derive(Default)]
struct EstimateCache(std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Estimates)>>);

impl EstimateCache {
    const FRESH: std::time::Duration = std::time::Duration::from_millis(500);
    /// Workstreams remembered at most; past that, the stale ones are forgotten.
    const MAX: usize = 1024;

    async fn get(&self, store: &Store, workstream: &str) -> Result<Estimates, StoreError> {
        let fresh = |at: &std::time::Instant| at.elapsed() < Self::FRESH;
        if let Ok(map) = self.0.lock()
            && let Some((at, e)) = map.get(workstream)
            && fresh(at)
        {
            return Ok(e.clone());
        }
        let e = store.duration_estimates(workstream).await?;
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= Self::MAX {
                map.retain(|_, (at, _)| fresh(at));
            }
            map.insert(workstream.to_string(), (std::time::Instant::now(), e.clone()));
        }
        Ok(e)
    }
}

impl RunApi {
    /// The service over what the API port's services share.
    pub fn new(cx: &super::Context) -> RunApi {
        RunApi {
            leadership: cx.leadership.clone(),
            router: cx.router.clone(),
            store: cx.store.clone(),
            logs: cx.logs.clone(),
            router_path: cx.router_path.clone(),
            shutdown: cx.shutdown.clone(),
            tasks: cx.tasks.clone(),
            estimates: EstimateCache::default(),
            artifacts: cx.artifacts.clone(),
        }
    }

    /// The engine when this controller leads; UNAVAILABLE naming the leader otherwise.
    fn engine(&self) -> Result<crate::engine::EngineHandle, Status> {
        self.leadership.engine().map(|(e, _)| e)
    }

    /// The engine, for a call that changes run state: UNAVAILABLE, saying why, while the
    /// database refuses writes (the change could not be made durable).
    fn writer(&self) -> Result<crate::engine::EngineHandle, Status> {
        super::writable(&self.store)?;
        self.engine()
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::baton_service_server::BatonService for RunApi {
    async fn submit_run(
        &self,
        req: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        let source = if req.source.is_empty() { "<request>" } else { req.source.as_str() };
        if req.spec.len() > MAX_SPEC_BYTES {
            return Err(ApiError::invalid(format!(
                "{source}: spec is {} bytes; the limit is {MAX_SPEC_BYTES}",
                req.spec.len()
            ))
            .into());
        }
        let request_id = req.request_id;
        check_request_id(&request_id)?;
        if !request_id.is_empty()
            && let Some(run_id) = self.store.run_by_request_id(&request_id).await?
        {
            return Ok(Response::new(pb::SubmitRunResponse { run_id }));
        }
        check_name(&req.name)?;
        check_labels(&req.labels, "labels")?;
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&req.priority) {
            return Err(ApiError::invalid(format!(
                "priority {} is out of range: -{MAX_PRIORITY} to {MAX_PRIORITY}",
                req.priority
            ))
            .into());
        }
        let params = params_of(req.params.as_ref())?;
        let engine = self.writer()?;
        let (name, labels) = (req.name, req.labels.into_iter().collect());
        // Parsing, the checks and routing are CPU work bounded by the size and
        // nesting caps; they run on the blocking pool, off the engine's loop, so that
        // one big spec holds up neither other calls nor scheduling.
        let (source_owned, text, rules) = (source.to_string(), req.spec, self.router.current());
        let ws = tokio::task::spawn_blocking(move || spec::parse(&source_owned, &text))
            .await
            .map_err(|e| ApiError::internal(format!("parsing the spec: {e}")))?
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let estimates = self.estimates.get(&self.store, &ws.name).await?;
        let run = Submission {
            params,
            request_id,
            name,
            labels,
            estimates,
            no_cache: req.no_cache,
            priority: req.priority,
            ..Submission::new(ws)
        };
        let refused = |e: EngineError| match e {
            EngineError::Invalid(m) => ApiError::invalid(format!("{source}: {m}")),
            other => other.into(),
        };
        let admitted = tokio::task::spawn_blocking(move || run.admit(&rules))
            .await
            .map_err(|e| ApiError::internal(format!("checking the spec: {e}")))?
            .map_err(refused)?;
        let run_id = engine.submit(admitted, actor).await.map_err(refused)?;
        Ok(Response::new(pb::SubmitRunResponse { run_id }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::GetRunResponse>, Status> {
        let req = req.into_inner();
        let summary = req.view == pb::RunView::Summary as i32;
        let id = self.store.resolve_run_id(&req.run_id).await?;
        // Ask the engine first: what it says may be a little older than the rows, never
        // newer.
        // A standby serves what the shared database holds, without live details.
        let live = match self.leadership.engine() {
            Ok((engine, _)) => engine.live(id.clone()).await?,
            Err(_) => None,
        };
        let rec = self.store.get_run(&id).await?;
        let mut run = convert::run(rec, summary);
        if let Some(live) = live {
            for step in &mut run.steps {
                if step.reason.is_empty()
                    && let Some(why) = live.reasons.get(&step.id)
                {
                    step.reason = why.clone();
                }
            }
            if let Some(p) = &mut run.progress {
                p.eta = live.progress.eta;
            }
        }
        Ok(Response::new(pb::GetRunResponse { run: Some(run) }))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let req = req.into_inner();
        let states = req
            .states
            .iter()
            .map(|&s| RunState::from_pb(s).map(|s| s.as_str().to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::invalid(format!("states: {e}")))?;
        check_labels(&req.labels, "labels")?;
        if req.page_size > MAX_PAGE {
            return Err(
                ApiError::invalid(format!("page_size: at most {MAX_PAGE}, not {}", req.page_size)).into()
            );
        }
        let limit = if req.page_size == 0 { 50 } else { req.page_size };
        let before = match req.page_token.as_str() {
            "" => None,
            t => Some(page_cursor(t)?),
        };
        let filter = RunFilter {
            states,
            workstream: req.workstream,
            labels: req.labels.into_iter().collect(),
            before,
            // One more than the page: whether there is a next one.
            limit: limit + 1,
        };
        let mut rows = self.store.list_runs(&filter).await?;
        let next_page_token = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|(r, _)| page_token(r.created_at, &r.id)).unwrap_or_default()
        } else {
            String::new()
        };
        let runs = rows.iter().map(|(r, c)| convert::summary(r, c)).collect();
        Ok(Response::new(pb::ListRunsResponse { runs, next_page_token }))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        let id = self.store.resolve_run_id(&req.run_id).await?;
        let step = (!req.step_id.is_empty()).then_some(req.step_id);
        let whole_run = step.is_none();
        match self.writer()?.cancel(id.clone(), step, req.reason, actor).await {
            Ok(state) => Ok(Response::new(pb::CancelRunResponse { run_id: id, state: state.to_pb() })),
            // Not in the engine: the run is final already.
            Err(EngineError::RunNotFound(_)) if whole_run => {
                let rec = self.store.get_run(&id).await?;
                if rec.run.state == RunState::Canceled.as_str() {
                    Ok(Response::new(pb::CancelRunResponse { run_id: id, state: RunState::Canceled.to_pb() }))
                } else {
                    Err(ApiError::conflict(format!("run {id} already {}", rec.run.state)).into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn decide_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::DecideApprovalResponse>, Status> {
        let who = Identity::of(&req);
        // Anonymous callers get here only when authentication is off.
        let role = if matches!(who.via, crate::auth::Via::Anonymous) { None } else { who.role };
        let req = req.into_inner();
        let id = self.store.resolve_run_id(&req.run_id).await?;
        if req.comment.len() > MAX_COMMENT_BYTES {
            return Err(ApiError::invalid(format!(
                "comment is {} bytes; the limit is {MAX_COMMENT_BYTES}",
                req.comment.len()
            ))
            .into());
        }
        let inputs = req.inputs.as_ref().map(baton_common::proto::json_object).unwrap_or_default();
        let decision = crate::engine::Decision { approve: req.approve, comment: req.comment, inputs, role };
        let step_id = req.step_id;
        match self.writer()?.decide(id.clone(), step_id.clone(), decision, who.actor()).await {
            Ok(state) => Ok(Response::new(pb::DecideApprovalResponse { run_id: id, state: state.to_pb() })),
            // Not in the engine: the run has ended.
            Err(EngineError::RunNotFound(_)) => {
                let rec = self.store.get_run(&id).await?;
                let step = rec.steps.iter().find(|s| s.step_id == step_id);
                Err(match step {
                    None => ApiError::NotFound(format!("run {id} has no step {step_id:?}")),
                    Some(s) => ApiError::conflict(format!(
                        "step {step_id:?} is {}, not awaiting approval (run {id} has {})",
                        s.state, rec.run.state
                    )),
                }
                .into())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn release_run(
        &self,
        req: Request<pb::ReleaseRunRequest>,
    ) -> Result<Response<pb::ReleaseRunResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        let micros = match req.max_cost_usd {
            None => None,
            Some(c) if c.is_finite() && c > 0.0 && c < 1e12 => Some((c * 1e6).round() as i64),
            Some(c) => {
                return Err(ApiError::invalid(format!(
                    "max_cost_usd must be a positive number of dollars, not {c}"
                ))
                .into());
            }
        };
        let tokens = match req.max_tokens {
            None => None,
            Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1").into()),
            Some(t) => Some(t.min(i64::MAX as u64) as i64),
        };
        let id = self.store.resolve_run_id(&req.run_id).await?;
        let state = self.writer()?.release(id.clone(), (micros, tokens), actor).await?;
        Ok(Response::new(pb::ReleaseRunResponse { run_id: id, state: state.to_pb() }))
    }

    async fn retry_run(
        &self,
        req: Request<pb::RetryRunRequest>,
    ) -> Result<Response<pb::RetryRunResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let id = self.store.resolve_run_id(&req.into_inner().run_id).await?;
        let engine = self.writer()?;
        // A run that has ended is no longer in the engine's memory: it comes back from
        // its rows, which do not change once it has ended.
        let stored = self.store.load_run(&id).await?;
        let seq = engine.retry(id.clone(), stored, actor).await?;
        Ok(Response::new(pb::RetryRunResponse { run_id: id, state: RunState::Running.to_pb(), seq }))
    }

    async fn rerun_run(
        &self,
        req: Request<pb::RerunRunRequest>,
    ) -> Result<Response<pb::RerunRunResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        check_request_id(&req.request_id)?;
        let overrides = params_of(req.params.as_ref())?;
        let old = self.store.resolve_run_id(&req.run_id).await?;
        if !req.request_id.is_empty()
            && let Some(run_id) = self.store.run_by_request_id(&req.request_id).await?
        {
            return Ok(Response::new(pb::RerunRunResponse { run_id, reused: 0 }));
        }
        let engine = self.writer()?;
        let rec = self.store.get_run(&old).await?;
        let mut ws: spec::Workstream = serde_json::from_str(&rec.run.spec)
            .map_err(|e| ApiError::internal(format!("run {old}: its stored spec does not parse: {e}")))?;
        // A step, or a matrix or for_each step: all of its expansions.
        let from: Vec<usize> = (0..ws.steps.len())
            .filter(|&i| {
                ws.steps[i].id == req.from_step || ws.steps[i].group.as_deref() == Some(&req.from_step)
            })
            .collect();
        if from.is_empty() {
            return Err(ApiError::not_found(format!("run {old} has no step {:?}", req.from_step)).into());
        }
        let again = rerun_steps(&mut ws, &from, req.only);
        let reused: BTreeMap<String, Option<String>> = rec
            .steps
            .iter()
            .filter(|s| !again.contains(&s.step_id) && ws.steps.iter().any(|w| w.id == s.step_id))
            .filter(|s| s.state.parse::<baton_common::state::StepState>().is_ok_and(|st| st.is_success()))
            .map(|s| (s.step_id.clone(), s.result.clone()))
            .collect();
        let n = reused.len() as u32;
        // The old run's params (secret ones still sealed for it), the new ones over them.
        let mut params: BTreeMap<String, String> = serde_json::from_str(&rec.run.params).unwrap_or_default();
        params.extend(overrides);
        let labels = serde_json::from_str(&rec.run.labels).unwrap_or_default();
        let estimates = self.estimates.get(&self.store, &ws.name).await?;
        let run = Submission {
            params,
            request_id: req.request_id,
            name: rec.run.name.clone(),
            labels,
            estimates,
            rerun: Some(crate::engine::Rerun { of: old.clone(), reused }),
            no_cache: req.no_cache,
            // A rerun goes with the priority of the run it repeats.
            priority: rec.run.priority(),
            ..Submission::new(ws)
        };
        let rules = self.router.current();
        let admitted = tokio::task::spawn_blocking(move || run.admit(&rules))
            .await
            .map_err(|e| ApiError::internal(format!("checking the spec: {e}")))??;
        let run_id = engine.submit(admitted, actor).await?;
        Ok(Response::new(pb::RerunRunResponse { run_id, reused: n }))
    }

    async fn create_schedule(
        &self,
        req: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        let source = if req.source.is_empty() { "<request>" } else { req.source.as_str() }.to_string();
        if req.spec.len() > MAX_SPEC_BYTES {
            return Err(ApiError::invalid(format!(
                "{source}: spec is {} bytes; the limit is {MAX_SPEC_BYTES}",
                req.spec.len()
            ))
            .into());
        }
        let params = params_of(req.params.as_ref())?;
        self.writer()?;
        let (src, text) = (source.clone(), req.spec.clone());
        let ws = tokio::task::spawn_blocking(move || spec::parse(&src, &text))
            .await
            .map_err(|e| ApiError::internal(format!("parsing the spec: {e}")))?
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let row = super::schedules::new_row(&req, &ws, &params, actor)?;
        // Its runs must be admissible: the checks a submit makes, made now.
        let (probe, rules) = (Submission { params, ..Submission::new(ws) }, self.router.current());
        tokio::task::spawn_blocking(move || probe.admit(&rules))
            .await
            .map_err(|e| ApiError::internal(format!("checking the spec: {e}")))?
            .map_err(|e| match e {
                EngineError::Invalid(m) => ApiError::invalid(format!("{source}: {m}")),
                other => other.into(),
            })?;
        self.store.put_schedule(&row).await?;
        tracing::info!(schedule_id = %row.id, workstream = %row.workstream, cron = %row.cron, every_ms = ?row.every_ms, "schedule created");
        Ok(Response::new(super::schedules::to_pb(&row, true)))
    }

    async fn list_schedules(
        &self,
        _req: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let rows = self.store.list_schedules().await?;
        let schedules = rows.iter().map(|r| super::schedules::to_pb(r, false)).collect();
        Ok(Response::new(pb::ListSchedulesResponse { schedules }))
    }

    async fn get_schedule(
        &self,
        req: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let row = self.store.get_schedule(&req.into_inner().schedule_id).await?;
        Ok(Response::new(super::schedules::to_pb(&row, true)))
    }

    async fn pause_schedule(
        &self,
        req: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.writer()?;
        let mut row = self.store.get_schedule(&req.into_inner().schedule_id).await?;
        self.store.pause_schedule(&row.id, true, row.next_at).await?;
        row.paused = true;
        Ok(Response::new(super::schedules::to_pb(&row, false)))
    }

    async fn resume_schedule(
        &self,
        req: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.writer()?;
        let mut row = self.store.get_schedule(&req.into_inner().schedule_id).await?;
        if row.paused {
            row.next_at = super::schedules::resume_at(&row)?;
            self.store.pause_schedule(&row.id, false, row.next_at).await?;
            row.paused = false;
        }
        Ok(Response::new(super::schedules::to_pb(&row, true)))
    }

    async fn delete_schedule(
        &self,
        req: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.writer()?;
        let row = self.store.get_schedule(&req.into_inner().schedule_id).await?;
        self.store.delete_schedule(&row.id).await?;
        tracing::info!(schedule_id = %row.id, "schedule deleted");
        Ok(Response::new(super::schedules::to_pb(&row, false)))
    }

    async fn trigger_schedule(
        &self,
        req: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let engine = self.writer()?;
        let row = self.store.get_schedule(&req.into_inner().schedule_id).await?;
        let at = baton_common::time::now_ms();
        let run_id = crate::schedules::start_run(&engine, &self.store, &self.router, &row, at)
            .await
            .map_err(ApiError::invalid)?;
        self.store.schedule_progress(&row.id, row.next_at, &run_id).await?;
        Ok(Response::new(pb::SubmitRunResponse { run_id }))
    }

    async fn list_artifacts(
        &self,
        req: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let run_id = self.store.resolve_run_id(&req.into_inner().run_id).await?;
        let rows = self.store.list_artifacts(&run_id).await?;
        let artifacts = rows.iter().map(super::artifacts::info).collect();
        Ok(Response::new(pb::ListArtifactsResponse { run_id, artifacts }))
    }

    type GetArtifactStream = super::artifacts::ChunkStream;

    async fn get_artifact(
        &self,
        req: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<Self::GetArtifactStream>, Status> {
        let req = req.into_inner();
        let artifacts = super::artifacts::store_of(&self.artifacts)?.clone();
        let run_id = self.store.resolve_run_id(&req.run_id).await?;
        let row = self
            .store
            .list_artifacts(&run_id)
            .await?
            .into_iter()
            .find(|r| r.step_id == req.step_id && r.path == req.path)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "run {run_id} has no artifact {:?} of step {:?}",
                    req.path, req.step_id
                ))
            })?;
        Ok(Response::new(super::artifacts::stream(artifacts, vec![row])))
    }

    async fn list_cache(
        &self,
        req: Request<pb::ListCacheRequest>,
    ) -> Result<Response<pb::ListCacheResponse>, Status> {
        let rows = self.store.list_cache(&req.into_inner().workstream).await?;
        let entries = rows
            .into_iter()
            .map(|r| pb::CacheEntry {
                key: r.cache_key,
                workstream: r.workstream,
                step_id: r.step_id,
                run_id: r.run_id,
                created_at: Some(baton_common::proto::timestamp(r.created_at)),
                expires_at: Some(baton_common::proto::timestamp(r.expires_at)),
            })
            .collect();
        Ok(Response::new(pb::ListCacheResponse { entries }))
    }

    async fn purge_cache(
        &self,
        req: Request<pb::PurgeCacheRequest>,
    ) -> Result<Response<pb::PurgeCacheResponse>, Status> {
        let req = req.into_inner();
        if !req.key_prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(
                ApiError::invalid(format!("key_prefix {:?}: keys are hexadecimal", req.key_prefix)).into()
            );
        }
        // The engine forgets them first, so that no step takes one over meanwhile.
        self.writer()?.purge_cache(req.workstream.clone(), req.key_prefix.to_ascii_lowercase()).await?;
        let purged = self.store.purge_cache(&req.workstream, &req.key_prefix).await?;
        Ok(Response::new(pb::PurgeCacheResponse { purged: purged as u32 }))
    }

    async fn delete_run(
        &self,
        req: Request<pb::DeleteRunRequest>,
    ) -> Result<Response<pb::DeleteRunResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let id = self.store.resolve_run_id(&req.into_inner().run_id).await?;
        // Only the leader changes the database; finished runs are no longer in its
        // engine's memory, so the store alone holds what is deleted.
        self.writer()?;
        let rows = self.store.delete_finished_run(&id).await?;
        if let Some(a) = &self.artifacts
            && let Err(e) = a.delete_run(&id).await
        {
            tracing::warn!(run_id = %id, error = %e, "deleting a deleted run's artifacts failed");
        }
        tracing::info!(run_id = %id, rows, by = %actor, "run deleted");
        Ok(Response::new(pb::DeleteRunResponse { run_id: id, rows }))
    }

    async fn list_breakers(
        &self,
        _req: Request<pb::ListBreakersRequest>,
    ) -> Result<Response<pb::ListBreakersResponse>, Status> {
        let breakers = self.engine()?.list_breakers().await?;
        Ok(Response::new(pb::ListBreakersResponse { breakers }))
    }

    async fn reset_breaker(
        &self,
        req: Request<pb::ResetBreakerRequest>,
    ) -> Result<Response<pb::ListBreakersResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        if req.tool.is_empty() {
            return Err(ApiError::invalid("reset breaker: tool is empty").into());
        }
        let breakers = self.writer()?.reset_breaker(req.tool, req.agent, actor).await?;
        Ok(Response::new(pb::ListBreakersResponse { breakers }))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        req: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let req = req.into_inner();
        // Subscribe before reading the store, so no event falls between the two.
        let (engine, term) = self.leadership.engine()?;
        let live = engine.subscribe();
        let id = self.store.resolve_run_id(&req.run_id).await?;
        let (tx, rx) = mpsc::channel(256);
        let watch = Watch { store: self.store.clone(), run_id: id, run_events_only: req.run_events_only };
        self.tasks.spawn(watch.run(req.from_seq.max(1), live, tx, term));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchRunsStream = EventStream;

    async fn watch_runs(
        &self,
        req: Request<pb::WatchRunsRequest>,
    ) -> Result<Response<Self::WatchRunsStream>, Status> {
        let run_events_only = req.into_inner().run_events_only;
        let (engine, term) = self.leadership.engine()?;
        let mut live = engine.subscribe();
        let (tx, rx) = mpsc::channel(1024);
        self.tasks.spawn(async move {
            loop {
                let Some(e) = next_live(&mut live, &term, &tx).await else { return };
                match e {
                    Ok(p) if run_events_only && !p.event.kind.starts_with("run_") => {}
                    Ok(p) => {
                        if tx.send(Ok(live_event(&p))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let m = format!(
                            "this watcher fell {n} events behind; list the runs again and watch anew"
                        );
                        let _ = tx.send(Err(ApiError::unavailable(m).into())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx
                            .send(Err(ApiError::unavailable("the controller is shutting down").into()))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetLogsStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

    async fn get_logs(
        &self,
        req: Request<pb::GetLogsRequest>,
    ) -> Result<Response<Self::GetLogsStream>, Status> {
        let req = req.into_inner();
        let live = self.logs.subscribe();
        let run_id = self.store.resolve_run_id(&req.run_id).await?;
        let rec = self.store.get_run(&run_id).await?;
        if !req.step_id.is_empty() && !rec.steps.iter().any(|s| s.step_id == req.step_id) {
            return Err(ApiError::not_found(format!("run {run_id} has no step {:?}", req.step_id)).into());
        }
        if req.attempt > 0
            && !rec.attempts.iter().any(|a| a.step_id == req.step_id && a.number == i64::from(req.attempt))
        {
            return Err(ApiError::not_found(format!(
                "step {:?} has no attempt {}",
                req.step_id, req.attempt
            ))
            .into());
        }
        if req.from_seq > 1 && (req.step_id.is_empty() || req.attempt == 0) {
            return Err(ApiError::invalid(
                "from_seq: resuming needs one attempt's output: give step_id and attempt too",
            )
            .into());
        }
        let (tx, rx) = mpsc::channel(64);
        let follow = super::logs::Follow {
            from_seq: req.from_seq.max(1),
            store: self.store.clone(),
            run_id,
            step_id: req.step_id,
            attempt: req.attempt,
            follow: req.follow,
        };
        self.tasks.spawn(follow.run(live, tx, self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_report(
        &self,
        req: Request<pb::GetReportRequest>,
    ) -> Result<Response<pb::GetReportResponse>, Status> {
        let req = req.into_inner();
        let format = pb::ReportFormat::try_from(req.format)
            .map_err(|_| ApiError::invalid(format!("format: unknown report format #{}", req.format)))?;
        let id = self.store.resolve_run_id(&req.run_id).await?;
        let rec = self.store.get_run(&id).await?;
        let mut events = Vec::new();
        loop {
            let page = self.store.events(&id, events.len() as i64 + 1, 5000).await?;
            let n = page.len();
            events.extend(page);
            if n < 5000 {
                break;
            }
        }
        let report = crate::report::build(&rec, &events);
        let (format, content) = match format {
            pb::ReportFormat::Json => (format, crate::report::to_json(&report)),
            pb::ReportFormat::Html => (format, crate::report::to_html(&report)),
            pb::ReportFormat::Markdown | pb::ReportFormat::Unspecified => {
                (pb::ReportFormat::Markdown, crate::report::to_markdown(&report))
            }
        };
        Ok(Response::new(pb::GetReportResponse { format: format as i32, content }))
    }

    async fn drain_agent(&self, req: Request<pb::DrainAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        Ok(Response::new(self.writer()?.drain(req.agent, req.undo, actor).await?))
    }

    async fn reload_router(
        &self,
        req: Request<pb::ReloadRouterRequest>,
    ) -> Result<Response<pb::ReloadRouterResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let Some(path) = &self.router_path else {
            return Err(ApiError::conflict("the controller was started without --router").into());
        };
        let router = crate::router::Router::load(path).map_err(|e| {
            ApiError::invalid(format!("{}: {e}; the rules in force are kept", path.display()))
        })?;
        let rules = router.rules.len() as u32;
        self.router.replace(router);
        tracing::info!(path = %path.display(), rules, by = %actor, "router config reloaded; runs submitted from now on follow it");
        Ok(Response::new(pb::ReloadRouterResponse { rules }))
    }

    async fn get_leader(
        &self,
        _req: Request<pb::GetLeaderRequest>,
    ) -> Result<Response<pb::GetLeaderResponse>, Status> {
        let info = self.store.leader().await?;
        let is_leader = matches!(self.leadership.role(), crate::leader::Role::Leader { .. });
        Ok(Response::new(pb::GetLeaderResponse {
            is_leader,
            address: if info.alive || is_leader { info.address } else { String::new() },
            epoch: info.epoch,
        }))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self.engine()?.list_agents().await?;
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }
}

/// Sends a run's events from `next` on: first from the store, then live; falls back to
/// the store whenever the live feed skips (lag), so the client sees every event once.
/// One WatchRun being served.
struct Watch {
    store: Store,
    run_id: String,
    run_events_only: bool,
}

impl Watch {
    async fn run(
        self,
        mut next: i64,
        mut live: broadcast::Receiver<std::sync::Arc<crate::engine::Published>>,
        tx: mpsc::Sender<Result<pb::RunEvent, Status>>,
        shutdown: CancellationToken,
    ) {
        let Watch { store, run_id, run_events_only } = self;
        const PAGE: i64 = 1000;
        let mut first = true;
        loop {
            // Catch up from the store. A final event ends the log unless events follow
            // it: the run was retried, and its log goes on.
            let mut ended = false;
            loop {
                let events = match store.events(&run_id, next, PAGE).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let n = events.len() as i64;
                // Resuming past the last event of a run that has ended (a client that
                // saw it all): nothing will follow, so the stream ends now.
                if n == 0 && std::mem::take(&mut first) {
                    match store.get_run(&run_id).await {
                        Ok(rec) if rec.run.state.parse::<RunState>().is_ok_and(|s| s.is_terminal()) => return,
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                for e in &events {
                    next = e.seq + 1;
                    ended = is_final(e);
                    if run_events_only && !e.kind.starts_with("run_") {
                        continue;
                    }
                    if tx.send(Ok(convert::event(e))).await.is_err() {
                        return;
                    }
                }
                if n < PAGE {
                    if ended {
                        return;
                    }
                    break;
                }
            }
            // Follow live until the feed skips something.
            loop {
                let Some(e) = next_live(&mut live, &shutdown, &tx).await else { return };
                match e {
                    Ok(p) if p.event.run_id != run_id || p.event.seq < next => continue,
                    Ok(p) if p.event.seq > next => break,
                    Ok(p) if run_events_only && !p.event.kind.starts_with("run_") => {
                        next += 1;
                        if is_final(&p.event) {
                            return;
                        }
                    }
                    Ok(p) => {
                        if tx.send(Ok(live_event(&p))).await.is_err() {
                            return;
                        }
                        next += 1;
                        if is_final(&p.event) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx
                            .send(Err(ApiError::unavailable("the controller is shutting down").into()))
                            .await;
                        return;
                    }
                }
            }
        }
    }
}

/// A committed event as a stream sends it: with its run's progress at the end of its
/// batch when the engine published one.
fn live_event(p: &crate::engine::Published) -> pb::RunEvent {
    let mut ev = convert::event(&p.event);
    if let Some(progress) = p.progress.as_deref() {
        ev.progress = Some(progress.clone());
    }
    ev
}

/// The next committed event, for a stream to a client: `None` once the client has
/// gone, or the controller is shutting down (the client is told so, to come back).
async fn next_live<T>(
    live: &mut broadcast::Receiver<std::sync::Arc<crate::engine::Published>>,
    stop: &CancellationToken,
    tx: &mpsc::Sender<Result<T, Status>>,
) -> Option<Result<std::sync::Arc<crate::engine::Published>, broadcast::error::RecvError>> {
    tokio::select! {
        _ = stop.cancelled() => {
            let _ = tx.send(Err(ApiError::unavailable("the controller is shutting down").into())).await;
            None
        }
        _ = tx.closed() => None,
        e = live.recv() => Some(e),
    }
}

/// The event that ends a run's log.
fn is_final(e: &crate::store::EventRow) -> bool {
    e.kind.starts_with("run_") && e.run_state.parse::<RunState>().is_ok_and(RunState::is_terminal)
}

/// Largest `page_size` of `ListRuns`.
const MAX_PAGE: u32 = 1000;

/// Labels a run may carry at most.
const MAX_LABELS: usize = 32;

/// A run's display name: short, one line.
fn check_name(name: &str) -> Result<(), Status> {
    if name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name: at most 200 characters, on one line").into());
    }
    Ok(())
}

/// Label keys of 1 to 63 letters, digits and `._/-`; values of at most 256 characters
/// without control characters. (Keys so made are safe inside a JSON path.)
fn check_labels(labels: &std::collections::HashMap<String, String>, field: &str) -> Result<(), Status> {
    if labels.len() > MAX_LABELS {
        return Err(
            ApiError::invalid(format!("{field}: at most {MAX_LABELS} labels, not {}", labels.len())).into()
        );
    }
    for (k, v) in labels {
        let key_ok = (1..=63).contains(&k.len())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
        if !key_ok {
            return Err(ApiError::invalid(format!(
                "{field}: key {k:?} must be 1 to 63 letters, digits or ._/-"
            ))
            .into());
        }
        if v.chars().count() > 256 || v.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "{field}.{k}: the value must be at most 256 characters, on one line"
            ))
            .into());
        }
    }
    Ok(())
}

/// The ids of the steps a rerun from steps `from` runs again: those and, unless `only`,
/// every step downstream of them. A `for_each` step whose list is made again expands
/// anew, so its old expansions are taken out of `ws`; one whose expansion reruns ends
/// again with it.
fn rerun_steps(ws: &mut spec::Workstream, from: &[usize], only: bool) -> std::collections::HashSet<String> {
    let mut again: std::collections::HashSet<usize> = from.iter().copied().collect();
    if only {
        let index = ws.index();
        again.extend(from.iter().filter_map(|&i| {
            let s = &ws.steps[i];
            s.item.as_ref().and(s.group.as_deref()).and_then(|g| index.get(g).copied())
        }));
    } else {
        let dependents = crate::engine::dependents_of(ws);
        let mut queue = from.to_vec();
        while let Some(j) = queue.pop() {
            for &d in &dependents[j] {
                if again.insert(d) {
                    queue.push(d);
                }
            }
        }
    }
    let ids: std::collections::HashSet<String> = again.iter().map(|&i| ws.steps[i].id.clone()).collect();
    let anew: Vec<String> = ws
        .steps
        .iter()
        .filter(|s| s.expanded.is_some())
        .filter(|s| {
            s.for_each_source().is_some_and(|r| match r {
                baton_common::template::Ref::Output { step, .. } => ws
                    .steps
                    .iter()
                    .any(|u| ids.contains(&u.id) && (u.id == step || u.group.as_deref() == Some(&step))),
                _ => false,
            })
        })
        .map(|s| s.id.clone())
        .collect();
    for id in anew {
        ws.unexpand(&id);
    }
    ids
}

/// A client's request id: at most 128 printable ASCII characters without spaces.
fn check_request_id(id: &str) -> Result<(), Status> {
    if id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(
            ApiError::invalid("request_id: at most 128 printable ASCII characters without spaces").into()
        );
    }
    Ok(())
}

/// Submitted params as text: strings as they are, numbers and booleans as written.
fn params_of(params: Option<&baton_common::proto::Struct>) -> Result<BTreeMap<String, String>, Status> {
    let Some(params) = params else { return Ok(BTreeMap::new()) };
    let mut out = BTreeMap::new();
    for (k, v) in baton_common::proto::json_object(params) {
        let text = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(
                    ApiError::invalid(format!("params.{k}: must be a string, number or boolean")).into()
                );
            }
        };
        out.insert(k, text);
    }
    Ok(out)
}

/// An opaque token for the page after the run created at `at` with id `id`.
fn page_token(at: i64, id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{at}:{id}"))
}

/// Where the page of a `page_token` starts.
fn page_cursor(token: &str) -> Result<(i64, String), Status> {
    use base64::Engine;
    let bad = || {
        Status::from(ApiError::invalid(
            "page_token: not a token this controller gave (pass next_page_token as is)",
        ))
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((at.parse().map_err(|_| bad())?, id.to_string()))
}
