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
        "json" => builder.json().try_init(),
        other => return Err(SetupError::LogFormat(other.to_string())),
    };
    Ok(())
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
