//! A controller and agents as real processes on loopback (this binary, re-run in its
//! `controller` / `agent` roles), with their CPU time and peak memory read from /proc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use baton_common::pb;
use baton_common::pb::baton_service_client::BatonServiceClient;
use tonic::transport::Channel;

pub type Client = BatonServiceClient<Channel>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    /// The dashboard's address.
    pub http: SocketAddr,
    pub db: String,
    pub controller: Child,
    pub agents: Vec<Child>,
    heartbeat: Duration,
    pipeline: bool,
    pg_admin: Option<String>,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Cluster {
    /// A controller on a fresh database and agents with these slot counts.
    pub async fn start(
        backend: Backend,
        pg_url: Option<&str>,
        agents: &[u32],
        heartbeat: Duration,
        pipeline: bool,
    ) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("baton-bench-").tempdir()?;
        let (db, pg_admin) = match backend {
            Backend::Sqlite => (format!("sqlite://{}", dir.path().join("bench.db").display()), None),
            Backend::Postgres => {
                let admin =
                    pg_url.context("--postgres-url (or BATON_TEST_POSTGRES_URL) is needed for postgres")?;
                let url = baton_controller::store::testing::create_database(admin).await?;
                (url, Some(admin.to_string()))
            }
        };
        let addr = free_addr()?;
        let metrics = free_addr()?;
        let http = free_addr()?;
        let controller = spawn_controller(addr, [metrics, http], &db, heartbeat, pipeline, dir.path())?;
        let mut c = Cluster {
            url: format!("http://{addr}"),
            addr,
            metrics,
            http,
            db,
            controller,
            agents: Vec::new(),
            dir,
            heartbeat,
            pipeline,
            pg_admin,
        };
        c.wait_leader().await?;
        for (i, slots) in agents.iter().enumerate() {
            c.add_agent(&format!("a{}", i + 1), *slots)?;
        }
        c.wait_agents(agents.len()).await?;
        Ok(c)
    }

    pub fn add_agent(&mut self, name: &str, slots: u32) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .args([
                "agent",
                "--controller",
                &self.url,
                "--name",
                name,
                "--slots",
                &slots.to_string(),
                "--work-dir",
            ])
            .arg(self.dir.path().join(name))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), name)?)
            .spawn()?;
        self.agents.push(child);
        Ok(())
    }

    /// kill -9 the controller and start a new one on the same database and port.
    pub fn restart_controller(&mut self) -> anyhow::Result<std::time::Instant> {
        let _ = self.controller.kill();
        let _ = self.controller.wait();
        let t0 = std::time::Instant::now();
        self.controller = spawn_controller(
            self.addr,
            [self.metrics, self.http],
            &self.db,
            self.heartbeat,
            self.pipeline,
            self.dir.path(),
        )?;
        Ok(t0)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let ep = tonic::transport::Endpoint::from_shared(self.url.clone())?.tcp_nodelay(true);
        for _ in 0..400 {
            if let Ok(ch) = ep.connect().await {
                return Ok(BatonServiceClient::new(ch).max_decoding_message_size(512 * 1024 * 1024));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("the controller at {} never answered", self.url)
    }

    async fn wait_leader(&self) -> anyhow::Result<()> {
        let mut c = self.client().await?;
        for _ in 0..600 {
            if c.get_leader(pb::GetLeaderRequest {}).await.is_ok_and(|r| r.into_inner().is_leader) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the controller never led")
    }

    async fn wait_agents(&self, n: usize) -> anyhow::Result<()> {
        let mut c = self.client().await?;
        for _ in 0..600 {
            let agents = c.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents;
            if agents.iter().filter(|a| a.state == baton_common::state::AgentState::Connected.to_pb()).count()
                >= n
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("agents did not connect")
    }

    /// CPU seconds used so far: (controller, all agents).
    pub fn cpu(&self) -> (f64, f64) {
        let agents = self.agents.iter().map(|a| cpu_seconds(a.id())).sum();
        (cpu_seconds(self.controller.id()), agents)
    }

    /// Peak resident memory in MiB: (controller, the largest agent).
    pub fn peak_rss(&self) -> (f64, f64) {
        let agents = self.agents.iter().map(|a| peak_rss_mib(a.id())).fold(0.0, f64::max);
        (peak_rss_mib(self.controller.id()), agents)
    }

    /// The controller's metrics as `name{labels}` → value.
    pub async fn metrics(&self) -> anyhow::Result<std::collections::HashMap<String, f64>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await?;
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v))))
            .collect())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = self.controller.kill();
        let _ = self.controller.wait();
        if let Some(admin) = self.pg_admin.take() {
            let url = self.db.clone();
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    let _ = rt.block_on(baton_controller::store::testing::drop_database(&admin, &url));
                }
            })
            .join();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
}

/// A controller process; `http`: its metrics port and its dashboard's.
fn spawn_controller(
    addr: SocketAddr,
    [metrics, http]: [SocketAddr; 2],
    db: &str,
    heartbeat: Duration,
    pipeline: bool,
    dir: &Path,
) -> anyhow::Result<Child> {
    let exe: PathBuf = std::env::current_exe()?;
    Ok(Command::new(exe)
        .args([
            "controller",
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
            "--http-listen",
            &http.to_string(),
            "--db",
            db,
        ])
        .args(["--heartbeat-interval", &format!("{}ms", heartbeat.as_millis())])
        .args(if pipeline { &[][..] } else { &["--no-pipeline"][..] })
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(dir, "controller")?)
        .spawn()?)
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime is field 14 overall, i.e. [11].
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports these in USER_HZ, which is 100 on every architecture it supports.
    ticks / 100.0
}

/// VmHWM (peak resident set) in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// A memory figure of `/proc/PID/status` (`VmRSS:`, `VmHWM:`) in MiB.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0.0 };
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
