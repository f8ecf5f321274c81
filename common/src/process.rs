//! What each Baton binary does at its edges, in one place: logs on stderr (text or
//! JSON, `RUST_LOG` filters), and a clean stop on SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--log-format must be text or json, not {0:?}")]
    LogFormat(String),
}

/// Sends logs to stderr as `format` ("text" or "json"), at `default_level` unless
/// `RUST_LOG` says otherwise; colours only on a terminal and without `NO_COLOR`. A
/// second call keeps the first setup.
pub fn init_tracing(format: &str, default_level: &str) -> Result<(), SetupError> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _already_set = match format {
        "text" => builder.try_init(),
        "json" => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(FlatJson)
            .try_init(),
        other => return Err(SetupError::LogFormat(other.to_string())),
    };
    Ok(())
}

/// One JSON object per line with every field at the top: `timestamp`, `level`,
/// `target`, `message`, the fields of the spans the event is in (`run_id`, `step_id`,
/// `attempt_id`, ...; inner spans win) and the event's own.
pub struct FlatJson;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for FlatJson
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use serde_json::Value;
        let meta = event.metadata();
        let mut map = serde_json::Map::new();
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        map.insert("timestamp".into(), Value::String(now));
        map.insert("level".into(), Value::String(meta.level().to_string()));
        map.insert("target".into(), Value::String(meta.target().to_string()));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let fields = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>();
                if let Some(Ok(Value::Object(m))) = fields.map(|f| serde_json::from_str::<Value>(f.as_str()))
                {
                    map.extend(m);
                }
            }
        }
        event.record(&mut JsonVisitor(&mut map));
        let line = serde_json::to_string(&Value::Object(map)).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Records an event's fields as JSON values: numbers and booleans as such, the rest as
/// their text.
struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &tracing::field::Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT. The handlers are registered
/// before this returns, so a signal that comes right after is not lost.
pub fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (term, int) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    let (Ok(mut term), Ok(mut int)) = (term, int) else {
        tracing::error!("cannot listen for SIGTERM and SIGINT; stop this process with SIGKILL");
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        tracing::info!("shutting down");
        shutdown.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_logs_carry_span_ids_as_top_level_fields() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("attempt", run_id = "r1", step_id = "build", attempt_id = "a1");
            let _g = span.enter();
            tracing::info!(exit_code = 3, retried = true, "attempt failed");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["run_id"], "r1");
        assert_eq!(v["step_id"], "build");
        assert_eq!(v["attempt_id"], "a1");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["retried"], true);
        assert_eq!(v["message"], "attempt failed");
        assert_eq!(v["level"], "INFO");
    }
}
