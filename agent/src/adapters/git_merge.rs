//! `git_merge`: merges commits (coding steps' `commit` outputs) onto a target branch,
//! in order. `with: {repo, target, commits, base, message}`. The merges are made in a
//! worktree of the attempt's own, detached at the target; once all are in, the target
//! branch is moved to the result if nobody moved it meanwhile. A target that does not
//! exist is made from `base`. A target checked out in a work tree is refused: moving it
//! would leave that work tree's files behind its branch. A conflict fails the step with
//! the class `merge_conflict`, the conflicting paths in its result, and the target as
//! it was.

use baton_common::outcome::FailureClass;
use serde_json::{Value, json};

use super::git::{self, Worktree};
use super::{Adapter, AttemptContext, BoxFuture, Outcome};

pub struct GitMerge;

impl Adapter for GitMerge {
    fn name(&self) -> &'static str {
        "git_merge"
    }

    /// Advertised when git answers `--version`.
    fn probe(&self) -> Option<String> {
        super::process::probe_version("git")
    }

    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        Box::pin(run(ctx))
    }
}

fn text(ctx: &AttemptContext, key: &str) -> Option<String> {
    ctx.input.get(key).and_then(Value::as_str).map(str::to_string)
}

async fn run(ctx: AttemptContext) -> Outcome {
    let fail = |m: String| Outcome::failure(FailureClass::ToolError, m);
    let (Some(repo), Some(target)) = (text(&ctx, "repo"), text(&ctx, "target")) else {
        return fail("git_merge needs with.repo and with.target".into());
    };
    // Steps that changed nothing have no commit: they are left out.
    let commits: Vec<String> = ctx
        .input
        .get("commits")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|c| !c.is_empty() && *c != "null")
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let remote = match git::open(&repo, &ctx.dir).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let repo = remote.dir.clone();
    let target_ref = format!("refs/heads/{target}");
    if git::git(&repo, &["check-ref-format", &target_ref]).await.is_err() {
        return fail(format!("with.target {target:?} is not a valid branch name"));
    }
    let worktrees = git::git(&repo, &["worktree", "list", "--porcelain"]).await.unwrap_or_default();
    if let Some(at) = checked_out_at(&worktrees, &target_ref) {
        return fail(format!(
            "with.target {target} is checked out at {at}: git_merge does not move a branch under its work tree; merge onto another branch (with.base makes it) or use a bare repository"
        ));
    }
    let (start, existed) = match git::commit_of(&repo, &target_ref).await {
        Ok(c) => (c, true),
        Err(_) => {
            let Some(base) = text(&ctx, "base") else {
                return fail(format!(
                    "with.target {target} does not exist in {}: give with.base to make it",
                    repo.display()
                ));
            };
            match git::commit_of(&repo, &base).await {
                Ok(c) => (c, false),
                Err(e) => return fail(format!("with.base: {e}")),
            }
        }
    };
    let mut resolved = Vec::new();
    for c in &commits {
        match git::commit_of(&repo, c).await {
            Ok(sha) => resolved.push(sha),
            Err(e) => return fail(format!("with.commits: {e}")),
        }
    }
    let path = ctx.dir.join("merge");
    let wt = match Worktree::add(&repo, &path, None, &start).await {
        Ok(w) => w,
        Err(e) => return fail(format!("cannot make a worktree: {e}")),
    };
    let mut merged = Vec::new();
    for sha in &resolved {
        let message = text(&ctx, "message").unwrap_or_else(|| {
            format!("baton: merge {sha} into {target} (run {} step {})", ctx.run_id, ctx.step_id)
        });
        ctx.output.write(format!("merging {sha} into {target}\n").as_bytes());
        match wt.merge(sha, &message).await {
            Ok(Ok(())) => merged.push(sha.clone()),
            Ok(Err(paths)) => {
                wt.remove().await;
                let result = json!({"target": target, "conflicts": paths, "conflicting_commit": sha, "merged": merged});
                let msg = format!("merge conflict merging {sha} into {target}: {}", paths.join(", "));
                ctx.output.write(format!("{msg}\n").as_bytes());
                return Outcome {
                    result: Some(result.to_string()),
                    ..Outcome::failure(FailureClass::MergeConflict, msg)
                };
            }
            Err(e) => {
                wt.remove().await;
                return fail(format!("cannot merge {sha}: {e}"));
            }
        }
    }
    let head = git::commit_of(&wt.path, "HEAD").await;
    wt.remove().await;
    let head = match head {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    // Moved only from where the merges started: a target moved meanwhile is not lost.
    let old = if existed { start.clone() } else { "0".repeat(40) };
    let _guard = git::lock(&repo).await;
    if let Err(e) = git::git(&repo, &["update-ref", "-m", "baton git_merge", &target_ref, &head, &old]).await
    {
        return fail(format!("cannot move {target}: {e}"));
    }
    drop(_guard);
    if let Err(e) = remote.publish(&target).await {
        return fail(e);
    }
    let result =
        json!({"target": target, "commit": head, "previous": existed.then_some(start), "merged": merged});
    Outcome::success(Some(result.to_string()))
}

/// Where `branch_ref` is checked out, from `git worktree list --porcelain` (a bare
/// repository's own entry checks nothing out).
fn checked_out_at(list: &str, branch_ref: &str) -> Option<String> {
    let mut path = None;
    for line in list.lines() {
        if let Some(p) = line.strip_prefix("worktree ") {
            path = Some(p.to_string());
        } else if line.strip_prefix("branch ") == Some(branch_ref) {
            return path;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_where_a_branch_is_checked_out() {
        let list =
            "worktree /srv/r\nHEAD abc\nbranch refs/heads/main\n\nworktree /tmp/w\nHEAD def\ndetached\n";
        assert_eq!(checked_out_at(list, "refs/heads/main").as_deref(), Some("/srv/r"));
        assert_eq!(checked_out_at(list, "refs/heads/dev"), None);
    }
}
