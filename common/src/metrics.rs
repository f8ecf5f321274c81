//! Metrics in the Prometheus text format, and the small HTTP endpoint that serves them
//! with `/healthz` and `/readyz`.
//!
//! Each component owns its metrics (no global registry), so several controllers or
//! agents in one process keep separate numbers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family as PFamily, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram as PHistogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(String, String)>;

/// The label set of `values` under `names`.
fn label_set(names: &[&str], values: &[&str]) -> Labels {
    names.iter().zip(values).map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

enum Values {
    Counter(PFamily<Labels, Counter<f64, AtomicU64>>),
    Gauge(PFamily<Labels, Gauge<f64, AtomicU64>>),
}

/// A counter or gauge with labels (a prometheus-client family).
pub struct Family {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Values,
}

impl Family {
    /// A counter; its name ends in `_total`, as the exposition shows it.
    pub fn counter(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        let f = Family { name, help, labels, values: Values::Counter(PFamily::default()) };
        f.touch();
        f
    }

    pub fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        let f = Family { name, help, labels, values: Values::Gauge(PFamily::default()) };
        f.touch();
        f
    }

    /// A metric without labels shows 0 before anything happened.
    fn touch(&self) {
        if self.labels.is_empty() {
            self.add(&[], 0.0);
        }
    }

    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }

    pub fn add(&self, labels: &[&str], v: f64) {
        let ls = label_set(self.labels, labels);
        match &self.values {
            Values::Counter(f) => {
                f.get_or_create(&ls).inc_by(v);
            }
            Values::Gauge(f) => {
                f.get_or_create(&ls).inc_by(v);
            }
        }
    }

    /// Sets a gauge (a counter only goes up: it is raised to `v`).
    pub fn set(&self, labels: &[&str], v: f64) {
        let ls = label_set(self.labels, labels);
        match &self.values {
            Values::Counter(f) => {
                let c = f.get_or_create(&ls);
                let now = c.get();
                if v > now {
                    c.inc_by(v - now);
                }
            }
            Values::Gauge(f) => {
                f.get_or_create(&ls).set(v);
            }
        }
    }

    /// Replaces all values of a gauge (for gauges read from state at scrape time).
    pub fn set_all(&self, values: impl IntoIterator<Item = (Vec<String>, f64)>) {
        if let Values::Gauge(f) = &self.values {
            f.clear();
            for (key, v) in values {
                let key: Vec<&str> = key.iter().map(String::as_str).collect();
                f.get_or_create(&label_set(self.labels, &key)).set(v);
            }
        }
    }

    pub fn get(&self, labels: &[&str]) -> f64 {
        let ls = label_set(self.labels, labels);
        match &self.values {
            Values::Counter(f) => f.get(&ls).map_or(0.0, |c| c.get()),
            Values::Gauge(f) => f.get(&ls).map_or(0.0, |g| g.get()),
        }
    }

    fn register(&self, r: &mut Registry) {
        match &self.values {
            // The exposition adds `_total` to counters.
            Values::Counter(f) => r.register(self.name.trim_end_matches("_total"), self.help, f.clone()),
            Values::Gauge(f) => r.register(self.name, self.help, f.clone()),
        }
    }
}

/// Makes the histogram of a new label set with the family's buckets.
#[derive(Clone, Debug)]
struct Buckets(&'static [f64]);

impl MetricConstructor<PHistogram> for Buckets {
    fn new_metric(&self) -> PHistogram {
        PHistogram::new(self.0.iter().copied())
    }
}

/// A histogram with labels and fixed buckets.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: PFamily<Labels, PHistogram, Buckets>,
}

impl Histogram {
    pub fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Histogram {
        Histogram { name, help, labels, values: PFamily::new_with_constructor(Buckets(buckets)) }
    }

    pub fn observe(&self, labels: &[&str], v: f64) {
        self.values.get_or_create(&label_set(self.labels, labels)).observe(v);
    }
}

/// The metrics in the OpenMetrics text format (which Prometheus reads), in one
/// exposition ending with `# EOF`.
pub fn render(families: &[&Family], histograms: &[&Histogram]) -> String {
    let mut r = Registry::default();
    for f in families {
        f.register(&mut r);
    }
    for h in histograms {
        r.register(h.name, h.help, h.values.clone());
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}

/// `baton_build_info{component, version} 1`: which build runs, for dashboards and
/// alerts on mixed versions.
pub fn build_info(component: &'static str) -> Family {
    let f = Family::gauge(
        "baton_build_info",
        "The running build: component and version.",
        &["component", "version"],
    );
    f.set(&[component, env!("CARGO_PKG_VERSION")], 1.0);
    f
}

/// Metrics of the process itself, read from /proc at each scrape: CPU time, memory,
/// threads, file descriptors, start time (the names node and Go exporters use).
pub struct ProcessMetrics {
    cpu: Family,
    resident: Family,
    virtual_bytes: Family,
    threads: Family,
    open_fds: Family,
    max_fds: Family,
    start: Family,
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        ProcessMetrics {
            cpu: Family::counter(
                "process_cpu_seconds_total",
                "User and system CPU time spent, in seconds.",
                &[],
            ),
            resident: Family::gauge("process_resident_memory_bytes", "Resident memory size in bytes.", &[]),
            virtual_bytes: Family::gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                &[],
            ),
            threads: Family::gauge("process_threads", "Threads of the process.", &[]),
            open_fds: Family::gauge("process_open_fds", "Open file descriptors.", &[]),
            max_fds: Family::gauge("process_max_fds", "The limit of open file descriptors.", &[]),
            start: Family::gauge(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
                &[],
            ),
        }
    }
}

impl ProcessMetrics {
    /// Reads /proc now; what cannot be read keeps its last value.
    pub fn refresh(&self) {
        let ticks = 100.0; // USER_HZ, fixed at 100 on Linux for /proc's clock ticks
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
        {
            // Fields after the command name, from field 3 (state) on.
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
            if let (Some(u), Some(s)) = (num(14), num(15)) {
                self.cpu.set(&[], (u + s) / ticks);
            }
            if let Some(t) = num(20) {
                self.threads.set(&[], t);
            }
            if let Some(v) = num(23) {
                self.virtual_bytes.set(&[], v);
            }
            if let Some(pages) = num(24) {
                self.resident.set(&[], pages * 4096.0);
            }
            let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok()))
            });
            if let (Some(boot), Some(start)) = (boot, num(22)) {
                self.start.set(&[], boot + start / ticks);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(&[], dir.count() as f64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
            && let Some(max) = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        {
            self.max_fds.set(&[], max);
        }
    }

    pub fn families(&self) -> [&Family; 7] {
        [
            &self.cpu,
            &self.resident,
            &self.virtual_bytes,
            &self.threads,
            &self.open_fds,
            &self.max_fds,
            &self.start,
        ]
    }
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

/// What answers `/metrics`, `/healthz` (up) and `/readyz` (ready to work), on the
/// metrics port or on another HTTP port that shares them.
#[derive(Clone)]
pub struct Probes {
    pub render: RenderFn,
    pub ready: ReadyFn,
    /// With it, `/metrics` answers 401 to a request it refuses (probes stay open).
    pub authorize: Option<AuthorizeFn>,
}

impl Probes {
    /// Whether `path` is one of the probes' paths.
    pub fn serves(path: &str) -> bool {
        matches!(path, "/metrics" | "/healthz" | "/readyz")
    }

    /// The answer to a request for one of [`Probes::serves`]' paths (404 otherwise).
    pub async fn respond(&self, path: &str, authorization: Option<String>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, ctype: &str, body: String| {
            Response::builder()
                .status(status)
                .header("content-type", ctype)
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        };
        if path == "/metrics"
            && let Some(authorize) = &self.authorize
            && !authorize(authorization).await
        {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", "Bearer")
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from("a token with role reader is needed for /metrics\n")))
                .unwrap_or_default();
        }
        match path {
            "/metrics" => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                (self.render)().await,
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => match (self.ready)().await {
                Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
                Err(why) => {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n"))
                }
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics, /healthz, /readyz\n".into(),
            ),
        }
    }
}

/// Serves the probes on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, probes: Probes, shutdown: CancellationToken) {
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
        let probes = probes.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let probes = probes.clone();
            async move {
                let header = req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Ok::<_, Infallible>(probes.respond(req.uri().path(), header).await)
            }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_openmetrics_text_format() {
        let c = Family::counter("x_total", "Things.", &["kind", "class"]);
        let g = Family::gauge("up", "Up.", &[]);
        let h = Histogram::new("lat_seconds", "Latency.", &[], &[0.1, 1.0]);
        c.inc(&["a", "b\"q"]);
        c.add(&["a", "b\"q"], 2.0);
        h.observe(&[], 0.05);
        h.observe(&[], 0.5);
        h.observe(&[], 5.0);
        let p = ProcessMetrics::default();
        p.refresh();
        let mut families = vec![&c, &g];
        families.extend(p.families());
        let out = render(&families, &[&h]);
        assert!(out.contains("# TYPE x counter\nx_total{kind=\"a\",class=\"b\\\"q\"} 3.0\n"), "{out}");
        assert!(out.contains("up 0.0\n"), "{out}");
        assert!(out.contains("lat_seconds_sum 5.55\nlat_seconds_count 3\nlat_seconds_bucket{le=\"0.1\"} 1\nlat_seconds_bucket{le=\"1.0\"} 2\nlat_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
        assert!(p.resident.get(&[]) > 0.0 && p.open_fds.get(&[]) > 0.0 && p.start.get(&[]) > 1.7e9, "{out}");
        assert_eq!(c.get(&["a", "b\"q"]), 3.0);
    }
}
