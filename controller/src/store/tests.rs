//! Store tests against a real SQLite file.

use super::*;

/// A store on a fresh SQLite file or Postgres database, removed afterwards.
struct TestStore {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some((admin, url)) = self.pg.take() {
            // Dropping a database needs its own runtime here (drop is not async).
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let _ = rt.block_on(testing::drop_database(&admin, &url));
            })
            .join();
        }
    }
}

async fn sqlite_store() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    TestStore { store: Store::open(&url).await.unwrap(), _dir: Some(dir), pg: None }
}

async fn postgres_store() -> Option<TestStore> {
    let Some(admin) = testing::postgres_url() else {
        eprintln!("SKIPPED (postgres): set BATON_TEST_POSTGRES_URL to run the Postgres store tests");
        return None;
    };
    let url = testing::create_database(&admin).await.unwrap();
    let store = Store::open(&url).await.unwrap();
    Some(TestStore { store, _dir: None, pg: Some((admin, url)) })
}

/// Runs each test on SQLite and on Postgres.
macro_rules! on_both {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let t = super::sqlite_store().await;
                super::$name(&t.store).await;
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(t) = super::postgres_store().await {
                    super::$name(&t.store).await;
                }
            }
        }
    )+};
}

on_both!(
    run_written_and_read_back,
    events_come_back_in_order_from_any_sequence,
    a_failing_batch_writes_nothing,
    a_retried_commit_does_not_duplicate_events,
    a_commit_is_written_only_after_the_one_before_it,
    run_ids_resolve_by_unique_prefix,
    output_chunks_and_estimates,
    leadership_is_exclusive_and_fences_commits,
    finished_runs_are_pruned_by_their_retention_with_all_their_rows,
    an_ended_run_loads_alone_and_its_reruns_link_back,
    cached_results_are_written_listed_loaded_and_purged,
);

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
        request_id: String::new(),
        name: String::new(),
        labels: "{}".into(),
        retain_ms: None,
        rerun_of: String::new(),
        deadline_at: None,
        no_cache: 0,
        priority: 0,
        queued: 0,
        cost_micros: 0,
        tokens: 0,
        budget_micros: None,
        budget_tokens: None,
    }
}

fn state_of(r: &RunRow) -> RunStateRow {
    RunStateRow {
        id: r.id.clone(),
        state: r.state.clone(),
        reason: r.reason.clone(),
        started_at: r.started_at,
        finished_at: r.finished_at,
        deadline_at: r.deadline_at,
        queued: r.queued,
        cost_micros: r.cost_micros,
        tokens: r.tokens,
        budget_micros: r.budget_micros,
        budget_tokens: r.budget_tokens,
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
        needs: "[]".into(),
        kind: String::new(),
        route: String::new(),
        cost_micros: 0,
        tokens: 0,
    }
}

fn event(run: &str, seq: i64, kind: &str) -> EventRow {
    EventRow { run_id: run.into(), seq, at: seq * 10, kind: kind.into(), ..Default::default() }
}

async fn run_written_and_read_back(store: &Store) {
    let run_id = "0a1b2c3d-0000-4000-8000-000000000001";
    let mut batch = Batch::default();
    batch.new_runs.push(run_row(run_id, "running", 1000));
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
        follows: r#"["x"]"#.into(),
    });
    batch.events.push(event(run_id, 1, "run_submitted"));
    store.commit(batch.clone(), None).await.unwrap();

    let rec = store.get_run(run_id).await.unwrap();
    assert_eq!(rec.run, batch.new_runs[0]);
    assert_eq!(rec.steps, batch.steps);
    assert_eq!(rec.attempts, batch.attempts);
    assert_eq!(rec.last_seq, 1);

    // Upserts replace rows in place.
    let mut b2 = Batch::default();
    let mut r = run_row(run_id, "succeeded", 1000);
    r.finished_at = Some(2000);
    b2.runs.push(state_of(&r.clone()));
    let mut s = step_row(run_id, "b", 1, "succeeded");
    s.attempts = 1;
    b2.steps.push(s.clone());
    store.commit(b2.clone(), None).await.unwrap();
    let rec = store.get_run(run_id).await.unwrap();
    assert_eq!(rec.run, r, "the state changed, the rest kept");
    assert_eq!(rec.steps[1], s);

    // A grown spec (a for_each expanded) is written with its new steps, the rest kept.
    let mut b3 = Batch::default();
    b3.specs.push(RunSpecRow { id: run_id.into(), spec: r#"{"grown":true}"#.into() });
    b3.steps.push(step_row(run_id, "b[0]", 2, "ready"));
    store.commit(b3, None).await.unwrap();
    let rec = store.get_run(run_id).await.unwrap();
    assert_eq!(rec.run, RunRow { spec: r#"{"grown":true}"#.into(), ..r.clone() });
    assert_eq!(rec.steps.len(), 3);
    assert_eq!(store.step_counts(run_id).await.unwrap().get("succeeded"), Some(&2));

    // Final runs are not part of what the engine reloads.
    assert!(store.load_active().await.unwrap().runs.is_empty());
}

async fn an_ended_run_loads_alone_and_its_reruns_link_back(store: &Store) {
    let old = "0a1b2c3d-0000-4000-8000-0000000000a1";
    let mut batch = Batch::default();
    batch.new_runs.push(run_row(old, "failed", 1000));
    batch.new_runs.push(run_row("0a1b2c3d-0000-4000-8000-0000000000a9", "running", 999));
    batch.steps.push(step_row(old, "a", 0, "succeeded"));
    batch.steps.push(step_row(old, "b", 1, "failed"));
    batch.events.push(event(old, 1, "run_submitted"));
    batch.events.push(event(old, 2, "run_failed"));
    store.commit(batch, None).await.unwrap();
    // What a retry reads: the run alone, with its steps and last event number.
    let snap = store.load_run(old).await.unwrap();
    assert_eq!(snap.runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![old]);
    assert_eq!(snap.steps.len(), 2);
    assert_eq!(snap.last_seq.get(old), Some(&2));
    assert!(matches!(
        store.load_run("0a1b2c3d-0000-4000-8000-0000000000ff").await,
        Err(StoreError::RunNotFound(_))
    ));

    let mut reruns = Batch::default();
    for (id, at) in
        [("0a1b2c3d-0000-4000-8000-0000000000b2", 3000), ("0a1b2c3d-0000-4000-8000-0000000000b1", 2000)]
    {
        let mut r = run_row(id, "running", at);
        r.rerun_of = old.into();
        reruns.new_runs.push(r);
    }
    store.commit(reruns, None).await.unwrap();
    let rec = store.get_run(old).await.unwrap();
    assert_eq!(
        rec.reruns,
        vec!["0a1b2c3d-0000-4000-8000-0000000000b1", "0a1b2c3d-0000-4000-8000-0000000000b2"]
    );
    let new = store.get_run("0a1b2c3d-0000-4000-8000-0000000000b1").await.unwrap();
    assert_eq!(new.run.rerun_of, old);
    assert!(new.reruns.is_empty());
}

async fn cached_results_are_written_listed_loaded_and_purged(store: &Store) {
    let row = |key: &str, ws: &str, at: i64| CacheRow {
        cache_key: key.into(),
        workstream: ws.into(),
        step_id: "a".into(),
        run_id: "0a1b2c3d-0000-4000-8000-0000000000c1".into(),
        result: Some(r#"{"x":1}"#.into()),
        created_at: at,
        expires_at: at + 1000,
    };
    let batch = Batch {
        cache: vec![row("ab01", "w1", 1), row("ab02", "w2", 2), row("cd03", "w1", 3)],
        ..Default::default()
    };
    store.commit(batch, None).await.unwrap();
    // The same key again replaces it.
    let again = Batch { cache: vec![row("ab01", "w1", 4)], ..Default::default() };
    store.commit(again, None).await.unwrap();
    let all = store.list_cache("").await.unwrap();
    assert_eq!(all.iter().map(|r| r.cache_key.as_str()).collect::<Vec<_>>(), vec!["ab01", "cd03", "ab02"]);
    assert_eq!(store.list_cache("w1").await.unwrap().len(), 2);
    assert_eq!(store.load_active().await.unwrap().cache.len(), 3);
    // Pruning drops those past their ttl (ab02 ends at 1002, cd03 at 1003, ab01 at 1004).
    store.prune(1003, None, 10).await.unwrap();
    assert_eq!(store.list_cache("").await.unwrap().len(), 1);
    let back = Batch { cache: vec![row("ab02", "w2", 2), row("cd03", "w1", 3)], ..Default::default() };
    store.commit(back, None).await.unwrap();
    assert_eq!(store.purge_cache("w1", "ab").await.unwrap(), 1);
    assert_eq!(store.purge_cache("", "").await.unwrap(), 2);
    assert!(store.list_cache("").await.unwrap().is_empty());
}

async fn events_come_back_in_order_from_any_sequence(store: &Store) {
    let run_id = "0a1b2c3d-0000-4000-8000-000000000002";
    let mut batch = Batch::default();
    batch.new_runs.push(run_row(run_id, "running", 1));
    // Written out of order, across several multi-row chunks.
    for seq in (1..=150).rev() {
        batch.events.push(event(run_id, seq, "e"));
    }
    store.commit(batch.clone(), None).await.unwrap();
    let all = store.events(run_id, 1, 1000).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=150).collect::<Vec<_>>());
    let tail = store.events(run_id, 140, 5).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![140, 141, 142, 143, 144]);
    let snap = store.load_active().await.unwrap();
    assert_eq!(snap.last_seq.get(run_id), Some(&150));
}

async fn a_failing_batch_writes_nothing(store: &Store) {
    let run_id = "0a1b2c3d-0000-4000-8000-000000000003";
    let mut batch = Batch::default();
    batch.new_runs.push(run_row(run_id, "pending", 1));
    batch.steps.push(step_row(run_id, "a", 0, "ready"));
    batch.events.push(event(run_id, 1, "run_submitted"));
    // An event of a run that does not exist breaks the foreign key, after the run,
    // step and first event rows were written inside the transaction.
    batch.events.push(event("no-such-run", 1, "bogus"));
    let err = store.commit(batch.clone(), None).await.unwrap_err();
    let text = err.to_string().to_lowercase();
    assert!(text.contains("foreign key"), "{err}");
    assert!(matches!(store.get_run(run_id).await, Err(StoreError::RunNotFound(_))));
    assert!(store.events(run_id, 1, 10).await.unwrap().is_empty());
    assert!(store.list_runs(&RunFilter { limit: 10, ..Default::default() }).await.unwrap().is_empty());
}

async fn a_commit_is_written_only_after_the_one_before_it(store: &Store) {
    let run_id = "0a1b2c3d-0000-4000-8000-000000000005";
    let mut first = Batch::default();
    first.new_runs.push(run_row(run_id, "pending", 1));
    let mut second = Batch::default();
    second.runs.push(state_of(&run_row(run_id, "running", 1)));
    let (stored, stored_rx) = tokio::sync::oneshot::channel::<()>();
    let later = store.commit_after(second.clone(), None, async { stored_rx.await.is_ok() });
    let before = async {
        // `later` has been polled and is waiting: it must not have written yet.
        assert!(matches!(store.get_run(run_id).await, Err(StoreError::RunNotFound(_))));
        store.commit(first.clone(), None).await.unwrap();
        assert_eq!(store.get_run(run_id).await.unwrap().run.state, "pending");
        stored.send(()).unwrap();
    };
    let (written, ()) = tokio::join!(later, before);
    written.unwrap();
    assert_eq!(store.get_run(run_id).await.unwrap().run.state, "running");

    // The one before failed: nothing is written.
    let mut third = Batch::default();
    third.runs.push(state_of(&run_row(run_id, "failed", 1)));
    let err = store.commit_after(third.clone(), None, std::future::ready(false)).await.unwrap_err();
    assert!(matches!(err, StoreError::Aborted), "{err}");
    assert_eq!(store.get_run(run_id).await.unwrap().run.state, "running");
}

async fn a_retried_commit_does_not_duplicate_events(store: &Store) {
    let run_id = "0a1b2c3d-0000-4000-8000-000000000004";
    let mut batch = Batch::default();
    batch.new_runs.push(run_row(run_id, "pending", 1));
    batch.events.push(event(run_id, 1, "run_submitted"));
    store.commit(batch.clone(), None).await.unwrap();
    store.commit(batch.clone(), None).await.unwrap();
    assert_eq!(store.events(run_id, 1, 10).await.unwrap().len(), 1);
}

async fn run_ids_resolve_by_unique_prefix(store: &Store) {
    let mut batch = Batch::default();
    batch.new_runs.push(run_row("abc00000-0000-4000-8000-000000000001", "running", 1));
    let mut labeled = run_row("abd00000-0000-4000-8000-000000000002", "failed", 2);
    labeled.labels = r#"{"team":"blue"}"#.into();
    batch.new_runs.push(labeled);
    store.commit(batch.clone(), None).await.unwrap();
    assert_eq!(store.resolve_run_id("abc").await.unwrap(), "abc00000-0000-4000-8000-000000000001");
    assert_eq!(store.resolve_run_id("ABD").await.unwrap(), "abd00000-0000-4000-8000-000000000002");
    assert!(matches!(store.resolve_run_id("ab").await, Err(StoreError::AmbiguousRun { .. })));
    assert!(matches!(store.resolve_run_id("ff").await, Err(StoreError::RunNotFound(_))));
    assert!(matches!(store.resolve_run_id("x%").await, Err(StoreError::RunNotFound(_))));
    let all = RunFilter { limit: 10, ..Default::default() };
    let listed = store.list_runs(&all).await.unwrap();
    assert_eq!(listed[0].0.id, "abd00000-0000-4000-8000-000000000002", "newest first");
    assert_eq!(listed[0].0.spec, "", "a list leaves specs out");
    let running = RunFilter { states: vec!["running".into()], ..all.clone() };
    assert_eq!(store.list_runs(&running).await.unwrap().len(), 1);
    let after_first = RunFilter { before: Some((2, listed[0].0.id.clone())), ..all.clone() };
    let page = store.list_runs(&after_first).await.unwrap();
    assert_eq!(
        page.iter().map(|(r, _)| r.id.as_str()).collect::<Vec<_>>(),
        vec!["abc00000-0000-4000-8000-000000000001"]
    );
    let labeled = RunFilter { labels: [("team".to_string(), "blue".to_string())].into(), ..all.clone() };
    assert_eq!(store.list_runs(&labeled).await.unwrap()[0].0.id, "abd00000-0000-4000-8000-000000000002");
    let other = RunFilter { labels: [("team".to_string(), "red".to_string())].into(), ..all.clone() };
    assert!(store.list_runs(&other).await.unwrap().is_empty());
    let ws = RunFilter { workstream: "nope".into(), ..all };
    assert!(store.list_runs(&ws).await.unwrap().is_empty());
}

async fn output_chunks_and_estimates(store: &Store) {
    let run_id = "0a1b2c3d-0000-4000-8000-000000000005";
    let mut batch = Batch::default();
    let mut run = run_row(run_id, "succeeded", 1);
    run.workstream = "est".into();
    batch.new_runs.push(run);
    let mut s = step_row(run_id, "a", 0, "succeeded");
    (s.started_at, s.finished_at) = (Some(1_000), Some(3_000));
    batch.steps.push(s);
    store.commit(batch.clone(), None).await.unwrap();
    let e = store.duration_estimates("est").await.unwrap();
    assert_eq!(e.by_step.get("a"), Some(&2_000));
    assert_eq!(e.by_tool.get("shell"), Some(&2_000));
    assert!(store.duration_estimates("other").await.unwrap().by_step.is_empty());

    let rows = vec![
        OutputRow { attempt_id: "att".into(), seq: 1, data: b"hello ".to_vec() },
        OutputRow { attempt_id: "att".into(), seq: 2, data: vec![0, 159, 146, 150] },
    ];
    store.write_output(&rows).await.unwrap();
    assert_eq!(store.output("att", 1).await.unwrap(), rows);
    assert_eq!(store.output_size("att").await.unwrap(), (10, 3));
    assert_eq!(store.run_counts().await.unwrap().get("succeeded"), Some(&1));
    store.ping().await.unwrap();
}

/// A finished run with a step, an attempt, an event and output: 5 rows.
async fn finished_run(
    store: &Store,
    id: &str,
    state: &str,
    finished_at: Option<i64>,
    retain_ms: Option<i64>,
) {
    let mut batch = Batch::default();
    let mut run = run_row(id, state, 1);
    (run.finished_at, run.retain_ms) = (finished_at, retain_ms);
    batch.new_runs.push(run);
    batch.steps.push(step_row(id, "a", 0, "succeeded"));
    batch.attempts.push(AttemptRow {
        id: format!("{id}-att"),
        run_id: id.into(),
        step_id: "a".into(),
        number: 1,
        state: "succeeded".into(),
        ..Default::default()
    });
    batch.events.push(event(id, 1, "run_submitted"));
    store.commit(batch.clone(), None).await.unwrap();
    let out = OutputRow { attempt_id: format!("{id}-att"), seq: 1, data: b"out".to_vec() };
    store.write_output(&[out]).await.unwrap();
}

async fn finished_runs_are_pruned_by_their_retention_with_all_their_rows(store: &Store) {
    let old = "0a1b2c3d-0000-4000-8000-0000000000a1";
    let own = "0a1b2c3d-0000-4000-8000-0000000000a2";
    let recent = "0a1b2c3d-0000-4000-8000-0000000000a3";
    let active = "0a1b2c3d-0000-4000-8000-0000000000a4";
    finished_run(store, old, "failed", Some(1_000), None).await;
    finished_run(store, own, "succeeded", Some(9_000), Some(500)).await;
    finished_run(store, recent, "canceled", Some(9_000), None).await;
    finished_run(store, active, "quarantined", None, Some(1)).await;
    let now = 10_000;
    // Without a default, only the run with a retention of its own goes.
    let p = store.prune(now, None, 100).await.unwrap();
    assert_eq!((p.runs, p.rows), (1, 5));
    assert!(matches!(store.get_run(own).await, Err(StoreError::RunNotFound(_))));
    assert!(store.output(&format!("{own}-att"), 1).await.unwrap().is_empty());
    // With one, runs finished before it, in bounded batches; the rest stay.
    let p = store.prune(now, Some(5_000), 100).await.unwrap();
    assert_eq!((p.runs, p.rows), (1, 5));
    assert!(matches!(store.get_run(old).await, Err(StoreError::RunNotFound(_))));
    assert!(store.events(old, 1, 10).await.unwrap().is_empty());
    for id in [recent, active] {
        assert_eq!(store.get_run(id).await.unwrap().steps.len(), 1);
    }
    assert_eq!(store.prune(now, Some(5_000), 100).await.unwrap(), Pruned::default());
    assert_eq!(store.prune(20_000, Some(5_000), 0).await.unwrap(), Pruned::default());

    // Deleting by hand: finished runs only.
    let err = store.delete_finished_run(active).await.unwrap_err();
    assert!(err.to_string().contains("is quarantined: only finished runs are deleted"), "{err}");
    assert_eq!(store.delete_finished_run(recent).await.unwrap(), 5);
    assert!(matches!(store.delete_finished_run(recent).await, Err(StoreError::RunNotFound(_))));
    assert!(store.size_bytes().await.unwrap() > 0);
}

async fn leadership_is_exclusive_and_fences_commits(store: &Store) {
    let e1 = store.acquire_lead("c1", "http://one", 60_000).await.unwrap().expect("free lead");
    assert_eq!(store.acquire_lead("c2", "http://two", 60_000).await.unwrap(), None, "one leader at a time");
    let info = store.leader().await.unwrap();
    assert_eq!(
        (info.holder.as_str(), info.address.as_str(), info.epoch, info.alive),
        ("c1", "http://one", e1, true)
    );
    let f1 = Fence { holder: "c1".into(), epoch: e1 };
    assert!(store.renew_lead(&f1, 60_000).await.unwrap());
    let run_id = "0a1b2c3d-0000-4000-8000-000000000006";
    let mut batch = Batch::default();
    batch.new_runs.push(run_row(run_id, "running", 1));
    store.commit(batch.clone(), Some(&f1)).await.unwrap();

    // The lease runs out; another controller takes over with a new epoch.
    store.release_lead(&f1).await.unwrap();
    let e2 = store.acquire_lead("c2", "http://two", 60_000).await.unwrap().expect("released lead");
    assert!(e2 > e1);
    assert!(!store.renew_lead(&f1, 60_000).await.unwrap(), "the old leader cannot renew");
    let mut late = Batch::default();
    late.runs.push(state_of(&run_row(run_id, "failed", 1)));
    assert!(matches!(store.commit(late.clone(), Some(&f1)).await, Err(StoreError::Fenced(e)) if e == e1));
    assert_eq!(store.get_run(run_id).await.unwrap().run.state, "running", "the fenced write left nothing");
    store.commit(late.clone(), Some(&Fence { holder: "c2".into(), epoch: e2 })).await.unwrap();
    assert_eq!(store.get_run(run_id).await.unwrap().run.state, "failed");
}

#[tokio::test]
async fn bad_urls_are_refused_and_postgres_urls_are_redacted_in_logs() {
    let err = Store::open("mysql://x").await.err().unwrap();
    assert!(err.to_string().contains("unsupported database url"), "{err}");
    assert_eq!(crate::redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
}

/// A database written before steps and events were stored clustered keeps its runs,
/// steps and events through the migration that rebuilds those tables.
/// A database migrated by a newer controller is refused by an older one (no
/// downgrade), with the reason.
#[tokio::test]
async fn a_database_from_a_newer_controller_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("b.db").display());
    let store = Store::open(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99999, 'from the future', TRUE, X'00', 0)",
    )
    .execute(&store.pool)
    .await
    .unwrap();
    store.close().await;
    let err = Store::open(&url).await.err().expect("refused").to_string();
    assert!(err.contains("migration 99999 was previously applied but is missing"), "{err}");
}

#[tokio::test]
async fn a_sqlite_backup_is_a_database_of_its_own() {
    let t = sqlite_store().await;
    let id = "0a1b2c3d-0000-4000-8000-0000000000b1";
    finished_run(&t.store, id, "succeeded", Some(1), None).await;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("backup.db");
    t.store.backup(&copy).await.unwrap();
    let err = t.store.backup(&copy).await.unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
    let restored = Store::open(&format!("sqlite://{}", copy.display())).await.unwrap();
    assert_eq!(restored.get_run(id).await.unwrap().attempts.len(), 1);
    assert_eq!(restored.output(&format!("{id}-att"), 1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn sqlite_runs_survive_the_migration_to_clustered_tables() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(&sqlite_url(&url)).await.unwrap();
    let mut before = sqlx::migrate!("./migrations/sqlite");
    let all = before.migrations.len();
    before.migrations = before.migrations.iter().filter(|m| m.version < 7).cloned().collect();
    assert!(before.migrations.len() < all, "the clustering migration exists");
    before.run(&pool).await.unwrap();
    // Rows as that schema held them (the columns of later migrations did not exist).
    let run_id = "0a1b2c3d-0000-4000-8000-0000000000c1";
    for sql in [
        format!(
            "INSERT INTO runs (id, workstream, state, spec, params, reason, created_at) VALUES ('{run_id}', 'ws', 'running', '{{}}', '{{}}', '', 1)"
        ),
        format!(
            "INSERT INTO steps (run_id, step_id, idx, state, tool, attempts, failures, lost_count, reason) VALUES ('{run_id}', 'a', 0, 'succeeded', 'shell', 0, 0, 0, '')"
        ),
        format!(
            "INSERT INTO steps (run_id, step_id, idx, state, tool, attempts, failures, lost_count, reason) VALUES ('{run_id}', 'b', 1, 'ready', 'shell', 0, 0, 0, '')"
        ),
        format!(
            "INSERT INTO run_events (run_id, seq, at, kind, step_id, attempt_id, run_state, step_state, attempt_state, message, epoch) VALUES ('{run_id}', 1, 10, 'run_submitted', '', '', '', '', '', '', 0)"
        ),
        format!(
            "INSERT INTO run_events (run_id, seq, at, kind, step_id, attempt_id, run_state, step_state, attempt_state, message, epoch) VALUES ('{run_id}', 2, 20, 'step_succeeded', '', '', '', '', '', '', 0)"
        ),
    ] {
        sqlx::query(AssertSqlSafe(sql)).execute(&pool).await.unwrap();
    }
    pool.close().await;

    let store = Store::open(&url).await.unwrap();
    let rec = store.get_run(run_id).await.unwrap();
    let steps: Vec<(&str, &str)> = rec.steps.iter().map(|s| (s.step_id.as_str(), s.state.as_str())).collect();
    assert_eq!(steps, [("a", "succeeded"), ("b", "ready")]);
    assert_eq!(rec.last_seq, 2);
    let kinds: Vec<String> = store.events(run_id, 1, 10).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["run_submitted", "step_succeeded"]);
    for table in ["steps", "run_events"] {
        let sql: String = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = '{table}'"
        )))
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert!(sql.contains("WITHOUT ROWID"), "{table}: {sql}");
    }
    // New writes land in the rebuilt tables.
    let mut b = Batch::default();
    b.steps.push(step_row(run_id, "b", 1, "succeeded"));
    b.events.push(event(run_id, 3, "step_succeeded"));
    store.commit(b.clone(), None).await.unwrap();
    assert_eq!(store.get_run(run_id).await.unwrap().last_seq, 3);
}
