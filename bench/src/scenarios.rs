//! The scenarios, their measurements, and the table.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_common::pb;
use serde_json::json;
use tokio_stream::StreamExt;

use crate::cluster::{Backend, Client, Cluster};
use crate::compare::{self, Shape};

pub struct Options {
    pub backend: Backend,
    pub postgres_url: Option<String>,
    pub compare: bool,
    pub b5_seconds: u64,
    /// Simulated agents in B5.
    pub b5_agents: usize,
    /// Controllers with pipelined starts.
    pub pipeline: bool,
    /// The `baton` CLI, for end-to-end times of B1–B3.
    pub baton: Option<std::path::PathBuf>,
}

/// One line of the table.
#[derive(Default)]
struct Row {
    name: String,
    steps: usize,
    makespan: Option<f64>,
    /// The makespan is the time to run `steps` (not a time to first dispatch).
    throughput: bool,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    ctl_cpu: f64,
    agent_cpu: f64,
    ctl_rss: f64,
    agent_rss: f64,
    make: Option<f64>,
    dask: Option<f64>,
    /// `baton submit FILE --watch`, start to exit, on the same cluster right after.
    cli: Option<f64>,
    note: String,
}

pub async fn run_all(chosen: &[String], o: &Options) -> anyhow::Result<()> {
    let backend = match o.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    eprintln!(
        "baton-bench: backend {backend}, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let mut rows = Vec::new();
    let mut dask_missing = false;
    for (i, s) in chosen.iter().enumerate() {
        if i > 0 {
            // Let the previous scenario's processes and files go before timing the next.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        eprintln!("running {s} ...");
        let row = match s.as_str() {
            "b1" => dag(o, "B1 1000 independent shell", Shape::Independent(1000), &[1, 1], 2).await?,
            "b2" => dag(o, "B2 chain of 1000 shell", Shape::Chain(1000), &[1, 1], 1).await?,
            "b3" => dag(o, "B3 10 layers x 100 shell", Shape::Layers(10, 100), &[1, 1], 2).await?,
            "b4" => b4(o).await?,
            "b8" => b8(o).await?,
            "b9" => b9(o).await?,
            "b10" => b10(o).await?,
            "b5" => b5(o).await?,
            "b6" => b6(o).await?,
            "idle" => idle(o).await?,
            _ => unreachable!("checked by the caller"),
        };
        dask_missing |= o.compare && row.dask.is_none() && s.as_str() < "b4";
        print_row(&row);
        rows.push(row);
    }
    println!();
    println!("## Results ({backend})");
    println!();
    println!(
        "| scenario | steps | makespan | steps/s | overhead/step vs make | ready→started p50 | p99 | controller CPU | agents CPU | controller RSS | agent RSS | make | Baton/make | CLI end to end | CLI/make | Dask | Baton/Dask | notes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", table_line(r));
    }
    if dask_missing {
        println!("\n{}", compare::DASK_HINT);
    }
    Ok(())
}

fn fmt_s(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.3}s")).unwrap_or_else(|| "-".into())
}

fn fmt_us(v: Option<f64>) -> String {
    v.map(|us| if us >= 1000.0 { format!("{:.2}ms", us / 1000.0) } else { format!("{us:.0}µs") })
        .unwrap_or_else(|| "-".into())
}

fn table_line(r: &Row) -> String {
    let rate = r
        .makespan
        .filter(|m| r.throughput && *m > 0.0)
        .map(|m| format!("{:.0}", r.steps as f64 / m))
        .unwrap_or_else(|| "-".into());
    let overhead = match (r.makespan, r.make) {
        (Some(m), Some(f)) if r.steps > 0 => format!("{:.2}ms", (m - f) * 1000.0 / r.steps as f64),
        _ => "-".into(),
    };
    let ratio = |x: Option<f64>| match (r.makespan, x) {
        (Some(m), Some(x)) if x > 0.0 => format!("{:.2}", m / x),
        _ => "-".into(),
    };
    let cli_ratio = match (r.cli, r.make) {
        (Some(c), Some(m)) if m > 0.0 => format!("{:.2}", c / m),
        _ => "-".into(),
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.2}s | {:.2}s | {:.0} MiB | {:.0} MiB | {} | {} | {} | {} | {} | {} | {} |",
        r.name,
        r.steps,
        fmt_s(r.makespan),
        rate,
        overhead,
        fmt_us(r.p50_us),
        fmt_us(r.p99_us),
        r.ctl_cpu,
        r.agent_cpu,
        r.ctl_rss,
        r.agent_rss,
        fmt_s(r.make),
        ratio(r.make),
        fmt_s(r.cli),
        cli_ratio,
        fmt_s(r.dask),
        ratio(r.dask),
        r.note
    )
}

fn print_row(r: &Row) {
    eprintln!("  {}", table_line(r));
}

/// A workstream of `steps` as JSON (fast to parse even at 20,000 steps).
pub fn spec(name: &str, shape: Shape, tool: &str) -> String {
    let steps: Vec<serde_json::Value> = shape
        .graph()
        .into_iter()
        .map(|(id, needs)| match tool {
            "shell" if needs.is_empty() => json!({"id": id, "tool": "shell", "with": {"argv": ["true"]}}),
            "shell" => json!({"id": id, "needs": needs, "tool": "shell", "with": {"argv": ["true"]}}),
            // Without an empty `needs`: 100,000 steps must fit the 4 MiB a spec may have.
            _ if needs.is_empty() => json!({"id": id, "tool": tool}),
            _ => json!({"id": id, "needs": needs, "tool": tool}),
        })
        .collect();
    json!({"name": name, "steps": steps}).to_string()
}

/// Submits and waits for the run's end; returns the makespan (submit to end).
pub async fn run_to_end(c: &mut Client, spec: String) -> anyhow::Result<(Duration, String)> {
    let t0 = Instant::now();
    let id = c
        .submit_run(pb::SubmitRunRequest {
            spec,
            source: "bench".into(),
            params: Default::default(),
            request_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let mut s = c
        .watch_run(pb::WatchRunRequest { run_id: id.clone(), from_seq: 1, run_events_only: true })
        .await?
        .into_inner();
    let mut last = String::new();
    while let Some(ev) = s.next().await {
        let ev = ev?;
        let state = baton_common::state::RunState::from_pb(ev.run_state);
        last = state.as_ref().map_or("", |s| s.as_str()).to_string();
        if state.is_ok_and(|s| s.is_terminal()) {
            break;
        }
    }
    let took = t0.elapsed();
    if last != "succeeded" {
        bail!("run {id} ended {last}");
    }
    Ok((took, id))
}

/// Quantile from the difference of two scrapes of a Prometheus histogram, interpolated
/// within buckets (as histogram_quantile does). Microseconds.
fn quantile(before: &HashMap<String, f64>, after: &HashMap<String, f64>, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_count) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le * 1e6);
            }
            let within = if count > prev_count { (rank - prev_count) / (count - prev_count) } else { 1.0 };
            return Some((prev_le + (le - prev_le) * within) * 1e6);
        }
        (prev_le, prev_count) = (le, count);
    }
    None
}

const LATENCY: &str = "baton_dispatch_latency_seconds";

/// How many store commits ran between two scrapes and how long they took on average.
fn commits(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> String {
    let delta = |k: &str| after.get(k).unwrap_or(&0.0) - before.get(k).unwrap_or(&0.0);
    let n = delta("baton_store_commit_seconds_count");
    let mean = if n > 0.0 { delta("baton_store_commit_seconds_sum") / n * 1e6 } else { 0.0 };
    format!("{n:.0} commits, mean {}", fmt_us(Some(mean)))
}

/// Runs `shape` with `tool` on a fresh cluster of `agents` and measures it: makespan,
/// dispatch latency, CPU, memory, and (in `note`) the commits.
async fn measure(o: &Options, name: &str, shape: Shape, tool: &str, agents: &[u32]) -> anyhow::Result<Row> {
    let cluster =
        Cluster::start(o.backend, o.postgres_url.as_deref(), agents, Duration::from_secs(1), o.pipeline)
            .await?;
    let mut c = cluster.client().await?;
    let before = cluster.metrics().await?;
    let cpu0 = cluster.cpu();
    let (took, _) = run_to_end(&mut c, spec(name, shape, tool)).await?;
    let cpu1 = cluster.cpu();
    let after = cluster.metrics().await?;
    let (ctl_rss, agent_rss) = cluster.peak_rss();
    let cli = match (&o.baton, tool) {
        (Some(baton), "shell") => Some(cli_run(baton, &cluster, spec(name, shape, tool))?),
        _ => None,
    };
    Ok(Row {
        cli,
        name: name.to_string(),
        steps: shape.steps(),
        makespan: Some(took.as_secs_f64()),
        throughput: true,
        p50_us: quantile(&before, &after, LATENCY, 0.5),
        p99_us: quantile(&before, &after, LATENCY, 0.99),
        ctl_cpu: cpu1.0 - cpu0.0,
        agent_cpu: cpu1.1 - cpu0.1,
        ctl_rss,
        agent_rss,
        note: commits(&before, &after),
        ..Default::default()
    })
}

/// The time a user sees: `baton submit FILE --watch` from start to exit, the run's
/// end included.
fn cli_run(baton: &std::path::Path, cluster: &Cluster, spec: String) -> anyhow::Result<f64> {
    let file = cluster.dir.path().join("cli.json");
    std::fs::write(&file, spec)?;
    let t0 = Instant::now();
    let out = std::process::Command::new(baton)
        .arg("submit")
        .arg(&file)
        .arg("--watch")
        .env("BATON_CONTROLLER", &cluster.url)
        .env("BATON_CONFIG", cluster.dir.path().join("no-contexts.yaml"))
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", baton.display()))?;
    let took = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{} submit --watch failed: {}", baton.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

async fn dag(o: &Options, name: &str, shape: Shape, agents: &[u32], make_jobs: usize) -> anyhow::Result<Row> {
    let mut row = measure(o, name, shape, "shell", agents).await?;
    let mut note = String::new();
    if o.compare {
        row.make = Some(compare::make(shape, make_jobs)?.as_secs_f64());
        row.dask = compare::dask(shape)?.map(|d| d.as_secs_f64());
        note = format!("make -j{make_jobs}; ");
    }
    row.note = format!("{note}2 agents x 1 slot; {}", row.note);
    Ok(row)
}

async fn b4(o: &Options) -> anyhow::Result<Row> {
    let mut row = measure(o, "B4 20000 noop", Shape::Independent(20_000), "noop", &[8, 8, 8, 8]).await?;
    row.note = format!("4 agents x 8 slots; {}", row.note);
    Ok(row)
}

/// The cluster of B4, B8 and B9: 4 agents × 8 slots.
async fn busy_cluster(o: &Options) -> anyhow::Result<Cluster> {
    Cluster::start(o.backend, o.postgres_url.as_deref(), &[8, 8, 8, 8], Duration::from_secs(1), o.pipeline)
        .await
}

/// B8: 1,000 runs of 10 `noop` steps submitted at once (64 submits in flight), against
/// one run of 10,000 on the same cluster; p50/p99 of each run's submit to end.
async fn b8(o: &Options) -> anyhow::Result<Row> {
    let cluster = busy_cluster(o).await?;
    let mut c = cluster.client().await?;
    let (single, _) = run_to_end(&mut c, spec("b8-single", Shape::Independent(10_000), "noop")).await?;
    let before = cluster.metrics().await?;
    let cpu0 = cluster.cpu();
    let t0 = Instant::now();
    let small = spec("b8", Shape::Independent(10), "noop");
    let labels: std::collections::HashMap<String, String> = [("bench".to_string(), "b8".to_string())].into();
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..1000 {
        if pending.len() >= 64
            && let Some(r) = pending.join_next().await
        {
            r??;
        }
        let mut c = c.clone();
        let req = pb::SubmitRunRequest {
            spec: small.clone(),
            source: "bench".into(),
            request_id: format!("b8-{i}-{}", uuid::Uuid::new_v4()),
            labels: labels.clone(),
            ..Default::default()
        };
        pending.spawn(async move { c.submit_run(req).await.map(|_| ()).map_err(anyhow::Error::from) });
    }
    while let Some(r) = pending.join_next().await {
        r??;
    }
    let open = [baton_common::state::RunState::Pending, baton_common::state::RunState::Running];
    loop {
        let left = c
            .list_runs(pb::ListRunsRequest {
                states: open.iter().map(|s| s.to_pb()).collect(),
                labels: labels.clone(),
                page_size: 1,
                ..Default::default()
            })
            .await?
            .into_inner()
            .runs;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed().as_secs_f64();
    let cpu1 = cluster.cpu();
    let after = cluster.metrics().await?;
    let mut spans = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_runs(pb::ListRunsRequest {
                labels: labels.clone(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        for r in &page.runs {
            if r.state != baton_common::state::RunState::Succeeded.to_pb() {
                bail!("run {} ended {}", r.id, r.state);
            }
            let ms = |t: &Option<baton_common::proto::Timestamp>| {
                t.as_ref().map_or(0.0, |t| t.seconds as f64 * 1e3 + f64::from(t.nanos) / 1e6)
            };
            spans.push(ms(&r.finished_at) - ms(&r.created_at));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    spans.sort_by(f64::total_cmp);
    let q =
        |f: f64| spans.get(((spans.len() as f64 * f) as usize).min(spans.len().saturating_sub(1))).copied();
    let (ctl_rss, agent_rss) = cluster.peak_rss();
    Ok(Row {
        name: "B8 1000 runs x 10 noop at once".into(),
        steps: 10_000,
        makespan: Some(took),
        throughput: true,
        p50_us: q(0.5).map(|ms| ms * 1e3),
        p99_us: q(0.99).map(|ms| ms * 1e3),
        ctl_cpu: cpu1.0 - cpu0.0,
        agent_cpu: cpu1.1 - cpu0.1,
        ctl_rss,
        agent_rss,
        note: format!(
            "4 agents x 8 slots; p50/p99 are each run's submit to end; one run of 10000 on the same cluster took {:.3}s ({:.2}x); {}",
            single.as_secs_f64(),
            took / single.as_secs_f64(),
            commits(&before, &after)
        ),
        ..Default::default()
    })
}

/// B9: one run of 100,000 `noop` steps after one of 10,000 on the same cluster: the
/// submit's time, the controller's memory per open step, and the rate at both sizes.
async fn b9(o: &Options) -> anyhow::Result<Row> {
    let cluster = busy_cluster(o).await?;
    let mut c = cluster.client().await?;
    let (ten, _) = run_to_end(&mut c, spec("b9-10k", Shape::Independent(10_000), "noop")).await?;
    let n = 100_000;
    let text = spec("b9", Shape::Independent(n), "noop");
    let rss0 = crate::cluster::status_mib(cluster.controller.id(), "VmRSS:");
    let cpu0 = cluster.cpu();
    let t0 = Instant::now();
    let id = c
        .submit_run(pb::SubmitRunRequest {
            spec: text,
            source: "bench".into(),
            request_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let submit = t0.elapsed().as_secs_f64();
    let rss1 = crate::cluster::status_mib(cluster.controller.id(), "VmRSS:");
    let mut s = c
        .watch_run(pb::WatchRunRequest { run_id: id.clone(), from_seq: 1, run_events_only: true })
        .await?
        .into_inner();
    while let Some(ev) = s.next().await {
        if baton_common::state::RunState::from_pb(ev?.run_state).is_ok_and(|s| s.is_terminal()) {
            break;
        }
    }
    let took = t0.elapsed().as_secs_f64();
    let cpu1 = cluster.cpu();
    let (ctl_rss, agent_rss) = cluster.peak_rss();
    let per_step = |secs: f64, steps: usize| secs * 1e6 / steps as f64;
    Ok(Row {
        name: "B9 one run of 100000 noop".into(),
        steps: n,
        makespan: Some(took),
        throughput: true,
        ctl_cpu: cpu1.0 - cpu0.0,
        agent_cpu: cpu1.1 - cpu0.1,
        ctl_rss,
        agent_rss,
        note: format!(
            "4 agents x 8 slots; submit {submit:.3}s; controller RSS +{:.0} B per open step right after it; {:.1}µs per step at 100000 vs {:.1}µs at 10000",
            (rss1 - rss0).max(0.0) * 1024.0 * 1024.0 / n as f64,
            per_step(took, n),
            per_step(ten.as_secs_f64(), 10_000),
        ),
        ..Default::default()
    })
}

/// B10: a run of 10,000 `sleep 20ms` steps fills every slot of 2 agents × 4 slots; a
/// run of 10 such steps submitted while it goes: its makespan (and `baton submit
/// --watch`'s), and how many of the big run's steps ended meanwhile.
async fn b10(o: &Options) -> anyhow::Result<Row> {
    let cluster =
        Cluster::start(o.backend, o.postgres_url.as_deref(), &[4, 4], Duration::from_secs(1), o.pipeline)
            .await?;
    let mut c = cluster.client().await?;
    let sleepy = |name: &str, n: usize| {
        let steps: Vec<serde_json::Value> = (0..n)
            .map(|i| json!({"id": format!("s{i}"), "tool": "sleep", "with": {"duration": "20ms"}}))
            .collect();
        json!({"name": name, "steps": steps}).to_string()
    };
    let req = pb::SubmitRunRequest {
        spec: sleepy("b10-big", 10_000),
        source: "bench".into(),
        ..Default::default()
    };
    let big = c.submit_run(req).await?.into_inner().run_id;
    let done = |c: &mut Client| {
        let mut c = c.clone();
        let id = big.clone();
        async move {
            let req = pb::GetRunRequest { run_id: id, view: pb::RunView::Summary as i32 };
            let run = c.get_run(req).await?.into_inner();
            anyhow::Ok(run.run.and_then(|r| r.progress).map_or(0, |p| p.done))
        }
    };
    // Until it has every slot.
    while done(&mut c).await? < 8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = done(&mut c).await?;
    let cpu0 = cluster.cpu();
    let (small, _) = run_to_end(&mut c, sleepy("b10-small", 10)).await?;
    let cpu1 = cluster.cpu();
    let during = done(&mut c).await? - before;
    let cli = match &o.baton {
        Some(baton) => Some(cli_run(baton, &cluster, sleepy("b10-cli", 10))?),
        None => None,
    };
    let left = 10_000 - done(&mut c).await?;
    c.cancel_run(pb::CancelRunRequest { run_id: big, ..Default::default() }).await?;
    let (ctl_rss, agent_rss) = cluster.peak_rss();
    Ok(Row {
        name: "B10 10 sleep steps beside a run of 10000".into(),
        steps: 10,
        makespan: Some(small.as_secs_f64()),
        cli,
        ctl_cpu: cpu1.0 - cpu0.0,
        agent_cpu: cpu1.1 - cpu0.1,
        ctl_rss,
        agent_rss,
        note: format!(
            "2 agents x 4 slots, steps of 20ms; {during} of the big run's steps ended meanwhile; {left} still to go after the CLI's run"
        ),
        ..Default::default()
    })
}

/// An agent that only says hello and heartbeats (for B5; idle, at the idle interval),
/// or waits for its first assignment (for B6).
async fn fake_agent(url: String, name: String, heartbeats: bool) -> anyhow::Result<Instant> {
    use pb::agent_message::Msg;
    let ch = tonic::transport::Endpoint::from_shared(url)?.connect().await?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let hello = pb::Hello {
        agent_id: format!("bench-{name}"),
        name,
        version: "bench".into(),
        tools: vec![pb::Tool { name: "noop".into(), version: "bench".into() }],
        slots: 1,
        ..Default::default()
    };
    tx.send(pb::AgentMessage { msg: Some(Msg::Hello(hello)) }).await?;
    let mut inbound = client.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let mut every = Duration::from_secs(1);
    loop {
        let m = if heartbeats {
            match tokio::time::timeout(every, inbound.message()).await {
                Ok(m) => m?,
                Err(_) => {
                    let hb = pb::Heartbeat { running: vec![], free_slots: 1, ..Default::default() };
                    tx.send(pb::AgentMessage { msg: Some(Msg::Heartbeat(hb)) }).await?;
                    continue;
                }
            }
        } else {
            inbound.message().await?
        };
        match m.and_then(|m| m.msg) {
            // It holds no work: it heartbeats at the idle interval, as an agent does.
            Some(pb::controller_message::Msg::Welcome(w)) => {
                let ms = |d: &Option<baton_common::proto::Duration>| {
                    d.as_ref().map_or(0, baton_common::proto::duration_millis)
                };
                every = Duration::from_millis(
                    ms(&w.idle_heartbeat_interval).max(ms(&w.heartbeat_interval)) as u64
                )
            }
            Some(pb::controller_message::Msg::Assign(_)) if !heartbeats => return Ok(Instant::now()),
            Some(_) => {}
            None => bail!("stream ended"),
        }
    }
}

async fn b5(o: &Options) -> anyhow::Result<Row> {
    let cluster =
        Cluster::start(o.backend, o.postgres_url.as_deref(), &[], Duration::from_secs(1), o.pipeline).await?;
    let mut tasks = Vec::new();
    let n = o.b5_agents;
    for i in 0..n {
        tasks.push(tokio::spawn(fake_agent(cluster.url.clone(), format!("sim-{i}"), true)));
    }
    let mut c = cluster.client().await?;
    for _ in 0..3000 {
        let up = c.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents.len();
        if up >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu0 = cluster.cpu();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.b5_seconds)).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cluster.cpu();
    let agents = c.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents;
    let connected =
        agents.iter().filter(|a| a.state == baton_common::state::AgentState::Connected.to_pb()).count();
    for t in tasks {
        t.abort();
    }
    let used = cpu1.0 - cpu0.0;
    let (ctl_rss, _) = cluster.peak_rss();
    Ok(Row {
        name: format!("B5 {n} idle agents"),
        ctl_cpu: used,
        ctl_rss,
        note: format!(
            "controller CPU {:.2}% of one core over {secs:.0}s; {connected} agents connected, heartbeat 1s",
            used / secs * 100.0
        ),
        ..Default::default()
    })
}

async fn b6(o: &Options) -> anyhow::Result<Row> {
    let mut cluster =
        Cluster::start(o.backend, o.postgres_url.as_deref(), &[], Duration::from_secs(1), o.pipeline).await?;
    let mut c = cluster.client().await?;
    let shape = Shape::Independent(10_000);
    c.submit_run(pb::SubmitRunRequest {
        spec: spec("b6", shape, "noop"),
        source: "bench".into(),
        params: Default::default(),
        request_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    })
    .await?;
    let t0 = cluster.restart_controller()?;
    // An agent that keeps trying to connect, and notes its first assignment.
    let url = cluster.url.clone();
    let first = tokio::spawn(async move {
        loop {
            if let Ok(at) = fake_agent(url.clone(), "waiting".into(), false).await {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let at = tokio::time::timeout(Duration::from_secs(120), first)
        .await
        .context("no dispatch after restart")??;
    let took = at.duration_since(t0).as_secs_f64();
    let (ctl_rss, _) = cluster.peak_rss();
    Ok(Row {
        name: "B6 restart with 10000 open steps".into(),
        steps: shape.steps(),
        makespan: Some(took),
        ctl_rss,
        note: "time from kill -9 and restart to the first dispatch".into(),
        ..Default::default()
    })
}

async fn idle(o: &Options) -> anyhow::Result<Row> {
    let cluster =
        Cluster::start(o.backend, o.postgres_url.as_deref(), &[1], Duration::from_secs(1), o.pipeline)
            .await?;
    let mut c = cluster.client().await?;
    // Warm up connections and caches.
    run_to_end(&mut c, spec("idle", Shape::Independent(1), "noop")).await?;
    let before = cluster.metrics().await?;
    let mut total = Duration::ZERO;
    let n = 200;
    for _ in 0..n {
        total += run_to_end(&mut c, spec("idle", Shape::Independent(1), "noop")).await?.0;
    }
    let after = cluster.metrics().await?;
    Ok(Row {
        name: "idle: 200 one-step runs, one after another".into(),
        steps: n,
        p50_us: quantile(&before, &after, LATENCY, 0.5),
        p99_us: quantile(&before, &after, LATENCY, 0.99),
        note: format!("mean submit-to-end {:.2}ms", total.as_secs_f64() * 1000.0 / n as f64),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(pairs: &[(&str, f64)]) -> HashMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn quantiles_interpolate_within_buckets_of_the_difference() {
        let b = |le: &str| format!("{LATENCY}_bucket{{le=\"{le}\"}}");
        let (b1, b2, inf) = (b("0.001"), b("0.002"), b("+Inf"));
        // Before: 10 observations, all under 1 ms; they must not count.
        let before = scrape(&[(&b1, 10.0), (&b2, 10.0), (&inf, 10.0)]);
        let after = scrape(&[(&b1, 60.0), (&b2, 110.0), (&inf, 110.0)]);
        let p50 = quantile(&before, &after, LATENCY, 0.5).unwrap();
        assert!((p50 - 1000.0).abs() < 1e-6, "{p50}");
        let p99 = quantile(&before, &after, LATENCY, 0.99).unwrap();
        assert!((p99 - 1980.0).abs() < 1e-6, "{p99}");
        assert_eq!(quantile(&after, &after, LATENCY, 0.5), None, "no observations, no quantile");
    }

    #[test]
    fn rows_print_ratios_and_dashes() {
        let r = Row {
            name: "B".into(),
            steps: 100,
            makespan: Some(0.5),
            throughput: true,
            make: Some(0.25),
            cli: Some(0.3),
            dask: Some(1.0),
            ..Default::default()
        };
        let line = table_line(&r);
        assert!(line.starts_with("| B | 100 | 0.500s | 200 | 2.50ms |"), "{line}");
        assert!(line.contains("| 0.250s | 2.00 | 0.300s | 1.20 | 1.000s | 0.50 |"), "{line}");
        let r = Row { name: "B6".into(), steps: 10, makespan: Some(0.1), ..Default::default() };
        assert!(table_line(&r).starts_with("| B6 | 10 | 0.100s | - | - |"), "{}", table_line(&r));
    }
}
