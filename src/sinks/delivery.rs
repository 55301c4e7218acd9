//! The reliability layer every sink shares: a bounded buffer with a `when_full` policy, a
//! delivery thread that sends batches through a [`Transport`], retries with capped exponential
//! backoff and full jitter, and counters for every result.
//!
//! The buffer is in memory, or on disk ([`super::disk`], `buffer_type = "disk"`), where it
//! survives a crash and the next run delivers what it holds first (counted `recovered`).
//!
//! For every sink, once it has been closed:
//! `offered + recovered = delivered + dropped_overflow + dropped_rejected + dropped_corrupt +
//! left_at_shutdown`.
//! Results are delivered in the order they were offered; after a failed attempt the unacknowledged
//! rest of the batch is sent again, so a result the broker had received but not acknowledged may
//! arrive twice (counted as `resent`, "duplicates possible"): at-least-once.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::disk::DiskBuffer;
pub use super::message::{Message, Offer, SinkCounters, SinkSummary};
use super::settings::{Delivery, Messages, WhenFull};

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The connection or the broker failed; reconnect and send the rest again.
    Retriable,
    /// The broker refused the credentials. Retried too (the operator may fix the broker), but
    /// logged as an error; at start-up it stops the pipeline.
    Auth,
    /// The broker refused these results for good (too large, malformed): drop them, counted.
    Rejected,
}

/// A failed connect or send.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Kind.
    pub kind: FailureKind,
    /// Leading results of the batch the broker acknowledged before the failure.
    pub acked: usize,
    /// Leading results written to the connection (acknowledged or not); `>= acked`.
    pub sent: usize,
    /// For [`FailureKind::Rejected`]: results after `acked` the broker refused.
    pub rejected: usize,
    /// What went wrong (never with credentials).
    pub message: String,
}

impl Failure {
    /// A retriable failure with nothing acknowledged.
    pub fn retriable(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Retriable,
            acked: 0,
            sent: 0,
            rejected: 0,
            message: message.into(),
        }
    }

    /// A credentials failure.
    pub fn auth(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Auth,
            ..Self::retriable(message)
        }
    }

    /// Sets how far the batch got.
    pub fn progress(mut self, acked: usize, sent: usize) -> Self {
        self.acked = acked;
        self.sent = sent.max(acked);
        self
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A broker connection, driven by one delivery thread. Implementations are blocking; those
/// built on async clients own a current-thread tokio runtime.
pub trait Transport: Send {
    /// Connects (again). Called before the first send and after every failure.
    fn connect(&mut self) -> Result<(), Failure>;
    /// Delivers `batch` in order; `Ok` once the destination acknowledged all of it.
    fn send(&mut self, batch: &[Message]) -> Result<(), Failure>;
    /// Drops the connection (after a failure, and at the end).
    fn disconnect(&mut self) {}
    /// Called about every 100 ms while nothing is buffered (keep-alives).
    fn idle(&mut self) {}
}

#[derive(Debug, Default)]
struct BufState {
    queue: VecDeque<Message>,
    closed: bool,
    /// `block` gives up: a full buffer drops new results (set when a stopping pipeline has
    /// waited its flush timeout for a destination that does not come back).
    released: bool,
}

/// A bounded FIFO of results with a `when_full` policy.
#[derive(Debug)]
pub struct Buffer {
    state: Mutex<BufState>,
    items: Condvar,
    room: Condvar,
    capacity: usize,
    policy: WhenFull,
}

impl Buffer {
    /// An empty buffer.
    pub fn new(capacity: usize, policy: WhenFull) -> Self {
        Self {
            state: Mutex::new(BufState::default()),
            items: Condvar::new(),
            room: Condvar::new(),
            capacity: capacity.max(1),
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BufState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a result, applying the policy when full (`block` waits for room).
    pub fn offer(&self, m: Message) -> Offer {
        let mut s = self.lock();
        let mut outcome = Offer::Queued;
        while s.queue.len() >= self.capacity && !s.closed {
            match self.policy {
                WhenFull::Block if s.released => return Offer::DroppedNewest,
                WhenFull::Block => s = self.room.wait(s).unwrap_or_else(|e| e.into_inner()),
                WhenFull::DropOldest => {
                    s.queue.pop_front();
                    outcome = Offer::DroppedOldest(1);
                }
                WhenFull::DropNewest => return Offer::DroppedNewest,
            }
        }
        if s.closed {
            return Offer::Closed;
        }
        s.queue.push_back(m);
        drop(s);
        self.items.notify_one();
        outcome
    }

    /// Moves up to `max` results into `out`, waiting up to `wait` for the first. Returns `false`
    /// once the buffer is closed and empty.
    pub fn take(&self, max: usize, out: &mut Vec<Message>, wait: Duration) -> bool {
        let mut s = self.lock();
        if s.queue.is_empty() && !s.closed {
            s = self
                .items
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let n = s.queue.len().min(max);
        out.extend(s.queue.drain(..n));
        let open = !(s.closed && s.queue.is_empty() && n == 0);
        drop(s);
        if n > 0 {
            self.room.notify_all();
        }
        open
    }

    /// Refuses further offers and wakes every waiter.
    pub fn close(&self) {
        self.lock().closed = true;
        self.items.notify_all();
        self.room.notify_all();
    }

    /// Stops `block` from waiting: from now on a full buffer drops new results (counted).
    pub fn release_blocked(&self) {
        self.lock().released = true;
        self.room.notify_all();
    }

    /// Empties the buffer, returning how many results it held.
    pub fn drain(&self) -> usize {
        let n = {
            let mut s = self.lock();
            let n = s.queue.len();
            s.queue.clear();
            n
        };
        self.room.notify_all();
        n
    }

    /// Results held.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A sink's buffer: in memory, or on disk.
#[derive(Debug)]
pub enum Queue {
    /// See [`Buffer`].
    Memory(Buffer),
    /// See [`DiskBuffer`].
    Disk(Box<DiskBuffer>),
}

impl Queue {
    /// Adds a result, applying the policy when full.
    pub fn offer(&self, m: Message) -> Offer {
        match self {
            Self::Memory(b) => b.offer(m),
            Self::Disk(b) => b.offer(m),
        }
    }

    /// Moves up to `max` results into `out`, waiting up to `wait` for the first; `false` once
    /// closed and empty.
    pub fn take(&self, max: usize, out: &mut Vec<Message>, wait: Duration) -> bool {
        match self {
            Self::Memory(b) => b.take(max, out, wait),
            Self::Disk(b) => b.take(max, out, wait),
        }
    }

    /// Refuses further offers and wakes every waiter.
    pub fn close(&self) {
        match self {
            Self::Memory(b) => b.close(),
            Self::Disk(b) => b.close(),
        }
    }

    /// Stops `block` from waiting: from now on a full buffer drops new results (counted).
    pub fn release_blocked(&self) {
        match self {
            Self::Memory(b) => b.release_blocked(),
            Self::Disk(b) => b.release_blocked(),
        }
    }

    /// At shutdown: what is still buffered, counted as left. Memory forgets it; disk keeps it
    /// for the next run.
    pub fn leave(&self) -> usize {
        match self {
            Self::Memory(b) => b.drain(),
            Self::Disk(b) => b.leave(),
        }
    }

    /// The first `n` taken results are about to be sent; returns how many of them an earlier
    /// run may have sent already (disk only).
    fn sending(&self, n: usize) -> u64 {
        match self {
            Self::Memory(_) => 0,
            Self::Disk(b) => b.sending(n),
        }
    }

    /// The first `n` taken results are done with (disk: the acknowledgement moves).
    fn ack(&self, n: usize) {
        if let Self::Disk(b) = self {
            b.ack(n);
        }
    }

    /// Results waiting to be taken.
    pub fn len(&self) -> usize {
        match self {
            Self::Memory(b) => b.len(),
            Self::Disk(b) => b.len(),
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether less than half of the capacity is used.
    fn below_half(&self) -> bool {
        match self {
            Self::Memory(b) => b.len() * 2 < b.capacity,
            Self::Disk(b) => b.below_half(),
        }
    }
}

/// Capped exponential backoff with full jitter: attempt `n` waits a uniform random time in
/// `[0, min(max, initial * 2^n)]`, never less than `initial / 2`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A fresh backoff; `seed` makes the jitter repeatable.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        let unit = r as f64 / (1u64 << 53) as f64;
        cap.mul_f64(unit).max(self.initial / 2)
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A running sink: its buffer, counters and delivery thread.
pub struct SinkHandle {
    name: String,
    buffer: Arc<Queue>,
    counters: Arc<SinkCounters>,
    flush_deadline: Arc<Mutex<Option<Instant>>>,
    flush_timeout: Duration,
    thread: Option<JoinHandle<()>>,
    overflowing: bool,
    messages: Messages,
}

impl SinkHandle {
    /// Starts the delivery thread of `transport`; `connected` says whether it already is.
    pub fn start(
        name: String,
        transport: Box<dyn Transport>,
        connected: bool,
        delivery: &Delivery,
        counters: Arc<SinkCounters>,
    ) -> std::io::Result<Self> {
        let buffer = Arc::new(match &delivery.disk {
            None => Queue::Memory(Buffer::new(delivery.buffer, delivery.when_full)),
            Some(d) => Queue::Disk(Box::new(
                DiskBuffer::open(d, delivery.when_full, counters.clone())
                    .map_err(std::io::Error::other)?,
            )),
        });
        let flush_deadline = Arc::new(Mutex::new(None));
        let worker = Worker {
            name: name.clone(),
            transport,
            buffer: buffer.clone(),
            counters: counters.clone(),
            delivery: delivery.clone(),
            flush_deadline: flush_deadline.clone(),
            connected,
        };
        let thread = std::thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || {
                let counters = worker.counters.clone();
                if let Err(p) =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()))
                {
                    let message = crate::panics::panic_message(&*p);
                    *counters.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                }
            })?;
        Ok(Self {
            name,
            buffer,
            counters,
            flush_deadline,
            flush_timeout: delivery.flush_timeout,
            thread: Some(thread),
            overflowing: false,
            messages: delivery.messages,
        })
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counters.
    pub fn counters(&self) -> &Arc<SinkCounters> {
        &self.counters
    }

    /// The buffer, for [`Buffer::release_blocked`] from another thread while the publisher may
    /// be blocked in [`SinkHandle::offer`]; with the flush timeout to wait before releasing.
    pub fn blocked_release(&self) -> (Arc<Queue>, Duration) {
        (self.buffer.clone(), self.flush_timeout)
    }

    /// Hands a result to the sink (may block under `when_full = "block"`).
    pub fn offer(&mut self, m: Message) {
        match (self.messages, &m.rule) {
            (Messages::Results, Some(_)) | (Messages::Events, None) => return,
            _ => {}
        }
        self.counters.offered.fetch_add(1, Relaxed);
        // Counted as buffered before it is, so the delivery thread's decrement never comes first.
        self.counters.buffered.fetch_add(1, Relaxed);
        let outcome = self.buffer.offer(m);
        if outcome != Offer::Queued {
            // It, or the oldest results, were dropped; the buffer holds fewer than counted.
            let n = match outcome {
                Offer::DroppedOldest(n) => n,
                _ => 1,
            };
            self.counters.buffered.fetch_sub(n, Relaxed);
            self.counters.dropped_overflow.fetch_add(n, Relaxed);
            if !self.overflowing {
                self.overflowing = true;
                tracing::warn!(
                    sink = %self.name,
                    "Sink buffer full: dropping results ({outcome:?}) until it drains; see dropped_overflow."
                );
            }
        }
        if self.overflowing && outcome == Offer::Queued && self.buffer.below_half() {
            self.overflowing = false;
            tracing::info!(sink = %self.name, dropped = self.counters.dropped_overflow.load(Relaxed), "Sink buffer has room again.");
        }
    }

    /// Delivers what is buffered within the flush timeout, stops the thread and returns the
    /// final counters.
    pub fn close(mut self) -> SinkSummary {
        self.shutdown();
        self.counters.summary(&self.name)
    }

    fn shutdown(&mut self) {
        let Some(t) = self.thread.take() else { return };
        *self
            .flush_deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + self.flush_timeout);
        self.buffer.close();
        if t.join().is_err() || self.counters.panicked().is_some() {
            tracing::error!(sink = %self.name, "Sink thread panicked.");
            let left = self.buffer.leave() as u64;
            self.counters.left_at_shutdown.fetch_add(left, Relaxed);
        }
        let left = self.counters.left_at_shutdown.load(Relaxed);
        if left > 0 {
            tracing::error!(sink = %self.name, left, "Sink shut down with undelivered results.");
        }
    }
}

impl Drop for SinkHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    name: String,
    transport: Box<dyn Transport>,
    buffer: Arc<Queue>,
    counters: Arc<SinkCounters>,
    delivery: Delivery,
    flush_deadline: Arc<Mutex<Option<Instant>>>,
    connected: bool,
}

impl Worker {
    fn deadline(&self) -> Option<Instant> {
        *self
            .flush_deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn past_deadline(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Sleeps `d`, or less if the flush deadline comes first.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            let now = Instant::now();
            let until = self.deadline().map_or(end, |x| x.min(end));
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(50)));
        }
    }

    fn delivered(&self, batch: &[Message]) {
        let now = Instant::now();
        for m in batch {
            self.counters
                .latency
                .record(now.duration_since(m.offered).as_nanos() as u64);
        }
        let n = batch.len() as u64;
        self.counters.delivered.fetch_add(n, Relaxed);
    }

    fn run(mut self) {
        let seed = self.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut backoff = Backoff::new(
            self.delivery.retry_initial,
            self.delivery.retry_max,
            seed ^ std::process::id() as u64,
        );
        let mut inflight: Vec<Message> = Vec::with_capacity(self.delivery.batch);
        // Messages at the front of `inflight` that a failed attempt had written.
        let mut written = 0usize;
        let mut connected = self.connected;
        // Since when delivery has been failing, and the last error logged.
        let mut outage: Option<(Instant, String)> = None;
        loop {
            if inflight.is_empty() {
                let open = self.buffer.take(
                    self.delivery.batch,
                    &mut inflight,
                    Duration::from_millis(100),
                );
                self.counters
                    .buffered
                    .fetch_sub(inflight.len() as u64, Relaxed);
                if !open {
                    break;
                }
                if inflight.is_empty() {
                    if connected {
                        self.transport.idle();
                    }
                    continue;
                }
            }
            if self.past_deadline() {
                break;
            }
            let attempt = if connected {
                Ok(())
            } else {
                self.transport.connect()
            };
            let earlier = self.buffer.sending(inflight.len());
            if earlier > 0 {
                // Written by a run that stopped before the destination acknowledged them.
                self.counters.resent.fetch_add(earlier, Relaxed);
            }
            let result = attempt.and_then(|()| {
                connected = true;
                self.transport.send(&inflight)
            });
            match result {
                Ok(()) => {
                    self.delivered(&inflight);
                    self.buffer.ack(inflight.len());
                    inflight.clear();
                    written = 0;
                    backoff.reset();
                    if let Some((since, _)) = outage.take() {
                        tracing::info!(
                            sink = %self.name,
                            outage_s = since.elapsed().as_secs_f64(),
                            retries = self.counters.retries.load(Relaxed),
                            "Sink delivering again."
                        );
                    }
                }
                Err(f) => {
                    let acked = f.acked.min(inflight.len());
                    self.delivered(&inflight[..acked]);
                    self.buffer.ack(acked);
                    inflight.drain(..acked);
                    written = written.saturating_sub(acked);
                    if f.kind == FailureKind::Rejected {
                        let n = f
                            .rejected
                            .clamp(1, inflight.len().max(1))
                            .min(inflight.len());
                        inflight.drain(..n);
                        self.buffer.ack(n);
                        written = written.saturating_sub(n);
                        self.counters.dropped_rejected.fetch_add(n as u64, Relaxed);
                        tracing::error!(sink = %self.name, results = n, error = %f, "Destination refused results; dropped.");
                        continue;
                    }
                    // Those written in this attempt beyond the acknowledged ones will go again.
                    let now_written = f.sent.saturating_sub(acked).min(inflight.len());
                    if now_written > written {
                        self.counters
                            .resent
                            .fetch_add((now_written - written) as u64, Relaxed);
                        written = now_written;
                    }
                    connected = false;
                    self.transport.disconnect();
                    self.counters.retries.fetch_add(1, Relaxed);
                    let changed = outage.as_ref().is_none_or(|(_, m)| *m != f.message);
                    if changed {
                        if f.kind == FailureKind::Auth {
                            tracing::error!(sink = %self.name, error = %f, "Sink refused by the destination (credentials); retrying.");
                        } else {
                            tracing::warn!(sink = %self.name, error = %f, buffered = self.buffer.len(), "Sink delivery failed; buffering and retrying.");
                        }
                    }
                    let since = outage.map_or_else(Instant::now, |(s, _)| s);
                    outage = Some((since, f.message));
                    self.pause(backoff.next_delay());
                }
            }
        }
        let left = inflight.len() + self.buffer.leave();
        self.counters.buffered.store(0, Relaxed);
        self.counters
            .left_at_shutdown
            .fetch_add(left as u64, Relaxed);
        self.transport.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Message {
        Message::result(
            "s".into(),
            seq,
            format!("{{\"seq\":{seq}}}").into(),
            Instant::now(),
        )
    }

    fn seqs(b: &Buffer) -> Vec<u64> {
        let mut out = Vec::new();
        b.take(100, &mut out, Duration::ZERO);
        out.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn full_buffers_follow_their_policy() {
        let b = Buffer::new(2, WhenFull::DropOldest);
        assert_eq!(b.offer(msg(1)), Offer::Queued);
        assert_eq!(b.offer(msg(2)), Offer::Queued);
        assert_eq!(b.offer(msg(3)), Offer::DroppedOldest(1));
        assert_eq!(seqs(&b), [2, 3]);
        let b = Buffer::new(2, WhenFull::DropNewest);
        b.offer(msg(1));
        b.offer(msg(2));
        assert_eq!(b.offer(msg(3)), Offer::DroppedNewest);
        assert_eq!(seqs(&b), [1, 2]);
    }

    #[test]
    fn a_blocked_offer_waits_for_room_and_close_releases_it() {
        let b = Arc::new(Buffer::new(1, WhenFull::Block));
        b.offer(msg(1));
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.offer(msg(2)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !t.is_finished(),
            "offer into a full blocking buffer returned"
        );
        assert_eq!(seqs(&b), [1]);
        assert_eq!(t.join().unwrap(), Offer::Queued);
        assert_eq!(seqs(&b), [2]);
        assert_eq!(b.offer(msg(3)), Offer::Queued);
        let b3 = b.clone();
        let t = std::thread::spawn(move || b3.offer(msg(4)));
        std::thread::sleep(Duration::from_millis(20));
        b.close();
        assert_eq!(t.join().unwrap(), Offer::Closed);
        // Released, a full blocking buffer drops instead of waiting.
        let b = Arc::new(Buffer::new(1, WhenFull::Block));
        b.offer(msg(1));
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.offer(msg(2)));
        std::thread::sleep(Duration::from_millis(20));
        b.release_blocked();
        assert_eq!(t.join().unwrap(), Offer::DroppedNewest);
        assert_eq!(seqs(&b), [1]);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        let d: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(
            d.iter()
                .all(|x| *x >= Duration::from_millis(50) && *x <= Duration::from_secs(2))
        );
        assert!(d[0] <= Duration::from_millis(100));
        let late_max = d[6..].iter().max().unwrap();
        assert!(*late_max > Duration::from_millis(400), "{d:?}");
        let distinct: std::collections::HashSet<_> = d.iter().collect();
        assert!(distinct.len() > 8, "no jitter: {d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    /// A transport that fails on a schedule, recording what it was sent.
    struct Flaky {
        log: Arc<Mutex<Vec<u64>>>,
        /// Per send call: how many to accept before failing (None = accept all).
        plan: VecDeque<Option<(usize, FailureKind)>>,
    }

    impl Transport for Flaky {
        fn connect(&mut self) -> Result<(), Failure> {
            Ok(())
        }
        fn send(&mut self, batch: &[Message]) -> Result<(), Failure> {
            let step = self.plan.pop_front().flatten();
            let mut log = self.log.lock().unwrap();
            match step {
                None => {
                    log.extend(batch.iter().map(|m| m.seq));
                    Ok(())
                }
                Some((n, kind)) => {
                    let n = n.min(batch.len());
                    log.extend(batch[..n].iter().map(|m| m.seq));
                    let mut f = Failure::retriable("boom").progress(n, batch.len());
                    f.kind = kind;
                    f.rejected = 1;
                    Err(f)
                }
            }
        }
    }

    fn delivery(batch: usize) -> Delivery {
        Delivery {
            batch,
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(2),
            ..Delivery::default()
        }
    }

    #[test]
    fn failures_resend_the_unacknowledged_rest_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let t = Flaky {
            log: log.clone(),
            plan: [
                Some((2, FailureKind::Retriable)),
                Some((0, FailureKind::Rejected)),
                None,
            ]
            .into(),
        };
        let counters = Arc::new(SinkCounters::default());
        let mut h =
            SinkHandle::start("t".into(), Box::new(t), true, &delivery(4), counters).unwrap();
        for s in 0..10 {
            h.offer(msg(s));
        }
        let sum = h.close();
        let log = log.lock().unwrap().clone();
        // Attempt 1 acked up to 2 of its batch and failed; attempt 2 had one refused; the rest went.
        assert_eq!(sum.offered, 10);
        assert_eq!(sum.dropped_rejected, 1);
        assert_eq!(sum.delivered, 9);
        assert!(sum.balanced(), "{sum:?}");
        assert_eq!(sum.retries, 1);
        let mut sorted = log.clone();
        sorted.sort_unstable();
        assert_eq!(log, sorted, "out of order: {log:?}");
        assert_eq!(log.len(), 9);
    }

    #[test]
    fn a_dead_destination_is_reported_as_left_at_shutdown() {
        struct Dead;
        impl Transport for Dead {
            fn connect(&mut self) -> Result<(), Failure> {
                Err(Failure::retriable("connection refused"))
            }
            fn send(&mut self, _: &[Message]) -> Result<(), Failure> {
                unreachable!()
            }
        }
        let d = Delivery {
            flush_timeout: Duration::from_millis(50),
            buffer: 3,
            ..delivery(2)
        };
        let counters = Arc::new(SinkCounters::default());
        let mut h = SinkHandle::start("dead".into(), Box::new(Dead), false, &d, counters).unwrap();
        for s in 0..6 {
            h.offer(msg(s));
        }
        let sum = h.close();
        assert_eq!(sum.delivered, 0);
        assert!(sum.retries >= 1);
        assert_eq!(sum.offered, 6);
        assert!(sum.dropped_overflow >= 1, "{sum:?}");
        assert!(sum.balanced(), "{sum:?}");
        assert_eq!(sum.left_at_shutdown + sum.dropped_overflow, 6);
    }

    /// A destination down until `up_at`, then accepting everything.
    struct DownUntil {
        up_at: Instant,
        got: Arc<Mutex<Vec<u64>>>,
    }

    impl Transport for DownUntil {
        fn connect(&mut self) -> Result<(), Failure> {
            if Instant::now() < self.up_at {
                return Err(Failure::retriable("connection refused"));
            }
            Ok(())
        }
        fn send(&mut self, batch: &[Message]) -> Result<(), Failure> {
            self.connect()?;
            self.got.lock().unwrap().extend(batch.iter().map(|m| m.seq));
            Ok(())
        }
    }

    #[test]
    fn a_small_disk_buffer_in_an_outage_follows_its_policy_and_counts_like_memory() {
        for policy in [WhenFull::DropOldest, WhenFull::DropNewest, WhenFull::Block] {
            let dir = tempfile::tempdir().unwrap();
            // About 300 results fit; 2000 are offered while the destination is down for 0.3 s
            // (forever for the dropping policies, which never wait).
            let down = match policy {
                WhenFull::Block => Duration::from_millis(300),
                _ => Duration::from_secs(3600),
            };
            let got = Arc::new(Mutex::new(Vec::new()));
            let t = DownUntil {
                up_at: Instant::now() + down,
                got: got.clone(),
            };
            let mut disk = super::super::disk::DiskSettings::new(
                dir.path().to_path_buf(),
                16 << 10,
                Duration::from_millis(100),
            );
            disk.segment_bytes = 2 << 10;
            let d = Delivery {
                when_full: policy,
                flush_timeout: Duration::from_millis(100),
                disk: Some(disk),
                ..delivery(16)
            };
            let counters = Arc::new(SinkCounters::default());
            let mut h = SinkHandle::start("d".into(), Box::new(t), false, &d, counters).unwrap();
            let t0 = Instant::now();
            for s in 0..2000 {
                h.offer(msg(s));
            }
            let waited = t0.elapsed();
            let sum = h.close();
            assert!(sum.balanced(), "{policy:?}: {sum:?}");
            assert_eq!(sum.offered, 2000);
            let got = got.lock().unwrap().clone();
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "{policy:?}: out of order"
            );
            match policy {
                WhenFull::Block => {
                    assert!(
                        waited >= Duration::from_millis(200),
                        "{policy:?} did not wait"
                    );
                    assert_eq!((sum.delivered, sum.dropped_overflow), (2000, 0), "{sum:?}");
                    assert_eq!(got, (0..2000).collect::<Vec<_>>());
                }
                _ => {
                    assert!(sum.dropped_overflow > 1000, "{policy:?}: {sum:?}");
                    assert_eq!(sum.delivered, 0);
                    assert_eq!(sum.left_at_shutdown + sum.dropped_overflow, 2000);
                }
            }
            // What was left is on disk for the next run, the newest (drop_oldest) or the
            // oldest (drop_newest) kept.
            if policy != WhenFull::Block {
                let c = Arc::new(SinkCounters::default());
                let b = super::super::disk::DiskBuffer::open(
                    d.disk.as_ref().unwrap(),
                    policy,
                    c.clone(),
                )
                .unwrap();
                assert_eq!(c.recovered.load(Relaxed), sum.left_at_shutdown);
                let mut out = Vec::new();
                b.take(5000, &mut out, Duration::ZERO);
                let first = out.first().unwrap().seq;
                let last = out.last().unwrap().seq;
                if policy == WhenFull::DropOldest {
                    assert_eq!(last, 1999);
                } else {
                    assert_eq!(first, 0);
                }
            }
        }
    }
}
