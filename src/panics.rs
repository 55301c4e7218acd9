//! Panics of pipeline threads: what is kept of one, for reports and the exit code.

use serde::Serialize;

/// A pipeline thread that panicked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreadPanic {
    /// What the thread was: `stage `x` worker 0`, `publisher`, `sink `y``.
    pub thread: String,
    /// The panic's message.
    pub message: String,
}

impl std::fmt::Display for ThreadPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} panicked: {}", self.thread, self.message)
    }
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}
