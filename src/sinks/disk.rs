//! A sink buffer on disk (`buffer_type = "disk"`): results survive a crash of the process and
//! are delivered by the next run, in order, before its own.
//!
//! A buffer is a folder of its own (one per pipeline and sink) holding:
//! - segments `<first id>.seg`: records appended in offer order, each
//!   `magic u32 | length u32 | crc32 u32 | body`, the CRC over the length and the body; the body
//!   holds the record's id (consecutive from 0 over the buffer's life), the stream, the frame's
//!   seq and part, the rule and the payload. A segment is closed at about `max_bytes / 8` and
//!   deleted once every record in it is acknowledged;
//! - `ack`: the id of the first record not yet acknowledged by the destination, and the id
//!   below which records may have been written to it (those are counted `resent` when sent
//!   again), with a CRC;
//! - `lock`: held (`flock`) while a process uses the buffer; a second process is refused.
//!
//! Durability: every offer is one `write(2)` of its record before `offer` returns, so a result
//! counted published survives a crash or `kill -9` of the process. The segment and the `ack`
//! file are `fsync`'d every `fsync_ms` (default 100 ms) while there are new writes, when a
//! segment is closed, and at shutdown: a crash of the machine (power loss, kernel panic) loses
//! at most the last `fsync_ms` of results, and may deliver again up to `fsync_ms` of
//! acknowledged ones.
//!
//! Corruption: a record whose CRC does not match (a flipped byte, a torn write at the end of
//! a crashed run) is skipped, never delivered, and counted `dropped_corrupt`: within a segment
//! by the gap in the ids of the good records around it; at the end of a segment, one per record
//! start (magic) found in the bad bytes, at least one.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::message::{Message, Offer, SinkCounters};
pub use super::settings::DiskSettings;
use super::settings::WhenFull;

/// Marks the start of a record.
const MAGIC: u32 = 0x3142_5050; // "PPB1" little-endian
/// Marks the `ack` file.
const ACK_MAGIC: u32 = 0x4b41_5050; // "PPAK"
/// Magic, length, CRC.
const HEADER: usize = 12;
/// A length above this is corruption.
const MAX_RECORD: usize = 64 << 20;
/// Payload bytes of the newest results also kept in memory, so that a reader keeping up with
/// the writer takes them from there instead of reading and decoding them back.
const TAIL_BYTES: usize = 8 << 20;
/// Bytes read from a segment at a time.
const CHUNK: usize = 256 << 10;

/// Errors opening a disk buffer.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The folder or a file in it cannot be created, read or written.
    #[error("buffer folder {dir}: {source}")]
    Io {
        /// The folder.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the buffer.
    #[error(
        "buffer folder {dir} is in use by another poolpipe process (lock file {dir}/lock); \
         two processes cannot share a sink's disk buffer: stop the other one or give this one \
         its own --data-dir"
    )]
    Locked {
        /// The folder.
        dir: PathBuf,
    },
}

/// One segment file.
#[derive(Debug, Clone)]
struct Segment {
    /// Id of its first record (also its name).
    first: u64,
    /// Id after its last record (the active segment's grows).
    end: u64,
    /// Bytes in it.
    len: u64,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// A result just written, kept in memory for the reader.
#[derive(Debug)]
struct Tail {
    id: u64,
    message: Message,
    /// The segment it is in, and the offset after it.
    seg: u64,
    end: u64,
}

/// Where the reader is.
#[derive(Debug)]
struct Reader {
    /// The segment it reads (its `first`).
    seg: Option<u64>,
    /// That segment's file, opened when first read from.
    file: Option<(u64, File)>,
    /// Bytes read from the segment and not yet parsed; `buf[0]` is at file offset `buf_at`.
    buf: Vec<u8>,
    buf_at: u64,
    /// Id the next good record should have.
    expect: u64,
}

#[derive(Debug)]
struct State {
    /// Live segments, oldest first; the last is written to.
    segments: VecDeque<Segment>,
    writer: File,
    next_id: u64,
    reader: Reader,
    /// Ids of records taken and not yet acknowledged, in order.
    taken: VecDeque<u64>,
    /// First id not acknowledged.
    acked: u64,
    /// Ids below this may have been written to the destination.
    sent: u64,
    /// Ids below this come from an earlier run.
    recovered_end: u64,
    /// Ids below this an earlier run may have written to the destination.
    earlier_sent: u64,
    /// Ids below this have been checked by [`DiskBuffer::sending`].
    counted_resent: u64,
    /// What the `ack` file holds.
    ack_written: (u64, u64),
    /// Bytes of live segments.
    bytes: u64,
    /// Writes since the last fsync.
    dirty: bool,
    /// Closed segments not yet fsync'd.
    unsynced: Vec<File>,
    /// The newest results, in memory too (see [`TAIL_BYTES`]).
    tail: VecDeque<Tail>,
    tail_bytes: usize,
    /// Results on disk not yet read (nor dropped, nor found corrupt).
    pending: u64,
    closed: bool,
    released: bool,
    record: Vec<u8>,
}

impl State {
    /// Drops the oldest result kept in memory, returning it.
    fn pop_tail(&mut self) -> Option<Tail> {
        let t = self.tail.pop_front()?;
        self.tail_bytes -= t.message.payload.len();
        Some(t)
    }
}

/// A sink buffer on disk. See the module documentation.
#[derive(Debug)]
pub struct DiskBuffer {
    dir: PathBuf,
    state: Mutex<State>,
    items: Condvar,
    room: Condvar,
    max_bytes: u64,
    segment_bytes: u64,
    policy: WhenFull,
    fsync: Duration,
    last_sync: Mutex<Instant>,
    ack_file: File,
    counters: Arc<SinkCounters>,
    /// When this run opened it (the offer time of recovered records).
    base: Instant,
    _lock: File,
}

fn io(dir: &Path) -> impl Fn(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        dir: dir.to_path_buf(),
        source,
    }
}

/// Encodes a record into `out` (cleared first).
fn encode(out: &mut Vec<u8>, id: u64, offered_ns: u64, m: &Message) {
    out.clear();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&offered_ns.to_le_bytes());
    out.extend_from_slice(&m.seq.to_le_bytes());
    out.extend_from_slice(&m.part.to_le_bytes());
    let rule = m.rule.as_deref().unwrap_or("");
    for s in [&*m.stream, rule] {
        let b = s.as_bytes();
        out.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
    }
    out.extend_from_slice(m.payload.as_bytes());
    let len = (out.len() - HEADER) as u32;
    out[4..8].copy_from_slice(&len.to_le_bytes());
    let crc = checksum(&out[4..8], &out[HEADER..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
}

fn checksum(len: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(body);
    h.finalize()
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default())
}

/// A decoded record.
struct Record {
    id: u64,
    offered_ns: u64,
    seq: u64,
    part: u32,
    stream: String,
    rule: Option<String>,
    payload: String,
}

/// What is at the start of `b`.
enum Parse {
    /// A good record of this many bytes.
    Good(Record, usize),
    /// Too few bytes to tell.
    Short,
    /// Not a good record.
    Bad,
}

fn parse(b: &[u8]) -> Parse {
    if b.len() < HEADER {
        return if b.len() >= 4 && u32_at(b, 0) != MAGIC {
            Parse::Bad
        } else {
            Parse::Short
        };
    }
    if u32_at(b, 0) != MAGIC {
        return Parse::Bad;
    }
    let len = u32_at(b, 4) as usize;
    if !(28..=MAX_RECORD).contains(&len) {
        return Parse::Bad;
    }
    if b.len() < HEADER + len {
        return Parse::Short;
    }
    let body = &b[HEADER..HEADER + len];
    if checksum(&b[4..8], body) != u32_at(b, 8) {
        return Parse::Bad;
    }
    let decode = || -> Option<Record> {
        let mut i = 28;
        let mut text = || -> Option<String> {
            let n = u16_at(body, i) as usize;
            let s = std::str::from_utf8(body.get(i + 2..i + 2 + n)?).ok()?;
            i += 2 + n;
            Some(s.to_string())
        };
        let stream = text()?;
        let rule = text()?;
        let payload = std::str::from_utf8(body.get(i..)?).ok()?.to_string();
        Some(Record {
            id: u64_at(body, 0),
            offered_ns: u64_at(body, 8),
            seq: u64_at(body, 16),
            part: u32_at(body, 24),
            stream,
            rule: (!rule.is_empty()).then_some(rule),
            payload,
        })
    };
    match decode() {
        Some(r) => Parse::Good(r, HEADER + len),
        None => Parse::Bad,
    }
}

/// Where a record starts again after `from`, or `None` (with the bytes that may still begin
/// one kept).
fn resync(b: &[u8], from: usize) -> Option<usize> {
    let m = MAGIC.to_le_bytes();
    (from..b.len().saturating_sub(3)).find(|&i| b[i..i + 4] == m)
}

/// Record starts (magic) in bad bytes: the records they held, at least one.
fn records_in(bad: &[u8]) -> u64 {
    let m = MAGIC.to_le_bytes();
    let n = bad.windows(4).filter(|w| *w == m).count() as u64;
    n.max(1)
}

/// What a scan of a whole segment found.
struct Scan {
    /// Id after the last good record, or None when it has none.
    last_end: Option<u64>,
    /// Bad bytes after the last good record: records they held.
    trailing: u64,
}

fn scan_segment(data: &[u8]) -> Scan {
    let mut at = 0;
    let mut last_end = None;
    let mut bad_from: Option<usize> = None;
    let mut trailing = 0;
    while at < data.len() {
        match parse(&data[at..]) {
            Parse::Good(r, n) => {
                last_end = Some(r.id + 1);
                bad_from = None;
                at += n;
            }
            Parse::Short | Parse::Bad => {
                bad_from.get_or_insert(at);
                match resync(data, at + 1) {
                    Some(i) => at = i,
                    None => break,
                }
            }
        }
    }
    if let Some(from) = bad_from {
        trailing = records_in(&data[from..]);
    }
    Scan { last_end, trailing }
}

fn write_ack(f: &File, acked: u64, sent: u64) -> std::io::Result<()> {
    let mut b = [0u8; 24];
    b[0..4].copy_from_slice(&ACK_MAGIC.to_le_bytes());
    b[4..12].copy_from_slice(&acked.to_le_bytes());
    b[12..20].copy_from_slice(&sent.to_le_bytes());
    let crc = crc32fast::hash(&b[0..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&b, 0)
}

fn read_ack(f: &File) -> Option<(u64, u64)> {
    let mut b = [0u8; 24];
    f.read_exact_at(&mut b, 0).ok()?;
    (u32_at(&b, 0) == ACK_MAGIC && crc32fast::hash(&b[0..20]) == u32_at(&b, 20))
        .then(|| (u64_at(&b, 4), u64_at(&b, 12)))
}

impl DiskBuffer {
    /// Opens (or creates) the buffer in `s.dir`: takes its lock, finds what an earlier run left
    /// unacknowledged (counted `recovered`, and `buffered` until delivered) and starts a new
    /// segment for this run's results.
    pub fn open(
        s: &DiskSettings,
        policy: WhenFull,
        counters: Arc<SinkCounters>,
    ) -> Result<Self, DiskError> {
        let dir = &s.dir;
        let err = io(dir);
        std::fs::create_dir_all(dir).map_err(&err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(&err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DiskError::Locked { dir: dir.clone() });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        let ack_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("ack"))
            .map_err(&err)?;
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)
            .map_err(&err)?
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        firsts.sort_unstable();
        let ack = read_ack(&ack_file);
        let mut segments = VecDeque::new();
        let mut next_id = 0;
        let mut bytes = 0;
        for &first in &firsts {
            let data = std::fs::read(segment_path(dir, first)).map_err(&err)?;
            let scan = scan_segment(&data);
            let end = scan.last_end.unwrap_or(first).max(first) + scan.trailing;
            next_id = next_id.max(end);
            bytes += data.len() as u64;
            segments.push_back(Segment {
                first,
                end,
                len: data.len() as u64,
            });
        }
        let oldest = segments.front().map_or(next_id, |s| s.first);
        let (acked, sent) = match ack {
            Some((a, s)) => (a.clamp(oldest, next_id), s.clamp(oldest, next_id)),
            None if segments.is_empty() => (0, 0),
            None => {
                tracing::warn!(dir = %dir.display(), "Disk buffer without a readable ack file: delivering all it holds; some may be duplicates (counted resent).");
                (oldest, next_id)
            }
        };
        // Segments fully acknowledged by the earlier run.
        while segments.front().is_some_and(|s| s.end <= acked) {
            let s = segments.pop_front().unwrap_or_else(|| unreachable!());
            let _ = std::fs::remove_file(segment_path(dir, s.first));
            bytes -= s.len;
        }
        // Ids missing between segments were dropped for room (counted then).
        let recovered: u64 = segments
            .iter()
            .map(|g| g.end.saturating_sub(g.first.max(acked)))
            .sum();
        let writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, next_id))
            .map_err(&err)?;
        let existing = writer.metadata().map_err(&err)?.len();
        if segments.back().is_some_and(|s| s.first == next_id) {
            // The last segment holds no good record (a crash right after it was started, or
            // only bad bytes, already counted in `next_id`): start it afresh.
            writer.set_len(0).map_err(&err)?;
            bytes -= existing;
            segments.pop_back();
        }
        segments.push_back(Segment {
            first: next_id,
            end: next_id,
            len: 0,
        });
        write_ack(&ack_file, acked, sent).map_err(&err)?;
        ack_file.sync_data().map_err(&err)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        counters.recovered.fetch_add(recovered, Relaxed);
        counters.buffered.fetch_add(recovered, Relaxed);
        if recovered > 0 {
            tracing::info!(dir = %dir.display(), recovered, "Disk buffer holds results an earlier run did not deliver; delivering them first.");
        }
        let segment_bytes = s.segment_bytes.max(1);
        Ok(Self {
            dir: dir.clone(),
            state: Mutex::new(State {
                segments,
                writer,
                next_id,
                reader: Reader {
                    seg: None,
                    file: None,
                    buf: Vec::new(),
                    buf_at: 0,
                    expect: acked,
                },
                taken: VecDeque::new(),
                acked,
                sent,
                recovered_end: next_id,
                earlier_sent: sent,
                counted_resent: 0,
                ack_written: (acked, sent),
                bytes,
                dirty: false,
                unsynced: Vec::new(),
                tail: VecDeque::new(),
                tail_bytes: 0,
                pending: recovered,
                closed: false,
                released: false,
                record: Vec::new(),
            }),
            items: Condvar::new(),
            room: Condvar::new(),
            max_bytes: s.max_bytes,
            segment_bytes,
            policy,
            fsync: s.fsync,
            last_sync: Mutex::new(Instant::now()),
            ack_file,
            counters,
            base: Instant::now(),
            _lock: lock,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a result, applying the policy when `max_bytes` is reached or the disk is full
    /// (`block` waits for acknowledgements to free a segment). `DroppedOldest(n)`: the `n`
    /// oldest unread results were dropped (a whole segment) to make room.
    pub fn offer(&self, m: Message) -> Offer {
        let mut s = self.lock();
        let offered_ns = m.offered.saturating_duration_since(self.base).as_nanos() as u64;
        let id = s.next_id;
        let mut record = std::mem::take(&mut s.record);
        encode(&mut record, id, offered_ns, &m);
        let need = record.len() as u64;
        let mut dropped = 0;
        let outcome = loop {
            if s.closed {
                break Offer::Closed;
            }
            let fits = s.bytes + need <= self.max_bytes;
            if fits {
                match self.append(&mut s, &record, &m) {
                    Ok(()) => {
                        break if dropped > 0 {
                            Offer::DroppedOldest(dropped)
                        } else {
                            Offer::Queued
                        };
                    }
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "Disk buffer write failed (disk full?); applying when_full.");
                    }
                }
            } else if need > self.max_bytes {
                break Offer::DroppedNewest;
            }
            match self.policy {
                WhenFull::DropNewest => break Offer::DroppedNewest,
                WhenFull::Block if s.released => break Offer::DroppedNewest,
                WhenFull::Block => {
                    s = self
                        .room
                        .wait_timeout(s, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                WhenFull::DropOldest => match self.drop_oldest_segment(&mut s) {
                    Some(n) => dropped += n,
                    None => break Offer::DroppedNewest,
                },
            }
        };
        s.record = record;
        drop(s);
        if matches!(outcome, Offer::Queued | Offer::DroppedOldest(_)) {
            self.items.notify_one();
        }
        outcome
    }

    fn append(&self, s: &mut State, record: &[u8], m: &Message) -> std::io::Result<()> {
        let (seg, len) = s.segments.back().map_or((0, 0), |g| (g.first, g.len));
        if let Err(e) = s.writer.write_all(record) {
            // Leave no partial record behind.
            let _ = s.writer.set_len(len);
            return Err(e);
        }
        let n = record.len() as u64;
        s.next_id += 1;
        s.pending += 1;
        s.bytes += n;
        s.dirty = true;
        let next = s.next_id;
        if let Some(g) = s.segments.back_mut() {
            g.len += n;
            g.end = next;
        }
        s.tail.push_back(Tail {
            id: next - 1,
            message: m.clone(),
            seg,
            end: len + n,
        });
        s.tail_bytes += m.payload.len();
        while s.tail_bytes > TAIL_BYTES && s.pop_tail().is_some() {}
        if len + n >= self.segment_bytes {
            // Close the segment; the next sync makes it durable (never in the offering thread).
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(segment_path(&self.dir, next))?;
            let old = std::mem::replace(&mut s.writer, f);
            s.unsynced.push(old);
            s.segments.push_back(Segment {
                first: next,
                end: next,
                len: 0,
            });
        }
        Ok(())
    }

    /// Drops the oldest segment nobody reads yet (not the reader's, not the active one):
    /// returns how many results it held.
    fn drop_oldest_segment(&self, s: &mut State) -> Option<u64> {
        let reading = s.reader.seg;
        let last = s.segments.len().checked_sub(1)?;
        let i = (0..last).find(|&i| reading.is_none_or(|r| s.segments[i].first > r))?;
        // Before the reader: its records have been taken; never drop those.
        if s.segments[i].end <= s.reader.expect {
            return None;
        }
        let g = s.segments.remove(i)?;
        let _ = std::fs::remove_file(segment_path(&self.dir, g.first));
        s.bytes -= g.len;
        let from = g.first.max(s.reader.expect);
        let n = g.end - from;
        if s.reader.expect >= g.first {
            s.reader.expect = g.end;
        }
        s.pending -= n;
        let tail_bytes: usize = s
            .tail
            .iter()
            .filter(|t| t.id >= g.first && t.id < g.end)
            .map(|t| t.message.payload.len())
            .sum();
        s.tail.retain(|t| t.id < g.first || t.id >= g.end);
        s.tail_bytes -= tail_bytes;
        Some(n)
    }

    /// Moves up to `max` results into `out`, waiting up to `wait` for the first. Returns `false`
    /// once closed with nothing left to read.
    pub fn take(&self, max: usize, out: &mut Vec<Message>, wait: Duration) -> bool {
        let mut s = self.lock();
        let mut n = self.read(&mut s, max, out);
        if n == 0 && !s.closed {
            s = self
                .items
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            n = self.read(&mut s, max, out);
        }
        let open = !(s.closed && n == 0 && Self::unread(&s) == 0);
        drop(s);
        self.maybe_sync();
        open
    }

    /// Reads good records into `out` (from memory while the reader keeps up with the writer);
    /// counts the bad ones it skips.
    fn read(&self, s: &mut State, max: usize, out: &mut Vec<Message>) -> usize {
        let mut n = 0;
        let mut corrupt = 0u64;
        while n < max {
            // Kept in memory: no read, no decoding.
            while s.tail.front().is_some_and(|t| t.id < s.reader.expect) {
                s.pop_tail();
            }
            if s.tail.front().is_some_and(|t| t.id == s.reader.expect)
                && let Some(t) = s.pop_tail()
            {
                let r = &mut s.reader;
                r.seg = Some(t.seg);
                r.buf.clear();
                r.buf_at = t.end;
                r.expect = t.id + 1;
                s.pending -= 1;
                s.taken.push_back(t.id);
                out.push(t.message);
                n += 1;
                continue;
            }
            if s.reader.seg.is_none() {
                // The segment holding `expect`, or the first after it.
                let expect = s.reader.expect;
                let last = s.segments.len().saturating_sub(1);
                let Some(g) = s
                    .segments
                    .iter()
                    .enumerate()
                    .find(|(i, g)| g.end > expect || *i == last)
                    .map(|(_, g)| g.clone())
                else {
                    break;
                };
                // Ids missing before this segment were dropped for room (and counted then).
                s.reader.expect = s.reader.expect.max(g.first);
                s.reader.seg = Some(g.first);
                s.reader.buf.clear();
                s.reader.buf_at = 0;
            }
            let Some(first) = s.reader.seg else { break };
            let Some(g) = s.segments.iter().find(|g| g.first == first).cloned() else {
                // Deleted (fully acknowledged) or dropped: move on.
                s.reader.seg = None;
                continue;
            };
            let active = s.segments.back().is_some_and(|b| b.first == first);
            match parse(&s.reader.buf) {
                Parse::Good(r, len) => {
                    s.reader.buf.drain(..len);
                    s.reader.buf_at += len as u64;
                    if r.id < s.reader.expect {
                        continue;
                    }
                    corrupt += r.id - s.reader.expect;
                    s.reader.expect = r.id + 1;
                    s.pending -= 1;
                    s.taken.push_back(r.id);
                    let offered = if r.id < s.recovered_end {
                        self.base
                    } else {
                        self.base + Duration::from_nanos(r.offered_ns)
                    };
                    out.push(Message {
                        stream: r.stream.into(),
                        seq: r.seq,
                        payload: r.payload.into(),
                        offered,
                        rule: r.rule.map(Into::into),
                        part: r.part,
                    });
                    n += 1;
                }
                Parse::Bad => {
                    let at = resync(&s.reader.buf, 1);
                    let keep_from = at.unwrap_or(s.reader.buf.len().saturating_sub(3).max(1));
                    s.reader.buf.drain(..keep_from.min(s.reader.buf.len()));
                    s.reader.buf_at += keep_from as u64;
                }
                Parse::Short => {
                    let end = s.reader.buf_at + s.reader.buf.len() as u64;
                    let avail = g.len.saturating_sub(end);
                    if avail > 0 {
                        if s.reader.file.as_ref().is_none_or(|(f, _)| *f != first) {
                            match File::open(segment_path(&self.dir, first)) {
                                Ok(f) => s.reader.file = Some((first, f)),
                                Err(e) => {
                                    tracing::error!(dir = %self.dir.display(), segment = first, error = %e, "Disk buffer segment unreadable; its results are counted dropped_corrupt.");
                                    corrupt += g.end.saturating_sub(s.reader.expect);
                                    s.reader.expect = s.reader.expect.max(g.end);
                                    s.reader.seg = None;
                                    continue;
                                }
                            }
                        }
                        let want = (avail as usize).min(CHUNK.max(s.reader.buf.len()));
                        let r = &mut s.reader;
                        let old = r.buf.len();
                        r.buf.resize(old + want, 0);
                        let file = &r.file.as_ref().unwrap_or_else(|| unreachable!()).1;
                        match file.read_exact_at(&mut r.buf[old..], end) {
                            Ok(()) => continue,
                            Err(e) => {
                                r.buf.truncate(old);
                                tracing::error!(dir = %self.dir.display(), error = %e, "Disk buffer read failed.");
                                break;
                            }
                        }
                    }
                    if active {
                        // Caught up with the writer.
                        break;
                    }
                    // The end of a closed segment. A bad length can make a record look longer
                    // than the rest: look for the next record in what is left.
                    if let Some(i) = resync(&s.reader.buf, 1) {
                        s.reader.buf.drain(..i);
                        s.reader.buf_at += i as u64;
                        continue;
                    }
                    // What is left is torn or bad: the segment's ids not found (its end counts
                    // one per record start in bad bytes at its end, see `open`).
                    corrupt += g.end.saturating_sub(s.reader.expect);
                    s.reader.expect = s.reader.expect.max(g.end);
                    s.reader.seg = None;
                    s.reader.file = None;
                    s.reader.buf.clear();
                }
            }
        }
        if corrupt > 0 {
            s.pending = s.pending.saturating_sub(corrupt);
            self.counters.dropped_corrupt.fetch_add(corrupt, Relaxed);
            self.counters
                .buffered
                .fetch_sub(corrupt.min(self.counters.buffered.load(Relaxed)), Relaxed);
            tracing::error!(dir = %self.dir.display(), records = corrupt, "Disk buffer records failed their checksum; skipped (dropped_corrupt).");
        }
        n
    }

    /// The first `n` taken results are about to be sent: records them as possibly written
    /// (durable across a crash) and returns how many of them an earlier run may already have
    /// written (each counted once, as `resent`).
    pub fn sending(&self, n: usize) -> u64 {
        let mut s = self.lock();
        let Some(&last) = s.taken.get(n.saturating_sub(1)) else {
            return 0;
        };
        let (from, to) = (s.counted_resent, s.earlier_sent);
        let again = s
            .taken
            .iter()
            .take(n)
            .filter(|&&id| id >= from && id < to)
            .count() as u64;
        s.counted_resent = s.counted_resent.max(last + 1);
        if last + 1 > s.sent {
            s.sent = last + 1;
            self.persist(&mut s);
        }
        again
    }

    /// The first `n` taken results are done (acknowledged or refused for good).
    pub fn ack(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut s = self.lock();
        let mut last = None;
        for _ in 0..n {
            last = s.taken.pop_front().or(last);
        }
        let Some(last) = last else { return };
        s.acked = if s.taken.is_empty() {
            s.reader.expect
        } else {
            last + 1
        };
        self.persist(&mut s);
        let reading = s.reader.seg;
        let mut freed = false;
        while s.segments.len() > 1
            && s.segments
                .front()
                .is_some_and(|g| g.end <= s.acked && Some(g.first) != reading)
        {
            let g = s.segments.pop_front().unwrap_or_else(|| unreachable!());
            let _ = std::fs::remove_file(segment_path(&self.dir, g.first));
            s.bytes -= g.len;
            freed = true;
        }
        drop(s);
        if freed {
            self.room.notify_all();
        }
    }

    fn persist(&self, s: &mut State) {
        if s.ack_written == (s.acked, s.sent) {
            return;
        }
        if let Err(e) = write_ack(&self.ack_file, s.acked, s.sent) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "Disk buffer ack file write failed.");
        }
        s.ack_written = (s.acked, s.sent);
        s.dirty = true;
    }

    /// Makes new writes durable when `fsync_ms` has passed since the last time.
    pub fn maybe_sync(&self) {
        {
            let last = self.last_sync.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < self.fsync {
                return;
            }
        }
        self.sync();
    }

    /// Makes every write durable.
    pub fn sync(&self) {
        let (writer, closed) = {
            let mut s = self.lock();
            if !s.dirty {
                return;
            }
            s.dirty = false;
            (s.writer.try_clone(), std::mem::take(&mut s.unsynced))
        };
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        // Outside the lock: offers go on while the disk works.
        let r = closed
            .iter()
            .try_for_each(File::sync_data)
            .and(writer)
            .and_then(|w| w.sync_data())
            .and_then(|()| self.ack_file.sync_data())
            .and_then(|()| match closed.is_empty() {
                // New segment files: their names too.
                true => Ok(()),
                false => File::open(&self.dir).and_then(|d| d.sync_all()),
            });
        if let Err(e) = r {
            tracing::warn!(dir = %self.dir.display(), error = %e, "Disk buffer fsync failed.");
        }
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

    /// At shutdown: leaves the unread results on disk for the next run (made durable) and
    /// returns how many.
    pub fn leave(&self) -> usize {
        let n = Self::unread(&self.lock()) as usize;
        self.sync();
        n
    }

    /// Results written and not yet read.
    pub fn len(&self) -> usize {
        Self::unread(&self.lock()) as usize
    }

    /// Results on disk not yet read.
    fn unread(s: &State) -> u64 {
        s.pending
    }

    /// Whether nothing waits to be read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether less than half of `max_bytes` is used.
    pub fn below_half(&self) -> bool {
        self.lock().bytes * 2 < self.max_bytes
    }

    /// Bytes of segments on disk.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Message {
        Message::result(
            "cam".into(),
            seq,
            format!("{{\"seq\":{seq},\"pad\":\"{}\"}}", "x".repeat(40)).into(),
            Instant::now(),
        )
    }

    fn settings(dir: &Path, max_bytes: u64) -> DiskSettings {
        DiskSettings::new(dir.to_path_buf(), max_bytes, Duration::from_millis(100))
    }

    fn open(dir: &Path, max_bytes: u64, policy: WhenFull) -> (DiskBuffer, Arc<SinkCounters>) {
        let c = Arc::new(SinkCounters::default());
        (
            DiskBuffer::open(&settings(dir, max_bytes), policy, c.clone()).unwrap(),
            c,
        )
    }

    fn take_all(b: &DiskBuffer) -> Vec<u64> {
        let mut out = Vec::new();
        while b.take(1000, &mut out, Duration::ZERO) && !b.is_empty() {}
        out.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn records_round_trip_and_a_restart_delivers_the_unacknowledged_in_order() {
        let d = tempfile::tempdir().unwrap();
        let (b, _) = open(d.path(), 1 << 20, WhenFull::Block);
        for s in 0..100 {
            assert_eq!(b.offer(msg(s)), Offer::Queued);
        }
        let got = take_all(&b);
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        b.sending(40);
        b.ack(30);
        drop(b); // a crash: nothing more
        let (b, c) = open(d.path(), 1 << 20, WhenFull::Block);
        assert_eq!(c.recovered.load(Relaxed), 70);
        let mut out = Vec::new();
        b.take(1000, &mut out, Duration::ZERO);
        assert_eq!(
            out.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (30..100).collect::<Vec<_>>()
        );
        assert_eq!(out[0].payload, msg(30).payload);
        assert_eq!(
            (&*out[0].stream, out[0].rule.as_deref(), out[0].part),
            ("cam", None, 0)
        );
        // 30..40 were sent before the crash: counted as possibly sent twice.
        assert_eq!(b.sending(70), 10);
        // An event keeps its rule and part.
        let event = Message {
            rule: Some("door-in".into()),
            part: 2,
            ..msg(7)
        };
        b.offer(event);
        drop(b);
        let (b, _) = open(d.path(), 1 << 20, WhenFull::Block);
        let mut out = Vec::new();
        b.take(1000, &mut out, Duration::ZERO);
        let e = out.last().unwrap();
        assert_eq!((e.seq, e.rule.as_deref(), e.part), (7, Some("door-in"), 2));
    }

    #[test]
    fn a_second_process_is_refused_by_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let (_b, _) = open(d.path(), 1 << 20, WhenFull::Block);
        let c = Arc::new(SinkCounters::default());
        let e = DiskBuffer::open(&settings(d.path(), 1 << 20), WhenFull::Block, c).unwrap_err();
        assert!(matches!(e, DiskError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("in use by another"), "{e}");
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    /// Writes `n` results, lets `damage` change the segment (given the size of a record), and
    /// opens the buffer again.
    fn damaged(
        d: &Path,
        n: u64,
        damage: impl FnOnce(&mut Vec<u8>, usize),
    ) -> (DiskBuffer, Arc<SinkCounters>) {
        let (b, _) = open(d, 1 << 20, WhenFull::Block);
        for s in 0..n {
            b.offer(msg(s));
        }
        drop(b);
        let seg = &segments(d)[0];
        let mut data = std::fs::read(seg).unwrap();
        let rec = data.len() / n as usize;
        damage(&mut data, rec);
        std::fs::write(seg, &data).unwrap();
        open(d, 1 << 20, WhenFull::Block)
    }

    #[test]
    fn a_torn_tail_and_a_flipped_byte_are_skipped_and_counted() {
        let d = tempfile::tempdir().unwrap();
        // A flipped byte in record 20's payload, and the last record torn in half.
        let (b, c) = damaged(d.path(), 50, |data, rec| {
            data[20 * rec + rec / 2] ^= 0x40;
            data.truncate(data.len() - rec / 2);
        });
        assert_eq!(c.recovered.load(Relaxed), 50);
        let got = take_all(&b);
        let want: Vec<u64> = (0..49).filter(|&s| s != 20).collect();
        assert_eq!(got, want);
        assert_eq!(c.dropped_corrupt.load(Relaxed), 2);
        // New results after the damaged ones still go through.
        b.offer(msg(1000));
        assert_eq!(take_all(&b), [1000]);
    }

    #[test]
    fn a_flipped_length_resynchronises_on_the_next_record() {
        let d = tempfile::tempdir().unwrap();
        // The length of record 3.
        let (b, c) = damaged(d.path(), 10, |data, rec| data[3 * rec + 5] ^= 0x7f);
        let want: Vec<u64> = (0..10).filter(|&s| s != 3).collect();
        assert_eq!(take_all(&b), want);
        assert_eq!(c.dropped_corrupt.load(Relaxed), 1);
    }

    /// Bytes of one test record.
    fn record_len() -> u64 {
        let mut v = Vec::new();
        encode(&mut v, 0, 0, &msg(0));
        v.len() as u64
    }

    #[test]
    fn acknowledged_segments_are_deleted_and_max_bytes_applies_the_policy() {
        let d = tempfile::tempdir().unwrap();
        let rec = record_len();
        // Room for 200 records; segments of 25.
        let max = 200 * rec;
        let (b, c) = open(d.path(), max, WhenFull::DropNewest);
        let mut newest_dropped = 0;
        for s in 0..300 {
            if b.offer(msg(s)) == Offer::DroppedNewest {
                newest_dropped += 1;
            }
        }
        assert!(
            (95..=105).contains(&newest_dropped),
            "{newest_dropped} dropped"
        );
        assert!(b.bytes() <= max);
        let got = take_all(&b);
        assert_eq!(got.len() as u64, 300 - newest_dropped);
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        b.ack(got.len());
        assert!(segments(d.path()).len() <= 2, "{:?}", segments(d.path()));
        drop(b);
        // drop_oldest: whole segments of unread results go, the newest stay.
        let d = tempfile::tempdir().unwrap();
        let (b, c2) = open(d.path(), max, WhenFull::DropOldest);
        let mut dropped = 0;
        let mut got = Vec::new();
        for s in 0..300 {
            if let Offer::DroppedOldest(n) = b.offer(msg(s)) {
                dropped += n;
            }
            if s == 10 {
                // The reader is inside the first segment, its results in flight.
                let mut out = Vec::new();
                b.take(5, &mut out, Duration::ZERO);
                got.extend(out.iter().map(|m| m.seq));
            }
        }
        assert!(dropped > 0);
        got.extend(take_all(&b));
        assert_eq!(got.len() as u64 + dropped, 300);
        assert_eq!(&got[..5], [0, 1, 2, 3, 4]);
        assert_eq!(*got.last().unwrap(), 299);
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            c2.dropped_corrupt.load(Relaxed),
            0,
            "drops are not corruption"
        );
        assert_eq!(c.dropped_corrupt.load(Relaxed), 0);
    }

    #[test]
    fn block_waits_for_acknowledgements_to_free_a_segment() {
        let d = tempfile::tempdir().unwrap();
        let rec = record_len();
        let (b, _) = open(d.path(), 100 * rec, WhenFull::Block);
        let b = Arc::new(b);
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || (0..150).map(|s| b.offer(msg(s))).collect::<Vec<_>>())
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!writer.is_finished(), "a full blocking buffer took 150");
        let mut got = Vec::new();
        while got.len() < 150 {
            let mut out = Vec::new();
            b.take(50, &mut out, Duration::from_millis(50));
            b.ack(out.len());
            got.extend(out.iter().map(|m| m.seq));
        }
        assert!(writer.join().unwrap().iter().all(|o| *o == Offer::Queued));
        assert_eq!(got, (0..150).collect::<Vec<_>>());
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Append(u8),
            Take(u8),
            /// Send and acknowledge some of what was taken.
            Ack(u8),
            /// Send some without an acknowledgement.
            Send(u8),
            Crash,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => any::<u8>().prop_map(|n| Op::Append(n % 40)),
                3 => any::<u8>().prop_map(|n| Op::Take(n % 50)),
                3 => any::<u8>().prop_map(|n| Op::Ack(n % 50)),
                1 => any::<u8>().prop_map(|n| Op::Send(n % 50)),
                1 => Just(Op::Crash),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
            /// Over random appends, takes, acknowledgements and crashes: every appended result
            /// is delivered (acknowledged) in order, and a result acknowledged twice was counted
            /// as sent again.
            #[test]
            fn nothing_is_lost_or_silently_repeated(ops in proptest::collection::vec(op(), 1..60)) {
                let d = tempfile::tempdir().unwrap();
                // Segments of about 10 records: rolled and deleted often.
                let s = DiskSettings { segment_bytes: 1000, ..settings(d.path(), 1 << 30) };
                let open = || {
                    let c = Arc::new(SinkCounters::default());
                    (DiskBuffer::open(&s, WhenFull::DropNewest, c.clone()).unwrap(), c)
                };
                let (mut b, _) = open();
                let mut appended = 0u64;
                // Taken, not acknowledged; of those, the first `sent` were written out.
                let mut taken: VecDeque<u64> = VecDeque::new();
                let mut sent = 0usize;
                // What the destination received, repeats included.
                let mut received: Vec<u64> = Vec::new();
                let mut resent = 0u64;
                for o in &ops {
                    match *o {
                        Op::Append(n) => for _ in 0..n {
                            prop_assert_eq!(b.offer(msg(appended)), Offer::Queued);
                            appended += 1;
                        },
                        Op::Take(n) => {
                            let mut out = Vec::new();
                            b.take(n as usize, &mut out, Duration::ZERO);
                            taken.extend(out.iter().map(|m| m.seq));
                        }
                        Op::Send(n) | Op::Ack(n) => {
                            let n = (n as usize).min(taken.len());
                            if n > sent {
                                resent += b.sending(n);
                                received.extend(taken.iter().skip(sent).take(n - sent));
                                sent = n;
                            }
                            if let Op::Ack(_) = o {
                                taken.drain(..n);
                                sent -= n;
                                b.ack(n);
                            }
                        }
                        Op::Crash => {
                            drop(b);
                            b = open().0;
                            taken.clear();
                            sent = 0;
                        }
                    }
                }
                // Deliver what is left.
                loop {
                    let mut out = Vec::new();
                    b.take(1000, &mut out, Duration::ZERO);
                    taken.extend(out.iter().map(|m| m.seq));
                    if taken.is_empty() { break; }
                    let n = taken.len();
                    resent += b.sending(n);
                    received.extend(taken.iter().skip(sent));
                    taken.clear();
                    sent = 0;
                    b.ack(n);
                }
                // In order, every one, repeats only as counted.
                let mut first: Vec<u64> = Vec::new();
                let mut repeats = 0u64;
                for &s in &received {
                    if first.last().is_some_and(|&l| s <= l) { repeats += 1; } else { first.push(s); }
                }
                prop_assert_eq!(first, (0..appended).collect::<Vec<_>>());
                prop_assert!(repeats <= resent, "{} repeats, {} counted resent", repeats, resent);
            }
        }
    }
}
