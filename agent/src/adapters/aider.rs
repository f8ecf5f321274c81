//! `aider`: the aider coding CLI. `with: {prompt, files, model, repo, base, isolate,
//! extra_args}` runs `aider --message=PROMPT --yes-always --no-auto-commits
//! [--model=M] [EXTRA...] -- FILES`. The prompt and model are glued to their flags and
//! the files follow `--`, so a value that starts with `-` is still data.
//!
//! With a git repository (a path or a URL), the attempt works in a worktree of its
//! own on the branch `baton/RUN/STEP/ATTEMPT` from `base` (default: the repository's
//! HEAD), so parallel steps on one repository never touch each other's files or the
//! repository's own work tree, and a retry starts from `base` again. The agent commits
//! what aider changed, writes the patch to `baton.patch` in the attempt's directory
//! and removes the worktree; the branch keeps the commit. `isolate: none` edits the
//! repository in place. The result names the branch and commit, the changed files with
//! their line counts, and the tokens and cost aider reported.

use baton_common::outcome::FailureClass;
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::git::{self, Worktree};
use super::{Adapter, AttemptContext, BoxFuture, Outcome, process};

/// The file the patch of an isolated attempt is written to, in its directory.
pub const PATCH_FILE: &str = "baton.patch";

/// Most bytes of the patch kept in the step's result (`patch`) for review gates.
const MAX_PATCH_IN_RESULT: usize = 256 * 1024;

pub struct Aider;

impl Adapter for Aider {
    fn name(&self) -> &'static str {
        "aider"
    }

    /// Advertised only when `aider` is on PATH and answers `--version`.
    fn probe(&self) -> Option<String> {
        process::probe_version("aider")
    }

    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        Box::pin(run(ctx))
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

async fn run(ctx: AttemptContext) -> Outcome {
    let Some(prompt) = ctx.input.get("prompt").and_then(Value::as_str).map(str::to_string) else {
        return Outcome::failure(FailureClass::ToolError, "aider needs with.prompt");
    };
    let repo = match ctx.input.get("repo").and_then(Value::as_str) {
        Some(r) => match git::open(r, &ctx.dir).await {
            Ok(p) => p,
            Err(e) => return Outcome::failure(FailureClass::ToolError, e),
        },
        None => git::Repo { dir: ctx.dir.clone(), url: None },
    };
    let is_repo = git::is_repo(&repo.dir).await;
    let isolate = match ctx.input.get("isolate").and_then(Value::as_str) {
        Some("worktree") if !is_repo => {
            return Outcome::failure(
                FailureClass::ToolError,
                format!(
                    "with.repo {} is not a git repository: isolate: worktree needs one (or isolate: none)",
                    repo.dir.display()
                ),
            );
        }
        Some("worktree") => true,
        Some("none") => false,
        Some(other) => {
            return Outcome::failure(
                FailureClass::ToolError,
                format!("with.isolate must be worktree or none, not {other:?}"),
            );
        }
        // The default: isolated wherever git can isolate.
        None => is_repo && ctx.input.contains_key("repo"),
    };
    if isolate { isolated(ctx, &repo, prompt).await } else { in_place(ctx, &repo.dir, prompt).await }
}

/// The aider command for this attempt.
fn command(ctx: &AttemptContext, prompt: &str) -> crate::spawn::Command {
    let mut cmd = crate::spawn::Command::new("aider");
    cmd.arg(format!("--message={prompt}")).arg("--yes-always").arg("--no-auto-commits");
    if let Some(model) = ctx.input.get("model").and_then(Value::as_str) {
        cmd.arg(format!("--model={model}"));
    }
    cmd.args(strings(ctx.input.get("extra_args")));
    let files = strings(ctx.input.get("files"));
    if !files.is_empty() {
        cmd.arg("--").args(&files);
    }
    cmd
}

/// Runs aider in `dir`: its outcome (a failure when it did not exit 0) and exit code.
async fn aider_in(ctx: AttemptContext, dir: &Path, prompt: &str) -> (Option<Outcome>, Option<i32>) {
    let cmd = command(&ctx, prompt);
    let run_ctx = AttemptContext { dir: dir.to_path_buf(), ..ctx };
    match process::run(cmd, &run_ctx).await {
        Err(failed) => (Some(failed), None),
        Ok(finished) => {
            let code = finished.status.as_ref().ok().and_then(|s| s.code());
            (process::exit_failure(&finished.status, "aider"), code)
        }
    }
}

async fn isolated(ctx: AttemptContext, remote: &git::Repo, prompt: String) -> Outcome {
    let repo = remote.dir.as_path();
    let base = ctx.input.get("base").and_then(Value::as_str).unwrap_or("HEAD").to_string();
    let base_commit = match git::commit_of(repo, &base).await {
        Ok(c) => c,
        Err(e) => return Outcome::failure(FailureClass::ToolError, format!("with.base: {e}")),
    };
    let branch = format!("baton/{}/{}/{}", ctx.run_id, git::ref_part(&ctx.step_id), ctx.number);
    let path = ctx.dir.join("worktree");
    let wt = match Worktree::add(repo, &path, Some(&branch), &base_commit).await {
        Ok(w) => w,
        Err(e) => return Outcome::failure(FailureClass::ToolError, format!("cannot make a worktree: {e}")),
    };
    let (output, attempt_dir) = (ctx.output.clone(), ctx.dir.clone());
    let message =
        format!("baton: run {} step {} attempt {}\n\n{prompt}\n", ctx.run_id, ctx.step_id, ctx.number);
    let (failed, exit_code) = aider_in(ctx, &path, &prompt).await;
    let usage = usage(&output.tail());
    let mut result = json!({
        "branch": branch, "base": base, "base_commit": base_commit, "commit": null,
        "changed_files": [], "changes": [], "exit_code": exit_code, "git": true, "isolated": true,
    });
    add_usage(&mut result, &usage);
    // A failed attempt's edits go with its worktree; a retry starts from base.
    if let Some(failed) = failed {
        wt.remove().await;
        let _ = git::git(repo, &["branch", "-D", &branch]).await;
        return Outcome { result: Some(result.to_string()), ..failed };
    }
    let committed = wt.commit_all(&message).await;
    wt.remove().await;
    let commit = match committed {
        Ok(Some(c)) => c,
        Ok(None) => {
            let _ = git::git(repo, &["branch", "-D", &branch]).await;
            result["branch"] = Value::Null;
            return Outcome { exit_code, ..Outcome::success(Some(result.to_string())) };
        }
        Err(e) => {
            return Outcome::failure(FailureClass::ToolError, format!("cannot commit aider's changes: {e}"));
        }
    };
    if let Err(e) = remote.publish(&branch).await {
        return Outcome::failure(FailureClass::ToolError, e);
    }
    let changes = git::changes(repo, &base_commit, &commit).await.unwrap_or_default();
    let names: Vec<Value> = changes.iter().filter_map(|c| c.get("path").cloned()).collect();
    match git::git(repo, &["diff", "--binary", &base_commit, &commit, "--"]).await {
        Ok(patch) => {
            if let Err(e) = tokio::fs::write(attempt_dir.join(PATCH_FILE), patch).await {
                return Outcome::failure(FailureClass::ToolError, format!("cannot write the patch: {e}"));
            }
        }
        Err(e) => return Outcome::failure(FailureClass::ToolError, format!("cannot make the patch: {e}")),
    }
    result["commit"] = json!(commit);
    result["changed_files"] = json!(names);
    result["changes"] = json!(changes);
    // The text patch, for a review gate to show: cut at a bound (the artifact is whole).
    if let Ok(mut text) = git::git(repo, &["diff", base_commit.as_str(), commit.as_str(), "--"]).await {
        if text.len() > MAX_PATCH_IN_RESULT {
            let mut cut = MAX_PATCH_IN_RESULT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            result["patch_truncated"] = json!(true);
        }
        result["patch"] = json!(text);
    }
    Outcome { exit_code, ..Outcome::success(Some(result.to_string())) }
}

/// The repository edited where it is, as before worktrees: the changed files are
/// what git sees changed during the attempt.
async fn in_place(ctx: AttemptContext, repo: &Path, prompt: String) -> Outcome {
    let before = snapshot(repo).await;
    let output = ctx.output.clone();
    let (failed, exit_code) = aider_in(ctx, repo, &prompt).await;
    let after = snapshot(repo).await;
    let changed: Vec<String> = match (&before, &after) {
        (Some(b), Some(a)) => {
            a.iter().filter(|(f, h)| b.get(*f) != Some(*h)).map(|(f, _)| f.clone()).collect()
        }
        _ => Vec::new(),
    };
    let mut result =
        json!({"changed_files": changed, "exit_code": exit_code, "git": after.is_some(), "isolated": false});
    add_usage(&mut result, &usage(&output.tail()));
    match failed {
        Some(failed) => Outcome { result: Some(result.to_string()), ..failed },
        None => Outcome { exit_code, ..Outcome::success(Some(result.to_string())) },
    }
}

/// Tokens and cost aider reported: its usage lines, one per exchange,
/// `Tokens: 2.3k sent, 150 received. Cost: $0.01 message, $0.05 session.`
#[derive(Debug, Default, PartialEq)]
pub struct Usage {
    pub tokens: u64,
    /// The session's cost: aider's running total, from its last usage line.
    pub cost_usd: Option<f64>,
    pub exchanges: u32,
}

pub fn usage(output: &str) -> Usage {
    let mut u = Usage::default();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("Tokens:") else { continue };
        let (tokens, cost) = rest.split_once("Cost:").unwrap_or((rest, ""));
        u.exchanges += 1;
        for part in tokens.split(',').map(str::trim) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else { continue };
            let what = what.trim_end_matches('.');
            if what == "sent" || what == "received" {
                u.tokens += count(n).unwrap_or(0);
            }
        }
        for part in cost.split(',').map(str::trim) {
            if let Some(v) = part.strip_suffix("session.").or_else(|| part.strip_suffix("session")) {
                u.cost_usd = v.trim().trim_start_matches('$').parse().ok().or(u.cost_usd);
            }
        }
    }
    u
}

/// `2.3k` → 2300, `1.2M` → 1200000, `150` → 150.
fn count(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1e3),
        'm' | 'M' => (&s[..s.len() - 1], 1e6),
        _ => (s, 1.0),
    };
    num.parse::<f64>().ok().map(|v| (v * mult).round() as u64)
}

/// Usage as the step's outputs `baton_tokens` and `baton_cost_usd`, which budgets read.
fn add_usage(result: &mut Value, u: &Usage) {
    if u.exchanges == 0 {
        return;
    }
    result["baton_tokens"] = json!(u.tokens);
    if let Some(c) = u.cost_usd {
        result["baton_cost_usd"] = json!(c);
    }
}

/// Files git sees as changed or new in `repo`, each with its content hash; `None`
/// when `repo` is not a git work tree.
async fn snapshot(repo: &Path) -> Option<BTreeMap<String, String>> {
    let out = git::git(repo, &["status", "--porcelain", "-z", "--untracked-files=all"]).await.ok()?;
    let mut files = BTreeMap::new();
    for entry in out.as_bytes().split(|&b| b == 0) {
        if entry.len() < 4 {
            continue;
        }
        let path = String::from_utf8_lossy(&entry[3..]).into_owned();
        let hash = match tokio::fs::read(repo.join(&path)).await {
            Ok(bytes) => format!("{:x}", git::fnv(&bytes)),
            Err(_) => "deleted".to_string(),
        };
        files.insert(path, hash);
    }
    Some(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_lines_give_tokens_and_the_session_cost() {
        let out = "Applied edit to a.py\nTokens: 2.3k sent, 150 received. Cost: $0.01 message, $0.05 session.\n\
                   more\nTokens: 1.2k sent, 1.1k cache write, 50 received. Cost: $0.02 message, $0.07 session.\n";
        assert_eq!(usage(out), Usage { tokens: 2300 + 150 + 1200 + 50, cost_usd: Some(0.07), exchanges: 2 });
        assert_eq!(usage("nothing"), Usage::default());
        assert_eq!(count("1.5M"), Some(1_500_000));
    }
}
