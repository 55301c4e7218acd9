//! The front of a flow: admits its streams' frames fairly and spreads them over its routes.
//!
//! Every stream of a flow has a small lane of its own (a bounded queue). One admission thread
//! per flow takes the next frame from the lanes by smooth weighted round robin on the streams'
//! `priority`, and sends it to the first stage of one of the flow's routes, picked by smooth
//! weighted round robin on the routes' planned throughput (PPipe's front-end load balancer).
//! When the routes are full the thread waits, the lanes fill, and each live source drops its own
//! oldest frame for each new one (`dropped_overload`), so what waits is fresh: under overload
//! every stream gets its weighted share of what the flow carries, whichever camera happens to
//! deliver first (a single shared queue gives the slots to whoever arrives just after one
//! frees), and the frames it gets are recent. Nothing is unbounded: a lane holds
//! [`LANE_FRAMES`] frames.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::batcher::{Load, saturated};
use crate::clock::Nanos;
use crate::frame::Frame;
use crate::stats::Stats;
use crate::wrr::SmoothWrr;

/// Frames one stream's lane holds: one, the newest, so that a frame taken after a wait for room
/// is at most one frame interval old.
pub const LANE_FRAMES: usize = 1;

/// How long a waiting admission sleeps at most before it looks again whether its route has room
/// (it is woken as soon as the route's first stage takes a frame or finishes a batch; this only
/// bounds how late it notices that a stream went quiet).
const GATE_RECHECK: Duration = Duration::from_millis(5);

/// Wakes whoever waits for a stage to have room: its batcher took a frame from its queue, or one
/// of its workers let go of a batch. Every stage's batcher and workers call [`Signal::notify`]
/// for every frame and batch, and only a flow's admission ever waits, so a notify with nobody
/// waiting costs one atomic load and no lock or wake-up.
#[derive(Default)]
pub struct Signal {
    /// Threads inside [`Signal::wait_while`].
    waiting: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Signal {
    /// Something changed (call after the change).
    pub fn notify(&self) {
        // A waiter counts itself before it looks at the state, so either it sees this change
        // or this sees it waiting (and takes the lock it holds until it sleeps).
        if self.waiting.load(Ordering::SeqCst) > 0 {
            drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
            self.changed.notify_all();
        }
    }

    /// Waits while `busy()` holds, up to `recheck` at a time between looks.
    fn wait_while(&self, mut busy: impl FnMut() -> bool, recheck: Duration) {
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while busy() {
            g = self
                .changed
                .wait_timeout(g, recheck)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a frame was not taken (it is given back, boxed).
pub enum Refused {
    /// The stream's lane is full.
    Full(Box<Frame>),
    /// The flow is shutting down.
    Closed(Box<Frame>),
}

struct Lane {
    frames: VecDeque<Frame>,
    /// The stream's priority, given to its frames as they are taken.
    priority: u32,
    /// When its last frame arrived: a stream that delivered within [`ACTIVE`] keeps earning its
    /// share while its lane is momentarily empty.
    last: Option<Instant>,
}

/// How long after its last frame a stream still counts as active.
const ACTIVE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    lanes: Vec<Lane>,
    /// Streams' priorities, by lane.
    wrr: Option<SmoothWrr>,
    closed: bool,
}

/// One flow's admission: lanes, and the routes' first queues.
pub struct Admission {
    state: Mutex<State>,
    /// Routes that replace the running ones at the thread's next frame (a re-plan).
    next_routes: Mutex<Option<Vec<RouteEntry>>>,
    /// Signalled when a frame arrives or the flow closes.
    arrived: Condvar,
    /// Signalled when a lane has room again.
    room: Condvar,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a stream hands its frames to its flow.
#[derive(Clone)]
pub struct Inlet {
    admission: Arc<Admission>,
    lane: usize,
}

impl Inlet {
    /// Hands a frame over without waiting; when the lane is full, its oldest frame makes room
    /// and is given back (the caller counts it as dropped).
    pub fn try_send(&self, frame: Frame) -> Result<Option<Frame>, Refused> {
        let mut s = lock(&self.admission.state);
        if s.closed {
            return Err(Refused::Closed(Box::new(frame)));
        }
        let lane = &mut s.lanes[self.lane];
        let evicted = if lane.frames.len() >= LANE_FRAMES {
            lane.frames.pop_front()
        } else {
            None
        };
        lane.frames.push_back(frame);
        lane.last = Some(Instant::now());
        drop(s);
        self.admission.arrived.notify_one();
        Ok(evicted)
    }

    /// Hands a frame over, waiting up to `timeout` for room.
    pub fn send_timeout(&self, frame: Frame, timeout: Duration) -> Result<(), Refused> {
        let until = Instant::now() + timeout;
        let mut s = lock(&self.admission.state);
        loop {
            if s.closed {
                return Err(Refused::Closed(Box::new(frame)));
            }
            if s.lanes[self.lane].frames.len() < LANE_FRAMES {
                s.lanes[self.lane].last = Some(Instant::now());
                s.lanes[self.lane].frames.push_back(frame);
                drop(s);
                self.admission.arrived.notify_one();
                return Ok(());
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Refused::Full(Box::new(frame)));
            }
            s = self
                .admission
                .room
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether a frame captured now is not worth converting: the lane is full of frames
    /// captured less than `max_age` before `now` (a fresher frame would only replace one of
    /// them), or the flow is closing.
    pub fn full_of_fresh(&self, now: Nanos, max_age: Nanos) -> bool {
        let s = lock(&self.admission.state);
        let lane = &s.lanes[self.lane].frames;
        s.closed
            || (lane.len() >= LANE_FRAMES
                && lane
                    .front()
                    .is_some_and(|f| f.captured.saturating_add(max_age) > now))
    }
}

/// A route of the flow as the admission thread sees it.
#[derive(Clone)]
pub struct RouteEntry {
    /// The route's index in the pipeline.
    pub route: usize,
    /// Global index of its first stage (for counters).
    pub first_stage: usize,
    /// Its first stage's queue.
    pub queue: flume::Sender<Frame>,
    /// Share of the flow's frames.
    pub weight: f64,
    /// Batches in flight on each worker of its first stage.
    pub in_flight: Arc<Vec<AtomicUsize>>,
    /// Notified when its first stage takes a frame or a worker of it lets go of a batch.
    pub room: Arc<Signal>,
}

/// The first stage's workers, as the gate reads them.
struct FirstStage<'a>(&'a [AtomicUsize]);

impl Load for FirstStage<'_> {
    fn workers(&self) -> usize {
        self.0.len()
    }
    fn of(&self, worker: usize) -> usize {
        self.0[worker].load(Ordering::SeqCst)
    }
}

impl Admission {
    /// An admission with no streams yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            next_routes: Mutex::new(None),
            arrived: Condvar::new(),
            room: Condvar::new(),
        })
    }

    /// A lane of its own for a stream with weight `priority`.
    pub fn inlet(self: &Arc<Self>, priority: u32) -> Inlet {
        let mut s = lock(&self.state);
        let lane = s
            .wrr
            .get_or_insert_with(|| SmoothWrr::new(Vec::new()))
            .push(f64::from(priority.max(1)));
        s.lanes.push(Lane {
            frames: VecDeque::new(),
            priority: priority.max(1),
            last: None,
        });
        Inlet {
            admission: self.clone(),
            lane,
        }
    }

    /// Sends the flow's frames to these routes from the next frame on. The routes no longer
    /// named are let go of (once the thread has swapped), so that their stages finish what they
    /// hold and end.
    pub fn set_routes(&self, routes: Vec<RouteEntry>) {
        *self.next_routes.lock().unwrap_or_else(|e| e.into_inner()) = Some(routes);
    }

    fn swap_pending(&self) -> bool {
        self.next_routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn swapped_routes(&self) -> Option<Vec<RouteEntry>> {
        self.next_routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Refuses new frames; the thread forwards what the lanes hold, then ends (and lets go of
    /// the routes' queues, so that the stages drain).
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.arrived.notify_all();
        self.room.notify_all();
    }

    /// The next frame by the streams' weights, waiting for one; `None` once closed and empty.
    fn take(&self) -> Option<Frame> {
        let mut s = lock(&self.state);
        loop {
            let State { lanes, wrr, closed } = &mut *s;
            let now = Instant::now();
            let picked = wrr.as_mut().and_then(|w| {
                w.pick_ready(
                    |i| lanes[i].last.is_some_and(|t| now - t < ACTIVE),
                    |i| !lanes[i].frames.is_empty(),
                )
            });
            if let Some(i) = picked {
                // Lanes of removed streams stay (indices never move) and, once empty, are never
                // eligible again.
                let priority = lanes[i].priority;
                let f = lanes[i].frames.pop_front().map(|mut f| {
                    f.priority = priority;
                    f
                });
                drop(s);
                self.room.notify_all();
                return f;
            }
            if *closed {
                return None;
            }
            s = self.arrived.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Starts the admission thread of flow `name`.
    pub fn spawn(
        self: &Arc<Self>,
        name: &str,
        routes: Vec<RouteEntry>,
        stats: Arc<Stats>,
    ) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("admit-{name}"))
            .spawn(move || {
                let mut routes = routes;
                let mut split = SmoothWrr::new(routes.iter().map(|r| r.weight).collect());
                let send = |mut f: Frame, r: &RouteEntry| {
                    f.route = r.route;
                    let stream = f.stream;
                    match r.queue.send(f) {
                        Ok(()) => stats.frames_entered(r.first_stage, 1),
                        Err(_) => stats.frame_failed_between_stages(stream),
                    }
                };
                let swap = |routes: &mut Vec<RouteEntry>, split: &mut SmoothWrr| {
                    if let Some(next) = me.swapped_routes().filter(|r| !r.is_empty()) {
                        *routes = next;
                        *split = SmoothWrr::new(routes.iter().map(|r| r.weight).collect());
                        true
                    } else {
                        false
                    }
                };
                loop {
                    swap(&mut routes, &mut split);
                    if routes.is_empty() {
                        // A flow this process runs no route of (fronts that share the
                        // cameras): it has no frames either, unless its cameras came before
                        // its routes; those fail, counted.
                        let Some(f) = me.take() else { break };
                        if swap(&mut routes, &mut split) {
                            send(f, &routes[split.pick()]);
                        } else {
                            stats.frame_failed_between_stages(f.stream);
                        }
                        continue;
                    }
                    // While streams share the flow, a route takes a frame once its first stage
                    // has room for a batch (nothing waits in its queue, a worker has room):
                    // frames wait here, in their streams' lanes, where they are taken fairly and
                    // the newest replaces the one waiting, rather than in reservations far ahead
                    // that go to whichever stream happened to come first. The price is up to one
                    // frame interval of waiting; a stream alone in its flow does not pay it.
                    let mut pick = split.pick();
                    let r = &routes[pick];
                    r.room.wait_while(
                        || {
                            me.shared()
                                && (!r.queue.is_empty() || saturated(&FirstStage(&r.in_flight)))
                                && !me.swap_pending()
                        },
                        GATE_RECHECK,
                    );
                    if me.swap_pending() {
                        continue;
                    }
                    let Some(f) = me.take() else { break };
                    // New routes that came while this waited for the frame take it.
                    if swap(&mut routes, &mut split) {
                        pick = split.pick();
                    }
                    send(f, &routes[pick]);
                }
            })
    }

    /// Whether two or more streams are active in the flow (then it is worth being fair).
    fn shared(&self) -> bool {
        let now = Instant::now();
        lock(&self.state)
            .lanes
            .iter()
            .filter(|l| !l.frames.is_empty() || l.last.is_some_and(|t| now - t < ACTIVE))
            .nth(1)
            .is_some()
    }

    /// Frames waiting in the lanes (for status).
    pub fn waiting(&self) -> usize {
        lock(&self.state).lanes.iter().map(|l| l.frames.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Image, PixelFormat};

    fn frame(stream: usize, seq: u64) -> Frame {
        Frame::new(
            stream,
            seq,
            Arc::new(Image::black(1, 1, PixelFormat::RGB)),
            0,
            u64::MAX,
        )
    }

    #[test]
    fn full_lanes_refuse_and_streams_are_taken_by_priority() {
        let a = Admission::new();
        let x = a.inlet(1);
        let y = a.inlet(3);
        for i in 0..LANE_FRAMES as u64 {
            assert!(matches!(x.try_send(frame(0, i)), Ok(None)));
        }
        // A full lane gives back its oldest frame for the new one.
        match x.try_send(frame(0, 9)) {
            Ok(Some(old)) => assert_eq!(old.seq, 0),
            _ => panic!("the oldest frame makes room"),
        }
        assert!(x.full_of_fresh(10, 100), "captured at 0, younger than 100");
        assert!(
            !x.full_of_fresh(200, 100),
            "older than 100: worth replacing"
        );
        assert!(!y.full_of_fresh(0, 100), "an empty lane takes frames");
        // Keep both lanes full: stream 1 (priority 3) gets three frames for each of stream 0's.
        let mut taken = [0; 2];
        let mut seq = 100;
        let fill = |seq: &mut u64| {
            for (s, inlet) in [(0, &x), (1, &y)] {
                while !inlet.full_of_fresh(0, 1) {
                    assert!(inlet.try_send(frame(s, *seq)).is_ok());
                    *seq += 1;
                }
            }
        };
        for _ in 0..400 {
            fill(&mut seq);
            taken[a.take().unwrap().stream] += 1;
        }
        assert_eq!(taken, [100, 300]);
        fill(&mut seq);
        a.close();
        assert!(matches!(y.try_send(frame(1, 0)), Err(Refused::Closed(_))));
        let mut left = 0;
        while a.take().is_some() {
            left += 1;
        }
        assert_eq!(
            left,
            2 * LANE_FRAMES,
            "what the lanes held is still forwarded"
        );
    }

    fn entry(route: usize) -> (RouteEntry, flume::Receiver<Frame>) {
        let (tx, rx) = flume::bounded(64);
        let e = RouteEntry {
            route,
            first_stage: route,
            queue: tx,
            weight: 1.0,
            in_flight: Arc::new(vec![AtomicUsize::new(0)]),
            room: Arc::new(Signal::default()),
        };
        (e, rx)
    }

    #[test]
    fn new_routes_take_over_and_the_old_ones_are_let_go_of() {
        let a = Admission::new();
        let stats = Arc::new(Stats::new(vec!["s".into()], vec!["a".into(), "b".into()]));
        let inlet = a.inlet(1);
        let (old, old_rx) = entry(0);
        let thread = a.spawn("f", vec![old], stats).unwrap();
        let send = |seq| {
            inlet
                .send_timeout(frame(0, seq), Duration::from_secs(5))
                .ok();
        };
        send(0);
        let f = old_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((f.seq, f.route), (0, 0));
        let (new, new_rx) = entry(1);
        a.set_routes(vec![new]);
        // The swap happens before the next frame is routed: every later frame goes to the new
        // route, and the old route's queue loses its last sender (its stages drain and end).
        for seq in 1..5 {
            send(seq);
            let f = new_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!((f.seq, f.route), (seq, 1));
        }
        assert!(old_rx.is_empty());
        assert!(old_rx.is_disconnected(), "the retired route is let go of");
        a.close();
        thread.join().unwrap();
        assert!(new_rx.is_disconnected());
    }
}
