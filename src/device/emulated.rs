//! The `emulated:<class>` device: a stage runner that computes nothing and holds each batch for
//! the profiled latency of its block range at that batch size, plus the transfer of the cut to
//! the next stage (the device is busy while it sends). It records what it did in the frame's
//! results. Computing the real output on the CPU at the same time is not implemented.

use std::time::Duration;

use crate::engine::{StageError, StageRunner};
use crate::frame::{Frame, StageOutput};

/// An emulated device: holds each batch for the profiled latency of its block range at that
/// batch size, so heterogeneous pools run (and can be tested and measured) without a GPU.
pub struct EmulatedDevice {
    /// Device class.
    class: String,
    /// Latencies and transfers of the stage's block range.
    profile: EmulatedCosts,
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
        std::thread::sleep(latency + transfer);
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
