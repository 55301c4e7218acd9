//! What travels through a sink's buffer, and what becomes of it: the [`Message`], the outcome
//! of offering it ([`Offer`]), and the sink's counters ([`SinkCounters`], [`SinkSummary`]).
//! Shared by the memory buffer and delivery thread ([`super::delivery`]) and the disk buffer
//! ([`super::disk`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde::Serialize;

use super::template::Template;
use crate::histogram::Histogram;

/// One result on its way to a sink.
#[derive(Debug, Clone)]
pub struct Message {
    /// Stream name (for templates and ordering).
    pub stream: Arc<str>,
    /// Frame sequence number within the stream.
    pub seq: u64,
    /// The JSON result.
    pub payload: Arc<str>,
    /// When the publisher offered it (for delivery latency).
    pub offered: Instant,
    /// Events: the rule that raised it (None: a frame's result).
    pub rule: Option<Arc<str>>,
    /// 0 for a frame's result; its events are numbered from 1 (with `seq`, a unique id).
    pub part: u32,
}

impl Message {
    /// A frame's result.
    pub fn result(stream: Arc<str>, seq: u64, payload: Arc<str>, offered: Instant) -> Self {
        Self {
            stream,
            seq,
            payload,
            offered,
            rule: None,
            part: 0,
        }
    }

    /// Where it goes: `results` rendered for a result, `events` for an event.
    pub fn topic(&self, results: &Template, events: &Template, pipeline: &str) -> String {
        match &self.rule {
            None => results.render(pipeline, &self.stream),
            Some(rule) => events.render_event(pipeline, &self.stream, rule),
        }
    }

    /// An id unique within the run: the stream, the frame's seq and the part.
    pub fn id(&self) -> String {
        match self.part {
            0 => format!("{}-{}", self.stream, self.seq),
            n => format!("{}-{}-{n}", self.stream, self.seq),
        }
    }
}

/// What happened to an offered result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Buffered.
    Queued,
    /// Buffered; this many of the oldest buffered results were dropped for it.
    DroppedOldest(u64),
    /// Not buffered: the buffer was full.
    DroppedNewest,
    /// Not buffered: the sink is closed.
    Closed,
}

/// Counters of one sink.
#[derive(Debug, Default)]
pub struct SinkCounters {
    /// Results offered by the publisher.
    pub offered: AtomicU64,
    /// Results the destination acknowledged.
    pub delivered: AtomicU64,
    /// Failed attempts (connects or sends) that were retried.
    pub retries: AtomicU64,
    /// Results sent again after a failed attempt that had already written them: each may be a
    /// duplicate at the destination.
    pub resent: AtomicU64,
    /// Results dropped because the buffer was full (`drop_oldest`, `drop_newest`).
    pub dropped_overflow: AtomicU64,
    /// Results the destination refused for good.
    pub dropped_rejected: AtomicU64,
    /// Results still buffered when the shutdown flush deadline passed (a disk buffer keeps
    /// them for the next run).
    pub left_at_shutdown: AtomicU64,
    /// Results an earlier run left in the disk buffer, delivered first by this one.
    pub recovered: AtomicU64,
    /// Disk-buffered results whose record failed its checksum: skipped, never delivered.
    pub dropped_corrupt: AtomicU64,
    /// Results in the buffer now.
    pub buffered: AtomicU64,
    /// Time from offer to acknowledgement.
    pub latency: Histogram,
    /// The message of a panic of the delivery thread, if it panicked.
    pub panic: std::sync::Mutex<Option<String>>,
}

impl SinkCounters {
    /// The message of a panic of the delivery thread, if it panicked.
    pub fn panicked(&self) -> Option<String> {
        self.panic.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A snapshot of [`SinkCounters`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SinkSummary {
    /// Sink name.
    pub name: String,
    /// Offered.
    pub offered: u64,
    /// Delivered.
    pub delivered: u64,
    /// Retried attempts.
    pub retries: u64,
    /// Possible duplicates.
    pub resent: u64,
    /// Dropped, buffer full.
    pub dropped_overflow: u64,
    /// Dropped, refused by the destination.
    pub dropped_rejected: u64,
    /// Not delivered by the shutdown deadline.
    pub left_at_shutdown: u64,
    /// Left by an earlier run in the disk buffer.
    pub recovered: u64,
    /// Disk-buffered results that failed their checksum.
    pub dropped_corrupt: u64,
    /// In the buffer now.
    pub buffered: u64,
    /// Median offer-to-acknowledgement time, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile offer-to-acknowledgement time, ms.
    pub p99_ms: Option<f64>,
}

impl SinkCounters {
    /// A snapshot.
    pub fn summary(&self, name: &str) -> SinkSummary {
        SinkSummary {
            name: name.to_string(),
            offered: self.offered.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            retries: self.retries.load(Relaxed),
            resent: self.resent.load(Relaxed),
            dropped_overflow: self.dropped_overflow.load(Relaxed),
            dropped_rejected: self.dropped_rejected.load(Relaxed),
            left_at_shutdown: self.left_at_shutdown.load(Relaxed),
            recovered: self.recovered.load(Relaxed),
            dropped_corrupt: self.dropped_corrupt.load(Relaxed),
            buffered: self.buffered.load(Relaxed),
            p50_ms: self.latency.quantile_ms(0.5),
            p99_ms: self.latency.quantile_ms(0.99),
        }
    }
}

impl SinkSummary {
    /// Whether every offered (or recovered) result is accounted for (after close).
    pub fn balanced(&self) -> bool {
        self.offered + self.recovered
            == self.delivered
                + self.dropped_overflow
                + self.dropped_rejected
                + self.dropped_corrupt
                + self.left_at_shutdown
                + self.buffered
    }
}
