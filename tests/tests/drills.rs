//! Drills: a real controller process and real agent processes, each agent in a network
//! namespace of its own behind a veth link, put through what real networks and
//! machines do (partitions cut with iptables, agents killed and restarted). Every tool
//! appends to its own log as it runs; a checker reads those logs and the runs' events
//! and counts accepted successes per step, overlapping executions of one step, lost
//! steps and gaps in event sequences, and prints the counts.
//!
//! Needs root, `ip` and `iptables`; skipped (saying so) otherwise, or a failure when
//! `BATON_REQUIRE_DRILLS=1` (as in CI). `BATON_DRILL_BIN_DIR` runs the drills against
//! the binaries in another directory (to compare two builds).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use baton_tests::*;

/// Timers of the drills' controller: an agent stops its tools 2s after its last
/// answered heartbeat and is lost after 3s.
const TIMERS: [&str; 8] =
    ["--heartbeat-interval", "500ms", "--lost-after", "3s", "--failover-grace", "6s", "--kill-grace", "3s"];
const STOP_AFTER: &str = "2s";

/// Whether this machine can run drills; says why not when it cannot.
fn drills_possible() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "iptables"].iter().all(|t| {
        Command::new(t).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
    });
    if root && tools {
        return true;
    }
    let why = if root { "ip and iptables are needed" } else { "they need root" };
    if std::env::var("BATON_REQUIRE_DRILLS").as_deref() == Ok("1") {
        panic!("BATON_REQUIRE_DRILLS=1 but the drills cannot run: {why}");
    }
    eprintln!("SKIPPED (drills): {why}");
    false
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Claims a /30 subnet of 10.214.0.0/16 for one link, across processes (nextest runs
/// each drill in a process of its own, at the same time as others): a file per subnet
/// holds the claimant's pid, and a claim whose process is gone is taken over.
struct Claim {
    net: u32,
    file: PathBuf,
}

impl Claim {
    fn take() -> Claim {
        let dir = std::env::temp_dir().join("baton-drill-nets");
        std::fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        for k in 0..250 {
            let net = (me + k) % 250;
            let file = dir.join(net.to_string());
            let claimed = |f: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(f)
                    .and_then(|mut h| std::io::Write::write_all(&mut h, me.to_string().as_bytes()))
                    .is_ok()
            };
            if claimed(&file) {
                return Claim { net, file };
            }
            // A claim of a process that is gone (killed before it could remove it).
            let holder = std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse::<u32>().ok());
            if holder.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
                && std::fs::remove_file(&file).is_ok()
                && claimed(&file)
            {
                return Claim { net, file };
            }
        }
        panic!("no free subnet for a drill's link in 10.214.0.0/16");
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Which way a cut drops packets.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Both,
    /// Agent to controller dropped; the controller's messages still arrive.
    FromAgent,
    /// Controller to agent dropped; the agent's messages still arrive.
    ToAgent,
}

/// One namespace per agent, linked to the host (where the controller listens) by a veth
/// pair; removed with every iptables rule it added when dropped.
struct Net {
    links: Vec<Link>,
    rules: std::sync::Mutex<Vec<Vec<String>>>,
}

struct Link {
    ns: String,
    host_if: String,
    host_ip: String,
    /// Released once the link is deleted (see `Drop for Net`).
    claim: Option<Claim>,
}

impl Net {
    fn new(agents: usize) -> Net {
        let mut links = Vec::new();
        for _ in 0..agents {
            // Names and addresses follow the claimed subnet: unique while it is held.
            let claim = Claim::take();
            let net = claim.net;
            let ns = format!("bdn{net}");
            let host_if = format!("bdh{net}");
            let ns_if = format!("bda{net}");
            let (host_ip, ns_ip) = (format!("10.214.{net}.1"), format!("10.214.{net}.2"));
            let _ = Command::new("ip").args(["link", "del", &host_if]).output();
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run("ip", &["netns", "add", &ns]);
            run("ip", &["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
            run("ip", &["link", "set", &ns_if, "netns", &ns]);
            run("ip", &["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
            run("ip", &["link", "set", &host_if, "up"]);
            run("ip", &["-n", &ns, "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
            run("ip", &["-n", &ns, "link", "set", &ns_if, "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            links.push(Link { ns, host_if, host_ip, claim: Some(claim) });
        }
        Net { links, rules: std::sync::Mutex::new(Vec::new()) }
    }

    fn cut(&self, agent: usize, how: Cut) {
        let l = &self.links[agent];
        let mut rules = Vec::new();
        if matches!(how, Cut::Both | Cut::FromAgent) {
            rules.push(vec!["INPUT".to_string(), "-i".into(), l.host_if.clone(), "-j".into(), "DROP".into()]);
        }
        if matches!(how, Cut::Both | Cut::ToAgent) {
            rules.push(vec![
                "OUTPUT".to_string(),
                "-o".into(),
                l.host_if.clone(),
                "-j".into(),
                "DROP".into(),
            ]);
        }
        for r in rules {
            let mut args = vec!["-w", "-I"];
            args.extend(r.iter().map(String::as_str));
            run("iptables", &args);
            self.rules.lock().unwrap().push(r);
        }
    }

    fn heal(&self) {
        for r in std::mem::take(&mut *self.rules.lock().unwrap()) {
            let mut args = vec!["-w", "-D"];
            args.extend(r.iter().map(String::as_str));
            let _ = Command::new("iptables").args(&args).output();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.heal();
        for l in &mut self.links {
            let _ = Command::new("ip").args(["link", "del", &l.host_if]).output();
            let _ = Command::new("ip").args(["netns", "del", &l.ns]).output();
            // The subnet is free for others only once its link is gone.
            drop(l.claim.take());
        }
    }
}

fn bin(name: &str) -> PathBuf {
    match std::env::var_os("BATON_DRILL_BIN_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => binary(name),
    }
}

/// A controller on all addresses (so every namespace reaches it), with authentication,
/// an admin token and a join token for the agents.
struct Drill {
    dir: tempfile::TempDir,
    net: Net,
    port: u16,
    db: String,
    admin: String,
    join: String,
    controller: Option<Process>,
    agents: BTreeMap<usize, Process>,
}

impl Drill {
    async fn start(agents: usize) -> Drill {
        Drill::start_on(agents, None).await
    }

    /// With the database in `db_dir` (else in the drill's directory).
    async fn start_on(agents: usize, db_dir: Option<&Path>) -> Drill {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", db_dir.unwrap_or(dir.path()).join("baton.db").display());
        // The binary under test makes its own database (BATON_DRILL_BIN_DIR may be
        // another build).
        let out = Command::new(bin("baton-controller"))
            .args(["bootstrap", "--db", &db])
            .output()
            .expect("bootstrap");
        assert!(out.status.success(), "bootstrap: {}", String::from_utf8_lossy(&out.stderr));
        let admin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let port = free_addr().port();
        let net = Net::new(agents);
        let mut d = Drill {
            dir,
            net,
            port,
            db,
            admin,
            join: String::new(),
            controller: None,
            agents: BTreeMap::new(),
        };
        d.start_controller().await;
        let mut a = baton_common::pb::admin_service_client::AdminServiceClient::new(
            channel_as(&d.local_url(), &Default::default(), Some(&d.admin)).await,
        );
        d.join = a
            .create_join_token(proto::CreateJoinTokenRequest {
                ttl: None,
                uses: 100,
                labels: Default::default(),
            })
            .await
            .expect("join token")
            .into_inner()
            .token;
        std::fs::write(d.dir.path().join("ticker.py"), TICKER).unwrap();
        std::fs::create_dir_all(d.dir.path().join("executions")).unwrap();
        d
    }

    fn local_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn start_controller(&mut self) {
        let mut args: Vec<String> =
            ["--listen", &format!("0.0.0.0:{}", self.port), "--insecure", "--db", &self.db]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(TIMERS.iter().map(|s| s.to_string()));
        let n = self.dir.path().read_dir().map(|d| d.count()).unwrap_or(0);
        let log = self.dir.path().join(format!("controller-{n}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin("baton-controller"))
            .args(&args)
            .env("BATON_STOP_AFTER", STOP_AFTER)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("controller");
        self.controller = Some(Process { child, log });
        let c = self.client().await;
        eventually(Duration::from_secs(30), "the controller to answer", || {
            let mut c = c.clone();
            async move { c.list_agents(proto::ListAgentsRequest {}).await.ok().map(|_| ()) }
        })
        .await;
    }

    /// Agent `i` (in namespace `i`), with one slot per `slots`.
    fn start_agent(&mut self, i: usize, slots: u32) {
        let url = format!("http://{}:{}", self.net.links[i].host_ip, self.port);
        self.start_agent_at(i, slots, &url);
    }

    /// Agent `i`, talking to the controller at `url`.
    fn start_agent_at(&mut self, i: usize, slots: u32, url: &str) {
        let l = &self.net.links[i];
        let work = self.dir.path().join(format!("agent-{i}"));
        let log = self.dir.path().join(format!("agent-{i}-{}.log", self.agents.len()));
        let out = std::fs::File::create(&log).unwrap();
        // `ip netns exec` gives the agent a fresh /sys without the cgroup tree: mount it
        // again there, so that the agent contains its attempts in cgroups as on a host.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &l.ns,
                "sh",
                "-c",
                "mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; exec \"$0\" \"$@\"",
            ])
            .arg(bin("baton-agent"))
            .args(["--controller", url])
            .args(["--name", &format!("agent-{i}"), "--slots", &slots.to_string()])
            .arg("--work-dir")
            .arg(&work)
            .args(["--join-token", &self.join])
            .env("BATON_STOP_AFTER", STOP_AFTER)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("agent");
        self.agents.insert(i, Process { child, log });
    }

    async fn client(&self) -> Client {
        connect_as(&self.local_url(), &Default::default(), Some(&self.admin)).await
    }

    async fn wait_agents(&self, n: usize) {
        let c = self.client().await;
        eventually(Duration::from_secs(30), "agents to connect", || {
            let mut c = c.clone();
            async move {
                let agents = c.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
                (agents.iter().filter(|a| a.state_name() == "connected").count() >= n).then_some(())
            }
        })
        .await;
    }

    /// A run of `steps` ticking steps of `secs` each, in parallel.
    async fn submit(&self, steps: usize, secs: f64) -> String {
        let mut spec = String::from("name: drill\nsteps:\n");
        for i in 0..steps {
            spec.push_str(&format!(
                "  - {{id: s{i}, tool: shell, with: {{run: 'exec python3 {} s{i} {secs} {}'}}}}\n",
                self.dir.path().join("ticker.py").display(),
                self.dir.path().join("executions").display()
            ));
        }
        self.submit_spec(spec).await
    }

    /// A run of `spec`; its id.
    async fn submit_spec(&self, spec: String) -> String {
        let mut c = self.client().await;
        c.submit_run(proto::SubmitRunRequest { spec, ..Default::default() })
            .await
            .expect("submit")
            .into_inner()
            .run_id
    }

    /// What the tools' own logs and the runs' events say.
    async fn check(&self, runs: &[String]) -> Report {
        let mut c = self.client().await;
        let mut r = Report::default();
        for id in runs {
            let run = get_run(&mut c, id).await;
            r.final_runs += usize::from(matches!(run.state_name(), "succeeded" | "failed" | "canceled"));
            for s in &run.steps {
                let ok = s.attempts.iter().filter(|a| a.state_name() == "succeeded").count();
                r.steps += 1;
                r.accepted_successes_over_one += ok.saturating_sub(1);
                r.lost_steps += usize::from(ok == 0);
            }
            let events = all_events(&mut c, id).await;
            r.event_gaps += events.iter().enumerate().filter(|(i, e)| e.seq != *i as i64 + 1).count();
        }
        let executions = executions(&self.dir.path().join("executions"));
        for (step, runs) in &executions {
            if std::env::var_os("BATON_DRILL_SPANS").is_some() {
                eprintln!(
                    "step {step}: executions (ms) {:?}",
                    runs.iter()
                        .map(|(a, b)| (a / 1_000_000 % 100_000, b / 1_000_000 % 100_000))
                        .collect::<Vec<_>>()
                );
            }
            r.executions += runs.len();
            for (i, a) in runs.iter().enumerate() {
                for b in &runs[i + 1..] {
                    let overlap = a.1.min(b.1) - a.0.max(b.0);
                    if overlap > 0 {
                        r.overlaps += 1;
                        r.overlap_ms = r.overlap_ms.max(overlap / 1_000_000);
                        eprintln!("step {step}: executions overlap by {} ms", overlap / 1_000_000);
                    }
                }
            }
        }
        eprintln!("drill: {r:?}");
        r
    }
}

impl Drop for Drill {
    fn drop(&mut self) {
        self.agents.clear();
        self.controller = None;
        if std::thread::panicking() {
            for f in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
                if f.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    eprintln!("--- {} (last lines)", f.path().display());
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// The checker's counts.
#[derive(Debug, Default)]
struct Report {
    steps: usize,
    executions: usize,
    final_runs: usize,
    accepted_successes_over_one: usize,
    lost_steps: usize,
    overlaps: usize,
    /// Longest overlap of two executions of one step.
    overlap_ms: i64,
    event_gaps: usize,
}

impl Report {
    fn assert_clean(&self, runs: usize) {
        assert_eq!(self.final_runs, runs, "every run ends: {self:?}");
        assert_eq!(self.accepted_successes_over_one, 0, "one accepted success per step: {self:?}");
        assert_eq!(self.lost_steps, 0, "no step lost: {self:?}");
        assert_eq!(self.overlaps, 0, "no step ran twice at once: {self:?}");
        assert_eq!(self.event_gaps, 0, "event sequences are dense: {self:?}");
    }
}

/// Writes `start`, a `tick` every 20ms and `end` (nanosecond wall clock) into
/// EXECUTIONS/STEP.log for as long as it runs.
const TICKER: &str = r#"import os, sys, time
step, secs, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
who = os.environ.get("BATON_ATTEMPT_ID", "?")
log = open(os.path.join(out, step + ".log"), "a", buffering=1)
end = time.time() + secs
log.write(f"start {who} {time.time_ns()}\n")
while time.time() < end:
    log.write(f"tick {who} {time.time_ns()}\n")
    time.sleep(0.02)
log.write(f"end {who} {time.time_ns()}\n")
"#;

/// Per step, each execution's first and last moment (ns).
fn executions(dir: &Path) -> BTreeMap<String, Vec<(i64, i64)>> {
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let step = f.path().file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let mut spans: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for line in std::fs::read_to_string(f.path()).unwrap_or_default().lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [_, who, at] = parts[..] else { continue };
            let Ok(at) = at.parse::<i64>() else { continue };
            let span = spans.entry(who.to_string()).or_insert((at, at));
            span.0 = span.0.min(at);
            span.1 = span.1.max(at);
        }
        out.insert(step, spans.into_values().collect());
    }
    out
}

async fn wait_started(c: &mut Client, run: &str, n: usize) {
    let mut started = std::collections::HashSet::new();
    wait_event(c, run, Duration::from_secs(30), |e| {
        if e.kind == "attempt_started" {
            started.insert(e.step_id.clone());
        }
        started.len() >= n
    })
    .await;
}

/// Two 8-second steps running on agent 0, with agent 1 connected to take them over.
async fn two_steps_on_agent_0() -> (Drill, Client, String) {
    let mut d = Drill::start(2).await;
    d.start_agent(0, 2);
    d.wait_agents(1).await;
    let mut c = d.client().await;
    let run = d.submit(2, 8.0).await;
    wait_started(&mut c, &run, 2).await;
    d.start_agent(1, 2);
    d.wait_agents(2).await;
    (d, c, run)
}

/// Until both steps of `run` have started again on agent 1.
async fn wait_moved_to_agent_1(c: &mut Client, run: &str) {
    let mut moved = std::collections::HashSet::new();
    wait_event(c, run, Duration::from_secs(30), |e| {
        if e.kind == "attempt_started" && e.message.contains("agent-1") {
            moved.insert(e.step_id.clone());
        }
        moved.len() == 2
    })
    .await;
}

async fn partition(how: Cut) {
    if !drills_possible() {
        return;
    }
    let (d, mut c, run) = two_steps_on_agent_0().await;
    d.net.cut(0, how);
    // The steps run again on agent 1 once agent 0 is lost.
    wait_moved_to_agent_1(&mut c, &run).await;
    d.net.heal();
    let done = wait_run(&mut c, &run, Duration::from_secs(60)).await;
    assert_eq!(done.state_name(), "succeeded");
    let report = d.check(std::slice::from_ref(&run)).await;
    report.assert_clean(1);
    assert!(report.executions >= 4, "both steps ran on both agents: {report:?}");
    for s in &done.steps {
        assert_eq!(s.attempts[0].state_name(), "lost", "{s:?}");
        assert_eq!(s.attempts[0].agent_name, "agent-0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_agent_stops_its_tools_before_its_steps_run_elsewhere() {
    partition(Cut::Both).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_messages_are_dropped_stops_its_tools_before_its_steps_run_elsewhere() {
    partition(Cut::FromAgent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_hears_nothing_stops_its_tools_before_its_steps_run_elsewhere() {
    partition(Cut::ToAgent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_and_restarted_ends_what_it_left_running_before_taking_work() {
    if !drills_possible() {
        return;
    }
    let mut d = Drill::start(1).await;
    d.start_agent(0, 2);
    d.wait_agents(1).await;
    let mut c = d.client().await;
    // Each step also leaves a daemon of its own session (out of its process group).
    let pids = d.dir.path().join("daemons");
    std::fs::create_dir_all(&pids).unwrap();
    let mut spec = String::from("name: crash\nsteps:\n");
    for i in 0..2 {
        spec.push_str(&format!(
            "  - {{id: s{i}, tool: shell, with: {{run: 'setsid sleep 300 & echo $! > {}/s{i}-$BATON_ATTEMPT; exec python3 {} s{i} 6 {}'}}}}\n",
            pids.display(),
            d.dir.path().join("ticker.py").display(),
            d.dir.path().join("executions").display()
        ));
    }
    let run = d.submit_spec(spec).await;
    wait_started(&mut c, &run, 2).await;
    let first: Vec<i32> = eventually(Duration::from_secs(10), "the daemons' pids", || {
        let pids = pids.clone();
        async move {
            let read = |s: &str| std::fs::read_to_string(pids.join(s)).ok()?.trim().parse().ok();
            Some(vec![read("s0-1")?, read("s1-1")?])
        }
    })
    .await;
    let logs = d.dir.path().join("executions");
    eventually(Duration::from_secs(10), "both tools to run", || {
        let n = executions(&logs).values().filter(|e| !e.is_empty()).count();
        async move { (n == 2).then_some(()) }
    })
    .await;
    d.agents.get_mut(&0).unwrap().kill9();
    d.start_agent(0, 2);
    let done = wait_run(&mut c, &run, Duration::from_secs(60)).await;
    assert_eq!(done.state_name(), "succeeded");
    let report = d.check(std::slice::from_ref(&run)).await;
    report.assert_clean(1);
    assert_eq!(report.executions, 4, "each step ran before the kill and after: {report:?}");
    for s in &done.steps {
        assert_eq!(s.attempts[0].state_name(), "lost", "{s:?}");
        assert_eq!(s.attempts.last().unwrap().state_name(), "succeeded", "{s:?}");
    }
    let log = d.agents[&0].logs();
    assert!(log.contains("still recorded as running; ended it"), "{log}");
    assert!(log.contains("each attempt runs in a cgroup of its own"), "{log}");
    // Not even a daemon outlives its attempt's agent.
    for pid in first {
        assert!(!process_alive(pid), "daemon {pid} of a killed agent's attempt survived");
    }
}

/// A small tmpfs, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        run("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.path().to_str().unwrap()]);
        SmallDisk(dir)
    }

    /// Writes a file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.path().join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&block[..1]);
    }

    fn free(&self) {
        std::fs::remove_file(self.0.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_the_controller_which_resumes_by_itself_and_loses_no_output() {
    if !drills_possible() {
        return;
    }
    // Room for the database and its write-ahead log (which SQLite lets grow to about
    // 4 MB between checkpoints) once the filler is gone.
    let disk = SmallDisk::new("16m");
    let mut d = Drill::start_on(1, Some(disk.0.path())).await;
    d.start_agent(0, 2);
    d.wait_agents(1).await;
    let mut c = d.client().await;
    let lines = 300;
    let mut spec = String::from("name: full\nsteps:\n");
    for i in 0..6 {
        spec.push_str(&format!(
            "  - {{id: s{i}, tool: shell, with: {{run: 'for n in $(seq 1 {lines}); do echo \"s{i} line $n of output, padded to a good length\"; sleep 0.005; done'}}}}\n"
        ));
    }
    let run = d.submit_spec(spec).await;
    wait_started(&mut c, &run, 1).await;
    disk.fill();
    // The controller stays up, refuses what needs a commit and says why.
    let noop = || proto::SubmitRunRequest {
        spec: "name: n\nsteps:\n  - {id: a, tool: noop}\n".into(),
        ..Default::default()
    };
    // A submit taken just before the first commit failed waits (its run is made
    // durable once the disk has room): each probe gets a moment, then the next goes.
    let refused = eventually(Duration::from_secs(60), "submits to be refused", || {
        let mut c = c.clone();
        async move {
            match tokio::time::timeout(Duration::from_secs(2), c.submit_run(noop())).await {
                Ok(Err(s)) if s.code() == tonic::Code::Unavailable => Some(s.message().to_string()),
                _ => None,
            }
        }
    })
    .await;
    assert!(refused.contains("the database refuses writes"), "{refused}");
    let ctl = d.controller.as_mut().unwrap();
    assert!(ctl.child.try_wait().unwrap().is_none(), "the controller is still running");
    // Reads still work meanwhile.
    get_run(&mut c, &run).await;
    disk.free();
    let done = wait_run(&mut c, &run, Duration::from_secs(120)).await;
    assert_eq!(done.state_name(), "succeeded");
    for s in &done.steps {
        let text = log_text(&logs(&mut c, &run, &s.id, 0, false).await);
        let got = text.lines().filter(|l| l.starts_with(&format!("{} line", s.id))).count();
        assert!(
            got == lines || text.contains("bytes of output lost"),
            "step {}: {got} of {lines} lines and no marker:\n{text}",
            s.id
        );
    }
    let report = d.check(std::slice::from_ref(&run)).await;
    assert_eq!(
        (report.accepted_successes_over_one, report.lost_steps, report.event_gaps),
        (0, 0, 0),
        "{report:?}"
    );
    // And it takes new work again by itself.
    let mut c = d.client().await;
    c.submit_run(noop()).await.expect("a submit after the disk has room again");
    let log = d.controller.as_ref().unwrap().logs();
    assert!(log.contains("the database refuses") || log.contains("cannot store attempt output yet"), "{log}");
    assert!(!log.contains("transaction depth"), "no connection is reused inside a failed transaction: {log}");
}

/// A DAG of `layers` × `width` ticking steps, each needing one or two of the layer
/// before, of 0.1–0.5 s each.
fn mixed_dag(d: &Drill, layers: usize, width: usize) -> String {
    let mut spec = String::from("name: mixed\nsteps:\n");
    for l in 0..layers {
        for w in 0..width {
            let id = format!("l{l}w{w}");
            let secs = 0.1 + ((l * 7 + w * 3) % 5) as f64 * 0.1;
            let needs = if l == 0 {
                String::new()
            } else {
                let a = format!("l{}w{}", l - 1, w);
                let b = format!("l{}w{}", l - 1, (w + 3) % width);
                format!(", needs: [{a}, {b}]")
            };
            spec.push_str(&format!(
                "  - {{id: {id}, tool: shell{needs}, with: {{run: 'exec python3 {} {id} {secs} {}'}}}}\n",
                d.dir.path().join("ticker.py").display(),
                d.dir.path().join("executions").display()
            ));
        }
    }
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_controller_kills_loses_nothing_and_runs_nothing_twice_at_once() {
    if !drills_possible() {
        return;
    }
    let mut d = Drill::start(2).await;
    d.start_agent(0, 4);
    d.start_agent(1, 4);
    d.wait_agents(2).await;
    let spec = mixed_dag(&d, 20, 10);
    let run = d.submit_spec(spec).await;
    let mut kills = 0;
    let mut progressed = 0;
    while kills < 20 {
        // Let some work happen under this controller (a few events), then kill it.
        let mut c = d.client().await;
        let before = get_run(&mut c, &run).await;
        if matches!(before.state_name(), "succeeded" | "failed" | "canceled") {
            break;
        }
        let seen = before.last_seq;
        eventually(Duration::from_secs(30), "the run to move on", || {
            let mut c = c.clone();
            let run = run.clone();
            async move {
                let r = c
                    .get_run(proto::GetRunRequest { run_id: run, ..Default::default() })
                    .await
                    .ok()?
                    .into_inner()
                    .run?;
                (r.last_seq > seen + 3 || r.state_name() == "succeeded").then_some(())
            }
        })
        .await;
        progressed += 1;
        d.controller.as_mut().unwrap().kill9();
        kills += 1;
        d.start_controller().await;
    }
    let mut c = d.client().await;
    let done = wait_run(&mut c, &run, Duration::from_secs(180)).await;
    eprintln!("drill: {kills} controller kills during the run ({progressed} with progress before them)");
    assert!(kills >= 20, "the run ended after only {kills} kills: make it longer");
    assert_eq!(done.state_name(), "succeeded");
    let report = d.check(std::slice::from_ref(&run)).await;
    report.assert_clean(1);
    assert_eq!(report.steps, 200);
}

/// Forwards connections to `target` with every chunk of data held back 100–300 ms
/// (in order), like a long, jittery link.
async fn slow_link(
    listen: std::net::SocketAddr,
    target: std::net::SocketAddr,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind the slow link");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else { continue };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(delayed(cr, sw));
            tokio::spawn(delayed(sr, cw));
        }
    })
}

async fn delayed(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut last = tokio::time::Instant::now();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = Duration::from_millis(100 + rand_ms(200));
        last = last.max(tokio::time::Instant::now() + delay);
        if tx.send((last, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn rand_ms(max: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(max);
    h.finish() % (max + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lossy_link_delays_work_but_runs_nothing_twice_at_once() {
    if !drills_possible() {
        return;
    }
    let mut d = Drill::start(2).await;
    // Agent 0 talks through a link of 200 ± 100 ms that drops 5 % of its packets.
    let l = &d.net.links[0];
    let slow = free_addr().port();
    let listen: std::net::SocketAddr = format!("{}:{slow}", l.host_ip).parse().unwrap();
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", d.port).parse().unwrap();
    let _link = slow_link(listen, target).await;
    for chain in ["INPUT", "OUTPUT"] {
        let dir = if chain == "INPUT" { "-i" } else { "-o" };
        let rule: Vec<String> = [
            chain,
            dir,
            &l.host_if,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.05",
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut args = vec!["-w", "-I"];
        args.extend(rule.iter().map(String::as_str));
        run("iptables", &args);
        d.net.rules.lock().unwrap().push(rule);
    }
    d.start_agent_at(0, 2, &format!("http://{listen}"));
    d.start_agent(1, 2);
    d.wait_agents(2).await;
    let mut c = d.client().await;
    let spec = mixed_dag(&d, 6, 6);
    let run = d.submit_spec(spec).await;
    let done = wait_run(&mut c, &run, Duration::from_secs(180)).await;
    assert_eq!(done.state_name(), "succeeded");
    let report = d.check(std::slice::from_ref(&run)).await;
    report.assert_clean(1);
    let slow_ran = done.steps.iter().filter(|s| s.attempts.iter().any(|a| a.agent_name == "agent-0")).count();
    eprintln!("drill: {slow_ran} of 36 steps ran on the agent behind the slow, lossy link");
    assert!(slow_ran > 0, "the slow agent took part");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_past_its_lease_has_its_tools_ended_by_its_warden() {
    if !drills_possible() {
        return;
    }
    let (d, mut c, run) = two_steps_on_agent_0().await;
    // The agent freezes; its tools do not.
    d.agents[&0].signal(nix::sys::signal::Signal::SIGSTOP);
    wait_moved_to_agent_1(&mut c, &run).await;
    // Resumed only once the retries have run a while: a tool of the stopped agent that
    // still ran would overlap them.
    let logs = d.dir.path().join("executions");
    eventually(Duration::from_secs(20), "the retries to run a while", || {
        let e = executions(&logs);
        let ok = e.len() == 2
            && e.values().all(|runs| {
                runs.iter().any(|(a, b)| {
                    b - a > 1_000_000_000
                        && runs.len() == 2
                        && *a == runs.iter().map(|r| r.0).max().unwrap_or(0)
                })
            });
        async move { ok.then_some(()) }
    })
    .await;
    d.agents[&0].signal(nix::sys::signal::Signal::SIGCONT);
    let done = wait_run(&mut c, &run, Duration::from_secs(60)).await;
    assert_eq!(done.state_name(), "succeeded");
    let report = d.check(std::slice::from_ref(&run)).await;
    report.assert_clean(1);
    assert!(report.executions >= 4, "{report:?}");
    let log = d.agents[&0].logs();
    assert!(
        log.contains("warden: the agent's lease ran out and its tools still ran; ended 2 attempt(s)"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_cut_off_by_controller_kills_are_retried_and_create_one_run_each() {
    if !drills_possible() {
        return;
    }
    let mut d = Drill::start(1).await;
    let spec = d.dir.path().join("one.yaml");
    std::fs::write(&spec, "name: one\nsteps:\n  - {id: a, tool: noop}\n").unwrap();
    let mut clis = Vec::new();
    for i in 0..16u64 {
        let cli = tokio::process::Command::new(bin("baton"))
            .args([
                "--controller",
                &d.local_url(),
                "--token",
                &d.admin,
                "--reconnect-timeout",
                "60s",
                "submit",
            ])
            .arg(&spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        clis.push(cli);
        // Killed at once or a moment later: before, during or after the submit's commit.
        tokio::time::sleep(Duration::from_millis(i * 7 % 40)).await;
        d.controller.as_mut().unwrap().kill9();
        d.start_controller().await;
    }
    let mut ids = std::collections::BTreeSet::new();
    for cli in clis {
        let out = cli.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        ids.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let mut c = d.client().await;
    let runs = c
        .list_runs(proto::ListRunsRequest { page_size: 100, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .runs;
    eprintln!(
        "drill: 16 submits across 16 controller kills: {} runs, {} distinct ids answered",
        runs.len(),
        ids.len()
    );
    assert_eq!(ids.len(), 16, "each submit answered with its own run");
    assert_eq!(runs.len(), 16, "no submit made two runs: {runs:?}");
}

/// A splitmix64 step: the drill's faults follow a seed, so a failing schedule can be
/// asked for again.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Real controller and agent code under a seeded schedule of faults: while a DAG runs,
/// one agent at a time is cut off (either way or both) for 0.3–6 s, or killed and
/// restarted after 0–4 s; the checker then finds every step accepted once and no step
/// running twice at once. `BATON_DRILL_SEED=N` repeats the schedule of seed N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_partitions_and_agent_kills_lose_nothing_and_run_nothing_twice_at_once() {
    if !drills_possible() {
        return;
    }
    let seed = match std::env::var("BATON_DRILL_SEED") {
        Ok(s) => s.parse().expect("BATON_DRILL_SEED is a number"),
        Err(_) => rand_ms(u64::from(u32::MAX)),
    };
    eprintln!("drill: fault schedule seed {seed} (BATON_DRILL_SEED={seed} repeats it)");
    let mut rng = seed;
    let mut d = Drill::start(2).await;
    d.start_agent(0, 2);
    d.start_agent(1, 2);
    d.wait_agents(2).await;
    let mut c = d.client().await;
    let run = d.submit_spec(mixed_dag(&d, 20, 6)).await;
    let mut faults = Vec::new();
    // Steps lost with their agents too often hold the run as poison; an operator
    // releases it.
    let releases = std::sync::atomic::AtomicUsize::new(0);
    while faults.len() < 12 {
        match get_run(&mut c, &run).await.state_name() {
            "succeeded" | "failed" | "canceled" => break,
            "quarantined" => {
                c.release_run(proto::ReleaseRunRequest { run_id: run.clone(), ..Default::default() })
                    .await
                    .expect("release");
                releases.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        let agent = (next_random(&mut rng) % 2) as usize;
        let hold = Duration::from_millis(300 + next_random(&mut rng) % 5_700);
        let fault = match next_random(&mut rng) % 4 {
            0 => Some(Cut::Both),
            1 => Some(Cut::FromAgent),
            2 => Some(Cut::ToAgent),
            _ => None,
        };
        // A killed agent is down for at most 4 s.
        let hold = if fault.is_none() { hold.min(Duration::from_secs(4)) } else { hold };
        faults.push(format!(
            "agent-{agent} {} for {}ms",
            fault.map_or("killed".into(), |f| format!("{f:?}")),
            hold.as_millis()
        ));
        match fault {
            Some(how) => {
                d.net.cut(agent, how);
                // The fault lasts this long: the schedule, not a wait for an event.
                tokio::time::sleep(hold).await;
                d.net.heal();
            }
            None => {
                d.agents.get_mut(&agent).expect("agent").kill9();
                tokio::time::sleep(hold).await;
                d.start_agent(agent, 2);
            }
        }
        // Calm between faults: both agents connected again.
        d.wait_agents(2).await;
    }
    eprintln!("drill: {} faults: {faults:?}", faults.len());
    let done = eventually(Duration::from_secs(240), "the run to end", || {
        let (mut c, run, releases) = (c.clone(), run.clone(), &releases);
        async move {
            let r = get_run(&mut c, &run).await;
            if r.state_name() == "quarantined" {
                c.release_run(proto::ReleaseRunRequest { run_id: run, ..Default::default() }).await.ok()?;
                releases.fetch_add(1, Ordering::SeqCst);
                return None;
            }
            matches!(r.state_name(), "succeeded" | "failed" | "canceled").then_some(r)
        }
    })
    .await;
    eprintln!("drill: released from quarantine {} times", releases.load(Ordering::SeqCst));
    assert_eq!(done.state_name(), "succeeded", "seed {seed}");
    let report = d.check(std::slice::from_ref(&run)).await;
    report.assert_clean(1);
    assert_eq!(report.steps, 120);
    assert!(faults.len() >= 3, "the run ended after {} faults (seed {seed}): make it longer", faults.len());
}
