//! Values substituted into scripts and commands are data: hostile parameters and step
//! outputs arrive byte for byte in shell (every quoting context), argv, Python and the
//! aider CLI, and nothing in them runs.

use std::path::Path;
use std::time::Duration;

use baton_tests::*;
use serde_json::json;

/// Values that would run code, split words or pass as options if pasted into a script.
const HOSTILE: &[&str] = &[
    "x; touch PWN; echo $(id -un)",
    "$(touch PWN)",
    "`touch PWN`",
    "it's \"quoted\" \\ and 'single'",
    "line one\nline two\ntouch PWN",
    "--help",
    "  spaced  *  ?  ",
    "EOF\ntouch PWN\nEOF",
    "'\"${HOME}\"'",
    "\"\"\" + __import__('os').system('touch PWN') + \"\"\"",
];

/// One workstream that writes `${{ params.v }}` and `${{ steps.src.outputs.v }}` to a
/// file per context.
fn spec(out: &Path) -> String {
    let o = |name: &str| out.join(name).display().to_string();
    let shell = |expr: &str, tag: &str| {
        format!(
            "printf '%s' {expr} > {a}\nprintf '%s' \"{expr}\" > {b}\nprintf '%s' '{expr}' > {c}\n\
             x=$(printf '%s' {expr}); printf '%s' \"$x\" > {d}\ncat > {e} <<EOF\n{expr}\nEOF\n",
            a = o(&format!("{tag}-plain")),
            b = o(&format!("{tag}-double")),
            c = o(&format!("{tag}-single")),
            d = o(&format!("{tag}-subst")),
            e = o(&format!("{tag}-heredoc")),
        )
    };
    let python = |expr: &str, tag: &str| {
        format!(
            "open({a:?}, 'w').write({expr})\nopen({b:?}, 'w').write(\"{expr}\")\n\
             open({c:?}, 'w').write('''{expr}''')\nopen({d:?}, 'w').write(f\"{expr}\")\n",
            a = o(&format!("{tag}-py-code")),
            b = o(&format!("{tag}-py-str")),
            c = o(&format!("{tag}-py-triple")),
            d = o(&format!("{tag}-py-fstr")),
        )
    };
    let p = "${{ params.v }}";
    let s = "${{ steps.src.outputs.v }}";
    json!({
        "name": "injection",
        "params": {"v": null},
        "steps": [
            {"id": "src", "tool": "echo", "with": {"v": p}},
            {"id": "sh-param", "tool": "shell", "with": {"run": shell(p, "param")}},
            {"id": "sh-output", "needs": "src", "tool": "shell", "with": {"run": shell(s, "output")}},
            {"id": "argv", "needs": "src", "tool": "shell", "with": {"argv": [
                "sh", "-c", format!("printf '%s' \"$1\" > {}; printf '%s' \"$2\" > {}", o("param-argv"), o("output-argv")),
                "sh", p, s,
            ]}},
            {"id": "py-param", "tool": "python", "with": {"script": python(p, "param")}},
            {"id": "py-output", "needs": "src", "tool": "python", "with": {"script": python(s, "output")}},
        ]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_arrive_byte_for_byte_and_nothing_runs() {
    let sb = Sandbox::builder().agents(1).slots(4).build().await;
    let mut c = sb.client().await;
    for (i, value) in HOSTILE.iter().enumerate() {
        let out = sb.dir.path().join(format!("case-{i}"));
        std::fs::create_dir_all(&out).unwrap();
        let text = spec(&out);
        let id = c
            .submit_run(proto::SubmitRunRequest {
                spec: text,
                source: "injection.json".into(),
                params: params(&[("v", value)]),
                ..Default::default()
            })
            .await
            .expect("submit")
            .into_inner()
            .run_id;
        let run = wait_run(&mut c, &id, Duration::from_secs(60)).await;
        let failed: Vec<String> = run
            .steps
            .iter()
            .filter(|s| s.state_name() != "succeeded")
            .map(|s| {
                format!(
                    "{}: {} {}",
                    s.id,
                    s.reason,
                    s.attempts.last().map(|a| a.output_tail.as_str()).unwrap_or("")
                )
            })
            .collect();
        assert!(failed.is_empty(), "value {value:?}: {failed:?}");
        let mut seen = 0;
        for entry in std::fs::read_dir(&out).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let got = std::fs::read_to_string(&path).unwrap();
            let want = if name.ends_with("-heredoc") { format!("{value}\n") } else { value.to_string() };
            assert_eq!(got, want, "value {value:?} in {name}");
            seen += 1;
        }
        assert_eq!(seen, 2 * (5 + 4 + 1), "value {value:?}: every context wrote its file");
        for dir in [sb.dir.path().to_path_buf(), out.clone()] {
            assert!(!dir.join("PWN").exists(), "value {value:?} ran code");
        }
        let attempts_dir = sb.dir.path().join("agent-1").join("attempts");
        let pwned = walk(&attempts_dir).into_iter().any(|p| p.ends_with("PWN"));
        assert!(!pwned, "value {value:?} ran code in an attempt's directory");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aider_gets_the_prompt_and_files_as_data() {
    let sb = Sandbox::builder().agents(0).build().await;
    let path = path_with_fixtures();
    let _coder = agent_process_with_env(&sb.url(), "coder", sb.dir.path(), &[], &[("PATH", &path)]);
    sb.wait_agents(1).await;
    let repo = sb.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let file = "--yes-always";
    std::fs::write(repo.join(file), "").unwrap();
    let prompt = "--model=evil; touch PWN\n$(touch PWN)";
    let spec = json!({
        "name": "aider-data",
        "params": {"prompt": null, "file": null},
        "steps": [{"id": "edit", "tool": "aider", "with": {
            "prompt": "${{ params.prompt }}", "files": ["${{ params.file }}"], "repo": repo.display().to_string()
        }}]
    });
    let mut c = sb.client().await;
    let id = c
        .submit_run(proto::SubmitRunRequest {
            spec: spec.to_string(),
            source: "aider.json".into(),
            params: params(&[("prompt", prompt), ("file", file)]),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .run_id;
    let run = wait_run(&mut c, &id, Duration::from_secs(60)).await;
    assert_eq!(run.state_name(), "succeeded", "{:?}", run.steps[0]);
    let edited = std::fs::read_to_string(repo.join(file)).unwrap();
    assert_eq!(
        edited,
        format!("# aider (default): {prompt}\n"),
        "the prompt is one argument, the file a file"
    );
    assert!(!repo.join("PWN").exists());
}
