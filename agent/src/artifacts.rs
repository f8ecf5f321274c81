//! Artifacts on the agent: before a tool starts, the files its step takes from earlier
//! steps (`inputs:`) are fetched into its working directory; after it succeeded, the
//! files its step leaves (`artifacts:`) are uploaded, before its result is sent. Both
//! go over the current session's connection, each checked against its SHA-256.

use std::path::{Path, PathBuf};

use baton_common::artifacts::{self, CHUNK, Checksum, MAX_FILES, Patterns};
use baton_common::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A client on the current session's connection.
pub type Transfer = pb::agent_service_client::AgentServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, baton_common::connect::Bearer>,
>;

/// The current session's client, when there is one.
pub type Link = watch::Receiver<Option<Transfer>>;

/// A client, once a session is up; `None` when the attempt is stopped meanwhile.
async fn client(link: &Link, stop: &CancellationToken) -> Option<Transfer> {
    let mut link = link.clone();
    tokio::select! {
        c = link.wait_for(|c| c.is_some()) => c.ok().and_then(|c| c.clone()),
        _ = stop.cancelled() => None,
    }
}

/// Fetches the artifacts `inputs` name into `dir`.
pub async fn fetch(
    link: &Link,
    stop: &CancellationToken,
    attempt: &pb::AttemptRef,
    inputs: &[pb::StepInputs],
    dir: &Path,
) -> Result<usize, String> {
    let mut files = 0;
    for input in inputs {
        let mut c = client(link, stop).await.ok_or("stopped")?;
        let req = pb::FetchInputsRequest {
            attempt: Some(attempt.clone()),
            from_step: input.from_step.clone(),
            patterns: input.patterns.clone(),
        };
        let mut chunks = c.fetch_inputs(req).await.map_err(|e| e.message().to_string())?.into_inner();
        let mut open: Option<(pb::ArtifactInfo, tokio::fs::File, Checksum, u64)> = None;
        loop {
            let chunk = chunks.message().await.map_err(|e| e.message().to_string())?;
            let Some(chunk) = chunk else { break };
            if let Some(info) = chunk.info {
                if let Some(done) = open.take() {
                    finish(done).await?;
                }
                artifacts::check_path(&info.path)?;
                let path = dir.join(&info.path);
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(|e| format!("{}: {e}", parent.display()))?;
                }
                let f =
                    tokio::fs::File::create(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
                open = Some((info, f, Checksum::default(), 0));
                files += 1;
            }
            let Some((info, f, sum, n)) = open.as_mut() else {
                return Err("the controller sent bytes before naming their file".into());
            };
            sum.update(&chunk.data);
            *n += chunk.data.len() as u64;
            f.write_all(&chunk.data).await.map_err(|e| format!("{}: {e}", info.path))?;
        }
        if let Some(done) = open.take() {
            finish(done).await?;
        }
    }
    Ok(files)
}

/// Checks a fetched file against its size and SHA-256.
async fn finish(
    (info, mut f, sum, n): (pb::ArtifactInfo, tokio::fs::File, Checksum, u64),
) -> Result<(), String> {
    f.flush().await.map_err(|e| format!("{}: {e}", info.path))?;
    let got = sum.finish();
    if n != info.size || got != info.sha256 {
        return Err(format!(
            "{} of step {} arrived damaged: {n} bytes with SHA-256 {got}, expected {} bytes with {}",
            info.path, info.step_id, info.size, info.sha256
        ));
    }
    Ok(())
}

/// The files under `dir` the globs match (regular files, symlinks not followed), as
/// relative paths; a glob that matches nothing is an error.
pub fn find(dir: &Path, globs: &[String]) -> Result<Vec<(String, PathBuf, u64)>, String> {
    let patterns = Patterns::new(globs)?;
    let mut hit = vec![false; patterns.len()];
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), String::new())];
    while let Some((at, rel)) = todo.pop() {
        let entries = std::fs::read_dir(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("{}: {e}", at.display()))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else { continue };
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let kind = e.file_type().map_err(|e| format!("{path}: {e}"))?;
            if kind.is_dir() {
                todo.push((e.path(), path));
            } else if kind.is_file() && patterns.matches(&path, &mut hit) {
                let size = e.metadata().map_err(|e| format!("{path}: {e}"))?.len();
                out.push((path, e.path(), size));
                if out.len() > MAX_FILES {
                    return Err(format!("more than {MAX_FILES} files match"));
                }
            }
        }
    }
    if let Some(p) = patterns.unmatched(&hit) {
        return Err(format!("{p:?} matched no file"));
    }
    out.sort();
    Ok(out)
}

/// Uploads the files under `dir` the globs match.
pub async fn upload(
    link: &Link,
    stop: &CancellationToken,
    attempt: &pb::AttemptRef,
    globs: &[String],
    dir: &Path,
) -> Result<Vec<pb::ArtifactInfo>, String> {
    let files = {
        let (dir, globs) = (dir.to_path_buf(), globs.to_vec());
        tokio::task::spawn_blocking(move || find(&dir, &globs)).await.map_err(|e| e.to_string())??
    };
    let mut stored = Vec::with_capacity(files.len());
    for (rel, path, size) in files {
        let mut c = client(link, stop).await.ok_or("stopped")?;
        let mut f = tokio::fs::File::open(&path).await.map_err(|e| format!("{rel}: {e}"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let header = pb::ArtifactHeader { attempt: Some(attempt.clone()), path: rel.clone(), size };
        let _ = tx.send(pb::ArtifactUpload { part: Some(pb::artifact_upload::Part::Header(header)) }).await;
        let mut sum = Checksum::default();
        let send = async {
            let mut left = size;
            while left > 0 {
                let mut buf = vec![0; CHUNK.min(left as usize)];
                f.read_exact(&mut buf).await.map_err(|e| format!("{rel}: {e}"))?;
                left -= buf.len() as u64;
                sum.update(&buf);
                let part = pb::artifact_upload::Part::Data(buf);
                if tx.send(pb::ArtifactUpload { part: Some(part) }).await.is_err() {
                    break;
                }
            }
            drop(tx);
            Ok::<_, String>(())
        };
        let call = c.upload_artifact(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (sent, info) = tokio::join!(send, call);
        let info = info.map_err(|e| format!("{rel}: {}", e.message()))?.into_inner();
        sent?;
        let ours = sum.finish();
        if info.sha256 != ours {
            return Err(format!("{rel}: the controller stored SHA-256 {}, the file has {ours}", info.sha256));
        }
        stored.push(info);
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_matches_files_below_the_directory_and_names_a_glob_that_matches_none() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("dist/sub")).unwrap();
        std::fs::write(d.path().join("dist/a.tgz"), "aa").unwrap();
        std::fs::write(d.path().join("dist/sub/b.tgz"), "b").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("dist/link.tgz")).unwrap();
        let found = find(d.path(), &["dist/**/*.tgz".into()]).unwrap();
        let names: Vec<(&str, u64)> = found.iter().map(|(r, _, n)| (r.as_str(), *n)).collect();
        assert_eq!(names, [("dist/a.tgz", 2), ("dist/sub/b.tgz", 1)], "no symlink followed");
        let e = find(d.path(), &["dist/*.tgz".into(), "*.whl".into()]).unwrap_err();
        assert_eq!(e, "\"*.whl\" matched no file");
    }
}
