//! The same DAGs run by GNU make and by Dask distributed, for comparison.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A DAG of `true` commands.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// N steps, no dependencies.
    Independent(usize),
    /// N steps, each needing the one before.
    Chain(usize),
    /// Layers of a width, each step needing the whole previous layer.
    Layers(usize, usize),
}

impl Shape {
    pub fn steps(self) -> usize {
        match self {
            Shape::Independent(n) | Shape::Chain(n) => n,
            Shape::Layers(l, w) => l * w,
        }
    }

    /// Step ids and, for each, the ids it needs.
    pub fn graph(self) -> Vec<(String, Vec<String>)> {
        match self {
            Shape::Independent(n) => (0..n).map(|i| (format!("s{i}"), vec![])).collect(),
            Shape::Chain(n) => (0..n)
                .map(|i| (format!("s{i}"), if i == 0 { vec![] } else { vec![format!("s{}", i - 1)] }))
                .collect(),
            Shape::Layers(l, w) => (0..l)
                .flat_map(|layer| {
                    (0..w).map(move |i| {
                        let needs = if layer == 0 {
                            vec![]
                        } else {
                            (0..w).map(|j| format!("l{}_{j}", layer - 1)).collect()
                        };
                        (format!("l{layer}_{i}"), needs)
                    })
                })
                .collect(),
        }
    }
}

/// Runs the DAG as a Makefile of `true` commands with `make -jJOBS`; returns the time.
pub fn make(shape: Shape, jobs: usize) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let graph = shape.graph();
    let mut mk = String::from(".PHONY: all");
    for (id, _) in &graph {
        mk.push(' ');
        mk.push_str(id);
    }
    mk.push_str("\nall:");
    for (id, _) in &graph {
        mk.push(' ');
        mk.push_str(id);
    }
    mk.push('\n');
    for (id, needs) in &graph {
        mk.push_str(&format!("{id}: {}\n\t@true\n", needs.join(" ")));
    }
    let path = dir.path().join("Makefile");
    std::fs::write(&path, mk)?;
    let t0 = Instant::now();
    let out = Command::new("make")
        .arg(format!("-j{jobs}"))
        .arg("-f")
        .arg(&path)
        .arg("all")
        .output()
        .context("cannot run make (is GNU make installed?)")?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!("make failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

const DASK_SCRIPT: &str = r#"
import subprocess, sys, time
import dask
from dask.distributed import Client, LocalCluster

def run(*deps):
    subprocess.run(["true"], check=True)
    return 0

if __name__ == "__main__":
    shape, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        d = dask.delayed(run, pure=False)
        if shape == "independent":
            target = [d() for _ in range(a)]
        elif shape == "chain":
            t = d()
            for _ in range(a - 1):
                t = d(t)
            target = [t]
        else:
            prev = []
            for _ in range(a):
                prev = [d(*prev) for _ in range(b)]
            target = prev
        client.submit(run, pure=False).result()
        t0 = time.perf_counter()
        dask.compute(*target)
        print(time.perf_counter() - t0)
"#;

/// A Python with Dask distributed: the system's `python3` if it has it, else a venv
/// the harness keeps under `target/bench-pyenv`, made and filled (`pip install
/// distributed`) on first use. `None` when that fails (no pip, no index).
fn python() -> Option<std::path::PathBuf> {
    static PYTHON: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let has_dask = |py: &std::path::Path| {
                Command::new(py)
                    .args(["-c", "import dask, distributed"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            let system = std::path::PathBuf::from("python3");
            if has_dask(&system) {
                return Some(system);
            }
            // target/release/baton-bench → target/bench-pyenv
            let exe = std::env::current_exe().ok()?;
            let venv = exe.parent()?.parent()?.join("bench-pyenv");
            let py = venv.join("bin").join("python");
            if has_dask(&py) {
                return Some(py);
            }
            eprintln!("installing dask distributed into {} for the comparison ...", venv.display());
            let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
            let pip = venv.join("bin").join("pip");
            let installed = made.is_ok_and(|s| s.success())
                && Command::new(&pip)
                    .args(["install", "-q", "distributed"])
                    .status()
                    .is_ok_and(|s| s.success());
            if installed && has_dask(&py) {
                Some(py)
            } else {
                eprintln!("could not install dask distributed; the Dask columns stay empty");
                None
            }
        })
        .clone()
}

/// Runs the DAG on a Dask LocalCluster of 2 workers × 1 thread, each task running
/// `true` as a subprocess. `Ok(None)` when no Python with Dask can be had (see
/// [`python`]).
pub fn dask(shape: Shape) -> anyhow::Result<Option<Duration>> {
    let Some(python) = python() else {
        return Ok(None);
    };
    let (kind, a, b) = match shape {
        Shape::Independent(n) => ("independent", n, 0),
        Shape::Chain(n) => ("chain", n, 0),
        Shape::Layers(l, w) => ("layers", l, w),
    };
    let out = Command::new(&python)
        .args(["-c", DASK_SCRIPT, kind, &a.to_string(), &b.to_string()])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!("dask failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 =
        text.trim().lines().last().unwrap_or("").trim().parse().context("dask printed no time")?;
    Ok(Some(Duration::from_secs_f64(secs)))
}

pub const DASK_HINT: &str = "Dask could not be installed (python3 -m venv and pip install \"distributed\" failed); the Dask columns are empty";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_their_steps_and_dependencies() {
        let chain = Shape::Chain(3).graph();
        assert_eq!(chain[2], ("s2".to_string(), vec!["s1".to_string()]));
        assert!(chain[0].1.is_empty());
        let layers = Shape::Layers(3, 2).graph();
        assert_eq!(layers.len(), Shape::Layers(3, 2).steps());
        assert_eq!(layers[4].0, "l2_0");
        assert_eq!(layers[4].1, ["l1_0", "l1_1"]);
        assert!(Shape::Independent(5).graph().iter().all(|(_, n)| n.is_empty()));
    }

    #[test]
    fn make_runs_the_dag() {
        let took = make(Shape::Layers(2, 3), 2).unwrap();
        assert!(took > Duration::ZERO);
    }
}
