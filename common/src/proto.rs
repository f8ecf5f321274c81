//! Generated gRPC types and services of package `baton.v1`, and the conversions between
//! the well-known types they use and Baton's own (Unix milliseconds, JSON values).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("baton.v1");
    include!(concat!(env!("OUT_DIR"), "/baton.v1.serde.rs"));

    /// Encoded descriptor set of all baton.v1 protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/baton_descriptor.bin"));
}

use pbjson_types::ListValue;
use pbjson_types::value::Kind;
/// The well-known types the protos use.
pub use pbjson_types::{Duration, Struct, Timestamp, Value};

/// A point in time given in Unix milliseconds.
pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// `timestamp` of a time that may be unset.
pub fn timestamp_opt(ms: Option<i64>) -> Option<Timestamp> {
    ms.map(timestamp)
}

/// Unix milliseconds of a point in time.
pub fn millis(t: &Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// A span given in milliseconds (negative ones are taken as zero).
pub fn duration(ms: i64) -> Duration {
    let ms = ms.max(0);
    Duration { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// Milliseconds of a span (negative ones as zero).
pub fn duration_millis(d: &Duration) -> i64 {
    d.seconds.saturating_mul(1000).saturating_add(i64::from(d.nanos) / 1_000_000).max(0)
}

/// A JSON value as a protobuf `Value`.
pub fn value(v: serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => {
            Kind::ListValue(ListValue { values: a.into_iter().map(value).collect() })
        }
        serde_json::Value::Object(o) => Kind::StructValue(structure(o)),
    };
    Value { kind: Some(kind) }
}

/// A JSON object as a protobuf `Struct`.
pub fn structure(o: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct { fields: o.into_iter().map(|(k, v)| (k, value(v))).collect() }
}

/// A protobuf `Value` as JSON (a whole number stays an integer).
pub fn json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(json).collect()),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(json_object(s)),
    }
}

/// A protobuf `Struct` as a JSON object.
pub fn json_object(s: &Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields.iter().map(|(k, v)| (k.clone(), json(v))).collect()
}

/// Protobuf numbers are doubles; those that are whole (and exact) become JSON integers,
/// so `3` does not come back as `3.0`.
fn number(n: f64) -> serde_json::Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.fract() == 0.0 && n.abs() < EXACT {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
    }
}

/// The text of stored JSON as a protobuf `Value`; `None` for no text (or text that is not
/// JSON, which the store never holds).
pub fn value_of_text(text: Option<&str>) -> Option<Value> {
    let text = text.filter(|t| !t.is_empty())?;
    serde_json::from_str(text).ok().map(value)
}

/// A protobuf `Value` as JSON text; empty for none.
pub fn text_of_value(v: Option<&Value>) -> String {
    v.map(|v| json(v).to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_timestamps_and_durations() {
        for ms in [0, 1, 999, 1_000, 1_764_000_123_456, -1] {
            assert_eq!(millis(&timestamp(ms)), ms);
        }
        assert_eq!(duration_millis(&duration(90_061)), 90_061);
        assert_eq!(duration(-5), Duration { seconds: 0, nanos: 0 });
    }

    #[test]
    fn json_round_trips_through_values_with_integers_kept() {
        let v = serde_json::json!({"n": 3, "f": 1.5, "s": "x", "l": [true, null, {"k": -7}]});
        assert_eq!(json(&value(v.clone())), v);
        assert_eq!(json(&value(v.clone())).to_string(), v.to_string());
        assert_eq!(value_of_text(Some("")), None);
        assert_eq!(text_of_value(value_of_text(Some("[1,2]")).as_ref()), "[1,2]");
    }
}
