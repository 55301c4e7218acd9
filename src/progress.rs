//! Progress of long commands on stderr, drawn only when stderr is a terminal: with stderr
//! redirected (CI, scripts, `2> log`) nothing is written, so logs and outputs stay as they are.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A bar of `done` of `total` steps, with the elapsed time and a note on the last step.
pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    started: Instant,
    on: bool,
}

impl Progress {
    /// A bar for `total` steps (drawn at once, at 0).
    pub fn new(label: &str, total: usize) -> Self {
        let p = Self {
            label: label.to_string(),
            total,
            done: 0,
            started: Instant::now(),
            on: std::io::stderr().is_terminal(),
        };
        p.draw("");
        p
    }

    /// One more step done; `note` says which.
    pub fn inc(&mut self, note: &str) {
        self.set(self.done + 1, note);
    }

    /// `done` steps done.
    pub fn set(&mut self, done: usize, note: &str) {
        self.done = done.min(self.total);
        self.draw(note);
        if self.done == self.total && self.on {
            eprintln!();
            self.on = false; // finished: draw nothing more
        }
    }

    /// Prints a line on stderr above the bar (as `eprintln!` does when there is no bar).
    pub fn line(&self, text: &str) {
        if self.on {
            eprint!("\r\x1b[K{text}\n");
            self.draw("");
        } else {
            eprintln!("{text}");
        }
    }

    fn draw(&self, note: &str) {
        if !self.on {
            return;
        }
        let width = 30;
        let filled = width * self.done / self.total.max(1);
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r\x1b[K{} [{}{}] {}/{}  {:.0} s  {note}",
            self.label,
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        let _ = err.flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.on && self.done > 0 {
            eprintln!();
        }
    }
}

/// Elapsed time against a limit, redrawn five times a second by its own thread, for work that
/// reports nothing while it runs (a MILP solve).
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts ticking (nothing when stderr is not a terminal).
    pub fn start(label: &str, limit: Option<Duration>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let stop = stop.clone();
            let label = label.to_string();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let spin = ['|', '/', '-', '\\'];
                let mut k = 0;
                while !stop.load(Ordering::SeqCst) {
                    let limit = limit.map_or(String::new(), |l| {
                        format!(" of at most {:.0} s", l.as_secs_f64())
                    });
                    eprint!(
                        "\r\x1b[K{} {label}: {:.1} s{limit}",
                        spin[k % 4],
                        t0.elapsed().as_secs_f64()
                    );
                    k += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                eprint!("\r\x1b[K");
            })
        });
        Self { stop, thread }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
