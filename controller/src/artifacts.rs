//! The artifact store: where the files steps leave (`artifacts:`) are kept, through
//! `object_store`: a directory on the controller's host by default, or an
//! S3-compatible bucket (`s3://BUCKET/PREFIX`, credentials and endpoint from the usual
//! `AWS_*` variables). Objects are `runs/RUN/STEP/ATTEMPT/PATH`: an attempt never
//! overwrites another's files, and a run's files go with it.

use std::sync::Arc;

use baton_common::artifacts::Checksum;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, WriteMultipart};

/// Default largest artifact: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact store {0}: {1}")]
    Open(String, String),
    #[error("artifact {path:?} is {size} bytes; the limit is {max} (--artifact-max-bytes)")]
    TooBig { path: String, size: u64, max: u64 },
    #[error("artifact {path:?}: {got} bytes arrived, {declared} were announced")]
    Size { path: String, got: u64, declared: u64 },
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    #[error("artifact upload: {0}")]
    Upload(String),
}

/// Where artifacts are kept, and how big one may be.
#[derive(Clone)]
pub struct Artifacts {
    store: Arc<dyn ObjectStore>,
    pub max_bytes: u64,
    /// Where it is, for logs and errors.
    pub location: String,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts").field("location", &self.location).finish()
    }
}

impl Artifacts {
    /// Opens `location`: `s3://BUCKET[/PREFIX]` (configured by the `AWS_*` variables),
    /// or a directory (created when missing).
    pub fn open(location: &str, max_bytes: u64) -> Result<Artifacts, ArtifactError> {
        let env =
            std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).map(|(k, v)| (k.to_ascii_lowercase(), v));
        Self::open_with(location, max_bytes, env)
    }

    /// [`Artifacts::open`] with the bucket's settings given (`aws_endpoint`,
    /// `aws_region`, ...) instead of read from the environment.
    pub fn open_with(
        location: &str,
        max_bytes: u64,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Artifacts, ArtifactError> {
        let open = |e: String| ArtifactError::Open(location.to_string(), e);
        let store: Arc<dyn ObjectStore> = if location.starts_with("s3://") {
            let url = url::Url::parse(location).map_err(|e| open(e.to_string()))?;
            let (store, prefix) =
                object_store::parse_url_opts(&url, options).map_err(|e| open(e.to_string()))?;
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        } else if location.contains("://") {
            return Err(open("expected a directory or s3://BUCKET/PREFIX".into()));
        } else {
            std::fs::create_dir_all(location).map_err(|e| open(e.to_string()))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(location)
                    .map_err(|e| open(e.to_string()))?,
            )
        };
        Ok(Artifacts { store, max_bytes, location: location.to_string() })
    }

    fn key(run: &str, step: &str, attempt: &str, path: &str) -> Path {
        Path::from_iter(["runs", run, step, attempt].into_iter().chain(path.split('/')))
    }

    /// Stores the bytes `data` yields as `path` of an attempt: at most `declared` bytes
    /// and at most the limit, exactly `declared` in all. Returns the SHA-256. Nothing is
    /// kept of an upload that fails.
    pub async fn put<S>(
        &self,
        (run, step, attempt): (&str, &str, &str),
        path: &str,
        declared: u64,
        mut data: S,
    ) -> Result<String, ArtifactError>
    where
        S: Stream<Item = Result<Vec<u8>, String>> + Unpin,
    {
        if declared > self.max_bytes {
            return Err(ArtifactError::TooBig { path: path.into(), size: declared, max: self.max_bytes });
        }
        let upload = self.store.put_multipart(&Self::key(run, step, attempt, path)).await?;
        let mut w = WriteMultipart::new(upload);
        let mut sum = Checksum::default();
        let mut got = 0u64;
        let result = async {
            while let Some(chunk) = data.next().await {
                let chunk = chunk.map_err(ArtifactError::Upload)?;
                got += chunk.len() as u64;
                if got > declared {
                    return Err(ArtifactError::Size { path: path.into(), got, declared });
                }
                sum.update(&chunk);
                w.wait_for_capacity(4).await?;
                w.write(&chunk);
            }
            if got != declared {
                return Err(ArtifactError::Size { path: path.into(), got, declared });
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                w.finish().await?;
                Ok(sum.finish())
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }

    /// The bytes of a stored artifact, in pieces.
    pub async fn get(
        &self,
        (run, step, attempt): (&str, &str, &str),
        path: &str,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, ArtifactError>> + use<>, ArtifactError> {
        let got = self.store.get(&Self::key(run, step, attempt, path)).await?;
        Ok(got.into_stream().map_ok(|b| b.to_vec()).map_err(ArtifactError::from))
    }

    /// Deletes every artifact of a run (when the run is deleted).
    pub async fn delete_run(&self, run: &str) -> Result<(), ArtifactError> {
        let prefix = Path::from_iter(["runs", run]);
        let keys: Vec<Path> = self.store.list(Some(&prefix)).map_ok(|m| m.location).try_collect().await?;
        for key in keys {
            self.store.delete(&key).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&[u8]]) -> impl Stream<Item = Result<Vec<u8>, String>> + Unpin {
        futures_util::stream::iter(parts.iter().map(|p| Ok(p.to_vec())).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn a_file_is_stored_whole_checked_and_deleted_with_its_run() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(&dir.path().join("store").display().to_string(), 10).unwrap();
        stores_checks_and_deletes(&a).await;
    }

    /// The same against an S3-compatible server: `BATON_TEST_S3_SERVER` names a
    /// `moto_server` executable (`.ci/run` installs it; a real S3 needs credentials this
    /// machine does not have). Skipped without it unless `BATON_REQUIRE_S3=1`.
    #[tokio::test]
    async fn an_s3_bucket_keeps_artifacts_as_a_directory_does() {
        let Some(server) = std::env::var_os("BATON_TEST_S3_SERVER") else {
            assert!(
                std::env::var("BATON_REQUIRE_S3").is_err(),
                "BATON_REQUIRE_S3=1 but no BATON_TEST_S3_SERVER"
            );
            eprintln!("skipped: no BATON_TEST_S3_SERVER");
            return;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = tokio::process::Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The bucket, made over plain HTTP once the server answers.
        let made = loop {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let req = format!(
                    "PUT /baton HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await.unwrap();
                let mut answer = String::new();
                s.read_to_string(&mut answer).await.unwrap();
                break answer;
            }
            assert!(child.try_wait().unwrap().is_none(), "moto_server exited");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert!(made.starts_with("HTTP/1.1 200"), "{made}");
        let options = [
            ("aws_endpoint", format!("http://127.0.0.1:{port}")),
            ("aws_allow_http", "true".into()),
            ("aws_access_key_id", "test".into()),
            ("aws_secret_access_key", "test".into()),
            ("aws_region", "us-east-1".into()),
        ]
        .map(|(k, v)| (k.to_string(), v));
        let a = Artifacts::open_with("s3://baton/artifacts", 10, options).unwrap();
        stores_checks_and_deletes(&a).await;
        child.kill().await.unwrap();
    }

    async fn stores_checks_and_deletes(a: &Artifacts) {
        let at = ("run-1", "build[os=debian]", "att-1");
        let sum = a.put(at, "dist/app.tgz", 6, chunks(&[b"abc", b"def"])).await.unwrap();
        assert_eq!(sum, "bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721");
        let back: Vec<Vec<u8>> = a.get(at, "dist/app.tgz").await.unwrap().try_collect().await.unwrap();
        assert_eq!(back.concat(), b"abcdef");
        // Past the limit, or not the size announced: refused, nothing kept.
        let e = a.put(at, "big", 11, chunks(&[b"x"])).await.unwrap_err().to_string();
        assert_eq!(e, "artifact \"big\" is 11 bytes; the limit is 10 (--artifact-max-bytes)");
        let e = a.put(at, "short", 5, chunks(&[b"abc"])).await.unwrap_err().to_string();
        assert!(e.contains("3 bytes arrived, 5 were announced"), "{e}");
        assert!(a.get(at, "short").await.is_err());
        a.delete_run("run-1").await.unwrap();
        assert!(a.get(at, "dist/app.tgz").await.is_err());
    }
}
