//! Monotonic time behind a trait.
//!
//! Everything that depends on time (batch waits, deadlines) reads it from a [`Clock`], so that
//! tests (and later the simulator) can drive it deterministically with a [`ManualClock`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Nanoseconds on a clock's monotonic time line (the zero point is the clock's own).
pub type Nanos = u64;

/// Converts a duration to nanoseconds, saturating.
pub fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Converts nanoseconds to milliseconds as a float (for reports).
pub fn ms(n: Nanos) -> f64 {
    n as f64 / 1e6
}

/// Below this, [`sleep_until`] stops sleeping and spins: a thread woken from a sleep on a busy
/// machine runs a few hundred microseconds late, which on an emulated device busy back to back
/// adds up to a few percent of its capacity and makes reserved finishes late.
const SPIN: Duration = Duration::from_micros(300);

/// Waits until `t`: sleeps most of the way, then spins (a yield can give the core away for a
/// whole time slice).
pub fn sleep_until(t: Instant) {
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

/// A source of monotonic time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Nanos;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// The real monotonic clock; zero is when it was created.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    /// Start of the time line.
    origin: Instant,
}

impl SystemClock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// The `Instant` at which this clock reads `t` (to sleep or wait until then).
    pub fn instant_at(&self, t: Nanos) -> Instant {
        self.origin + Duration::from_nanos(t)
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        nanos(self.origin.elapsed())
    }
}

/// A clock that only moves when told to (tests, simulation).
#[derive(Debug, Default)]
pub struct ManualClock {
    /// Current reading.
    now: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Nanos) -> Self {
        Self {
            now: AtomicU64::new(start),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(nanos(d), Ordering::SeqCst);
    }

    /// Sets the clock to `t` (never backwards).
    pub fn set(&self, t: Nanos) {
        self.now.fetch_max(t, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.now.load(Ordering::SeqCst)
    }
}

/// Milliseconds since the Unix epoch, now (wall clock: for records read by people and other
/// processes, never for deadlines).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_forward() {
        let c = ManualClock::new(10);
        c.advance(Duration::from_nanos(5));
        assert_eq!(c.now(), 15);
        c.set(3);
        assert_eq!(c.now(), 15, "set never moves the clock backwards");
        c.set(100);
        assert_eq!(c.now(), 100);
    }

    #[test]
    fn system_clock_is_monotonic() {
        let c = SystemClock::new();
        let a = c.now();
        std::thread::sleep(Duration::from_millis(2));
        let b = c.now();
        assert!(b >= a + 2_000_000, "{a} -> {b}");
    }
}
