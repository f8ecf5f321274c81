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

use super::{MAX_MESSAGE_BYTES, convert};
use crate::auth::Identity;
use crate::engine::EngineError;
use crate::leader::Leadership;
use crate::store::Store;

pub struct RunApi {
    leadership: Leadership,
    router: std::sync::Arc<std::sync::Mutex<crate::router::Router>>,
    store: Store,
    logs: crate::logs::Logs,
    router_path: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
}

impl RunApi {
    pub fn new(
        leadership: Leadership,
        router: std::sync::Arc<std::sync::Mutex<crate::router::Router>>,
        store: Store,
        logs: crate::logs::Logs,
        router_path: Option<std::path::PathBuf>,
        shutdown: CancellationToken,
    ) -> RunApi {
        RunApi { leadership, router, store, logs, router_path, shutdown }
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
        if req.spec.len() > MAX_MESSAGE_BYTES {
            return Err(Status::invalid_argument(format!(
                "{source}: spec is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
                req.spec.len()
            )));
        }
        let request_id = req.request_id;
        if request_id.len() > 128 || !request_id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Status::invalid_argument(
                "request_id: at most 128 printable ASCII characters without spaces",
            ));
        }
        if !request_id.is_empty()
            && let Some(run_id) = self.store.run_by_request_id(&request_id).await?
        {
            return Ok(Response::new(pb::SubmitRunResponse { run_id }));
        }
        // Parsing is CPU work bounded by the size and nesting caps; it runs on the
        // blocking pool so that one big spec cannot hold up other calls.
        let (source_owned, text) = (source.to_string(), req.spec);
        let ws = tokio::task::spawn_blocking(move || spec::parse(&source_owned, &text))
            .await
            .map_err(|e| Status::internal(format!("parsing the spec: {e}")))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let params: BTreeMap<String, String> = req.params.into_iter().collect();
        let estimates = self.store.duration_estimates(&ws.name).await?;
        let engine = self.writer()?;
        let run_id = engine.submit(ws, params, request_id, estimates, actor).await.map_err(|e| match e {
            EngineError::Invalid(m) => Status::invalid_argument(format!("{source}: {m}")),
            other => other.into(),
        })?;
        Ok(Response::new(pb::SubmitRunResponse { run_id }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::GetRunResponse>, Status> {
        let id = self.store.resolve_run_id(&req.into_inner().run_id).await?;
        // Ask the engine first: what it says may be a little older than the rows, never
        // newer.
        // A standby serves what the shared database holds, without live details.
        let live = match self.leadership.engine() {
            Ok((engine, _)) => engine.live(id.clone()).await?,
            Err(_) => None,
        };
        let rec = self.store.get_run(&id).await?;
        let mut run = convert::run(rec);
        if let Some(live) = live {
            for step in &mut run.steps {
                if step.reason.is_empty()
                    && let Some(why) = live.reasons.get(&step.id)
                {
                    step.reason = why.clone();
                }
            }
            if let Some(p) = &mut run.progress {
                p.eta_ms = live.progress.eta_ms;
            }
        }
        Ok(Response::new(pb::GetRunResponse { run: Some(run) }))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let req = req.into_inner();
        let state = if req.state.is_empty() {
            None
        } else {
            req.state.parse::<RunState>().map_err(|e| Status::invalid_argument(e.to_string()))?;
            Some(req.state.as_str())
        };
        let limit = if req.limit == 0 { 50 } else { req.limit };
        let runs = self.store.list_runs(state, limit).await?;
        let runs = runs.iter().map(|(r, c)| convert::summary(r, c)).collect();
        Ok(Response::new(pb::ListRunsResponse { runs }))
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
            Ok(state) => Ok(Response::new(pb::CancelRunResponse { run_id: id, state: state.to_string() })),
            // Not in the engine: the run is final already.
            Err(EngineError::RunNotFound(_)) if whole_run => {
                let rec = self.store.get_run(&id).await?;
                if rec.run.state == RunState::Canceled.as_str() {
                    Ok(Response::new(pb::CancelRunResponse { run_id: id, state: rec.run.state }))
                } else {
                    Err(Status::failed_precondition(format!("run {id} already {}", rec.run.state)))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn release_run(
        &self,
        req: Request<pb::ReleaseRunRequest>,
    ) -> Result<Response<pb::ReleaseRunResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let id = self.store.resolve_run_id(&req.into_inner().run_id).await?;
        let state = self.writer()?.release(id.clone(), actor).await?;
        Ok(Response::new(pb::ReleaseRunResponse { run_id: id, state: state.to_string() }))
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
            return Err(Status::invalid_argument("reset breaker: tool is empty"));
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
        let watch =
            Watch { store: self.store.clone(), engine, run_id: id, run_events_only: req.run_events_only };
        tokio::spawn(watch.run(req.from_seq.max(1), live, tx, term));
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
            return Err(Status::not_found(format!("run {run_id} has no step {:?}", req.step_id)));
        }
        if req.attempt > 0
            && !rec.attempts.iter().any(|a| a.step_id == req.step_id && a.number == i64::from(req.attempt))
        {
            return Err(Status::not_found(format!("step {:?} has no attempt {}", req.step_id, req.attempt)));
        }
        let (tx, rx) = mpsc::channel(64);
        let follow = super::logs::Follow {
            store: self.store.clone(),
            run_id,
            step_id: req.step_id,
            attempt: req.attempt,
            follow: req.follow,
        };
        tokio::spawn(follow.run(live, tx, self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_report(
        &self,
        req: Request<pb::GetReportRequest>,
    ) -> Result<Response<pb::GetReportResponse>, Status> {
        let req = req.into_inner();
        let format = if req.format.is_empty() { "md".to_string() } else { req.format.to_lowercase() };
        if !["md", "json", "html"].contains(&format.as_str()) {
            return Err(Status::invalid_argument(format!("report format {format:?}: use md, json or html")));
        }
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
        let content = match format.as_str() {
            "json" => crate::report::to_json(&report),
            "html" => crate::report::to_html(&report),
            _ => crate::report::to_markdown(&report),
        };
        Ok(Response::new(pb::GetReportResponse { format, content }))
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
            return Err(Status::failed_precondition("the controller was started without --router"));
        };
        let router = crate::router::Router::load(path).map_err(|e| {
            Status::invalid_argument(format!("{}: {e}; the rules in force are kept", path.display()))
        })?;
        let rules = router.rules.len() as u32;
        if let Ok(mut r) = self.router.lock() {
            *r = router.clone();
        }
        self.engine()?.set_router(router).await?;
        tracing::info!(path = %path.display(), rules, by = %actor, "router config reloaded");
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
    engine: crate::engine::EngineHandle,
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
        let Watch { store, engine, run_id, run_events_only } = self;
        const PAGE: i64 = 1000;
        let mut first = true;
        loop {
            // Catch up from the store.
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
                // The last event of a page carries the run's progress as it is now.
                let progress = match events.last() {
                    Some(last) if !is_final(last) => {
                        engine.live(run_id.clone()).await.ok().flatten().map(|l| l.progress)
                    }
                    _ => None,
                };
                for (i, e) in events.iter().enumerate() {
                    if run_events_only && !e.kind.starts_with("run_") {
                        next = e.seq + 1;
                        continue;
                    }
                    let mut ev = convert::event(e);
                    if i + 1 == events.len() {
                        ev.progress = progress.clone();
                    }
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                    next = e.seq + 1;
                    if is_final(e) {
                        return;
                    }
                }
                if n < PAGE {
                    break;
                }
            }
            // Follow live until the feed skips something.
            loop {
                let e = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the controller is shutting down"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    e = live.recv() => e,
                };
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
                        let mut ev = convert::event(&p.event);
                        ev.progress = p.progress.as_deref().cloned();
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                        next += 1;
                        if is_final(&p.event) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(Err(Status::unavailable("the controller is shutting down"))).await;
                        return;
                    }
                }
            }
        }
    }
}

/// The event that ends a run's log.
fn is_final(e: &crate::store::EventRow) -> bool {
    e.kind.starts_with("run_") && e.run_state.parse::<RunState>().is_ok_and(RunState::is_terminal)
}
