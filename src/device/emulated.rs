//! The `emulated:<class>` device: a stage runner that computes nothing and holds each batch for
//! the profiled latency of its block range at that batch size, then sends it to the next stage.
//! Either the process is busy while it sends (it holds the batch for the transfer too), or it
//! sends while computing: it hands the batch to its link and takes the next batch at once, with
//! one batch in flight on the link per process (a batch computed while the previous one is
//! still being sent waits for it). The processes of one device share its link: a transfer
//! starts when the link is free (first come, first served), as in the simulator. It records what it did in the frame's results. Computing the real output on the
//! CPU at the same time is not implemented.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::sleep_until;
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
    /// Sends while computing the next batch.
    send_while_computing: bool,
    /// When this process's last transfer ends.
    sending_until: Instant,
    /// When the batch `run` last handed to the link arrives, until the worker asks.
    pending: Option<Instant>,
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
            send_while_computing: false,
            sending_until: Instant::now(),
            pending: None,
        }
    }

    /// Sends batch k while computing batch k+1.
    pub fn sending_while_computing(mut self, on: bool) -> Self {
        self.send_while_computing = on;
        self
    }

    /// Sends over `link`, shared with the other processes of the same device.
    pub fn with_link(mut self, link: Link) -> Self {
        self.link = Some(link);
        self
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
        let computed = started + latency;
        // A transfer waits for the link (shared by the device's processes), then holds it.
        let book = |link: &Option<Link>, ready: Instant| match link {
            Some(link) => {
                let mut free = link.lock().unwrap_or_else(|e| e.into_inner());
                let start = (*free).max(ready);
                *free = start + transfer;
                *free
            }
            None => ready + transfer,
        };
        if transfer.is_zero() {
            sleep_until(computed);
        } else if self.send_while_computing {
            sleep_until(computed);
            // One batch in flight on the link per process: wait for the previous one.
            sleep_until(self.sending_until);
            let done = book(&self.link, computed.max(self.sending_until));
            self.sending_until = done;
            self.pending = Some(done);
        } else {
            sleep_until(computed);
            sleep_until(book(&self.link, computed));
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

    fn sent_at(&mut self) -> Option<Instant> {
        self.pending.take()
    }
}
