//! The control plane over NATS: heartbeats, the controller's lease, membership and plan epochs.
//! Never tensors (those go over the gRPC links).
//!
//! For a pipeline named `NAME`:
//! - every process (front, nodes) publishes a heartbeat on `poolpipe.NAME.heartbeat` every
//!   [`HEARTBEAT`]: its node name and the last epoch it applied;
//! - the JetStream key-value bucket `poolpipe_NAME` holds `epoch` (the current [`Epoch`], JSON)
//!   and `members` (the controller's view: per node up or not, and its applied epoch);
//! - the bucket `poolpipe_NAME_lease` (entries live [`LEASE_TTL`]) holds the [`Lease`]s:
//!   `controller`, whose holder owns the plan, and `front`, whose holder runs the cameras. The
//!   process that created one renews it every second; another waits until it expires (or is
//!   let go) and then takes it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::epoch::Epoch;

/// How often a process says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long after its last heartbeat a node is taken to be gone.
pub const NODE_SILENT: Duration = Duration::from_millis(1000);
/// How long a controller's lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// Control-plane failures.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("NATS {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("NATS key-value `{bucket}`: {detail}")]
    Store { bucket: String, detail: String },
    #[error("starting the control plane's runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    /// The last epoch the process applied (`None`: it runs the file's layout and has seen no
    /// epoch).
    pub applied: Option<u64>,
    /// A front's own counters (fronts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front: Option<FrontCounters>,
    /// What a node that the file does not name offers to join with (its GPUs and address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<Offer>,
}

/// A node joining a cluster the file does not name it in: the server it is (its GPUs' class
/// and count, its link) and where the front reaches it. The controller takes it in at the
/// next re-plan ([`super::members::Members`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// `HOST:PORT` its `poolpipe node` serves on, as the front reaches it.
    pub address: String,
    /// Device class of its GPUs (a class the latency profiles have).
    pub class: String,
    /// How many.
    pub gpus: u32,
    /// Its link, Gbit/s each way.
    pub link_gbps: f64,
}

impl Heartbeat {
    /// The heartbeat of `node` now: its applied epoch read from `applied` (`u64::MAX`: none
    /// yet), and a front's counters.
    fn of(
        node: &str,
        applied: &std::sync::atomic::AtomicU64,
        front: Option<FrontCounters>,
        offer: Option<Offer>,
    ) -> Heartbeat {
        let a = applied.load(std::sync::atomic::Ordering::Relaxed);
        Heartbeat {
            node: node.to_string(),
            applied: (a != u64::MAX).then_some(a),
            front,
            offer,
        }
    }
}

/// What a front says of its frames in each heartbeat: if it dies, the frames it had ingested
/// and not yet settled (published, dropped, failed or lost) die with it, and the controller
/// says how many.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FrontCounters {
    /// The front's id in the front lease.
    pub id: String,
    /// Frames its sources ingested.
    pub ingested: u64,
    /// Of those, frames with an outcome.
    pub settled: u64,
    /// Its last heartbeat: it stops (on a signal, or deposed) and drains what it holds.
    #[serde(default)]
    pub stopping: bool,
}

impl FrontCounters {
    /// Frames ingested and not settled.
    pub fn in_flight(&self) -> u64 {
        self.ingested.saturating_sub(self.settled)
    }
}

/// Reads a front's counters for its heartbeats.
pub type CountFront = Arc<dyn Fn() -> FrontCounters + Send + Sync>;

/// A connection to the control plane of one pipeline.
pub struct Bus {
    rt: Arc<tokio::runtime::Runtime>,
    client: async_nats::Client,
    store: kv::Store,
    lease: kv::Store,
    bucket: String,
    subject: String,
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, BusError> {
    let err = |detail: String| BusError::Store {
        bucket: name.to_string(),
        detail,
    };
    if let Ok(s) = js.get_key_value(name).await {
        return Ok(s);
    }
    // The stream a key-value bucket is, made directly: `create_key_value` first asks for the
    // account's info, which nats-server 2.9 (Debian 12's) answers in a form this client does
    // not parse.
    let made = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        })
        .await;
    if let Err(e) = made {
        return Err(err(e.to_string()));
    }
    js.get_key_value(name).await.map_err(|e| err(e.to_string()))
}

impl Bus {
    /// Connects to `url` for pipeline `name`, trying for up to `wait`.
    pub fn connect(url: &str, name: &str, wait: Duration) -> Result<Bus, BusError> {
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("poolpipe-bus")
                .enable_all()
                .build()?,
        );
        let id = sanitize(name);
        let bucket_name = format!("poolpipe_{id}");
        let (client, store, lease) = rt.block_on(async {
            let until = Instant::now() + wait;
            let client = loop {
                match async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(2))
                    .connect(url)
                    .await
                {
                    Ok(c) => break c,
                    Err(e) if Instant::now() >= until => {
                        return Err(BusError::Connect {
                            url: url.to_string(),
                            detail: e.to_string(),
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            let js = jetstream::new(client.clone());
            let store = bucket(&js, &bucket_name, Duration::ZERO).await?;
            let lease = bucket(&js, &format!("{bucket_name}_lease"), LEASE_TTL).await?;
            Ok((client, store, lease))
        })?;
        Ok(Bus {
            rt,
            client,
            store,
            lease,
            bucket: bucket_name,
            subject: format!("poolpipe.{id}.heartbeat"),
        })
    }

    fn store_err(&self, detail: impl ToString) -> BusError {
        BusError::Store {
            bucket: self.bucket.clone(),
            detail: detail.to_string(),
        }
    }

    /// Publishes a heartbeat of `node` every [`HEARTBEAT`] until `stop`, its applied epoch read
    /// from `applied` (`u64::MAX`: none yet); a front's also carry its counters, and those of a
    /// node the file does not name its offer.
    pub fn beat(
        &self,
        node: &str,
        applied: Arc<std::sync::atomic::AtomicU64>,
        stop: Arc<std::sync::atomic::AtomicBool>,
        front: Option<CountFront>,
        offer: Option<Offer>,
    ) {
        let client = self.client.clone();
        let subject = self.subject.clone();
        let node = node.to_string();
        self.rt.spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let hb = Heartbeat::of(&node, &applied, front.as_ref().map(|f| f()), offer.clone());
                if let Ok(body) = serde_json::to_vec(&hb) {
                    let _ = client.publish(subject.clone(), body.into()).await;
                }
            }
        });
    }

    /// A front's last heartbeat, saying it stops (it drains and counts what it holds), sent
    /// now and waited for: the heartbeat task dies with the process's runtime.
    pub fn last_beat(
        &self,
        node: &str,
        applied: &std::sync::atomic::AtomicU64,
        count: &CountFront,
    ) {
        let hb = Heartbeat::of(
            node,
            applied,
            Some(FrontCounters {
                stopping: true,
                ..count()
            }),
            None,
        );
        let Ok(body) = serde_json::to_vec(&hb) else {
            return;
        };
        // Not past a second: a front cut off from NATS stops without it.
        self.rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                if self
                    .client
                    .publish(self.subject.clone(), body.into())
                    .await
                    .is_ok()
                {
                    let _ = self.client.flush().await;
                }
            })
            .await;
        });
    }

    /// Every heartbeat from now on (a bounded queue: when it is full, heartbeats are dropped,
    /// and the next ones say the same).
    pub fn heartbeats(&self) -> Result<flume::Receiver<Heartbeat>, BusError> {
        let (tx, rx) = flume::bounded(1024);
        let mut sub = self
            .rt
            .block_on(self.client.subscribe(self.subject.clone()))
            .map_err(|e| BusError::Connect {
                url: "heartbeats".into(),
                detail: e.to_string(),
            })?;
        self.rt.spawn(async move {
            while let Some(m) = sub.next().await {
                if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&m.payload)
                    && tx.try_send(hb).is_err()
                    && tx.is_disconnected()
                {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Runs a key-value operation, waiting at most `limit` for NATS: a process cut off from
    /// NATS is held up by no call for longer (async-nats itself would wait 10 s).
    fn within<T, E: std::fmt::Display>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, E>>,
    ) -> Result<T, BusError> {
        self.rt
            .block_on(async { tokio::time::timeout(limit, op).await })
            .map_err(|_| self.store_err(format!("no answer within {limit:?}")))?
            .map_err(|e| self.store_err(e))
    }

    /// The current epoch, if one was published.
    pub fn current(&self) -> Result<Option<Epoch>, BusError> {
        let v = self.within(READ_WAIT, self.store.get("epoch"))?;
        v.map(|b: bytes::Bytes| serde_json::from_slice(&b).map_err(|e| self.store_err(e)))
            .transpose()
    }

    /// The current epoch and every later one, as published.
    pub fn epochs(&self) -> Result<flume::Receiver<Epoch>, BusError> {
        let (tx, rx) = flume::bounded(4);
        let mut watch = self
            .rt
            .block_on(self.store.watch_with_history("epoch"))
            .map_err(|e| self.store_err(e))?;
        self.rt.spawn(async move {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { continue };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                match serde_json::from_slice::<Epoch>(&entry.value) {
                    Ok(mut e) => loop {
                        match tx.try_send(e) {
                            Ok(()) => break,
                            Err(flume::TrySendError::Full(back)) => {
                                e = back;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(flume::TrySendError::Disconnected(_)) => return,
                        }
                    },
                    Err(e) => tracing::error!(error = %e, "An epoch that does not parse."),
                }
            }
        });
        Ok(rx)
    }

    /// Publishes `e` as the current epoch.
    pub fn publish(&self, e: &Epoch) -> Result<(), BusError> {
        let body = serde_json::to_vec(e).map_err(|e| self.store_err(e))?;
        self.rt
            .block_on(self.store.put("epoch", body.into()))
            .map_err(|e| self.store_err(e))?;
        Ok(())
    }

    /// Publishes the controller's view of the members.
    pub fn publish_members(&self, members: &serde_json::Value) -> Result<(), BusError> {
        let body = serde_json::to_vec(members).map_err(|e| self.store_err(e))?;
        self.rt
            .block_on(self.store.put("members", body.into()))
            .map_err(|e| self.store_err(e))?;
        Ok(())
    }

    /// Takes `lease` for `me` if no one holds it: its revision, to renew it with.
    pub fn take_lease(&self, lease: Lease, me: &str) -> Option<u64> {
        self.within(
            READ_WAIT,
            self.lease.create(lease.key(), me.to_string().into()),
        )
        .ok()
    }

    /// Renews `lease` held at `revision`: the next revision, or `None` where it was lost (or
    /// NATS did not answer).
    pub fn renew_lease(&self, lease: Lease, me: &str, revision: u64) -> Option<u64> {
        self.within(
            READ_WAIT,
            self.lease
                .update(lease.key(), me.to_string().into(), revision),
        )
        .ok()
    }

    /// Who holds `lease`: `Ok(None)` where no one does (it expired or was let go), an error
    /// where NATS did not answer within `limit`.
    pub fn lease_holder(&self, lease: Lease, limit: Duration) -> Result<Option<String>, BusError> {
        let v = self.within(limit, self.lease.get(lease.key()))?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Lets go of `lease` (a process that stops), so another takes over at once.
    pub fn release_lease(&self, lease: Lease) {
        let _ = self.within(READ_WAIT, self.lease.purge(lease.key()));
    }
}

/// The leases of a pipeline's control plane: one process holds each at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The controller that owns the plan.
    Controller,
    /// The front that runs shard `k` of the cameras (sources, batchers, sinks); shard 0 is
    /// every camera where one front runs them all (`[cluster] fronts`).
    Front(u32),
}

impl Lease {
    fn key(self) -> String {
        match self {
            Lease::Controller => "controller".into(),
            Lease::Front(0) => "front".into(),
            Lease::Front(k) => format!("front-{k}"),
        }
    }
}

/// How long a key-value call (the current epoch, a lease) waits for NATS at most.
pub const READ_WAIT: Duration = Duration::from_secs(2);
/// How long a front told by a node that it lost its lease asks NATS whether it did.
const DEPOSED_CHECK: Duration = Duration::from_secs(1);

/// A lease held and renewed every second on a thread of its own, and let go when dropped.
/// Where another process took it (this one was stalled or cut off from NATS for longer than
/// [`LEASE_TTL`]), `lost` is set and `on_lost` (if any) is raised: the holder must stop doing
/// what the lease is for.
/// Where NATS does not answer, it keeps trying: no one else can take the lease then either,
/// unless this process is cut off from NATS alone; then whoever still sees NATS (a node that
/// refuses its batches) tells it, through [`LeaseKeeper::deposer`].
pub struct LeaseKeeper {
    bus: Arc<Bus>,
    lease: Lease,
    me: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    lost: Arc<std::sync::atomic::AtomicBool>,
    on_lost: Option<Arc<std::sync::atomic::AtomicBool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Keeps `lease`, taken by `me` at `revision`.
    pub fn keep(
        bus: Arc<Bus>,
        lease: Lease,
        me: String,
        revision: u64,
        on_lost: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<LeaseKeeper, BusError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let (s, l, raise) = (stop.clone(), lost.clone(), on_lost.clone());
        let (b, holder) = (bus.clone(), me.clone());
        let thread = std::thread::Builder::new()
            .name(format!("{}-lease", lease.key()))
            .spawn(move || {
                let mut rev = revision;
                let mut last = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    // Told by someone else that the lease is another's: it is not ours to let go.
                    if l.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    if last.elapsed() < Duration::from_secs(1) {
                        continue;
                    }
                    last = Instant::now();
                    if let Some(next) = b.renew_lease(lease, &holder, rev) {
                        rev = next;
                        continue;
                    }
                    match b.lease_holder(lease, READ_WAIT) {
                        Ok(Some(h)) if h != holder => {
                            tracing::error!(lease = lease.key(), holder = %h, "Lease taken by another process: stopping.");
                            l.store(true, Ordering::SeqCst);
                            if let Some(f) = &raise {
                                f.store(true, Ordering::SeqCst);
                            }
                            return;
                        }
                        // It expired (NATS was away for longer than its life): take it again.
                        Ok(None) => {
                            if let Some(r) = b.take_lease(lease, &holder) {
                                rev = r;
                            }
                        }
                        _ => {}
                    }
                }
                b.release_lease(lease);
            })?;
        Ok(LeaseKeeper {
            bus,
            lease,
            me,
            stop,
            lost,
            on_lost,
            thread: Some(thread),
        })
    }

    /// Whether another process took the lease.
    pub fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What to call when another process says the lease is another's (a node that refuses
    /// this front's batches, with its reason). It asks NATS first (for at most a second): where
    /// NATS says this process holds the lease after all (the other read an old holder), nothing
    /// changes; else, as if the keeper had found the lease taken, it stops renewing and raises
    /// `on_lost`.
    pub fn deposer(&self) -> impl Fn(&str) + Send + Sync + 'static {
        use std::sync::atomic::Ordering;
        let (bus, lease, me) = (self.bus.clone(), self.lease, self.me.clone());
        let (lost, on_lost) = (self.lost.clone(), self.on_lost.clone());
        move |why: &str| {
            if lost.load(Ordering::SeqCst) {
                return;
            }
            if matches!(bus.lease_holder(lease, DEPOSED_CHECK), Ok(Some(h)) if h == me) {
                tracing::warn!(
                    lease = lease.key(),
                    why,
                    "Told the lease is another's, but NATS says it is this process's: running on."
                );
                return;
            }
            tracing::error!(
                lease = lease.key(),
                why,
                "Told the lease is another's: stopping."
            );
            lost.store(true, Ordering::SeqCst);
            if let Some(f) = &on_lost {
                f.store(true, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // A lost lease is not let go: its thread ends on its own, without being waited for
        // (it may be waiting for a NATS this process cannot reach).
        if let Some(t) = self.thread.take()
            && !self.lost()
        {
            let _ = t.join();
        }
    }
}
