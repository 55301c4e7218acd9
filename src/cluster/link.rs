//! gRPC links between nodes.
//!
//! The front node (the one that runs the sources, the batchers with their reservations, the
//! publisher and the sinks) reaches a worker that runs on another node through a
//! [`RemoteRunner`]: a [`StageRunner`] like any other, so the worker thread, its reservations,
//! its counters and the order it passes batches on in are the same as for a local worker. It
//! sends each batch on the worker's own long-lived bidirectional stream (`/poolpipe.Link/Run`)
//! without waiting for the answer to the one before ([`StageRunner::submit`]); the answers come
//! back on the same stream, in order, and the front's worker settles each on a thread of its
//! own. The node receives batch k+1 while its worker computes batch k, and no further: it reads
//! the next batch only when the worker starts the last one it read, so a slow node holds the
//! rest in the stream's HTTP/2 window and the front's worker waits to hand over more; the
//! front's reservations (which book a remote worker's link and its device one after the other,
//! see [`crate::batcher::deadline`]) see the worker busy, and its batchers drop (and count) what
//! can no longer make its deadline.
//!
//! Each peer is watched by pings (`/poolpipe.Link/Ping`, every [`PING_EVERY`]); a peer that
//! misses [`MISSES`] in a row, or whose stream fails, is down: its workers leave their pools'
//! reservations at once ([`StageRunner::watch`]), a batch it held is lost (counted as `lost`),
//! and when it answers pings again its workers rejoin.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tonic::codec::Streaming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::handoff::{self, Takers};
use super::wire::{self, CONNECTION_WINDOW, Packet, PacketCodec, STREAM_WINDOW, Sends};
use crate::engine::{Pending, StageError, StageRunner};
use crate::frame::Frame;
use crate::stats::NodeCounters;

/// How often a peer is pinged.
pub const PING_EVERY: Duration = Duration::from_millis(250);
/// How long a ping may take.
pub const PING_TIMEOUT: Duration = Duration::from_millis(400);
/// Missed pings after which a peer is down.
pub const MISSES: u32 = 2;

const RUN: &str = "/poolpipe.Link/Run";
const PING: &str = "/poolpipe.Link/Ping";

type Watchers = Vec<Box<dyn Fn(bool) + Send + Sync>>;
type PeerMap = Mutex<BTreeMap<String, Arc<Peer>>>;

/// Another node, as the front sees it.
pub struct Peer {
    name: String,
    addr: String,
    channel: Channel,
    /// Up (answers pings) or down.
    state: tokio::sync::watch::Sender<bool>,
    watchers: Mutex<Watchers>,
    limit: usize,
    /// What crossed the link, for the front's summary.
    counters: Arc<NodeCounters>,
}

impl Peer {
    /// Whether it answers.
    pub fn is_up(&self) -> bool {
        *self.state.borrow()
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its link's counters.
    pub fn counters(&self) -> &Arc<NodeCounters> {
        &self.counters
    }

    fn set_up(&self, up: bool, why: &str) {
        let changed = self
            .state
            .send_if_modified(|s| std::mem::replace(s, up) != up);
        if !changed {
            return;
        }
        self.counters.up.store(up, Ordering::Relaxed);
        let now = crate::clock::unix_ms();
        if up {
            &self.counters.up_at_unix_ms
        } else {
            &self.counters.down_at_unix_ms
        }
        .store(now, Ordering::Relaxed);
        if up {
            tracing::info!(node = %self.name, addr = %self.addr, "Node is up: its workers take batches.");
        } else {
            self.counters.downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %self.name, addr = %self.addr, why, "Node is down: its workers leave their pools until it answers again.");
        }
        for w in self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            w(up);
        }
    }

    async fn ping(&self, body: bytes::Bytes) -> Result<(), Status> {
        let mut grpc =
            tonic::client::Grpc::new(self.channel.clone()).max_encoding_message_size(self.limit);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        grpc.unary(
            Request::new(Packet {
                header: bytes::Bytes::new(),
                body,
            }),
            http::uri::PathAndQuery::from_static(PING),
            PacketCodec,
        )
        .await
        .map(|_| ())
    }
}

/// The other nodes of a cluster, their links and their watchers, on one small runtime.
pub struct Peers {
    rt: Arc<tokio::runtime::Runtime>,
    /// By node; nodes that join while the front runs are added ([`Peers::learn`]).
    peers: Arc<PeerMap>,
    limit: usize,
    front: Option<Arc<FrontId>>,
}

/// The front that sends the batches, where fronts hold a lease: its id in the lease (every
/// batch carries it), and what it does when a node refuses a batch because another front holds
/// the lease (the reason given).
pub struct FrontId {
    /// The id.
    pub id: String,
    /// Called on a refusal.
    pub deposed: Box<dyn Fn(&str) + Send + Sync>,
}

/// Why a peer cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The address is not one.
    #[error("node `{node}`: `{addr}` is not an address (expected HOST:PORT): {detail}")]
    Address {
        /// The node.
        node: String,
        /// Its address.
        addr: String,
        /// Why.
        detail: String,
    },
    /// The runtime could not start.
    #[error("cannot start the cluster links: {0}")]
    Runtime(#[from] std::io::Error),
    /// A node does not answer.
    #[error(
        "node `{node}` ({addr}) does not answer after {waited:?} (is `poolpipe node` running there?)"
    )]
    Unreachable {
        /// The node.
        node: String,
        /// Its address.
        addr: String,
        /// How long it was waited for.
        waited: Duration,
    },
    /// Serving failed.
    #[error("node `{node}`: cannot serve on {addr}: {detail}")]
    Serve {
        /// The node.
        node: String,
        /// The address.
        addr: String,
        /// Why.
        detail: String,
    },
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("poolpipe-link")
        .enable_all()
        .build()
}

impl Peers {
    /// Links to `nodes` (name -> `HOST:PORT`); messages up to `limit` bytes; batches sent as
    /// `front`, if given. Connections are made lazily and remade after a failure; each peer is
    /// pinged from now on.
    pub fn new(
        nodes: &BTreeMap<String, String>,
        limit: usize,
        front: Option<FrontId>,
    ) -> Result<Self, LinkError> {
        let peers = Self {
            rt: Arc::new(runtime()?),
            peers: Arc::default(),
            limit,
            front: front.map(Arc::new),
        };
        peers.learn(nodes)?;
        Ok(peers)
    }

    /// Adds links to the nodes of `nodes` it has none to (a node that joined the cluster while
    /// this process runs), pinged from now on; returns those added. A known node keeps its link.
    pub fn learn(&self, nodes: &BTreeMap<String, String>) -> Result<Vec<Arc<Peer>>, LinkError> {
        let mut known = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut added = Vec::new();
        for (name, addr) in nodes {
            if known.contains_key(name) {
                continue;
            }
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| LinkError::Address {
                    node: name.clone(),
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_millis(500))
                .keep_alive_timeout(Duration::from_secs(1))
                .keep_alive_while_idle(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW);
            let channel = {
                let _guard = self.rt.enter();
                endpoint.connect_lazy()
            };
            let peer = Arc::new(Peer {
                name: name.clone(),
                addr: addr.clone(),
                channel,
                state: tokio::sync::watch::Sender::new(false),
                watchers: Mutex::new(Vec::new()),
                limit: self.limit,
                counters: Arc::default(),
            });
            self.rt.spawn(watch_peer(Arc::downgrade(&peer)));
            known.insert(name.clone(), peer.clone());
            added.push(peer);
        }
        Ok(added)
    }

    /// Every peer.
    pub fn all(&self) -> Vec<Arc<Peer>> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Measures the rate of the link to each peer that is up: the median of three pings
    /// carrying `bytes` each, in Gbit/s, by node name. A peer that is down, or fails a ping, is
    /// left out (its cuts are charged at the file's rate), and costs no wait.
    pub fn measure(&self, bytes: usize) -> BTreeMap<String, f64> {
        let all: Vec<String> = self.all().iter().map(|p| p.name.clone()).collect();
        self.measure_some(&all, bytes)
    }

    /// [`Peers::measure`] of the peers among `nodes`.
    pub fn measure_some(&self, nodes: &[String], bytes: usize) -> BTreeMap<String, f64> {
        let body = bytes::Bytes::from(vec![0u8; bytes]);
        let mut out = BTreeMap::new();
        for p in self
            .all()
            .iter()
            .filter(|p| p.is_up() && nodes.contains(&p.name))
        {
            let mut times: Vec<f64> = Vec::new();
            for _ in 0..3 {
                let t = std::time::Instant::now();
                let ok = self
                    .rt
                    .block_on(async {
                        tokio::time::timeout(Duration::from_secs(10), p.ping(body.clone())).await
                    })
                    .is_ok_and(|r| r.is_ok());
                if !ok {
                    break;
                }
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            if let Some(t) = times.get(times.len() / 2) {
                out.insert(p.name.clone(), bytes as f64 * 8.0 / t / 1e9);
            }
        }
        out
    }

    /// Waits until every peer among `nodes` answers, up to `limit`.
    pub fn wait_for(&self, nodes: &[String], limit: Duration) -> Result<(), LinkError> {
        let until = std::time::Instant::now() + limit;
        for p in self.all().iter().filter(|p| nodes.contains(&p.name)) {
            let mut rx = p.state.subscribe();
            let left = until.saturating_duration_since(std::time::Instant::now());
            let ok = self
                .rt
                .block_on(async { tokio::time::timeout(left, rx.wait_for(|up| *up)).await })
                .is_ok();
            if !ok {
                return Err(LinkError::Unreachable {
                    node: p.name.clone(),
                    addr: p.addr.clone(),
                    waited: limit,
                });
            }
        }
        Ok(())
    }

    /// Where frames dropped here let go of the activations nodes hold for them (see
    /// [`handoff::Releaser`]).
    pub fn releaser(&self) -> handoff::Releaser {
        let peers = self.peers.clone();
        handoff::Releaser::spawn(&self.rt, self.limit, move |node| {
            let known = peers.lock().unwrap_or_else(|e| e.into_inner());
            known.get(node).map(|p| p.channel.clone())
        })
    }

    /// The runner of worker `worker` of stage `stage`, which runs on node `node`; each frame
    /// sends what `sends` says; its outputs go where `onward` says (see [`super::handoff`]).
    pub fn runner(
        &self,
        node: &str,
        stage: &str,
        worker: usize,
        sends: Sends,
        onward: Option<Onward>,
    ) -> Option<Box<dyn StageRunner>> {
        let peer = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)?
            .clone();
        Some(Box::new(RemoteRunner {
            rt: self.rt.clone(),
            peer,
            front: self.front.clone(),
            peers: self.peers.clone(),
            stage: stage.to_string(),
            worker,
            sends,
            onward,
            stream: None,
        }))
    }
}

/// What becomes of a remote stage's outputs, where its next stage takes them: filler as large
/// as an emulated cut (0: a real activation), and, with direct links, the node of each worker of
/// the next stage (`None`: this process): a batch reserved on a worker on a node leaves its
/// outputs on the stage's node for that node to take.
#[derive(Debug, Clone, Default)]
pub struct Onward {
    /// Bytes per frame of an emulated output.
    pub filler: u64,
    /// By worker of the next stage, with direct links.
    pub direct: Option<Arc<Vec<Option<String>>>>,
}

/// Pings a peer for as long as it exists.
async fn watch_peer(peer: std::sync::Weak<Peer>) {
    let mut misses = 0u32;
    loop {
        let Some(p) = peer.upgrade() else { return };
        match tokio::time::timeout(PING_TIMEOUT, p.ping(bytes::Bytes::new())).await {
            Ok(Ok(())) => {
                misses = 0;
                p.set_up(true, "");
            }
            Ok(Err(e)) => {
                misses += 1;
                if misses >= MISSES {
                    p.set_up(false, e.message());
                }
            }
            Err(_) => {
                misses += 1;
                if misses >= MISSES {
                    p.set_up(false, "pings time out");
                }
            }
        }
        drop(p);
        tokio::time::sleep(PING_EVERY).await;
    }
}

/// The answer to one batch, or why there is none.
type Answer = Result<Packet, String>;

/// One worker's stream: batches out; answers in, each handed to its batch's waiter (answers
/// come in the order the batches were sent).
struct Open {
    tx: tokio::sync::mpsc::Sender<Packet>,
    waiters: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Answer>>,
    /// Set when the stream failed: the next batch opens a new one.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

/// Batches sent on one stream whose answers are awaited, at most.
const AWAITED: usize = 4;

async fn open(peer: &Peer) -> Result<Open, Status> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Packet>(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
    let mut grpc = tonic::client::Grpc::new(peer.channel.clone())
        .max_decoding_message_size(peer.limit)
        .max_encoding_message_size(peer.limit);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let answers = grpc
        .streaming(
            Request::new(outbound),
            http::uri::PathAndQuery::from_static(RUN),
            PacketCodec,
        )
        .await?
        .into_inner();
    let (waiters, awaited) = tokio::sync::mpsc::channel(AWAITED);
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(read_answers(
        answers,
        awaited,
        peer.state.subscribe(),
        closed.clone(),
    ));
    Ok(Open {
        tx,
        waiters,
        closed,
    })
}

/// Hands each answer of a stream to its batch's waiter. When the stream fails (or the node
/// stops answering), every batch still awaited on it goes with it, for the same reason.
async fn read_answers(
    mut answers: Streaming<Packet>,
    mut awaited: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<Answer>>,
    mut state: tokio::sync::watch::Receiver<bool>,
    closed: Arc<std::sync::atomic::AtomicBool>,
) {
    while let Some(waiter) = awaited.recv().await {
        let answer = tokio::select! {
            m = answers.message() => match m {
                Ok(Some(p)) => Ok(p),
                Ok(None) => Err("the stream ended".to_string()),
                Err(e) => Err(e.message().to_string()),
            },
            _ = state.wait_for(|up| !*up) => Err("the node stopped answering".to_string()),
        };
        let Err(why) = answer else {
            let _ = waiter.send(answer);
            continue;
        };
        closed.store(true, Ordering::SeqCst);
        awaited.close();
        let _ = waiter.send(Err(why.clone()));
        while let Some(w) = awaited.recv().await {
            let _ = w.send(Err(why.clone()));
        }
        return;
    }
}

/// A worker that runs on another node. It sends batch k+1 while the node computes batch k
/// ([`StageRunner::submit`]): the node receives it meanwhile, and starts it when batch k is done.
pub struct RemoteRunner {
    rt: Arc<tokio::runtime::Runtime>,
    peer: Arc<Peer>,
    front: Option<Arc<FrontId>>,
    /// Every peer (a batch whose inputs another node lost counts on that node).
    peers: Arc<PeerMap>,
    stage: String,
    worker: usize,
    sends: Sends,
    onward: Option<Onward>,
    stream: Option<Open>,
}

impl RemoteRunner {
    /// Sends a batch on the worker's stream (opened, or opened again after a failure, first);
    /// returns where its answer will come.
    fn send(&mut self, packet: Packet) -> Result<tokio::sync::oneshot::Receiver<Answer>, String> {
        let peer = self.peer.clone();
        if self
            .stream
            .as_ref()
            .is_some_and(|s| s.closed.load(Ordering::SeqCst))
        {
            self.stream = None;
        }
        let stream = &mut self.stream;
        self.rt.block_on(async {
            if !peer.is_up() {
                return Err("the node is down".to_string());
            }
            if stream.is_none() {
                *stream = Some(open(&peer).await.map_err(|e| e.message().to_string())?);
            }
            let s = stream.as_mut().expect("opened above");
            let (waiter, answer) = tokio::sync::oneshot::channel();
            s.waiters
                .send(waiter)
                .await
                .map_err(|_| "the stream closed".to_string())?;
            s.tx.send(packet)
                .await
                .map_err(|_| "the stream closed".to_string())?;
            Ok(answer)
        })
    }
}

/// What the front makes of a node's answer to a batch (or of its absence).
struct Answered {
    peer: Arc<Peer>,
    front: Option<Arc<FrontId>>,
    peers: Arc<PeerMap>,
    sent: std::time::Instant,
    bytes: usize,
}

impl Answered {
    fn apply(&self, answer: Answer, frames: &mut [Frame]) -> Result<(), StageError> {
        let (peer, counters) = (&self.peer, &self.peer.counters);
        let back = answer
            .as_ref()
            .map_or(0, |p| (p.header.len() + p.body.len()) as u64);
        match answer {
            Ok(p) => match wire::apply_done(p, frames, &peer.addr) {
                Ok(Ok(ran)) => {
                    let trip = crate::clock::nanos(self.sent.elapsed());
                    counters.answered(frames.len(), self.bytes, trip.saturating_sub(ran.ran_ns));
                    counters
                        .bytes_direct
                        .fetch_add(ran.taken, Ordering::Relaxed);
                    counters.bytes_back.fetch_add(back, Ordering::Relaxed);
                    Ok(())
                }
                // The node could not take the batch's activations from the node that held them
                // (it stopped, or dropped them): the frames are lost with that node.
                Ok(Err(wire::NotRun {
                    error,
                    lost_on: Some(holder),
                })) => {
                    let known = self
                        .peers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&holder)
                        .cloned();
                    if let Some(h) = known {
                        h.counters
                            .lost
                            .fetch_add(frames.len() as u64, Ordering::Relaxed);
                    }
                    Err(StageError::Lost(format!(
                        "on node `{}`: {error}",
                        peer.name
                    )))
                }
                // The node is up: it ran the batch and its engine failed, or it runs no such
                // worker (an epoch it has not applied), or it refused the batch because another
                // front holds the front lease (this one must stop).
                Ok(Err(wire::NotRun { error: e, .. })) => {
                    if let (Some(why), Some(front)) = (e.strip_prefix(FENCED), &self.front) {
                        (front.deposed)(&format!("node `{}`: {why}", peer.name));
                    }
                    Err(StageError::Output(format!("on node `{}`: {e}", peer.name)))
                }
                Err(e) => Err(StageError::Output(e.to_string())),
            },
            Err(why) => {
                counters
                    .lost
                    .fetch_add(frames.len() as u64, Ordering::Relaxed);
                peer.set_up(false, &why);
                Err(StageError::Lost(format!(
                    "node `{}` ({}): {why}",
                    peer.name, peer.addr
                )))
            }
        }
    }
}

impl StageRunner for RemoteRunner {
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
        let pending = self
            .submit(frames, None)
            .expect("a remote runner always submits");
        pending(frames)
    }

    fn submit(&mut self, frames: &[Frame], next: Option<usize>) -> Option<Pending> {
        // The outputs stay on the node where the next stage's reserved worker is on a node.
        let onward = self.onward.as_ref().map(|o| wire::Onward {
            hold: o
                .direct
                .as_ref()
                .zip(next)
                .is_some_and(|(d, w)| d.get(w).is_some_and(Option::is_some)),
            filler: o.filler,
        });
        let packet = wire::encode_batch(
            (&self.stage, self.worker),
            self.front.as_ref().map(|f| f.id.as_str()),
            frames,
            self.sends,
            onward,
        );
        let answered = Answered {
            peer: self.peer.clone(),
            front: self.front.clone(),
            peers: self.peers.clone(),
            sent: std::time::Instant::now(),
            bytes: packet.header.len() + packet.body.len(),
        };
        let sent = self.send(packet);
        Some(Box::new(move |frames: &mut [Frame]| {
            let answer = match sent {
                Ok(rx) => rx
                    .blocking_recv()
                    .unwrap_or_else(|_| Err("the stream closed".to_string())),
                Err(why) => Err(why),
            };
            answered.apply(answer, frames)
        }))
    }

    fn watch(&mut self, on_change: Box<dyn Fn(bool) + Send + Sync>) {
        on_change(self.peer.is_up());
        self.peer
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(on_change);
    }
}

/// The workers a node serves, by (stage name, worker).
pub type Workers = BTreeMap<(String, usize), Box<dyn StageRunner>>;

/// What a node has done, for its summary.
#[derive(Debug, Default)]
pub struct Served {
    /// Batches run.
    pub batches: AtomicU64,
    /// Frames in them.
    pub frames: AtomicU64,
    /// Batches whose engine failed.
    pub failed: AtomicU64,
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Batches refused: their front no longer held the front lease.
    pub refused: AtomicU64,
}

/// Marks a node's refusal of a batch whose front does not hold the front lease.
const FENCED: &str = "fenced: ";

/// How often a node reads the front leases' holders again, at most, for batches from one front
/// that is not among the holders it last read (its control thread reads them every second).
const HOLDER_RECHECK: Duration = Duration::from_millis(200);
/// How long a node waits for NATS when it reads the holder on the data path.
const HOLDER_READ_WAIT: Duration = Duration::from_millis(100);
/// A holder read longer ago than this refuses nothing: the node cannot tell.
const HOLDER_STALE: Duration = Duration::from_secs(3);

/// On a node: batches are taken only from a front that holds a front lease (one per shard of
/// the cameras, `[cluster] fronts`), as NATS says.
/// This fences off a front cut off from NATS but not from the nodes: a standby took its
/// cameras over when its lease ran out, and its batches are refused, which tells it to stop.
/// The data path never waits on NATS for the holders (the node's control thread reads them
/// every second), except for at most [`HOLDER_READ_WAIT`] when a batch comes from a front that
/// is not among the holders last read (one that has just taken over must not be refused); a
/// node that has not read the holders for [`HOLDER_STALE`] (NATS does not answer it) refuses
/// nothing.
pub struct Fence {
    bus: Arc<super::bus::Bus>,
    /// How many front leases there are.
    fronts: u32,
    /// The holders last read (empty: no one), and when.
    holders: Mutex<(Vec<String>, std::time::Instant)>,
    /// The last front whose batch made the node read the holders again, and when: a front that
    /// is not among them is read for once per [`HOLDER_RECHECK`], however many batches it sends.
    rechecked: Mutex<Option<(String, std::time::Instant)>>,
}

impl Fence {
    /// Reads the holders of the `fronts` front leases from `bus`.
    pub fn new(bus: Arc<super::bus::Bus>, fronts: u32) -> Arc<Self> {
        let f = Arc::new(Fence {
            bus,
            fronts: fronts.max(1),
            holders: Mutex::new((Vec::new(), std::time::Instant::now())),
            rechecked: Mutex::new(None),
        });
        f.refresh(super::bus::READ_WAIT);
        f
    }

    /// Reads the holders again, waiting at most `limit` for NATS each (blocks: not on an async
    /// thread). The node's control thread calls it every second.
    pub fn refresh(&self, limit: Duration) {
        let mut holders = Vec::new();
        for k in 0..self.fronts {
            match self.bus.lease_holder(super::bus::Lease::Front(k), limit) {
                Ok(h) => holders.extend(h),
                Err(e) => {
                    tracing::debug!(error = %e, "The front leases' holders could not be read.");
                    return;
                }
            }
        }
        *self.holders.lock().unwrap_or_else(|e| e.into_inner()) =
            (holders, std::time::Instant::now());
    }

    /// Whether front `id` may send batches: `Err(holders)` where it holds no front lease and
    /// others do.
    pub fn admits(&self, id: &str) -> Result<(), String> {
        let other = |g: &(Vec<String>, std::time::Instant)| {
            (!g.0.is_empty() && !g.0.iter().any(|h| h == id) && g.1.elapsed() < HOLDER_STALE)
                .then(|| g.0.join(", "))
        };
        {
            let g = self.holders.lock().unwrap_or_else(|e| e.into_inner());
            let Some(h) = other(&g) else {
                return Ok(());
            };
            // Read again for this front, unless that was just done: a front that has just
            // taken a lease over is not refused on a read from before it did.
            let mut last = self.rechecked.lock().unwrap_or_else(|e| e.into_inner());
            if last
                .as_ref()
                .is_some_and(|(f, at)| f == id && at.elapsed() < HOLDER_RECHECK)
            {
                return Err(h);
            }
            *last = Some((id.to_string(), std::time::Instant::now()));
        }
        self.refresh(HOLDER_READ_WAIT);
        match other(&self.holders.lock().unwrap_or_else(|e| e.into_inner())) {
            Some(h) => Err(h),
            None => Ok(()),
        }
    }
}

type Slot = Arc<Mutex<Box<dyn StageRunner>>>;

/// The workers a node serves, by stage name and worker; a controller's epoch adds and retires
/// some while the node serves.
#[derive(Default)]
pub struct NodeWorkers {
    map: std::sync::RwLock<BTreeMap<(String, usize), Slot>>,
    /// Workers the current epoch no longer runs, with when they go: the front may still send
    /// them batches until it has switched.
    retiring: Mutex<BTreeMap<(String, usize), std::time::Instant>>,
}

impl NodeWorkers {
    /// Serving `workers`.
    pub fn new(workers: Workers) -> Arc<Self> {
        let w = NodeWorkers::default();
        for (k, r) in workers {
            w.insert(k, r);
        }
        Arc::new(w)
    }

    /// Whether worker `w` of `stage` is served.
    pub fn has(&self, stage: &str, w: usize) -> bool {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(stage.to_string(), w))
    }

    /// Serves `runner` as `key` from now on.
    pub fn insert(&self, key: (String, usize), runner: Box<dyn StageRunner>) {
        self.retiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Arc::new(Mutex::new(runner)));
    }

    /// Workers not in `keep` go `grace` from now (those already going keep their time); the
    /// ones whose time came go now. Returns the workers served after this.
    pub fn retire_others(
        &self,
        keep: &std::collections::HashSet<(String, usize)>,
        grace: Duration,
    ) -> Vec<String> {
        let now = std::time::Instant::now();
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let mut going = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
        for k in map.keys() {
            if !keep.contains(k) {
                going.entry(k.clone()).or_insert(now + grace);
            }
        }
        going.retain(|k, at| {
            if keep.contains(k) {
                return false;
            }
            if *at <= now {
                map.remove(k);
                return false;
            }
            true
        });
        map.keys().map(|(s, w)| format!("{s}[{w}]")).collect()
    }

    fn get(&self, stage: &str, w: usize) -> Option<Slot> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(stage.to_string(), w))
            .cloned()
    }
}

/// The gRPC service of a node.
#[derive(Clone)]
struct LinkService {
    /// This node's name.
    node: Arc<str>,
    workers: Arc<NodeWorkers>,
    served: Arc<Served>,
    fence: Option<Arc<Fence>>,
    /// What it holds for other nodes, and its links to take what they hold for it.
    takers: Arc<Takers>,
    limit: usize,
}

impl tonic::server::NamedService for LinkService {
    const NAME: &'static str = "poolpipe.Link";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Answers = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

impl tower_service::Service<http::Request<tonic::body::Body>> for LinkService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let limit = me.limit;
            Ok(match req.uri().path() {
                RUN => {
                    tonic::server::Grpc::new(PacketCodec)
                        .max_decoding_message_size(limit)
                        .max_encoding_message_size(limit)
                        .streaming(RunHandler(me), req)
                        .await
                }
                PING => {
                    tonic::server::Grpc::new(PacketCodec)
                        .max_decoding_message_size(limit)
                        .unary(PingHandler, req)
                        .await
                }
                handoff::TAKE => {
                    tonic::server::Grpc::new(PacketCodec)
                        .max_decoding_message_size(limit)
                        .max_encoding_message_size(limit)
                        .unary(TakeHandler(me.takers.store().clone()), req)
                        .await
                }
                other => Status::unimplemented(format!("no method {other}")).into_http(),
            })
        })
    }
}

struct PingHandler;

impl tower_service::Service<Request<Packet>> for PingHandler {
    type Response = Response<Packet>;
    type Error = Status;
    type Future = std::future::Ready<Result<Response<Packet>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Packet>) -> Self::Future {
        std::future::ready(Ok(Response::new(Packet::default())))
    }
}

struct TakeHandler(Arc<handoff::Store>);

impl tower_service::Service<Request<Packet>> for TakeHandler {
    type Response = Response<Packet>;
    type Error = Status;
    type Future = std::future::Ready<Result<Response<Packet>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Packet>) -> Self::Future {
        std::future::ready(handoff::answer_take(&self.0, req.get_ref()).map(Response::new))
    }
}

struct RunHandler(LinkService);

impl tower_service::Service<Request<Streaming<Packet>>> for RunHandler {
    type Response = Response<Answers>;
    type Error = Status;
    type Future = BoxFuture<Result<Response<Answers>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Streaming<Packet>>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let inbound = req.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Packet, Status>>(1);
            // The next batch is received (and the activations other nodes hold for it taken)
            // while this one runs, and no further: the rest waits in the stream's HTTP/2 window,
            // which holds the front.
            let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<Received>(1);
            tokio::spawn(receive_all(inbound, svc.clone(), ready_tx));
            tokio::spawn(async move {
                while let Some(batch) = ready.recv().await {
                    let answer = run_batch(&svc, batch).await;
                    if tx.send(answer).await.is_err() {
                        return;
                    }
                }
            });
            let answers: Answers =
                Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|a| (a, rx))
                }));
            Ok(Response::new(answers))
        })
    }
}

/// A batch as received (decoded, with the activations other nodes held for it taken), and when.
struct Received {
    batch: Result<Decoded, NotReady>,
    at: std::time::Instant,
}

/// A decoded batch with every activation on its frames, and the bytes taken for it.
struct Decoded {
    header: wire::BatchHeader,
    frames: Vec<Frame>,
    taken: u64,
}

/// Why a batch cannot run.
enum NotReady {
    /// The message is not a batch (the stream fails).
    Malformed(String),
    /// The activations another node held for it could not be taken (its frames are lost).
    Lost(wire::BatchHeader, handoff::TakeFailed),
}

/// Receives a stream's batches one at a time: the next only once the one before has been
/// started (the `ready` slot is free), so that one batch at most waits here while one runs.
/// Decoding it and taking what other nodes hold for it overlap the batch that runs.
async fn receive_all(
    mut inbound: Streaming<Packet>,
    svc: LinkService,
    ready: tokio::sync::mpsc::Sender<Received>,
) {
    loop {
        let Ok(slot) = ready.reserve().await else {
            return;
        };
        let p = match inbound.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "A stream from the front ended.");
                return;
            }
        };
        svc.served
            .bytes_in
            .fetch_add((p.header.len() + p.body.len()) as u64, Ordering::Relaxed);
        let batch = match wire::decode_holding(p) {
            Err(e) => Err(NotReady::Malformed(e.to_string())),
            Ok((header, mut frames)) => match svc.takers.take_held(&mut frames).await {
                Ok(taken) => Ok(Decoded {
                    header,
                    frames,
                    taken,
                }),
                Err(failed) => Err(NotReady::Lost(header, failed)),
            },
        };
        slot.send(Received {
            batch,
            at: std::time::Instant::now(),
        });
    }
}

/// Runs one batch on its worker, off the runtime's threads. The answer says how long the node
/// held the batch since it was `received` (waiting for the batch before it, and running it):
/// the front counts the rest of the round trip as link time.
async fn run_batch(svc: &LinkService, received: Received) -> Result<Packet, Status> {
    let Received {
        batch,
        at: received,
    } = received;
    let Decoded {
        header: h,
        mut frames,
        taken,
    } = match batch {
        Ok(b) => b,
        Err(NotReady::Malformed(e)) => return Err(Status::invalid_argument(e)),
        // Its frames are lost with what the other node held for them.
        Err(NotReady::Lost(h, failed)) => {
            tracing::warn!(stage = %h.stage, worker = h.worker, holder = %failed.node, why = %failed.why, "The batch's activations could not be taken: its frames are lost.");
            let why = format!(
                "the activations node `{}` held for the batch could not be taken: {}",
                failed.node, failed.why
            );
            return Ok(wire::encode_done(
                &mut [],
                &[],
                wire::Answer {
                    error: Some(why),
                    lost_on: Some(failed.node),
                    ..Default::default()
                },
            ));
        }
    };
    let before: Vec<usize> = frames.iter().map(|f| f.outputs.len()).collect();
    let answer = move |error: Option<String>, ran_ns| wire::Answer {
        error,
        ran_ns,
        taken,
        ..Default::default()
    };
    let Some(slot) = svc.workers.get(&h.stage, h.worker) else {
        // The front applied an epoch this node has not: the batch fails, the stream (and the
        // batches behind it on the stream) goes on.
        let why = format!(
            "this node runs no worker {} of stage `{}`",
            h.worker, h.stage
        );
        return Ok(wire::encode_done(
            &mut frames,
            &before,
            answer(Some(why), 0),
        ));
    };
    let (served, fence) = (svc.served.clone(), svc.fence.clone());
    let (node, store) = (svc.node.clone(), svc.takers.store().clone());
    tokio::task::spawn_blocking(move || {
        // A front that no longer holds the front lease runs nothing here: it is told, and
        // stops (a standby took its cameras over while it was cut off from NATS).
        if let (Some(fence), Some(front)) = (&fence, &h.front)
            && let Err(holder) = fence.admits(front)
        {
            served.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(front = %front, holder = %holder, "Batch refused: its front no longer holds the front lease.");
            let why = format!(
                "{FENCED}front `{holder}` holds the front lease: this front (`{front}`) no longer runs the cameras"
            );
            return wire::encode_done(&mut frames, &before, answer(Some(why), 0));
        }
        let mut runner = slot.lock().unwrap_or_else(|e| e.into_inner());
        let result = runner.run(&mut frames);
        // An emulated device that sends while computing returns before its batch is sent:
        // the answer leaves when the batch would have.
        if let Some(at) = runner.sent_at() {
            crate::clock::sleep_until(at);
        }
        drop(runner);
        served.batches.fetch_add(1, Ordering::Relaxed);
        served
            .frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        let error = result.err().map(|e| {
            served.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(stage = %h.stage, worker = h.worker, error = %e, "Batch failed.");
            e.to_string()
        });
        let ran = crate::clock::nanos(received.elapsed());
        let mut a = answer(error, ran);
        if let (Some(onward), None) = (h.onward, &a.error) {
            if onward.hold {
                a.held = handoff::hold_outputs(&store, &node, &mut frames, onward.filler);
            }
            a.filler = onward.filler;
        }
        wire::encode_done(&mut frames, &before, a)
    })
    .await
    .map_err(|e| Status::internal(format!("worker panicked: {e}")))
}

/// What a node serves: node `node`'s `workers`, on `addr`, in messages up to `limit` bytes,
/// counting what it did in `served`. With a `fence`, batches from a front that does not hold the
/// front lease are refused. Activations held for the nodes of next stages are kept in `store`.
pub struct Serving<'a> {
    pub node: &'a str,
    pub addr: std::net::SocketAddr,
    pub workers: Arc<NodeWorkers>,
    pub limit: usize,
    pub served: Arc<Served>,
    pub fence: Option<Arc<Fence>>,
    pub store: Arc<handoff::Store>,
}

/// Serves what `s` says until `stop` resolves.
pub fn serve(
    s: Serving<'_>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), LinkError> {
    let Serving {
        node,
        addr,
        workers,
        limit,
        served,
        fence,
        store,
    } = s;
    let rt = runtime()?;
    let svc = LinkService {
        node: node.into(),
        workers,
        served,
        fence,
        takers: Arc::new(Takers::new(node, store, limit)),
        limit,
    };
    let err = |detail: String| LinkError::Serve {
        node: node.to_string(),
        addr: addr.to_string(),
        detail,
    };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(node, %addr, "Serving stage workers.");
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        // Once told to stop, the server finishes what it has for at most `STOP_GRACE`: the
        // links other nodes keep to it (to take what it holds) do not hold it up.
        let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            stop.await;
            let _ = stopping.send(());
        };
        let server = tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_keepalive_interval(Some(Duration::from_millis(500)))
            .http2_keepalive_timeout(Some(Duration::from_secs(1)))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop);
        tokio::select! {
            r = server => r.map_err(|e| err(e.to_string())),
            _ = async {
                let _ = stopped.await;
                tokio::time::sleep(STOP_GRACE).await;
            } => {
                tracing::debug!(node, "Stopped with links still open.");
                Ok(())
            }
        }
    })
}

/// How long a stopping node waits for the links still open to it to close.
const STOP_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Image, PixelFormat};

    /// A stage that makes each frame's activation `2x + 1` (a 4-element vector from nothing).
    struct Affine;

    impl StageRunner for Affine {
        fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
            for f in frames {
                let a = f
                    .activation
                    .take()
                    .unwrap_or_else(|| ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4]), 1.0));
                f.activation = Some(a.mapv(|x| 2.0 * x + 1.0));
            }
            Ok(())
        }
    }

    /// Node `name` serving stage `stage` (one worker) on a free port, holding activations for
    /// `ttl` (the server lives as long as the test).
    fn node(name: &str, stage: &str, ttl: Duration) -> (String, Arc<handoff::Store>) {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut w = Workers::new();
        w.insert(
            (stage.to_string(), 0),
            Box::new(Affine) as Box<dyn StageRunner>,
        );
        let store = Arc::new(handoff::Store::new(1 << 20, ttl));
        let (name, s) = (name.to_string(), store.clone());
        std::thread::spawn(move || {
            serve(
                Serving {
                    node: &name,
                    addr,
                    workers: NodeWorkers::new(w),
                    limit: 1 << 24,
                    served: Arc::default(),
                    fence: None,
                    store: s,
                },
                std::future::pending(),
            )
        });
        (addr.to_string(), store)
    }

    fn frames(n: u64) -> Vec<Frame> {
        let img = Arc::new(Image::black(0, 0, PixelFormat::RGB));
        (0..n)
            .map(|i| Frame::new(0, i, img.clone(), i, i + 1_000_000_000))
            .collect()
    }

    #[test]
    fn the_next_node_takes_the_output_straight_from_the_node_that_computed_it() {
        let ttl = Duration::from_millis(500);
        let (a_addr, a_store) = node("a", "head", ttl);
        let (b_addr, b_store) = node("b", "tail", ttl);
        let nodes = BTreeMap::from([("a".to_string(), a_addr), ("b".to_string(), b_addr)]);
        let peers = Peers::new(&nodes, 1 << 24, None).unwrap();
        peers
            .wait_for(&["a".into(), "b".into()], Duration::from_secs(10))
            .unwrap();
        let direct = Onward {
            filler: 0,
            direct: Some(Arc::new(vec![Some("b".to_string())])),
        };
        let mut head = peers
            .runner("a", "head", 0, Sends::Activation, Some(direct))
            .unwrap();
        let mut tail = peers
            .runner("b", "tail", 0, Sends::Activation, None)
            .unwrap();

        // Reserved on the tail's worker 0 (on node b): the head's node keeps the outputs.
        let mut batch = frames(3);
        let pending = head.submit(&batch, Some(0)).unwrap();
        pending(&mut batch).unwrap();
        assert!(
            batch
                .iter()
                .all(|f| f.activation.is_none() && f.held.is_some())
        );
        assert_eq!(a_store.size(), 3 * 4 * 4);
        tail.run(&mut batch).unwrap();
        // 2(2*1+1)+1: the tail ran on the head's output, taken from a.
        for f in &batch {
            assert_eq!(
                f.activation.as_ref().unwrap().as_slice().unwrap(),
                &[7.0; 4]
            );
            assert!(f.held.is_none());
        }
        assert_eq!(a_store.size(), 0);
        assert_eq!(a_store.counters.given.load(Ordering::Relaxed), 3);
        assert_eq!(b_store.counters.bytes_taken.load(Ordering::Relaxed), 48);
        let b = peers.all().into_iter().find(|p| p.name() == "b").unwrap();
        assert_eq!(b.counters().bytes_direct.load(Ordering::Relaxed), 48);

        // Not reserved on a node (unknown next worker): the outputs come back here.
        let mut batch = frames(2);
        head.submit(&batch, None).unwrap()(&mut batch).unwrap();
        assert!(
            batch
                .iter()
                .all(|f| f.held.is_none() && f.activation.is_some())
        );

        // Held on a, and dropped there before b takes them (held too long): b answers, and the
        // frames are lost on a. (A holder that does not answer at all: see `handoff`'s tests.)
        let mut batch = frames(2);
        head.submit(&batch, Some(0)).unwrap()(&mut batch).unwrap();
        std::thread::sleep(ttl + Duration::from_millis(200));
        let err = tail.run(&mut batch).unwrap_err();
        assert!(matches!(err, StageError::Lost(_)), "{err}");
        assert!(err.to_string().contains("node `a` held"), "{err}");
        let a = peers.all().into_iter().find(|p| p.name() == "a").unwrap();
        assert_eq!(a.counters().lost.load(Ordering::Relaxed), 2);
        assert_eq!(b.counters().lost.load(Ordering::Relaxed), 0);
        assert!(b.is_up(), "b did nothing wrong");
        assert_eq!(b_store.counters.take_failed.load(Ordering::Relaxed), 1);
        assert_eq!(a_store.counters.expired.load(Ordering::Relaxed), 2);

        // Held on a for frames this process then drops: released on a at once, not left to
        // expire; a frame with nothing held is passed over.
        let mut batch = frames(3);
        head.submit(&batch, Some(0)).unwrap()(&mut batch).unwrap();
        assert_eq!(a_store.size(), 3 * 4 * 4);
        batch[2].held = None;
        let releaser = peers.releaser();
        batch.iter_mut().for_each(|f| releaser.release(f));
        assert!(batch.iter().all(|f| f.held.is_none()));
        let t0 = std::time::Instant::now();
        while a_store.counters.released.load(Ordering::Relaxed) < 2
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(a_store.counters.released.load(Ordering::Relaxed), 2);
        assert_eq!(a_store.size(), 4 * 4, "the third is still held");
        assert_eq!(a_store.counters.expired.load(Ordering::Relaxed), 2);
    }
}
