//! Metrics in the Prometheus text format, and the small HTTP endpoint that serves them
//! with `/healthz` and `/readyz`.
//!
//! Each component owns its metrics (no global registry), so several controllers or
//! agents in one process keep separate numbers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A counter or gauge with labels.
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, f64>>,
}

impl Family {
    pub const fn counter(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        Family { name, help, kind: "counter", labels, values: Mutex::new(BTreeMap::new()) }
    }

    pub const fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        Family { name, help, kind: "gauge", labels, values: Mutex::new(BTreeMap::new()) }
    }

    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }

    pub fn add(&self, labels: &[&str], v: f64) {
        if let Ok(mut m) = self.values.lock() {
            *m.entry(labels.iter().map(|s| s.to_string()).collect()).or_default() += v;
        }
    }

    pub fn set(&self, labels: &[&str], v: f64) {
        if let Ok(mut m) = self.values.lock() {
            m.insert(labels.iter().map(|s| s.to_string()).collect(), v);
        }
    }

    /// Replaces all values of a gauge (for gauges read from state at scrape time).
    pub fn set_all(&self, values: impl IntoIterator<Item = (Vec<String>, f64)>) {
        if let Ok(mut m) = self.values.lock() {
            m.clear();
            m.extend(values);
        }
    }

    pub fn get(&self, labels: &[&str]) -> f64 {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        self.values.lock().ok().and_then(|m| m.get(&key).copied()).unwrap_or(0.0)
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        let Ok(m) = self.values.lock() else { return };
        if m.is_empty() && self.labels.is_empty() {
            let _ = writeln!(out, "{} 0", self.name);
        }
        for (key, v) in m.iter() {
            let _ = writeln!(out, "{}{} {}", self.name, label_text(self.labels, key, None), num(*v));
        }
    }
}

/// A histogram with labels and fixed buckets.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    values: Mutex<BTreeMap<Vec<String>, HistogramState>>,
}

#[derive(Default)]
struct HistogramState {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Histogram {
        Histogram { name, help, labels, buckets, values: Mutex::new(BTreeMap::new()) }
    }

    pub fn observe(&self, labels: &[&str], v: f64) {
        let Ok(mut m) = self.values.lock() else { return };
        let s = m.entry(labels.iter().map(|s| s.to_string()).collect()).or_default();
        if s.counts.is_empty() {
            s.counts = vec![0; self.buckets.len()];
        }
        for (i, b) in self.buckets.iter().enumerate() {
            if v <= *b {
                s.counts[i] += 1;
            }
        }
        s.sum += v;
        s.count += 1;
    }

    pub fn count(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        self.values.lock().ok().and_then(|m| m.get(&key).map(|s| s.count)).unwrap_or(0)
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} histogram", self.name);
        let Ok(m) = self.values.lock() else { return };
        for (key, s) in m.iter() {
            for (i, b) in self.buckets.iter().enumerate() {
                let le = num(*b);
                let _ = writeln!(
                    out,
                    "{}_bucket{} {}",
                    self.name,
                    label_text(self.labels, key, Some(&le)),
                    s.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "{}_bucket{} {}",
                self.name,
                label_text(self.labels, key, Some("+Inf")),
                s.count
            );
            let _ = writeln!(out, "{}_sum{} {}", self.name, label_text(self.labels, key, None), num(s.sum));
            let _ = writeln!(out, "{}_count{} {}", self.name, label_text(self.labels, key, None), s.count);
        }
    }
}

fn label_text(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> =
        names.iter().zip(values).map(|(n, v)| format!("{n}=\"{}\"", escape(v))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") }
}

/// Fine latency buckets in seconds, from 50µs to 1 minute (dispatch, commits).
pub const LATENCY: &[f64] = &[
    0.00005, 0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005,
    0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Step duration buckets in seconds, from 10ms to 1 hour.
pub const DURATIONS: &[f64] =
    &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0];

/// Count buckets (batch sizes).
pub const COUNTS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// Renders the metrics text, gathering state first if needed.
pub type RenderFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;
/// Whether the component is ready to work (for `/readyz`), and why not.
pub type ReadyFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Whether a request's `authorization` header lets it read `/metrics`.
pub type AuthorizeFn =
    Arc<dyn Fn(Option<String>) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Serves `/metrics`, `/healthz` (up) and `/readyz` (ready to work) until `shutdown`.
/// With `authorize`, `/metrics` answers 401 to a request it refuses (probes stay open).
pub async fn serve(
    listener: TcpListener,
    render: RenderFn,
    ready: ReadyFn,
    authorize: Option<AuthorizeFn>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    continue;
                }
            },
        };
        let (render, ready, authorize) = (render.clone(), ready.clone(), authorize.clone());
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (render, ready, authorize) = (render.clone(), ready.clone(), authorize.clone());
            async move {
                if req.uri().path() == "/metrics"
                    && let Some(authorize) = authorize
                {
                    let header = req
                        .headers()
                        .get(hyper::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    if !authorize(header).await {
                        let refused = Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .header("www-authenticate", "Bearer")
                            .header("content-type", "text/plain")
                            .body(Full::new(Bytes::from("a token with role reader is needed for /metrics\n")))
                            .unwrap_or_default();
                        return Ok::<_, Infallible>(refused);
                    }
                }
                Ok::<_, Infallible>(route(req.uri().path(), render, ready).await)
            }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

async fn route(path: &str, render: RenderFn, ready: ReadyFn) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match path {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", render().await),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match ready().await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        _ => {
            reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz, /readyz\n".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        static C: Family = Family::counter("x_total", "Things.", &["kind", "class"]);
        static G: Family = Family::gauge("up", "Up.", &[]);
        static H: Histogram = Histogram::new("lat_seconds", "Latency.", &[], &[0.1, 1.0]);
        C.inc(&["a", "b\"q"]);
        C.add(&["a", "b\"q"], 2.0);
        H.observe(&[], 0.05);
        H.observe(&[], 0.5);
        H.observe(&[], 5.0);
        let mut out = String::new();
        C.render(&mut out);
        G.render(&mut out);
        H.render(&mut out);
        assert!(out.contains("# TYPE x_total counter\nx_total{kind=\"a\",class=\"b\\\"q\"} 3\n"), "{out}");
        assert!(out.contains("up 0\n"), "{out}");
        assert!(out.contains("lat_seconds_bucket{le=\"0.1\"} 1\nlat_seconds_bucket{le=\"1\"} 2\nlat_seconds_bucket{le=\"+Inf\"} 3\nlat_seconds_sum 5.55\nlat_seconds_count 3\n"), "{out}");
    }
}
