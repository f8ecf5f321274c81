//! Wall-clock time as Unix milliseconds: what is persisted and sent on the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Microseconds since the Unix epoch, now (the engine's clock: latencies below a
/// millisecond).
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// A duration as whole milliseconds, saturating.
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Parses a human duration such as `30s`, `5m`, `1h30m` or `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    humantime::parse_duration(t).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// Formats a duration the way `parse_duration` reads it, rounded to milliseconds.
pub fn format_duration(d: Duration) -> String {
    let d = Duration::from_millis(d.as_millis() as u64);
    humantime::format_duration(d).to_string()
}
