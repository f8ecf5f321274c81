//! Approval steps end to end: a step of the built-in `approval` tool blocks its run
//! without holding an agent slot until someone with the right role decides; who
//! decided, and why, is in the events, the outputs and the report; a timeout decides
//! on schedule, across a controller restart.

use std::time::Duration;

use baton_tests::*;

const GATED: &str = "name: release
params: {env: prod}
steps:
  - {id: build, tool: noop}
  - id: gate
    needs: build
    tool: approval
    with: {message: 'Deploy to ${{ params.env }}?', inputs: {version: string, canary: boolean}}
  - id: deploy
    needs: gate
    tool: shell
    env: {V: '${{ steps.gate.outputs.version }}', BY: '${{ steps.gate.outputs.approved_by }}', C: '${{ steps.gate.outputs.canary }}'}
    with: {run: 'echo \"deploying $V canary=$C for $BY\"'}
";

/// Waits until step `step` of the run awaits approval; returns its reason.
async fn awaiting(c: &mut Client, run_id: &str, step: &str) -> String {
    eventually(Duration::from_secs(30), "the step to await approval", || {
        let mut c = c.clone();
        let (run_id, step) = (run_id.to_string(), step.to_string());
        async move {
            let run = get_run(&mut c, &run_id).await;
            let s = run.steps.iter().find(|s| s.id == step)?;
            (s.state_name() == "awaiting_approval").then(|| s.reason.clone())
        }
    })
    .await
}

fn decision(
    run_id: &str,
    step: &str,
    approve: bool,
    comment: &str,
    inputs: &[(&str, &str)],
) -> proto::DecideApprovalRequest {
    proto::DecideApprovalRequest {
        run_id: run_id.to_string(),
        step_id: step.to_string(),
        approve,
        comment: comment.to_string(),
        inputs: params(inputs),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_blocks_without_a_slot_and_records_who_approved_and_with_what() {
    // One agent with one slot: the waiting approval must leave it free.
    let sb = Sandbox::builder().agents(1).slots(1).auth(AuthMode::Required).build().await;
    let submitter = sb.token("ci", Role::Submitter).await;
    let reader = sb.token("viewer", Role::Reader).await;
    let operator = sb.token("ops", Role::Operator).await;
    let mut c = sb.client_as(Some(&submitter)).await;
    let run_id = submit(&mut c, GATED).await;
    let why = awaiting(&mut c, &run_id, "gate").await;
    assert_eq!(why, "awaiting approval by the operator role or above: Deploy to prod?");

    // Meanwhile another run gets the only slot.
    let other = submit(&mut c, "name: other\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n").await;
    assert_eq!(wait_run(&mut c, &other, Duration::from_secs(30)).await.state_name(), "succeeded");

    // A reader and a submitter may look, not decide: the server refuses them.
    for token in [&reader, &submitter] {
        let mut c = sb.client_as(Some(token)).await;
        let err = c.decide_approval(decision(&run_id, "gate", true, "", &[])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("needs the operator role"), "{}", err.message());
    }
    let mut ops = sb.client_as(Some(&operator)).await;
    // Inputs are checked against the declared types, naming the one that is wrong.
    let err =
        ops.decide_approval(decision(&run_id, "gate", true, "", &[("version", "1.2")])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "input \"canary\" (boolean) is required");
    let err = ops
        .decide_approval(decision(&run_id, "gate", true, "", &[("version", "1.2"), ("canary", "maybe")]))
        .await
        .unwrap_err();
    assert_eq!(err.message(), "input \"canary\" must be a boolean, not \"maybe\"");
    let err = ops.decide_approval(decision(&run_id, "build", true, "", &[])).await.unwrap_err();
    assert!(
        err.message().contains("step \"build\" is succeeded, not awaiting approval"),
        "{}",
        err.message()
    );

    let ok = ops
        .decide_approval(decision(
            &run_id,
            "gate",
            true,
            "ship it",
            &[("version", "1.2"), ("canary", "true")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.run_id, run_id);
    let run = wait_run(&mut c, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded");
    let gate = run.steps.iter().find(|s| s.id == "gate").unwrap();
    assert!(gate.attempts.is_empty(), "an approval makes no attempt");
    assert_eq!(gate.reason, "approved by token ops: ship it");
    let outputs: serde_json::Value = serde_json::from_str(&result_text(&gate.result)).unwrap();
    assert_eq!(
        outputs,
        serde_json::json!({"version": "1.2", "canary": true, "approved_by": "token ops", "comment": "ship it"})
    );
    assert_eq!(
        log_text(&logs(&mut c, &run_id, "deploy", 1, false).await),
        "deploying 1.2 canary=true for token ops\n"
    );

    let events = all_events(&mut c, &run_id).await;
    let approved = events.iter().find(|e| e.kind == "step_approved").expect("a step_approved event");
    assert_eq!(
        (approved.actor.as_str(), approved.message.as_str()),
        ("token ops", "approved by token ops: ship it")
    );
    assert!(events.iter().any(|e| e.kind == "approval_requested" && e.step_id == "gate"));
    let report = report_md(&mut c, &run_id).await;
    assert!(report.contains("approved by token ops: ship it"), "{report}");

    // Deciding twice is refused.
    let err = ops.decide_approval(decision(&run_id, "gate", false, "", &[])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_fails_the_run_and_a_step_may_ask_for_a_stronger_role() {
    let sb = Sandbox::builder().agents(1).auth(AuthMode::Required).build().await;
    let operator = sb.token("ops", Role::Operator).await;
    let admin = sb.token("boss", Role::Admin).await;
    let mut ops = sb.client_as(Some(&operator)).await;
    let spec = "name: guarded
steps:
  - {id: gate, tool: approval, with: {role: admin}}
  - {id: after, needs: gate, tool: noop}
  - {id: notify, needs: gate, when: on_failure, tool: noop}
";
    let run_id = submit(&mut ops, spec).await;
    assert_eq!(awaiting(&mut ops, &run_id, "gate").await, "awaiting approval by the admin role or above");
    let err = ops.decide_approval(decision(&run_id, "gate", false, "", &[])).await.unwrap_err();
    assert_eq!(err.message(), "deciding step \"gate\" needs the admin role; token ops has operator");
    let mut boss = sb.client_as(Some(&admin)).await;
    boss.decide_approval(decision(&run_id, "gate", false, "not on a Friday", &[])).await.unwrap();
    let run = wait_run(&mut ops, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "failed");
    let state = |id: &str| run.steps.iter().find(|s| s.id == id).unwrap();
    assert_eq!(state("gate").state_name(), "failed");
    assert_eq!(state("gate").reason, "rejected by token boss: not on a Friday");
    assert_eq!(state("after").state_name(), "skipped");
    assert_eq!(state("notify").state_name(), "succeeded", "on_failure steps run after a rejection");
    let events = all_events(&mut ops, &run_id).await;
    assert!(events.iter().any(|e| e.kind == "step_rejected" && e.actor == "token boss"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_decides_on_schedule_and_survives_a_controller_restart() {
    let mut sb = Sandbox::builder().agents(1).build().await;
    let mut c = sb.client().await;
    let reject = submit(
        &mut c,
        "name: t1\nsteps:\n  - {id: gate, tool: approval, with: {timeout: 3s}}\n  - {id: after, needs: gate, tool: noop}\n",
    )
    .await;
    let approve = submit(
        &mut c,
        "name: t2\nsteps:\n  - {id: gate, tool: approval, with: {timeout: 3s, on_timeout: approve}}\n  - {id: after, needs: gate, tool: noop}\n",
    )
    .await;
    let why = awaiting(&mut c, &reject, "gate").await;
    assert_eq!(why, "awaiting approval by the operator role or above (rejected if not decided within 3s)");
    awaiting(&mut c, &approve, "gate").await;
    // The controller goes away while both wait; the timeouts still apply after it.
    sb.restart_controller().await;
    let mut c = sb.client().await;
    let rejected = wait_run(&mut c, &reject, Duration::from_secs(30)).await;
    let approved = wait_run(&mut c, &approve, Duration::from_secs(30)).await;
    assert_eq!((rejected.state_name(), approved.state_name()), ("failed", "succeeded"));
    let gate = |r: &proto::Run| r.steps.iter().find(|s| s.id == "gate").unwrap().clone();
    assert_eq!(gate(&rejected).reason, "rejected on timeout: no decision within 3s");
    assert_eq!(gate(&approved).reason, "approved on timeout: no decision within 3s");
    for run in [&rejected, &approved] {
        let g = gate(run);
        let waited = ms(&g.finished_at) - ms(&g.started_at);
        assert!(waited >= 3000, "decided after {waited} ms, before its timeout");
    }
    let outputs: serde_json::Value = serde_json::from_str(&result_text(&gate(&approved).result)).unwrap();
    assert_eq!(outputs["approved_by"], "timeout");
}
