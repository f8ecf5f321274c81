//! `aider`: the aider coding CLI. `with: {prompt, files, model, repo, extra_args}` runs
//! `aider --message=PROMPT --yes-always --no-auto-commits [--model=M] [EXTRA...] -- FILES`
//! in `repo`. The prompt and model are glued to their flags and the files follow `--`,
//! so a value that starts with `-` is still data. The result lists the files aider
//! changed (from git) and its exit code.

use baton_common::outcome::FailureClass;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::process::Command;

use super::{Adapter, AttemptContext, BoxFuture, Outcome, process};

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
    let repo: PathBuf = match ctx.input.get("repo").and_then(Value::as_str) {
        Some(r) => PathBuf::from(r),
        None => ctx.dir.clone(),
    };
    if !tokio::fs::metadata(&repo).await.is_ok_and(|m| m.is_dir()) {
        return Outcome::failure(
            FailureClass::ToolError,
            format!("with.repo {} is not a directory", repo.display()),
        );
    }
    let files = strings(ctx.input.get("files"));
    let before = snapshot(&repo).await;
    let mut cmd = crate::spawn::Command::new("aider");
    cmd.arg(format!("--message={prompt}")).arg("--yes-always").arg("--no-auto-commits");
    if let Some(model) = ctx.input.get("model").and_then(Value::as_str) {
        cmd.arg(format!("--model={model}"));
    }
    cmd.args(strings(ctx.input.get("extra_args")));
    if !files.is_empty() {
        cmd.arg("--").args(&files);
    }
    // aider runs in the repository, not in the attempt's scratch directory.
    let run_ctx = AttemptContext { dir: repo.clone(), ..ctx };
    let finished = match process::run(cmd, &run_ctx).await {
        Ok(f) => f,
        Err(failed) => return failed,
    };
    let after = snapshot(&repo).await;
    let changed: Vec<String> = match (&before, &after) {
        (Some(b), Some(a)) => {
            a.iter().filter(|(f, h)| b.get(*f) != Some(*h)).map(|(f, _)| f.clone()).collect()
        }
        _ => Vec::new(),
    };
    let exit_code = finished.status.as_ref().ok().and_then(|s| s.code());
    let result =
        json!({"changed_files": changed, "exit_code": exit_code, "git": after.is_some()}).to_string();
    match process::exit_failure(&finished.status, "aider") {
        Some(failed) => Outcome { result: Some(result), ..failed },
        None => Outcome { exit_code, ..Outcome::success(Some(result)) },
    }
}

/// Files git sees as changed or new in `repo`, each with its content hash; `None`
/// when `repo` is not a git work tree.
async fn snapshot(repo: &Path) -> Option<BTreeMap<String, String>> {
    let out = Command::new("git")
        .args(["status", "--porcelain", "-z", "--untracked-files=all"])
        .current_dir(repo)
        .output()
        .await
        .ok()
        .filter(|o| o.status.success())?;
    let mut files = BTreeMap::new();
    for entry in out.stdout.split(|&b| b == 0) {
        if entry.len() < 4 {
            continue;
        }
        let path = String::from_utf8_lossy(&entry[3..]).into_owned();
        let hash = match tokio::fs::read(repo.join(&path)).await {
            Ok(bytes) => format!("{:x}", fnv(&bytes)),
            Err(_) => "deleted".to_string(),
        };
        files.insert(path, hash);
    }
    Some(files)
}

/// FNV-1a: enough to tell whether a file changed during the attempt.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}
