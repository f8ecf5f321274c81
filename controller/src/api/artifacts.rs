//! Artifacts over the API: agents store what a successful attempt left and fetch the
//! inputs of the attempts they run (each call names a live attempt of theirs, with its
//! lease); users list a run's artifacts and read them.

use std::pin::Pin;

use baton_common::artifacts::{self, CHUNK, Patterns};
use baton_common::pb;
use futures_util::StreamExt;
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use super::ApiError;
use crate::artifacts::{ArtifactError, Artifacts};
use crate::auth::{Identity, Via};
use crate::store::{ArtifactRow, AttemptRow, Store};

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;

impl From<ArtifactError> for ApiError {
    fn from(e: ArtifactError) -> ApiError {
        match e {
            ArtifactError::TooBig { .. } | ArtifactError::Size { .. } | ArtifactError::Upload(_) => {
                ApiError::invalid(e.to_string())
            }
            ArtifactError::Store(object_store::Error::NotFound { .. }) => {
                ApiError::not_found(format!("{e} (the stored file is gone)"))
            }
            ArtifactError::Open(..) => ApiError::internal(e.to_string()),
            ArtifactError::Store(_) => ApiError::unavailable(e.to_string()),
        }
    }
}

/// The store, or why this controller keeps no artifacts.
pub fn store_of(a: &Option<Artifacts>) -> Result<&Artifacts, Status> {
    a.as_ref().ok_or_else(|| {
        ApiError::conflict(
            "this controller keeps no artifacts: start it with --artifacts DIR or s3://BUCKET/PREFIX",
        )
        .into()
    })
}

/// The attempt `r` names, if it is live, under that lease, and the caller's.
async fn live_attempt(
    store: &Store,
    who: &Identity,
    r: Option<&pb::AttemptRef>,
) -> Result<AttemptRow, Status> {
    let r = r.ok_or_else(|| ApiError::invalid("the attempt is missing"))?;
    let refuse =
        |why: &str| -> Status { ApiError::denied(format!("attempt {}: {why}", r.attempt_id)).into() };
    let row = store.attempt(&r.attempt_id).await.map_err(ApiError::from)?.ok_or_else(|| refuse("unknown"))?;
    if row.lease_token != r.lease_token || row.run_id != r.run_id || row.step_id != r.step_id {
        return Err(refuse("not under this lease"));
    }
    if !matches!(row.state.as_str(), "assigned" | "running") {
        return Err(refuse(&format!("it is {}", row.state)));
    }
    let mine = match &who.via {
        Via::Agent { agent_id } => *agent_id == row.agent_id,
        Via::Certificate => who.name == row.agent_name,
        Via::Anonymous => true,
        Via::Token { .. } | Via::JoinToken { .. } => false,
    };
    if !mine {
        return Err(refuse(&format!("it runs on agent {}", row.agent_name)));
    }
    Ok(row)
}

/// Stores one file of a live attempt of the caller: the header, then its bytes.
pub async fn upload(
    store: &Store,
    artifacts: &Artifacts,
    who: &Identity,
    mut parts: Streaming<pb::ArtifactUpload>,
) -> Result<pb::ArtifactInfo, Status> {
    use pb::artifact_upload::Part;
    let header = match parts.message().await?.and_then(|m| m.part) {
        Some(Part::Header(h)) => h,
        _ => return Err(ApiError::invalid("an upload starts with its header").into()),
    };
    artifacts::check_path(&header.path).map_err(ApiError::invalid)?;
    let row = live_attempt(store, who, header.attempt.as_ref()).await?;
    let data = parts.map(|m| match m {
        Ok(pb::ArtifactUpload { part: Some(Part::Data(d)) }) => Ok(d),
        Ok(_) => Err("a second header".to_string()),
        Err(e) => Err(e.message().to_string()),
    });
    let at = (row.run_id.as_str(), row.step_id.as_str(), row.id.as_str());
    let sha256 =
        artifacts.put(at, &header.path, header.size, Box::pin(data)).await.map_err(ApiError::from)?;
    tracing::debug!(run_id = %row.run_id, step_id = %row.step_id, attempt_id = %row.id, path = %header.path, size = header.size, "artifact stored");
    Ok(pb::ArtifactInfo {
        step_id: row.step_id,
        path: header.path,
        size: header.size,
        sha256,
        attempt_id: row.id,
        created_at: Some(baton_common::proto::timestamp(baton_common::time::now_ms())),
    })
}

/// The artifacts a live attempt of the caller takes from step `from` of its run (or,
/// for a matrix or for_each step, from its expansions): those its globs match, each
/// glob matching one at least. A rerun finds those of a step it took over in the run it
/// repeats.
pub async fn inputs(
    store: &Store,
    who: &Identity,
    req: &pb::FetchInputsRequest,
) -> Result<Vec<ArtifactRow>, Status> {
    let attempt = live_attempt(store, who, req.attempt.as_ref()).await?;
    let patterns = Patterns::new(&req.patterns).map_err(|e| ApiError::invalid(format!("patterns: {e}")))?;
    let from = req.from_step.as_str();
    let of_step = |r: &ArtifactRow| {
        r.step_id == from || r.step_id.strip_prefix(from).is_some_and(|x| x.starts_with('['))
    };
    let mut run = attempt.run_id.clone();
    let mut rows: Vec<ArtifactRow> = Vec::new();
    for _ in 0..100 {
        rows =
            store.list_artifacts(&run).await.map_err(ApiError::from)?.into_iter().filter(of_step).collect();
        match store.rerun_of(&run).await.map_err(ApiError::from)? {
            Some(of) if rows.is_empty() && !of.is_empty() => run = of,
            _ => break,
        }
    }
    let mut hit = vec![false; patterns.len()];
    rows.retain(|r| patterns.matches(&r.path, &mut hit));
    if let Some(p) = patterns.unmatched(&hit) {
        let left: Vec<String> = store
            .list_artifacts(&run)
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .filter(of_step)
            .map(|r| r.path)
            .collect();
        let left = if left.is_empty() { "none".to_string() } else { left.join(", ") };
        return Err(ApiError::conflict(format!(
            "no artifact of step {from:?} matches {p:?} (it left: {left})"
        ))
        .into());
    }
    let mut seen = std::collections::HashMap::new();
    for r in &rows {
        if let Some(other) = seen.insert(r.path.as_str(), r.step_id.as_str()) {
            return Err(ApiError::conflict(format!(
                "steps {other:?} and {:?} both left {:?}; take them with globs that tell them apart",
                r.step_id, r.path
            ))
            .into());
        }
    }
    Ok(rows)
}

/// The description of a stored artifact.
pub fn info(r: &ArtifactRow) -> pb::ArtifactInfo {
    pb::ArtifactInfo {
        step_id: r.step_id.clone(),
        path: r.path.clone(),
        size: r.size as u64,
        sha256: r.sha256.clone(),
        attempt_id: r.attempt_id.clone(),
        created_at: Some(baton_common::proto::timestamp(r.created_at)),
    }
}

/// The files of `rows`, one after the other, in chunks; the first chunk of each names it.
pub fn stream(artifacts: Artifacts, rows: Vec<ArtifactRow>) -> ChunkStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for r in rows {
            let got = artifacts.get((&r.run_id, &r.step_id, &r.attempt_id), &r.path).await;
            let mut bytes = match got {
                Ok(b) => Box::pin(b),
                Err(e) => {
                    let _ = tx.send(Err(ApiError::from(e).into())).await;
                    return;
                }
            };
            let mut first = Some(info(&r));
            // An empty file is still announced.
            if r.size == 0
                && tx.send(Ok(pb::ArtifactChunk { info: first.take(), data: Vec::new() })).await.is_err()
            {
                return;
            }
            while let Some(piece) = bytes.next().await {
                let piece = match piece {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::from(e).into())).await;
                        return;
                    }
                };
                for data in piece.chunks(CHUNK) {
                    let chunk = pb::ArtifactChunk { info: first.take(), data: data.to_vec() };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
