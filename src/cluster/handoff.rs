//! Direct links between nodes: a stage's output goes from the node that computed it straight
//! to the node of the next stage, not back through the front.
//!
//! The front still makes every reservation and sends every batch (a small header where the
//! frames' activations are elsewhere), so a route's timing and accounting stay in one place.
//! When the front sends a batch to a worker on node A and the batch's next stage is reserved on
//! another node B, it asks A to hold the outputs ([`super::wire::Onward`]). A keeps each frame's
//! activation in its [`Store`] (bounded in bytes, each kept at most [`HOLD_FOR`]) and answers
//! with keys instead of bytes. The front sends the batch on to B with those keys; B takes the
//! activations from A (`/poolpipe.Link/Take`, [`Takers`]) in the step where it receives the
//! batch, which overlaps the batch it is computing. An activation is handed over once: taking
//! it removes it. Where A's store is full, A answers with the bytes as before.
//!
//! A take that fails (A stopped, or dropped what it held) loses the batch's frames: B answers
//! the batch as not run, naming A, and the front counts the frames `lost` on A.
//!
//! A frame the front drops before B took its activation (B's batch failed or was lost with B,
//! the frame could not be forwarded, or it was dropped late) has it released on A at once
//! ([`Releaser`], the same call with `release` set), so that what no one will take does not fill
//! A's store until it expires.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::wire::{Packet, PacketCodec, Payload};

/// How long a node holds an activation for the next node, at most, by default (`[cluster]
/// hold_ms`): longer than any deadline.
pub const HOLD_FOR: Duration = Duration::from_millis(crate::config::DEFAULT_HOLD_MS);
/// Bytes a node holds for other nodes, at most, by default (`[cluster] hold_mib`).
pub const HOLD_BYTES: usize = (crate::config::DEFAULT_HOLD_MIB as usize) << 20;
/// How long a take may take.
pub const TAKE_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) const TAKE: &str = "/poolpipe.Link/Take";

/// What a node held and handed over, for its summary.
#[derive(Debug, Default)]
pub struct HandoffCounters {
    /// Activations held for another node.
    pub held: AtomicU64,
    /// Activations another node (or this one) took.
    pub given: AtomicU64,
    /// Bytes in them.
    pub bytes_given: AtomicU64,
    /// Activations no one took in time.
    pub expired: AtomicU64,
    /// Activations let go of unread: the front dropped their frames.
    pub released: AtomicU64,
    /// Activations not held because the store was full (sent back through the front).
    pub full: AtomicU64,
    /// Activations this node took from others.
    pub taken: AtomicU64,
    /// Bytes in them.
    pub bytes_taken: AtomicU64,
    /// Batches whose activations could not be taken (their frames lost).
    pub take_failed: AtomicU64,
}

impl HandoffCounters {
    /// The counters as JSON, for the node's summary.
    pub fn json(&self) -> serde_json::Value {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "held": n(&self.held),
            "given": n(&self.given),
            "bytes_given": n(&self.bytes_given),
            "expired": n(&self.expired),
            "released": n(&self.released),
            "full": n(&self.full),
            "taken": n(&self.taken),
            "bytes_taken": n(&self.bytes_taken),
            "take_failed": n(&self.take_failed),
        })
    }
}

struct Entry {
    at: Instant,
    payload: Payload,
    bytes: Bytes,
}

#[derive(Default)]
struct Held {
    /// By key; keys grow with time, so the oldest come first.
    map: BTreeMap<u64, Entry>,
    /// Bytes held.
    size: usize,
}

/// The activations a node holds for the nodes of the next stages.
pub struct Store {
    held: Mutex<Held>,
    next: AtomicU64,
    limit: usize,
    ttl: Duration,
    /// What it did.
    pub counters: HandoffCounters,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(HOLD_BYTES, HOLD_FOR)
    }
}

impl Store {
    /// Holding at most `limit` bytes, each activation for at most `ttl`. Keys start at the time
    /// in ns, so that a key from an earlier run of the node is never one of this run's.
    pub fn new(limit: usize, ttl: Duration) -> Self {
        Self {
            held: Mutex::default(),
            next: AtomicU64::new(crate::clock::unix_ms().saturating_mul(1_000_000)),
            limit,
            ttl,
            counters: HandoffCounters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops what has been held too long.
    fn sweep(&self, held: &mut Held, now: Instant) {
        while let Some(e) = held.map.first_entry() {
            if now.duration_since(e.get().at) < self.ttl {
                break;
            }
            let e = e.remove();
            held.size -= e.payload.size();
            self.counters.expired.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Holds `payload` (a tensor with its `bytes`, or filler, whose bytes are made when it is
    /// taken); returns its key, or `None` where the store is full.
    pub fn hold(&self, payload: Payload, bytes: Bytes) -> Option<u64> {
        let size = payload.size();
        let mut held = self.lock();
        let now = Instant::now();
        self.sweep(&mut held, now);
        if held.size + size > self.limit {
            self.counters.full.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        held.size += size;
        held.map.insert(
            key,
            Entry {
                at: now,
                payload,
                bytes,
            },
        );
        self.counters.held.fetch_add(1, Ordering::Relaxed);
        Some(key)
    }

    /// Takes the activations of `keys` (each once), in order; `Err(key)` names one that is not
    /// held (never held, taken, or expired).
    pub fn take(&self, keys: &[u64]) -> Result<Vec<(Payload, Bytes)>, u64> {
        let mut held = self.lock();
        self.sweep(&mut held, Instant::now());
        let mut out = Vec::with_capacity(keys.len());
        for &k in keys {
            let e = held.map.remove(&k).ok_or(k)?;
            held.size -= e.payload.size();
            let bytes = match e.payload {
                Payload::Filler { bytes } => Bytes::from(vec![0u8; bytes as usize]),
                _ => e.bytes,
            };
            self.counters.given.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_given
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            out.push((e.payload, bytes));
        }
        Ok(out)
    }

    /// Lets go of what `keys` hold, unread (keys no longer held are passed over); returns how
    /// many were held.
    pub fn release(&self, keys: &[u64]) -> u64 {
        let mut held = self.lock();
        let mut n = 0;
        for k in keys {
            if let Some(e) = held.map.remove(k) {
                held.size -= e.payload.size();
                n += 1;
            }
        }
        self.counters.released.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Bytes held now.
    pub fn size(&self) -> usize {
        self.lock().size
    }
}

/// Holds the outputs of a batch that ran for the next stage's node: each frame's activation
/// (taken off the frame), or `filler` bytes where it has none. Returns, per frame,
/// the payload that says where its output is (`None`: not held, the store being full, or
/// nothing to hold).
pub fn hold_outputs(
    store: &Store,
    node: &str,
    frames: &mut [crate::frame::Frame],
    filler: u64,
) -> Vec<Option<Payload>> {
    frames
        .iter_mut()
        .map(|f| {
            let (payload, bytes) = match &f.activation {
                Some(a) => super::wire::tensor_bytes(a),
                None if filler > 0 => (Payload::Filler { bytes: filler }, Bytes::new()),
                None => return None,
            };
            let key = store.hold(payload.clone(), bytes)?;
            f.activation = None;
            Some(Payload::Held {
                node: node.to_string(),
                addr: String::new(),
                key,
                of: Box::new(payload),
            })
        })
        .collect()
}

/// A take: the keys asked for; with `release`, what they hold is dropped and nothing is
/// answered.
#[derive(Debug, Serialize, Deserialize)]
struct TakeRequest {
    keys: Vec<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    release: bool,
}

/// Its answer: what each key held, in order; the body has their bytes.
#[derive(Debug, Serialize, Deserialize)]
struct Taken {
    payloads: Vec<Payload>,
}

/// Answers a take from `store`.
pub(super) fn answer_take(store: &Store, p: &Packet) -> Result<Packet, Status> {
    let req: TakeRequest = serde_json::from_slice(&p.header)
        .map_err(|e| Status::invalid_argument(format!("malformed take: {e}")))?;
    if req.release {
        store.release(&req.keys);
        return Ok(Packet {
            header: Bytes::from_static(br#"{"payloads":[]}"#),
            body: Bytes::new(),
        });
    }
    let taken = store.take(&req.keys).map_err(|k| {
        Status::not_found(format!(
            "nothing held under key {k} (taken, or held longer than {HOLD_FOR:?})"
        ))
    })?;
    let mut body = BytesMut::with_capacity(taken.iter().map(|(_, b)| b.len()).sum());
    let mut payloads = Vec::with_capacity(taken.len());
    for (payload, bytes) in taken {
        body.put_slice(&bytes);
        payloads.push(payload);
    }
    Ok(Packet {
        header: Bytes::from(serde_json::to_vec(&Taken { payloads }).expect("serialises")),
        body: body.freeze(),
    })
}

/// Sends a take (or a release) over `channel` and waits for its answer, at most
/// [`TAKE_TIMEOUT`].
async fn call_take(channel: Channel, limit: usize, req: TakeRequest) -> Result<Packet, String> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        grpc.unary(
            Request::new(Packet {
                header: Bytes::from(serde_json::to_vec(&req).expect("serialises")),
                body: Bytes::new(),
            }),
            http::uri::PathAndQuery::from_static(TAKE),
            PacketCodec,
        )
        .await
    };
    Ok(tokio::time::timeout(TAKE_TIMEOUT, call)
        .await
        .map_err(|_| format!("no answer in {TAKE_TIMEOUT:?}"))?
        .map_err(|e| e.message().to_string())?
        .into_inner())
}

/// Activations released per call, at most.
const RELEASE_BATCH: usize = 1024;

/// Frames' activations queued for release, at most; beyond that they are left to expire.
const RELEASE_QUEUE: usize = 4096;

/// Where a front (or any process that drops frames whose activation another node holds) lets
/// those activations go: queued without waiting, and released in the background, one call per
/// holder for whatever has queued up. A release that cannot be queued or sent is passed over:
/// the activation then expires on its holder as before.
#[derive(Clone)]
pub struct Releaser {
    tx: tokio::sync::mpsc::Sender<crate::frame::Held>,
}

impl Releaser {
    /// A releaser whose calls run on `rt`; `channel_of` gives the link to a holding node by
    /// name (`None`: no link, passed over).
    pub fn spawn(
        rt: &tokio::runtime::Runtime,
        limit: usize,
        channel_of: impl Fn(&str) -> Option<Channel> + Send + 'static,
    ) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::frame::Held>(RELEASE_QUEUE);
        rt.spawn(async move {
            let mut queued = Vec::with_capacity(RELEASE_BATCH);
            while rx.recv_many(&mut queued, RELEASE_BATCH).await > 0 {
                let mut by_node: BTreeMap<String, Vec<u64>> = BTreeMap::new();
                for h in queued.drain(..) {
                    by_node.entry(h.node).or_default().push(h.key);
                }
                for (node, keys) in by_node {
                    let Some(channel) = channel_of(&node) else {
                        continue;
                    };
                    let n = keys.len();
                    let req = TakeRequest {
                        keys,
                        release: true,
                    };
                    if let Err(why) = call_take(channel, limit, req).await {
                        tracing::debug!(
                            node,
                            n,
                            why,
                            "Could not release held activations; they expire there."
                        );
                    }
                }
            }
        });
        Self { tx }
    }

    /// Lets go of the activation `f` has held on another node, if any.
    pub fn release(&self, f: &mut crate::frame::Frame) {
        if let Some(h) = f.held.take() {
            let _ = self.tx.try_send(*h);
        }
    }
}

/// The links a node takes activations over, one per node it took from, made on first use.
pub struct Takers {
    /// This node's name (it takes from its own store directly).
    me: String,
    store: std::sync::Arc<Store>,
    channels: Mutex<HashMap<String, Channel>>,
    limit: usize,
}

/// A batch whose activations could not be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeFailed {
    /// The node that held them.
    pub node: String,
    /// Why.
    pub why: String,
}

impl Takers {
    /// For node `me`, whose own activations are in `store`; messages up to `limit` bytes.
    pub fn new(me: &str, store: std::sync::Arc<Store>, limit: usize) -> Self {
        Self {
            me: me.to_string(),
            store,
            channels: Mutex::default(),
            limit,
        }
    }

    /// This node's store.
    pub fn store(&self) -> &std::sync::Arc<Store> {
        &self.store
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("`{addr}` is not an address: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .initial_stream_window_size(super::wire::STREAM_WINDOW)
            .initial_connection_window_size(super::wire::CONNECTION_WINDOW)
            .connect_lazy();
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    async fn take_from(&self, addr: &str, keys: Vec<u64>) -> Result<Vec<(Payload, Bytes)>, String> {
        let answer = call_take(
            self.channel(addr)?,
            self.limit,
            TakeRequest {
                keys,
                release: false,
            },
        )
        .await?;
        let taken: Taken = serde_json::from_slice(&answer.header)
            .map_err(|e| format!("malformed answer to a take: {e}"))?;
        let mut body = answer.body;
        let mut out = Vec::with_capacity(taken.payloads.len());
        for payload in taken.payloads {
            let n = payload.bytes();
            if body.len() < n {
                return Err(format!(
                    "an answer to a take is {} bytes short",
                    n - body.len()
                ));
            }
            out.push((payload, body.split_to(n)));
        }
        Ok(out)
    }

    /// Takes the activations other nodes hold for `frames` (those with [`Frame::held`]) from
    /// them, or from this node's own store, and puts them on the frames; returns the bytes
    /// taken.
    ///
    /// [`Frame::held`]: crate::frame::Frame::held
    pub async fn take_held(&self, frames: &mut [crate::frame::Frame]) -> Result<u64, TakeFailed> {
        // The frames to take for, by holder.
        let mut wanted: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
        for (i, f) in frames.iter().enumerate() {
            if let Some(h) = &f.held {
                wanted
                    .entry((h.node.clone(), h.addr.clone()))
                    .or_default()
                    .push(i);
            }
        }
        let counters = &self.store.counters;
        let mut taken_bytes = 0u64;
        for ((node, addr), at) in wanted {
            let fail = |why: String| {
                counters.take_failed.fetch_add(1, Ordering::Relaxed);
                TakeFailed {
                    node: node.clone(),
                    why,
                }
            };
            let keys: Vec<u64> = at
                .iter()
                .filter_map(|&i| frames[i].held.as_ref().map(|h| h.key))
                .collect();
            let taken = if node == self.me {
                self.store.take(&keys).map_err(|k| {
                    format!("nothing held under key {k} (taken, or held longer than {HOLD_FOR:?})")
                })
            } else {
                self.take_from(&addr, keys.clone()).await
            }
            .map_err(fail)?;
            if taken.len() != keys.len() {
                return Err(fail(format!(
                    "{} activations for {} keys",
                    taken.len(),
                    keys.len()
                )));
            }
            for (&i, (payload, bytes)) in at.iter().zip(taken) {
                taken_bytes += bytes.len() as u64;
                super::wire::put_taken(&mut frames[i], &payload, bytes)
                    .map_err(|e| fail(e.to_string()))?;
            }
            counters
                .taken
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
        }
        counters
            .bytes_taken
            .fetch_add(taken_bytes, Ordering::Relaxed);
        Ok(taken_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::{self, Dtype, Sends};
    use crate::frame::{Frame, Held as HeldAt, Image, PixelFormat};
    use std::sync::Arc;

    fn tensor(v: &[f32]) -> (Payload, Bytes) {
        let mut b = BytesMut::new();
        v.iter().for_each(|x| b.put_f32_le(*x));
        (
            Payload::Tensor {
                shape: vec![v.len()],
                dtype: Dtype::F32,
            },
            b.freeze(),
        )
    }

    #[test]
    fn the_store_hands_each_activation_over_once_and_stays_within_its_bytes() {
        let s = Store::new(20, Duration::from_secs(60));
        let (p, b) = tensor(&[1.0, 2.0, 3.0]);
        let a = s.hold(p.clone(), b.clone()).unwrap();
        let f = s.hold(Payload::Filler { bytes: 8 }, Bytes::new()).unwrap();
        assert!(f > a, "keys grow");
        assert_eq!(s.size(), 20);
        // Full: the next one is not held.
        assert_eq!(s.hold(Payload::Filler { bytes: 1 }, Bytes::new()), None);
        assert_eq!(s.counters.full.load(Ordering::Relaxed), 1);
        let got = s.take(&[f, a]).unwrap();
        assert_eq!(got[0].1.len(), 8, "filler is made as it is taken");
        assert_eq!(got[1], (p, b));
        assert_eq!(s.size(), 0);
        assert_eq!(s.take(&[a]), Err(a), "taken once");
    }

    #[test]
    fn what_no_one_takes_expires() {
        let s = Store::new(1 << 20, Duration::from_millis(30));
        let k = s
            .hold(Payload::Filler { bytes: 100 }, Bytes::new())
            .unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(s.take(&[k]), Err(k));
        assert_eq!(s.counters.expired.load(Ordering::Relaxed), 1);
        assert_eq!(s.size(), 0);
    }

    fn frame(seq: u64) -> Frame {
        Frame::new(
            0,
            seq,
            Arc::new(Image::black(0, 0, PixelFormat::RGB)),
            seq,
            seq + 100,
        )
    }

    #[tokio::test]
    async fn a_batch_gets_its_held_activations_back_in_place() {
        let store = Arc::new(Store::default());
        let takers = Takers::new("a", store.clone(), 1 << 20);
        let (p, b) = tensor(&[0.5, -1.5]);
        let key = store.hold(p, b).unwrap();
        let mut held = frame(1);
        held.held = Some(Box::new(HeldAt {
            node: "a".into(),
            addr: "127.0.0.1:1".into(),
            key,
            shape: Some(vec![2]),
            bytes: 8,
        }));
        let mut inline = frame(2);
        inline.activation = Some(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[3]), 7.0));
        let packet =
            wire::encode_batch(("tail", 0), None, &[inline, held], Sends::Activation, None);
        let (_, mut frames) = wire::decode_holding(packet).unwrap();
        let taken = takers.take_held(&mut frames).await.unwrap();
        assert_eq!(taken, 8);
        assert_eq!(
            frames[0].activation.as_ref().unwrap().as_slice().unwrap(),
            &[7.0; 3]
        );
        assert_eq!(
            frames[1].activation.as_ref().unwrap().as_slice().unwrap(),
            &[0.5, -1.5]
        );
        assert!(frames.iter().all(|f| f.held.is_none()));
        // One activation was taken (the other came in the batch).
        assert_eq!(store.counters.taken.load(Ordering::Relaxed), 1);
        assert_eq!(store.counters.bytes_taken.load(Ordering::Relaxed), 8);
    }

    #[tokio::test]
    async fn a_holder_that_does_not_answer_fails_the_take_naming_it() {
        let takers = Takers::new("b", Arc::new(Store::default()), 1 << 20);
        // A port nothing listens on.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut f = frame(1);
        f.held = Some(Box::new(HeldAt {
            node: "a".into(),
            addr,
            key: 1,
            shape: None,
            bytes: 10,
        }));
        let packet = wire::encode_batch(("tail", 0), None, &[f], Sends::Filler(10), None);
        let (_, mut frames) = wire::decode_holding(packet).unwrap();
        let err = takers.take_held(&mut frames).await.unwrap_err();
        assert_eq!(err.node, "a");
        assert!(!err.why.is_empty());
        assert_eq!(
            takers.store().counters.take_failed.load(Ordering::Relaxed),
            1
        );
    }
}
