//! Secrets and secret parameters end to end: a step gets its secret's value, and the
//! value is masked in stored output, logs, results, reports, events, `runs show` and
//! the agent's own log; the database never holds it in plaintext.

use std::time::Duration;

use baton_tests::on_both;
use baton_tests::*;

/// Values long and odd enough that finding them anywhere is no accident.
const DB_PASSWORD: &str = "pw-Zq81-correct-horse";
const API_KEY: &str = "ak_7Yt5Rr2Ww9Qq3Ee1";
const ON_DISK: &str = "disk-secret-9f8e7d6c";
const PARAM: &str = "param-secret-55aa66bb";
const PATTERNED: &str = "literal-token-value-4242";

fn spec(out: &std::path::Path) -> String {
    let o = |n: &str| out.join(n).display().to_string();
    serde_json::json!({
        "name": "secrets",
        "on_failure": "continue",
        "params": {"pass": {"secret": true}, "region": "eu"},
        "steps": [
            {"id": "env", "tool": "shell", "env": {"DB_PASSWORD": "${{ secrets.db }}"}, "with": {"run":
                format!("printf '%s' \"$DB_PASSWORD\" > {}; echo \"pw=$DB_PASSWORD\"; echo \"{{\\\"leak\\\": \\\"$DB_PASSWORD\\\"}}\"", o("db"))}},
            {"id": "run", "tool": "shell", "with": {"run":
                "echo token ${{ secrets.api }} here; echo \"${{ secrets.api }}\" >&2; exit 3"}},
            {"id": "split", "tool": "python", "with": {"script":
                "import sys, time\nv = ${{ secrets.api }}\nsys.stdout.write(v[:5]); sys.stdout.flush()\ntime.sleep(0.3)\nsys.stdout.write(v[5:] + '\\n')\nresult = {'k': v}"}},
            {"id": "unreferenced", "tool": "shell", "with": {"run": format!("cat {}", o("on-disk"))}},
            {"id": "patterned", "tool": "shell", "env": {"API_TOKEN": PATTERNED}, "with": {"run": "echo \"t=$API_TOKEN\""}},
            {"id": "echoed", "tool": "echo", "with": {"x": "${{ secrets.db }}", "p": "${{ params.pass }}"}},
            {"id": "param", "tool": "shell", "with": {"run": "echo p=${{ params.pass }} r=${{ params.region }}"}},
            {"id": "raises", "tool": "python", "with": {"script": "raise ValueError('bad key ' + ${{ secrets.api }})"}},
        ]
    })
    .to_string()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

const ALL: [&str; 5] = [DB_PASSWORD, API_KEY, ON_DISK, PARAM, PATTERNED];
/// What must never be in the database: secrets and secret parameters. (An env value
/// written literally into a spec is part of the spec, which is stored as written.)
const SECRET: [&str; 4] = [DB_PASSWORD, API_KEY, ON_DISK, PARAM];

async fn secrets_reach_their_step_and_are_kept_nowhere(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(1).slots(4).build().await;
    // A real agent process too, logging at debug, to read its own log.
    let _agent = agent_process_with_env(&sb.url(), "logger", sb.dir.path(), &[], &[("RUST_LOG", "debug")]);
    sb.stop_agent("agent-1").await;
    sb.wait_agents(1).await;
    let mut admin = sb.admin_as(None).await;
    for (name, value) in [("db", DB_PASSWORD), ("api", API_KEY), ("disk", ON_DISK)] {
        admin.set_secret(proto::SetSecretRequest { name: name.into(), value: value.into() }).await.unwrap();
    }
    let listed = admin.list_secrets(proto::ListSecretsRequest {}).await.unwrap().into_inner().secrets;
    assert_eq!(listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["api", "db", "disk"]);
    let out = sb.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("on-disk"), format!("{ON_DISK}\n")).unwrap();
    let mut c = sb.client().await;
    let id = c
        .submit_run(proto::SubmitRunRequest {
            spec: spec(&out),
            source: "secrets.json".into(),
            params: params(&[("pass", PARAM)]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let run = wait_run(&mut c, &id, Duration::from_secs(60)).await;
    let state = |s: &str| run.steps.iter().find(|x| x.id == s).unwrap().state_name().to_string();
    assert_eq!(state("run"), "failed");
    assert_eq!(state("raises"), "failed");
    let raises = run.steps.iter().find(|s| s.id == "raises").unwrap();
    assert!(raises.reason.contains("ValueError: bad key ***"), "{}", raises.reason);
    for s in ["env", "split", "unreferenced", "patterned", "echoed", "param"] {
        assert_eq!(state(s), "succeeded", "{s}: {:?}", run.steps.iter().find(|x| x.id == s));
    }
    // The step got the real value.
    assert_eq!(std::fs::read_to_string(out.join("db")).unwrap(), DB_PASSWORD);

    // runs show: parameters, results, reasons, attempts.
    let shown = format!("{run:?}");
    for v in ALL {
        assert!(!shown.contains(v), "runs show holds {v}: {shown}");
    }
    assert_eq!(param(&run, "pass").as_deref(), Some("***"));
    assert_eq!(param(&run, "region").as_deref(), Some("eu"));
    let env = run.steps.iter().find(|s| s.id == "env").unwrap();
    assert_eq!(result_text(&env.result), "{\"leak\":\"***\"}");
    let split = run.steps.iter().find(|s| s.id == "split").unwrap();
    assert_eq!(result_text(&split.result), "{\"k\":\"***\"}");
    // Logs: masked, with the masks where the values were.
    let text = log_text(&logs(&mut c, &id, "", 0, false).await);

    for v in ALL {
        assert!(!text.contains(v), "logs hold {v}: {text}");
    }
    for expected in ["pw=***", "token *** here", "t=***", "p=*** r=eu"] {
        assert!(text.contains(expected), "{expected:?} not in {text}");
    }
    let split_lines: Vec<&str> = text.lines().filter(|l| l.trim() == "***").collect();
    assert!(!split_lines.is_empty(), "the value split over two writes is masked: {text}");
    // Reports and events.
    for format in [proto::ReportFormat::Markdown, proto::ReportFormat::Json, proto::ReportFormat::Html] {
        let r = c
            .get_report(proto::GetReportRequest { run_id: id.clone(), format: format as i32 })
            .await
            .unwrap();
        let content = r.into_inner().content;
        for v in ALL {
            assert!(!content.contains(v), "the {format:?} report holds {v}");
        }
    }
    let events = format!("{:?}", all_events(&mut c, &id).await);
    for v in ALL {
        assert!(!events.contains(v), "events hold {v}");
    }
    // The agent's own log.
    let agent_log = std::fs::read_to_string(sb.dir.path().join("logger.log")).unwrap();
    assert!(agent_log.contains("attempt finished"), "the agent logged at debug");
    for v in ALL {
        assert!(!agent_log.contains(v), "the agent's log holds {v}");
    }
    // The database, all of it: no value in plaintext.
    match backend {
        Backend::Sqlite => {
            let mut bytes = Vec::new();
            for entry in std::fs::read_dir(sb.dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path.file_name().unwrap().to_string_lossy().starts_with("baton.db") {
                    bytes.extend(std::fs::read(&path).unwrap());
                }
            }
            assert!(bytes.len() > 10_000, "read the database files");
            for v in SECRET {
                assert!(!contains(&bytes, v), "the SQLite files hold {v}");
            }
        }
        Backend::Postgres => {
            let rows = baton_controller::store::testing::postgres_rows_text(&sb.db).await.unwrap();
            assert!(rows.contains("region"), "read the rows");
            for v in SECRET {
                assert!(!rows.contains(v), "the Postgres rows hold {v}");
            }
        }
    }
}

on_both!(secrets_reach_their_step_and_are_kept_nowhere);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_naming_unknown_secrets_are_refused_and_deleted_ones_fail_their_step() {
    let sb = Sandbox::builder().agents(0).build().await;
    let mut c = sb.client().await;
    let spec =
        "name: s\nsteps:\n  - {id: a, tool: shell, env: {K: '${{ secrets.nope }}'}, with: {run: 'true'}}\n";
    let err = c
        .submit_run(proto::SubmitRunRequest {
            spec: spec.into(),
            source: "s.yaml".into(),
            params: Default::default(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("there is no secret named \"nope\" (baton secrets set nope)"),
        "{}",
        err.message()
    );
    // Set, then deleted before the step runs: the step fails saying why.
    let mut admin = sb.admin_as(None).await;
    admin
        .set_secret(proto::SetSecretRequest { name: "nope".into(), value: "some-value".into() })
        .await
        .unwrap();
    let id = submit(&mut c, spec).await;
    admin.delete_secret(proto::DeleteSecretRequest { name: "nope".into() }).await.unwrap();
    let mut sb = sb;
    sb.add_agent("late", 1);
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "failed");
    assert!(run.steps[0].reason.contains("secrets.nope is not set"), "{}", run.steps[0].reason);
    let bad = admin
        .set_secret(proto::SetSecretRequest { name: "a.b".into(), value: "x".into() })
        .await
        .unwrap_err();
    assert!(bad.message().contains("secret name \"a.b\""), "{}", bad.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_another_key_refuses_to_start_on_sealed_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("c.db").display());
    let start = |key: &str| {
        let addr = free_addr();
        let args: Vec<String> = ["--listen", &addr.to_string(), "--db", &db, "--secrets-key", key]
            .iter()
            .map(|s| s.to_string())
            .collect();
        (
            addr,
            Process::spawn("baton-controller", &args, dir.path().join(format!("{}.log", addr.port())), &[]),
        )
    };
    let key_a = dir.path().join("a.key").display().to_string();
    let (addr, mut first) = start(&key_a);
    let url = format!("http://{addr}");
    wait_leader(&url).await;
    let ch = channel_as(&url, &Default::default(), None).await;
    proto::admin_service_client::AdminServiceClient::new(ch)
        .set_secret(proto::SetSecretRequest { name: "db".into(), value: "sealed-value-1".into() })
        .await
        .unwrap();
    first.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = first.child.wait();
    let key_b = dir.path().join("b.key").display().to_string();
    let (_, mut second) = start(&key_b);
    let status = second.child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let log = second.logs();
    assert!(log.contains("secret:db: cannot be opened with the secrets key"), "{log}");
}
