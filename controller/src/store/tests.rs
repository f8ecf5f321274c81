//! Store tests against a real SQLite file.

use super::*;

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::open(&url).await.unwrap();
    (dir, store)
}

fn run_row(id: &str, state: &str, created_at: i64) -> RunRow {
    RunRow {
        id: id.into(),
        workstream: "ws".into(),
        state: state.into(),
        spec: "{}".into(),
        params: "{}".into(),
        reason: String::new(),
        created_at,
        started_at: None,
        finished_at: None,
    }
}

fn step_row(run: &str, id: &str, idx: i64, state: &str) -> StepRow {
    StepRow {
        run_id: run.into(),
        step_id: id.into(),
        idx,
        state: state.into(),
        tool: "shell".into(),
        attempts: 0,
        failures: 0,
        lost_count: 0,
        next_attempt_at: None,
        started_at: None,
        finished_at: None,
        reason: String::new(),
        result: None,
    }
}

fn event(run: &str, seq: i64, kind: &str) -> EventRow {
    EventRow { run_id: run.into(), seq, at: seq * 10, kind: kind.into(), ..Default::default() }
}

#[tokio::test]
async fn run_written_and_read_back() {
    let (_d, store) = store().await;
    let run_id = "0a1b2c3d-0000-4000-8000-000000000001";
    let mut batch = Batch::default();
    batch.runs.push(run_row(run_id, "running", 1000));
    batch.steps.push(step_row(run_id, "a", 0, "succeeded"));
    batch.steps.push(step_row(run_id, "b", 1, "running"));
    batch.attempts.push(AttemptRow {
        id: "att-1".into(),
        run_id: run_id.into(),
        step_id: "b".into(),
        number: 1,
        agent_id: "agent".into(),
        agent_name: "a1".into(),
        lease_token: "tok".into(),
        state: "running".into(),
        exit_code: Some(3),
        error_class: String::new(),
        error: String::new(),
        result: Some("{\"x\":1}".into()),
        output_tail: "out".into(),
        assigned_at: 5,
        started_at: Some(6),
        finished_at: None,
        deadline_at: Some(99),
    });
    batch.events.push(event(run_id, 1, "run_submitted"));
    store.commit(&batch).await.unwrap();

    let rec = store.get_run(run_id).await.unwrap();
    assert_eq!(rec.run, batch.runs[0]);
    assert_eq!(rec.steps, batch.steps);
    assert_eq!(rec.attempts, batch.attempts);
    assert_eq!(rec.last_seq, 1);

    // Upserts replace rows in place.
    let mut b2 = Batch::default();
    let mut r = run_row(run_id, "succeeded", 1000);
    r.finished_at = Some(2000);
    b2.runs.push(r.clone());
    let mut s = step_row(run_id, "b", 1, "succeeded");
    s.attempts = 1;
    b2.steps.push(s.clone());
    store.commit(&b2).await.unwrap();
    let rec = store.get_run(run_id).await.unwrap();
    assert_eq!(rec.run, r);
    assert_eq!(rec.steps[1], s);
    assert_eq!(store.step_counts(run_id).await.unwrap().get("succeeded"), Some(&2));

    // Final runs are not part of what the engine reloads.
    assert!(store.load_active().await.unwrap().runs.is_empty());
}

#[tokio::test]
async fn events_come_back_in_order_from_any_sequence() {
    let (_d, store) = store().await;
    let run_id = "0a1b2c3d-0000-4000-8000-000000000002";
    let mut batch = Batch::default();
    batch.runs.push(run_row(run_id, "running", 1));
    // Written out of order, across several multi-row chunks.
    for seq in (1..=150).rev() {
        batch.events.push(event(run_id, seq, "e"));
    }
    store.commit(&batch).await.unwrap();
    let all = store.events(run_id, 1, 1000).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=150).collect::<Vec<_>>());
    let tail = store.events(run_id, 140, 5).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![140, 141, 142, 143, 144]);
    let snap = store.load_active().await.unwrap();
    assert_eq!(snap.last_seq.get(run_id), Some(&150));
}

#[tokio::test]
async fn a_failing_batch_writes_nothing() {
    let (_d, store) = store().await;
    let run_id = "0a1b2c3d-0000-4000-8000-000000000003";
    let mut batch = Batch::default();
    batch.runs.push(run_row(run_id, "pending", 1));
    batch.steps.push(step_row(run_id, "a", 0, "ready"));
    batch.events.push(event(run_id, 1, "run_submitted"));
    // An event of a run that does not exist breaks the foreign key, after the run,
    // step and first event rows were written inside the transaction.
    batch.events.push(event("no-such-run", 1, "bogus"));
    let err = store.commit(&batch).await.unwrap_err();
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
    assert!(matches!(store.get_run(run_id).await, Err(StoreError::RunNotFound(_))));
    assert!(store.events(run_id, 1, 10).await.unwrap().is_empty());
    assert!(store.list_runs(None, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_retried_commit_does_not_duplicate_events() {
    let (_d, store) = store().await;
    let run_id = "0a1b2c3d-0000-4000-8000-000000000004";
    let mut batch = Batch::default();
    batch.runs.push(run_row(run_id, "pending", 1));
    batch.events.push(event(run_id, 1, "run_submitted"));
    store.commit(&batch).await.unwrap();
    store.commit(&batch).await.unwrap();
    assert_eq!(store.events(run_id, 1, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn run_ids_resolve_by_unique_prefix() {
    let (_d, store) = store().await;
    let mut batch = Batch::default();
    batch.runs.push(run_row("abc00000-0000-4000-8000-000000000001", "running", 1));
    batch.runs.push(run_row("abd00000-0000-4000-8000-000000000002", "failed", 2));
    store.commit(&batch).await.unwrap();
    assert_eq!(store.resolve_run_id("abc").await.unwrap(), "abc00000-0000-4000-8000-000000000001");
    assert_eq!(store.resolve_run_id("ABD").await.unwrap(), "abd00000-0000-4000-8000-000000000002");
    assert!(matches!(store.resolve_run_id("ab").await, Err(StoreError::AmbiguousRun { .. })));
    assert!(matches!(store.resolve_run_id("ff").await, Err(StoreError::RunNotFound(_))));
    assert!(matches!(store.resolve_run_id("x%").await, Err(StoreError::RunNotFound(_))));
    let listed = store.list_runs(None, 10).await.unwrap();
    assert_eq!(listed[0].0.id, "abd00000-0000-4000-8000-000000000002", "newest first");
    assert_eq!(store.list_runs(Some("running"), 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn bad_urls_are_refused() {
    let err = Store::open("mysql://x").await.err().unwrap();
    assert!(err.to_string().contains("unsupported database url"), "{err}");
}
