//! Traces of runs in OpenTelemetry: W3C trace context for attempts, and the OTLP/gRPC
//! exporter the controller and agents send spans through.
//!
//! A run's trace id is its id (a UUID holds 128 bits, like a trace id) and span ids are
//! hashes of what a span is of (`run:ID`, `step:RUN/STEP`, `attempt:ID`), so the
//! engine can name an attempt's span in the assignment it commits without asking the
//! exporter, and a restarted controller names the same spans.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use opentelemetry::Context;
/// A span attribute.
pub use opentelemetry::KeyValue;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator};

/// The trace id of a run: its UUID's bytes.
pub fn trace_id(run_id: &str) -> Option<[u8; 16]> {
    let hex: String = run_id.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (out != [0; 16]).then_some(out)
}

/// A span id from what the span is of (FNV-1a; never zero, which means "none").
pub fn span_id(what: &str) -> [u8; 8] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in what.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1).to_be_bytes()
}

pub fn run_span(run_id: &str) -> [u8; 8] {
    span_id(&format!("run:{run_id}"))
}

pub fn step_span(run_id: &str, step_id: &str) -> [u8; 8] {
    span_id(&format!("step:{run_id}/{step_id}"))
}

pub fn attempt_span(attempt_id: &str) -> [u8; 8] {
    span_id(&format!("attempt:{attempt_id}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The W3C `traceparent` of a span (sampled).
pub fn traceparent(trace: [u8; 16], span: [u8; 8]) -> String {
    format!("00-{}-{}-01", hex(&trace), hex(&span))
}

/// The trace and span id of a `traceparent` (version 00).
pub fn parse_traceparent(s: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = s.trim().split('-');
    let (version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let bytes = |h: &str, out: &mut [u8]| -> Option<()> {
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(())
    };
    let (mut t, mut p) = ([0u8; 16], [0u8; 8]);
    bytes(trace, &mut t)?;
    bytes(span, &mut p)?;
    Some((t, p))
}

thread_local! {
    /// The ids the next span started on this thread gets (see [`Ids`]).
    static NEXT: Cell<Option<([u8; 16], [u8; 8])>> = const { Cell::new(None) };
}

/// Gives a span the ids [`Exporter::span`] chose for it; random ones otherwise.
#[derive(Debug, Default)]
struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        NEXT.with(|n| n.get()).map_or_else(|| self.0.new_trace_id(), |(t, _)| TraceId::from_bytes(t))
    }

    fn new_span_id(&self) -> SpanId {
        NEXT.with(|n| n.get()).map_or_else(|| self.0.new_span_id(), |(_, s)| SpanId::from_bytes(s))
    }
}

/// A finished span to send.
pub struct SpanRecord {
    pub name: String,
    pub trace: [u8; 16],
    pub span: [u8; 8],
    /// The parent span in the same trace; `None` for a trace's root.
    pub parent: Option<[u8; 8]>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Set when what the span covers failed.
    pub error: Option<String>,
}

/// Sends spans over OTLP/gRPC in batches (at most a second late).
pub struct Exporter {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
    tracer: opentelemetry_sdk::trace::SdkTracer,
}

impl Exporter {
    /// An exporter to the OTLP/gRPC `endpoint` (`http://collector:4317`) for `service`.
    /// Call it inside the tokio runtime the gRPC client will use.
    pub fn new(endpoint: &str, service: &'static str) -> Result<Exporter, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        let batches = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default().with_scheduled_delay(Duration::from_secs(1)).build(),
            )
            .build();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_id_generator(Ids::default())
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(service);
        Ok(Exporter { provider, tracer })
    }

    /// Queues a finished span.
    pub fn span(&self, r: SpanRecord) {
        use opentelemetry::trace::Span as _;
        let cx = match r.parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(r.trace),
                SpanId::from_bytes(p),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        NEXT.with(|n| n.set(Some((r.trace, r.span))));
        let mut span = self
            .tracer
            .span_builder(r.name)
            .with_kind(SpanKind::Internal)
            .with_start_time(r.start)
            .with_attributes(r.attributes)
            .start_with_context(&self.tracer, &cx);
        NEXT.with(|n| n.set(None));
        if let Some(e) = r.error {
            span.set_status(Status::error(e));
        }
        span.end_with_timestamp(r.end);
    }

    /// Sends what is queued and stops; blocks (call it from a blocking thread).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OTLP exporter did not shut down cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_runs_and_traceparents_round_trip() {
        let run = "0190aaaa-0000-7000-8000-000000000001";
        let t = trace_id(run).unwrap();
        assert_eq!(hex(&t), "0190aaaa000070008000000000000001");
        assert_eq!(trace_id("not-a-uuid"), None);
        assert_ne!(run_span(run), step_span(run, "a"));
        assert_eq!(attempt_span("x"), attempt_span("x"));
        let tp = traceparent(t, attempt_span("x"));
        assert_eq!(parse_traceparent(&tp), Some((t, attempt_span("x"))));
        assert_eq!(parse_traceparent("01-00-00-01"), None);
    }
}
