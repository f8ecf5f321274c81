//! The dashboard on `--http-listen`: its pages, compiled into the binary, and the calls
//! they make. Those are calls of the public API carried over HTTP: a request is the
//! RPC's message in the protobuf JSON mapping, posted to `/api/v1/METHOD`; the answer
//! is the response message as JSON, or for a streaming RPC a stream of server-sent
//! events. Each call is admitted by the table of RPCs with the same credentials as on
//! the API port, so what a token may do is the same on both ports.

mod assets;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use baton_common::metrics::Probes;
use baton_common::pb;
use baton_common::pb::admin_service_server::AdminService;
use baton_common::pb::baton_service_server::BatonService;
use futures_util::{Stream, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, Response, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::api::{AdminApi, ApiError, RunApi};
use crate::auth::{Authenticator, Identity};
use crate::tls::{Peer, Tls};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body of a dashboard call.
const MAX_BODY_BYTES: usize = 1 << 20;

/// How often an idle event stream sends a comment, so that proxies and the browser
/// keep it open and a dead connection is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The RPCs the dashboard calls, with their service. Any other method is refused
/// (submitting, tokens and secrets stay on the API port).
const RPCS: &[(&str, &str)] = &[
    ("ListRuns", "baton.v1.BatonService"),
    ("GetRun", "baton.v1.BatonService"),
    ("CancelRun", "baton.v1.BatonService"),
    ("ReleaseRun", "baton.v1.BatonService"),
    ("RetryRun", "baton.v1.BatonService"),
    ("DecideApproval", "baton.v1.BatonService"),
    ("ListAgents", "baton.v1.BatonService"),
    ("DrainAgent", "baton.v1.BatonService"),
    ("ListBreakers", "baton.v1.BatonService"),
    ("ResetBreaker", "baton.v1.BatonService"),
    ("GetLeader", "baton.v1.BatonService"),
    ("WatchRun", "baton.v1.BatonService"),
    ("WatchRuns", "baton.v1.BatonService"),
    ("GetLogs", "baton.v1.BatonService"),
    ("WhoAmI", "baton.v1.AdminService"),
];

/// What the HTTP port serves.
pub struct Web {
    pub runs: Arc<RunApi>,
    pub admin: Arc<AdminApi>,
    pub auth: Arc<Authenticator>,
    /// `/metrics`, `/healthz` and `/readyz` when the port serves them too.
    pub probes: Option<Probes>,
}

/// Serves the dashboard on `listener` (with TLS when the API port has it) until `stop`.
pub async fn serve(listener: TcpListener, tls: Option<Arc<Tls>>, web: Arc<Web>, stop: CancellationToken) {
    let mut incoming = crate::tls::incoming(listener, tls, stop.clone());
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let peer = conn.connect_info();
        let (web, stop) = (web.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (web, peer) = (web.clone(), peer.clone());
                async move { Ok::<_, Infallible>(web.handle(req, &peer).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(error = %e, "dashboard connection ended") },
                _ = stop.cancelled() => {}
            }
        });
    }
}

impl Web {
    async fn handle(&self, req: Request<hyper::body::Incoming>, peer: &Peer) -> Response<Body> {
        let path = req.uri().path().to_string();
        if Probes::serves(&path)
            && let Some(probes) = &self.probes
        {
            let authorization =
                req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
            return probes.respond(&path, authorization).await.map(|b| b.boxed_unsync());
        }
        if let Some(rpc) = path.strip_prefix("/api/v1/") {
            if req.method() != Method::POST {
                return problem(StatusCode::METHOD_NOT_ALLOWED, "INVALID_ARGUMENT", "API calls are POSTs");
            }
            let rpc = rpc.to_string();
            let headers = req.headers().clone();
            let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let m = format!("request body: {e} (at most {MAX_BODY_BYTES} bytes)");
                    return problem(StatusCode::PAYLOAD_TOO_LARGE, "INVALID_ARGUMENT", &m);
                }
            };
            return self.call(&rpc, &headers, peer, body).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return problem(StatusCode::METHOD_NOT_ALLOWED, "INVALID_ARGUMENT", "pages are read with GET");
        }
        match assets::find(&path) {
            Some(asset) => page(StatusCode::OK, asset.content_type, Bytes::from_static(asset.body)),
            None => page(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                Bytes::from(format!("no page at {path}: try / (runs), /agents or /breakers\n")),
            ),
        }
    }

    /// One API call: admitted like the gRPC call, then made on the API's services.
    async fn call(&self, rpc: &str, headers: &hyper::HeaderMap, peer: &Peer, body: Bytes) -> Response<Body> {
        let Some((_, service)) = RPCS.iter().find(|(m, _)| *m == rpc) else {
            let m = format!("the dashboard's API has no method {rpc:?}");
            return problem(StatusCode::NOT_FOUND, "NOT_FOUND", &m);
        };
        let identity = match self.auth.admit_call(&format!("/{service}/{rpc}"), headers, Some(peer)).await {
            Ok(i) => i,
            Err(s) => return status_response(&s),
        };
        let id = identity;
        let runs = self.runs.clone();
        match rpc {
            "ListRuns" => unary(body, id, |r| async move { runs.list_runs(r).await }).await,
            "GetRun" => unary(body, id, |r| async move { runs.get_run(r).await }).await,
            "CancelRun" => unary(body, id, |r| async move { runs.cancel_run(r).await }).await,
            "ReleaseRun" => unary(body, id, |r| async move { runs.release_run(r).await }).await,
            "RetryRun" => unary(body, id, |r| async move { runs.retry_run(r).await }).await,
            "DecideApproval" => unary(body, id, |r| async move { runs.decide_approval(r).await }).await,
            "ListAgents" => unary(body, id, |r| async move { runs.list_agents(r).await }).await,
            "DrainAgent" => unary(body, id, |r| async move { runs.drain_agent(r).await }).await,
            "ListBreakers" => unary(body, id, |r| async move { runs.list_breakers(r).await }).await,
            "ResetBreaker" => unary(body, id, |r| async move { runs.reset_breaker(r).await }).await,
            "GetLeader" => unary(body, id, |r| async move { runs.get_leader(r).await }).await,
            "WatchRun" => {
                events(body, id, |r| async move { runs.watch_run(r).await }, |e: &pb::RunEvent| Some(e.seq))
                    .await
            }
            "WatchRuns" => events(body, id, |r| async move { runs.watch_runs(r).await }, |_| None).await,
            "GetLogs" => {
                events(body, id, |r| async move { runs.get_logs(r).await }, |c: &pb::LogChunk| Some(c.seq))
                    .await
            }
            "WhoAmI" => {
                let admin = self.admin.clone();
                unary(body, id, |r| async move { admin.who_am_i(r).await }).await
            }
            _ => problem(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("no method {rpc:?}")),
        }
    }
}

/// The request message of a call, from its JSON body (an empty body is the empty
/// message).
fn decode<Q: DeserializeOwned + Default>(body: &Bytes) -> Result<Q, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Q::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("request body: {e}")).into())
}

/// A gRPC request carrying the caller's identity, as the auth layer makes them.
fn request<Q>(message: Q, identity: Option<Identity>) -> tonic::Request<Q> {
    let mut r = tonic::Request::new(message);
    if let Some(i) = identity {
        r.extensions_mut().insert(i);
    }
    r
}

async fn unary<Q, A, F, Fut>(body: Bytes, identity: Option<Identity>, f: F) -> Response<Body>
where
    Q: DeserializeOwned + Default,
    A: Serialize,
    F: FnOnce(tonic::Request<Q>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<A>, Status>>,
{
    let q = match decode::<Q>(&body) {
        Ok(q) => q,
        Err(s) => return status_response(&s),
    };
    match f(request(q, identity)).await {
        Ok(r) => match serde_json::to_vec(r.get_ref()) {
            Ok(json) => {
                respond(StatusCode::OK, "application/json", Full::new(Bytes::from(json)).boxed_unsync())
            }
            Err(e) => status_response(&ApiError::internal(format!("cannot encode the answer: {e}")).into()),
        },
        Err(s) => status_response(&s),
    }
}

/// A streaming call as server-sent events: one `data:` line of JSON per message, with
/// `id:` its sequence number where it has one; `event: end` when the stream ends and
/// `event: error` (with code and message) when it fails.
async fn events<Q, A, S, F, Fut>(
    body: Bytes,
    identity: Option<Identity>,
    f: F,
    seq_of: fn(&A) -> Option<i64>,
) -> Response<Body>
where
    Q: DeserializeOwned + Default,
    A: Serialize + Send + 'static,
    S: Stream<Item = Result<A, Status>> + Send + Unpin + 'static,
    F: FnOnce(tonic::Request<Q>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    let q = match decode::<Q>(&body) {
        Ok(q) => q,
        Err(s) => return status_response(&s),
    };
    let mut stream = match f(request(q, identity)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return status_response(&s),
    };
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        let send = |text: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(Frame::data(Bytes::from(text)))).await.is_ok() }
        };
        // The headers and a first line go out at once: the page knows it is connected.
        if !send(": connected\n\n".into()).await {
            return;
        }
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        loop {
            let item = tokio::select! {
                _ = tx.closed() => return,
                _ = keepalive.tick() => {
                    if !send(": keepalive\n\n".into()).await { return }
                    continue;
                }
                item = stream.next() => item,
            };
            let text = match item {
                None => {
                    send("event: end\ndata: {}\n\n".into()).await;
                    return;
                }
                Some(Err(s)) => {
                    send(format!("event: error\ndata: {}\n\n", problem_json(&s))).await;
                    return;
                }
                Some(Ok(message)) => match serde_json::to_string(&message) {
                    Ok(json) => match seq_of(&message) {
                        Some(seq) => format!("id: {seq}\ndata: {json}\n\n"),
                        None => format!("data: {json}\n\n"),
                    },
                    Err(e) => {
                        warn!(error = %e, "cannot encode an event for the dashboard");
                        return;
                    }
                },
            };
            if !send(text).await {
                return;
            }
        }
    });
    let body = StreamBody::new(ReceiverStream::new(rx)).boxed_unsync();
    let mut r = respond(StatusCode::OK, "text/event-stream", body);
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

/// The HTTP status of a gRPC status.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        PermissionDenied => StatusCode::FORBIDDEN,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted | FailedPrecondition => StatusCode::CONFLICT,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `{"code": "PERMISSION_DENIED", "message": "..."}`.
fn problem_json(s: &Status) -> String {
    let code = format!("{:?}", s.code());
    // `PermissionDenied` → `PERMISSION_DENIED`, as gRPC names its codes.
    let mut name = String::new();
    for (i, c) in code.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    serde_json::json!({ "code": name, "message": s.message() }).to_string()
}

fn status_response(s: &Status) -> Response<Body> {
    let body = Full::new(Bytes::from(problem_json(s))).boxed_unsync();
    respond(http_status(s.code()), "application/json", body)
}

fn problem(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let json = serde_json::json!({ "code": code, "message": message }).to_string();
    respond(status, "application/json", Full::new(Bytes::from(json)).boxed_unsync())
}

fn page(status: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    let mut r = respond(status, content_type, Full::new(body).boxed_unsync());
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    r
}

/// A response with the headers every answer of the port carries: the pages load
/// nothing but their own scripts and styles, and are never framed.
fn respond(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every RPC the dashboard may call is in the table of RPCs, so its calls are
    /// admitted by the same rules as on the API port.
    #[test]
    fn every_dashboard_rpc_is_in_the_table() {
        for (m, s) in RPCS {
            assert!(crate::auth::table::need_of(&format!("/{s}/{m}")).is_some(), "{s}/{m}");
        }
    }

    #[test]
    fn grpc_codes_keep_their_names() {
        let j = problem_json(&Status::permission_denied("no"));
        assert_eq!(j, r#"{"code":"PERMISSION_DENIED","message":"no"}"#);
        assert_eq!(http_status(tonic::Code::Unauthenticated), StatusCode::UNAUTHORIZED);
    }
}
