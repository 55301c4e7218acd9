//! What every kind of device offers a stage: run a batch of frames in place.

use super::EngineError;
use crate::frame::Frame;

/// Errors of a stage on a batch (every frame of the batch counts as failed).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The model gave an output of an unexpected shape.
    #[error("unexpected output: {0}")]
    Output(String),
    /// The worker runs on another node, and the node or the link to it went away with the
    /// batch: its frames are lost, not failed.
    #[error("lost with its node: {0}")]
    Lost(String),
}

/// The rest of a batch handed to a runner that takes its next batch before this one is done
/// ([`StageRunner::submit`]): waits for the batch's outputs and attaches them to its frames.
pub type Pending = Box<dyn FnOnce(&mut [Frame]) -> Result<(), StageError> + Send>;

/// Runs one stage on a batch and attaches one [`crate::frame::StageOutput`] to every frame.
pub trait StageRunner: Send {
    /// Processes the batch in place.
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError>;

    /// For a runner that takes batch k+1 while batch k is still running (a worker on another
    /// node receives its next batch over its link while it computes): hands the batch over and
    /// returns what waits for its outputs, so that the worker can take its next batch at once.
    /// `None`: the runner runs one batch at a time, with [`run`](Self::run). `next`: the worker
    /// of the next stage the batch is reserved on, where it is (its outputs may go straight
    /// there).
    fn submit(&mut self, frames: &[Frame], next: Option<usize>) -> Option<Pending> {
        let _ = (frames, next);
        None
    }

    /// When the output of the batch [`run`](Self::run) just returned reaches the next stage, if
    /// that is still ahead: a runner that sends batch k while it computes batch k+1 returns from
    /// `run` once it has handed the batch to its link, and the worker passes the batch on at
    /// this instant. `None`: it has arrived.
    fn sent_at(&mut self) -> Option<std::time::Instant> {
        None
    }

    /// Tells `on_change` whenever the worker becomes unavailable (`false`: its node or the link
    /// to it is down) or available again (`true`). Local runners are always available and never
    /// call it.
    fn watch(&mut self, on_change: Box<dyn Fn(bool) + Send + Sync>) {
        let _ = on_change;
    }
}
