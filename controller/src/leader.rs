//! Leadership: with Postgres, several controllers share one database and one of them
//! leads — runs the engine and accepts agents — under a lease row with an epoch. The
//! others stand by, answer with the leader's address, and take over when the lease runs
//! out. Every commit of the engine is fenced by its epoch (see `Store::commit`), so a
//! deposed leader (paused, cut off) writes nothing once another has taken over.
//!
//! With SQLite there is one controller; it leads from the start, unfenced.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{error, info, warn};

use crate::api::ApiError;
use crate::engine::{self, EngineConfig, EngineHandle};
use crate::store::{Fence, Store, StoreError};

/// What this controller is right now.
#[derive(Clone)]
pub enum Role {
    /// Leading: its engine, and a token cancelled when the term ends.
    Leader { engine: EngineHandle, term: CancellationToken },
    /// Standing by; `leader` is the leader's advertised address when one is alive.
    Standby { leader: Option<String> },
}

/// The current role, for the API; cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    rx: watch::Receiver<Role>,
}

pub use baton_common::LEADER_HEADER;

impl Leadership {
    pub fn channel() -> (watch::Sender<Role>, Leadership) {
        let (tx, rx) = watch::channel(Role::Standby { leader: None });
        (tx, Leadership { rx })
    }

    pub fn role(&self) -> Role {
        self.rx.borrow().clone()
    }

    /// Waits for the role to change; false once it never will (the controller stops).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// The engine, when this controller leads; else UNAVAILABLE naming the leader.
    pub fn engine(&self) -> Result<(EngineHandle, CancellationToken), Status> {
        match self.role() {
            Role::Leader { engine, term } => Ok((engine, term)),
            Role::Standby { leader } => Err(not_leader(leader.as_deref())),
        }
    }
}

/// UNAVAILABLE for a standby, with the leader's address in the message and metadata.
pub fn not_leader(leader: Option<&str>) -> Status {
    let mut s: Status = match leader {
        Some(addr) => {
            ApiError::unavailable(format!("this controller is a standby; the leader is {addr}")).into()
        }
        None => ApiError::unavailable("this controller is a standby and no leader is known yet").into(),
    };
    if let Some(addr) = leader
        && let Ok(v) = addr.parse()
    {
        s.metadata_mut().insert(LEADER_HEADER, v);
    }
    s
}

/// What an engine is started with at each term.
pub struct EngineParts {
    pub store: Store,
    pub cfg: EngineConfig,
    pub logs: crate::logs::Logs,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// How this controller takes part in leadership.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// This controller's id (a fresh one per process).
    pub holder: String,
    /// The API address clients and agents should use for it.
    pub address: String,
    /// A leader not renewing for this long is replaced.
    pub lease: Duration,
}

/// With SQLite: the one controller leads from the start, unfenced. Starts its engine
/// (before the API opens, so no call finds it without one) and returns the engine task;
/// the engine failing is fatal.
pub async fn lead_alone(
    store: Store,
    cfg: EngineConfig,
    logs: crate::logs::Logs,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    role: &watch::Sender<Role>,
    stop: &CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<(), StoreError>>, StoreError> {
    let term = stop.child_token();
    let (engine, task) = engine::start(store, cfg, logs, metrics, None, term.clone()).await?;
    let _ = role.send(Role::Leader { engine, term });
    Ok(task)
}

/// With Postgres: runs leadership terms until `stop` — acquire the lead, run the
/// engine, renew the lease, step down when it is lost or the engine stops; stand by in
/// between. Database trouble only ever makes this controller stand by.
pub async fn run_terms(
    parts: EngineParts,
    lease: LeaseConfig,
    role: watch::Sender<Role>,
    stop: CancellationToken,
) -> Result<(), StoreError> {
    let EngineParts { store, cfg, logs, metrics } = parts;
    let lease_ms = lease.lease.as_millis() as i64;
    let every = (lease.lease / 3).max(Duration::from_millis(50));
    loop {
        // Stand by until the lead is free.
        let epoch = loop {
            match store.acquire_lead(&lease.holder, &lease.address, lease_ms).await {
                Ok(Some(epoch)) => break epoch,
                Ok(None) => {
                    let leader = store.leader().await.ok().filter(|l| l.alive).map(|l| l.address);
                    role.send_if_modified(|r| match r {
                        Role::Standby { leader: known } if *known == leader => false,
                        _ => {
                            *r = Role::Standby { leader: leader.clone() };
                            true
                        }
                    });
                }
                Err(e) => warn!(error = %e, "cannot reach the database to check the lead"),
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(every) => {}
            }
        };
        let fence = Fence { holder: lease.holder.clone(), epoch };
        info!(epoch, address = %lease.address, "this controller leads");
        let term = stop.child_token();
        let started = engine::start(
            store.clone(),
            cfg.clone(),
            logs.clone(),
            metrics.clone(),
            Some(fence.clone()),
            term.clone(),
        )
        .await;
        let (engine, mut task) = match started {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot start the engine; giving up the lead");
                let _ = store.release_lead(&fence).await;
                continue;
            }
        };
        let _ = role.send(Role::Leader { engine, term: term.clone() });
        // Renew until the lease is lost, the engine stops, or we are told to stop.
        let mut last_renewal = tokio::time::Instant::now();
        let (why, ended) = loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    term.cancel();
                    let _ = (&mut task).await;
                    let _ = store.release_lead(&fence).await;
                    let _ = role.send(Role::Standby { leader: None });
                    return Ok(());
                }
                r = &mut task => {
                    let why = match r {
                        Ok(Ok(())) => "the engine stopped".to_string(),
                        Ok(Err(e)) => format!("the engine stopped: {e}"),
                        Err(e) => format!("the engine failed: {e}"),
                    };
                    break (why, true);
                }
                _ = tokio::time::sleep(every) => {
                    match store.renew_lead(&fence, lease_ms).await {
                        Ok(true) => last_renewal = tokio::time::Instant::now(),
                        Ok(false) => break ("the lease was lost to another controller".to_string(), false),
                        Err(e) if last_renewal.elapsed() >= lease.lease => {
                            break (format!("the lease could not be renewed in time: {e}"), false);
                        }
                        Err(e) => warn!(error = %e, "lease renewal failed; retrying"),
                    }
                }
            }
        };
        warn!(epoch, %why, "stepping down");
        let _ = role.send(Role::Standby { leader: None });
        term.cancel();
        // A task that ended already must not be awaited again.
        if !ended {
            let _ = task.await;
        }
    }
}
