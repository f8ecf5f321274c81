//! `wait_for`: waits until a TCP port accepts connections (`with.tcp: "host:port"`) or
//! a file exists (`with.file`), up to `with.timeout` (default 60s).

use baton_common::outcome::FailureClass;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Adapter, AttemptContext, BoxFuture, Outcome};

pub struct WaitFor;

const POLL: Duration = Duration::from_millis(100);

impl Adapter for WaitFor {
    fn name(&self) -> &'static str {
        "wait_for"
    }

    fn probe(&self) -> Option<String> {
        Some(env!("CARGO_PKG_VERSION").to_string())
    }

    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        Box::pin(run(ctx))
    }

    fn needs_dir(&self) -> bool {
        false
    }
}

async fn run(ctx: AttemptContext) -> Outcome {
    let timeout = match ctx.input.get("timeout").and_then(Value::as_str) {
        None => Duration::from_secs(60),
        Some(t) => match baton_common::time::parse_duration(t) {
            Ok(d) => d,
            Err(e) => return Outcome::failure(FailureClass::ToolError, format!("with.timeout: {e}")),
        },
    };
    let tcp = ctx.input.get("tcp").and_then(Value::as_str).map(str::to_string);
    let file = ctx.input.get("file").and_then(Value::as_str).map(str::to_string);
    let what = match (&tcp, &file) {
        (Some(t), _) => format!("tcp {t}"),
        (None, Some(f)) => format!("file {f}"),
        (None, None) => {
            return Outcome::failure(FailureClass::ToolError, "wait_for needs with.tcp or with.file");
        }
    };
    let t0 = Instant::now();
    loop {
        let ready = match (&tcp, &file) {
            (Some(addr), _) => {
                matches!(
                    tokio::time::timeout(POLL, tokio::net::TcpStream::connect(addr.as_str())).await,
                    Ok(Ok(_))
                )
            }
            (None, Some(path)) => tokio::fs::try_exists(path).await.unwrap_or(false),
            (None, None) => false,
        };
        if ready {
            ctx.output.write(format!("{what} is ready\n").as_bytes());
            let waited = t0.elapsed().as_millis() as u64;
            return Outcome::success(Some(json!({"waited_ms": waited}).to_string()));
        }
        if t0.elapsed() >= timeout {
            return Outcome::failure(
                FailureClass::ToolError,
                format!("{what} not ready after {}", baton_common::time::format_duration(timeout)),
            );
        }
        tokio::select! {
            _ = ctx.stop.cancelled() => return Outcome::failure(FailureClass::ToolError, "stopped"),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn ctx(input: Value) -> AttemptContext {
        AttemptContext {
            kill_grace: Duration::from_millis(100),
            ..AttemptContext::for_test(&std::env::temp_dir(), input)
        }
    }

    #[tokio::test]
    async fn waits_for_a_port_that_opens_later() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let l = tokio::net::TcpListener::bind(addr).await.unwrap();
            let _ = l.accept().await;
        });
        let o = run(ctx(json!({"tcp": addr.to_string(), "timeout": "5s"}))).await;
        assert!(o.succeeded, "{o:?}");
        let waited: Value = serde_json::from_str(o.result.as_deref().unwrap()).unwrap();
        assert!(waited["waited_ms"].as_u64().unwrap() >= 200);
        opener.abort();
    }

    #[tokio::test]
    async fn a_file_that_never_appears_times_out() {
        let o = run(ctx(json!({"file": "/no/such/file", "timeout": "300ms"}))).await;
        assert_eq!((o.succeeded, o.error_class), (false, Some(FailureClass::ToolError)));
        assert_eq!(o.error, "file /no/such/file not ready after 300ms");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ready");
        std::fs::write(&f, "").unwrap();
        assert!(run(ctx(json!({"file": f.display().to_string()}))).await.succeeded);
    }
}
