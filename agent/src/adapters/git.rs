//! Git for the coding tools: repositories by path or URL, a worktree per attempt on a
//! branch of its own, commits made by the agent, and what a commit changed. Git runs
//! as a process with its arguments as data (never through a shell), without hooks and
//! without prompts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{Value, json};
use tokio::process::Command;

/// Who the agent's commits are by.
const AUTHOR: [&str; 4] = ["-c", "user.name=Baton", "-c", "user.email=baton@localhost"];

/// Runs git in `dir`; its stdout, or its stderr as the error.
pub async fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(["-c", "core.hooksPath=/dev/null", "-c", "advice.detachedHead=false"])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("git {}: {}", args.first().copied().unwrap_or(""), err.trim()))
    }
}

/// Whether `dir` is inside a git work tree (or is a bare repository).
pub async fn is_repo(dir: &Path) -> bool {
    git(dir, &["rev-parse", "--git-dir"]).await.is_ok()
}

/// One lock per repository: adding and removing worktrees, moving branches.
pub async fn lock(repo: &Path) -> tokio::sync::OwnedMutexGuard<()> {
    static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> =
        LazyLock::new(Default::default);
    let key = std::fs::canonicalize(repo).unwrap_or_else(|_| repo.to_path_buf());
    let m = match LOCKS.lock() {
        Ok(mut locks) => locks.entry(key).or_default().clone(),
        Err(_) => Arc::default(),
    };
    m.lock_owned().await
}

/// Whether `repo` names a remote repository (a URL or `host:path`) rather than a
/// directory.
fn is_url(repo: &str) -> bool {
    repo.contains("://") || (repo.contains(':') && !repo.starts_with('/') && !repo.starts_with('.'))
}

/// A repository a step works on.
pub struct Repo {
    pub dir: PathBuf,
    /// The URL it was cloned from; `None` for a repository given by its path.
    pub url: Option<String>,
}

impl Repo {
    /// Makes `branch` (as it is here) the remote's too, for a repository given by URL:
    /// the commits made in the agent's clone reach the repository the step named. A
    /// push the remote refuses (it moved meanwhile) is an error.
    pub async fn publish(&self, branch: &str) -> Result<(), String> {
        let Some(url) = &self.url else { return Ok(()) };
        let refspec = format!("refs/heads/{branch}:refs/heads/{branch}");
        git(&self.dir, &["push", "--quiet", "origin", &refspec])
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot push {branch} to {url}: {e}"))
    }
}

/// The repository `with.repo` names: a path as it is; a URL as a bare clone kept in
/// the agent's work dir (`WORK_DIR/repos`), fetched again each time.
pub async fn open(repo: &str, attempt_dir: &Path) -> Result<Repo, String> {
    if !is_url(repo) {
        let path = PathBuf::from(repo);
        if !tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir()) {
            return Err(format!("with.repo {repo} is not a directory"));
        }
        return Ok(Repo { dir: path, url: None });
    }
    let root = attempt_dir.parent().and_then(Path::parent).unwrap_or(attempt_dir).join("repos");
    tokio::fs::create_dir_all(&root).await.map_err(|e| format!("{}: {e}", root.display()))?;
    let name = format!("{:016x}.git", fnv(repo.as_bytes()));
    let clone = root.join(&name);
    let _guard = lock(&clone).await;
    if tokio::fs::metadata(&clone).await.is_ok() {
        git(&clone, &["fetch", "--prune", "--quiet", "origin", "+refs/heads/*:refs/heads/*"])
            .await
            .map_err(|e| format!("with.repo {repo}: {e}"))?;
    } else {
        git(&root, &["clone", "--bare", "--quiet", "--", repo, &name])
            .await
            .map_err(|e| format!("with.repo {repo}: {e}"))?;
    }
    Ok(Repo { dir: clone, url: Some(repo.to_string()) })
}

/// The commit `rev` names in `repo`.
pub async fn commit_of(repo: &Path, rev: &str) -> Result<String, String> {
    let spec = format!("{rev}^{{commit}}");
    git(repo, &["rev-parse", "--verify", "--quiet", "--end-of-options", &spec])
        .await
        .map(|s| s.trim().to_string())
        .map_err(|_| format!("{rev:?} is not a commit in {}", repo.display()))
}

/// A branch name part from a free-form id: what git refuses in a ref becomes `-`.
pub fn ref_part(id: &str) -> String {
    let s: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).collect();
    let s = s.trim_matches(|c| c == '.' || c == '-').replace("..", "-");
    if s.is_empty() { "x".into() } else { s }
}

/// A worktree of `repo` at `path`, removed by [`Worktree::remove`].
pub struct Worktree {
    pub repo: PathBuf,
    pub path: PathBuf,
}

impl Worktree {
    /// A new worktree at `path` on a new branch `branch` from `base` (a commit), or
    /// detached at `base` when `branch` is `None`.
    pub async fn add(repo: &Path, path: &Path, branch: Option<&str>, base: &str) -> Result<Worktree, String> {
        let _guard = lock(repo).await;
        // Worktrees of attempts that never cleaned up (a killed agent) are forgotten.
        let _ = git(repo, &["worktree", "prune"]).await;
        let p = path.display().to_string();
        let mut args = vec!["worktree", "add", "--quiet"];
        match branch {
            Some(b) => args.extend(["-B", b]),
            None => args.push("--detach"),
        }
        args.extend([p.as_str(), base]);
        git(repo, &args).await?;
        Ok(Worktree { repo: repo.to_path_buf(), path: path.to_path_buf() })
    }

    /// Commits everything in the worktree (new files too); the new commit, or `None`
    /// when nothing changed.
    pub async fn commit_all(&self, message: &str) -> Result<Option<String>, String> {
        git(&self.path, &["add", "--all"]).await?;
        if git(&self.path, &["diff", "--cached", "--quiet"]).await.is_ok() {
            return Ok(None);
        }
        let mut args = AUTHOR.to_vec();
        args.extend(["commit", "--quiet", "--no-verify", "-m", message]);
        git(&self.path, &args).await?;
        commit_of(&self.path, "HEAD").await.map(Some)
    }

    /// Merges `commit` into the worktree's HEAD; on a conflict, the conflicting paths
    /// (the merge is aborted).
    pub async fn merge(&self, commit: &str, message: &str) -> Result<Result<(), Vec<String>>, String> {
        let mut args = AUTHOR.to_vec();
        args.extend(["merge", "--no-ff", "--quiet", "-m", message, "--end-of-options", commit]);
        match git(&self.path, &args).await {
            Ok(_) => Ok(Ok(())),
            Err(e) => {
                let conflicts: Vec<String> = git(&self.path, &["diff", "--name-only", "--diff-filter=U"])
                    .await
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect();
                let _ = git(&self.path, &["merge", "--abort"]).await;
                if conflicts.is_empty() { Err(e) } else { Ok(Err(conflicts)) }
            }
        }
    }

    pub async fn remove(self) {
        let _guard = lock(&self.repo).await;
        let p = self.path.display().to_string();
        if git(&self.repo, &["worktree", "remove", "--force", &p]).await.is_err() {
            let _ = tokio::fs::remove_dir_all(&self.path).await;
            let _ = git(&self.repo, &["worktree", "prune"]).await;
        }
    }
}

/// What `commit` changed since `base`: per file the lines added and removed (`null`
/// for binary files).
pub async fn changes(repo: &Path, base: &str, commit: &str) -> Result<Vec<Value>, String> {
    let out = git(repo, &["diff", "--numstat", "-z", base, commit, "--"]).await?;
    let mut files = Vec::new();
    for entry in out.split('\0').filter(|e| !e.is_empty()) {
        let mut parts = entry.splitn(3, '\t');
        let (Some(added), Some(removed), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let n = |s: &str| s.parse::<u64>().ok();
        files.push(json!({"path": path, "added": n(added), "removed": n(removed)}));
    }
    Ok(files)
}

/// FNV-1a: a short stable name for a URL, and whether a file changed.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_ref_parts() {
        assert_eq!(ref_part("test[os=debian,py=3.11]"), "test-os-debian-py-3.11");
        assert_eq!(ref_part("a..b"), "a-b");
        assert_eq!(ref_part("..."), "x");
        assert!(is_url("https://example.com/r.git") && is_url("git@host:r.git") && !is_url("/srv/r"));
    }
}
