//! The `emulated:<class>` device: a stage runner that computes nothing and holds each batch for
//! the profiled latency of its block range at that batch size, plus the transfer of the cut to
//! the next stage (the device is busy while it sends). The processes of one device share its
//! link: a transfer starts when the link is free (first come, first served), as in the
//! simulator. It records what it did in the frame's results. Computing the real output on the
//! CPU at the same time is not implemented.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::{StageError, StageRunner};
use crate::frame::{Frame, StageOutput};

/// An emulated device: holds each batch for the profiled latency of its block range at that
/// batch size, so heterogeneous pools run (and can be tested and measured) without a GPU.
pub struct EmulatedDevice {
    /// Device class.
    class: String,
    /// Latencies and transfers of the stage's block range.
    profile: EmulatedCosts,
    /// When the device's link is free, shared by the processes of the device.
    link: Option<Link>,
}

/// The link of one emulated device: when it is free next.
pub type Link = Arc<Mutex<Instant>>;

/// A link that is free now.
pub fn new_link() -> Link {
    Arc::new(Mutex::new(Instant::now()))
}

/// What an emulated device replays: the profiled costs of its block range.
#[derive(Debug, Clone)]
pub struct EmulatedCosts {
    /// Block range `[first, end)` (reported in results).
    pub blocks: [usize; 2],
    /// Latency at batch `b`, at index `b - 1`.
    pub latency: Vec<Duration>,
    /// Time to send a batch of `b` frames to the next stage, at index `b - 1` (none: zero).
    pub transfer: Vec<Duration>,
}

impl EmulatedDevice {
    /// A device of `class` running the profiled block range.
    pub fn new(class: &str, profile: EmulatedCosts) -> Self {
        Self {
            class: class.to_string(),
            profile,
            link: None,
        }
    }

    /// Sends over `link`, shared with the other processes of the same device.
    pub fn with_link(mut self, link: Link) -> Self {
        self.link = Some(link);
        self
    }
}

/// Below this, [`sleep_until`] stops sleeping and spins: a thread woken from a sleep on a busy
/// machine runs a few hundred microseconds late, which on a device busy back to back adds up to
/// a few percent of its capacity and makes reserved finishes late.
const SPIN: Duration = Duration::from_micros(300);

/// Waits until `t`: sleeps most of the way, then spins (a yield can give the core away for a
/// whole time slice).
fn sleep_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

impl StageRunner for EmulatedDevice {
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
        let b = frames.len();
        let Some(latency) = self.profile.latency.get(b - 1).copied() else {
            return Err(StageError::Output(format!(
                "batch {b} is beyond the profiled batch sizes"
            )));
        };
        // The batch is also held for sending its activations to the next stage's device.
        let transfer = self
            .profile
            .transfer
            .get(b - 1)
            .copied()
            .unwrap_or_default();
        let started = Instant::now();
        match (&self.link, transfer.is_zero()) {
            (Some(link), false) => {
                let computed = started + latency;
                sleep_until(computed);
                // The transfer waits for the link, then holds it.
                let done = {
                    let mut free = link.lock().unwrap_or_else(|e| e.into_inner());
                    let start = (*free).max(computed);
                    *free = start + transfer;
                    *free
                };
                sleep_until(done);
            }
            _ => sleep_until(started + latency + transfer),
        }
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let run = crate::frame::EmulatedRun {
            class: self.class.clone(),
            blocks: self.profile.blocks,
            batch: b,
            latency_ms: ms(latency),
            transfer_ms: ms(transfer),
        };
        for f in frames {
            f.outputs.push(StageOutput::Emulated(run.clone()));
        }
        Ok(())
    }
}
