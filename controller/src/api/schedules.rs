//! Schedules over the API: create, list, show, pause, resume, delete, trigger. The
//! leader's scheduler (`crate::schedules`) starts their runs.

use baton_common::pb;
use baton_common::proto;
use tonic::Status;

use super::ApiError;
use crate::schedules::{Catchup, Overlap, When};
use crate::store::ScheduleRow;

/// How many next times GetSchedule shows.
const UPCOMING: usize = 5;

/// The API's view of a schedule; with `upcoming`, its next times from now.
pub fn to_pb(row: &ScheduleRow, upcoming: bool) -> pb::Schedule {
    let params: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&row.params).unwrap_or_default();
    let mut next = Vec::new();
    if upcoming
        && !row.paused
        && let Ok(when) = When::new(&row.cron, row.every_ms, &row.timezone)
    {
        let mut t = Some(row.next_at);
        while let Some(at) = t.filter(|_| next.len() < UPCOMING) {
            next.push(proto::timestamp(at));
            t = when.next_after(at);
        }
    }
    pb::Schedule {
        id: row.id.clone(),
        workstream: row.workstream.clone(),
        cron: row.cron.clone(),
        every: row.every_ms.map(proto::duration),
        timezone: row.timezone.clone(),
        params: Some(proto::structure(params)),
        overlap: row.overlap.clone(),
        catchup: row.catchup.clone(),
        paused: row.paused,
        next_at: Some(proto::timestamp(row.next_at)),
        last_run_id: row.last_run_id.clone(),
        created_at: Some(proto::timestamp(row.created_at)),
        created_by: row.created_by.clone(),
        upcoming: next,
    }
}

/// A schedule row from a create request and its parsed workstream, checked: when it
/// fires, its policies, its params (no secret ones).
pub fn new_row(
    req: &pb::CreateScheduleRequest,
    ws: &baton_common::spec::Workstream,
    params: &std::collections::BTreeMap<String, String>,
    actor: String,
) -> Result<ScheduleRow, Status> {
    let invalid = |m: String| -> Status { ApiError::invalid(m).into() };
    if let Some(p) = params.keys().find(|p| ws.secret_params.contains(*p)) {
        return Err(invalid(format!(
            "params.{p} is secret: a schedule does not keep secret values (read it from secrets.NAME in the spec)"
        )));
    }
    let timezone = if req.timezone.is_empty() { "UTC".to_string() } else { req.timezone.clone() };
    let every_ms = req.every.as_ref().map(proto::duration_millis);
    let when = When::new(&req.cron, every_ms, &timezone).map_err(invalid)?;
    let overlap = if req.overlap.is_empty() { "skip" } else { req.overlap.as_str() };
    let catchup = if req.catchup.is_empty() { "none" } else { req.catchup.as_str() };
    overlap.parse::<Overlap>().map_err(invalid)?;
    catchup.parse::<Catchup>().map_err(invalid)?;
    let now = baton_common::time::now_ms();
    let next_at = when.first_after(now).ok_or_else(|| invalid("the schedule never fires".into()))?;
    Ok(ScheduleRow {
        id: uuid::Uuid::new_v4().to_string(),
        workstream: ws.name.clone(),
        spec: serde_json::to_string(ws).map_err(|e| ApiError::internal(e.to_string()))?,
        params: serde_json::to_string(params).map_err(|e| ApiError::internal(e.to_string()))?,
        cron: req.cron.trim().to_string(),
        every_ms,
        timezone,
        overlap: overlap.to_string(),
        catchup: catchup.to_string(),
        paused: false,
        next_at,
        last_run_id: String::new(),
        created_at: now,
        created_by: actor,
    })
}

/// The time a resumed schedule starts from: the next one after now.
pub fn resume_at(row: &ScheduleRow) -> Result<i64, Status> {
    let when = When::new(&row.cron, row.every_ms, &row.timezone).map_err(ApiError::internal)?;
    when.first_after(baton_common::time::now_ms())
        .ok_or_else(|| ApiError::conflict("the schedule never fires again").into())
}
