//! Arrival processes of the simulator: Poisson, bursty (a two-state Markov-modulated Poisson
//! process) and traces of recorded timestamps.

use std::path::{Path, PathBuf};

use crate::clock::Nanos;

const MS: f64 = 1e6;

/// splitmix64: small, fast, seedable; the same seed gives the same arrivals.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponential with a rate per nanosecond.
    pub fn exp(&mut self, rate_per_ns: f64) -> Nanos {
        (-(1.0 - self.next_f64()).ln() / rate_per_ns) as Nanos
    }
}

/// A trace: timestamps in seconds, optionally per model.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// The file it came from.
    pub path: PathBuf,
    /// `(model or None, seconds)`, in file order.
    pub rows: Vec<(Option<String>, f64)>,
    /// Replay the timestamps as recorded (`true`), or stretch them so their mean rate is the
    /// offered load (`false`).
    pub as_recorded: bool,
}

/// How frames arrive.
#[derive(Debug, Clone, PartialEq)]
pub enum Arrivals {
    /// Poisson at the offered rate.
    Poisson,
    /// Two-state MMPP: bursts at `burstiness` x the mean rate a fifth of the time, and the rate
    /// that keeps the mean otherwise; states last 125 ms (burst) and 500 ms (calm) on average.
    /// `burstiness` is in [1, 5).
    Bursty {
        /// Burst rate / mean rate.
        burstiness: f64,
    },
    /// Timestamps from a file.
    Trace(Trace),
}

/// Errors of reading a trace.
#[derive(Debug, thiserror::Error)]
pub enum ArrivalsError {
    /// Unreadable or malformed.
    #[error("{path}:{line}: {message}")]
    Trace {
        /// File.
        path: PathBuf,
        /// 1-based line (0 = the whole file).
        line: usize,
        /// What.
        message: String,
    },
    /// Not a known process.
    #[error("unknown arrivals `{0}`: expected poisson, bursty, bursty:K or trace:FILE")]
    Unknown(String),
}

impl Arrivals {
    /// Parses `poisson`, `bursty`, `bursty:K` or `trace:FILE`.
    pub fn parse(spec: &str) -> Result<Arrivals, ArrivalsError> {
        match spec {
            "poisson" => Ok(Arrivals::Poisson),
            "bursty" => Ok(Arrivals::Bursty { burstiness: 3.0 }),
            _ => {
                if let Some(k) = spec.strip_prefix("bursty:") {
                    match k.parse::<f64>() {
                        Ok(b) if (1.0..5.0).contains(&b) => Ok(Arrivals::Bursty { burstiness: b }),
                        _ => Err(ArrivalsError::Unknown(format!(
                            "{spec} (the burstiness K is in [1, 5))"
                        ))),
                    }
                } else if let Some(f) = spec.strip_prefix("trace:") {
                    Ok(Arrivals::Trace(Trace::load(Path::new(f))?))
                } else {
                    Err(ArrivalsError::Unknown(spec.to_string()))
                }
            }
        }
    }

    /// Arrival times of model `model` (index and name) over `duration` at a mean of `rate`
    /// frames per second.
    pub fn times(
        &self,
        model: usize,
        name: &str,
        rate: f64,
        duration: Nanos,
        seed: u64,
    ) -> Vec<Nanos> {
        let _ = model;
        if rate <= 0.0 && !matches!(self, Arrivals::Trace(t) if t.as_recorded) {
            return Vec::new();
        }
        match self {
            Arrivals::Poisson => poisson_mmpp(rate, None, duration, seed),
            Arrivals::Bursty { burstiness } => {
                poisson_mmpp(rate, Some(*burstiness), duration, seed)
            }
            Arrivals::Trace(t) => t.times(name, rate, duration),
        }
    }
}

fn poisson_mmpp(rate: f64, burst: Option<f64>, duration: Nanos, seed: u64) -> Vec<Nanos> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity((rate * duration as f64 / 1e9 * 1.1) as usize + 16);
    let mut t: Nanos = 0;
    let mut bursting = false;
    let mut switch_at = rng.exp(1.0 / (500.0 * MS));
    loop {
        let r = match burst {
            None => rate,
            // A fifth of the time at k x the mean, the rest at (1 - 0.2 k) / 0.8 of it.
            Some(k) if bursting => rate * k,
            Some(k) => rate * (1.0 - 0.2 * k) / 0.8,
        };
        let next = if r > 0.0 {
            t + rng.exp(r / 1e9)
        } else {
            Nanos::MAX
        };
        if burst.is_some() && next > switch_at {
            t = switch_at;
            bursting = !bursting;
            let mean = if bursting { 125.0 } else { 500.0 };
            switch_at = t + rng.exp(1.0 / (mean * MS));
            if t >= duration {
                return out;
            }
            continue;
        }
        t = next;
        if t >= duration {
            return out;
        }
        out.push(t);
    }
}

impl Trace {
    /// Reads `SECONDS` or `SECONDS,MODEL` per line (`#` comments and a header line allowed).
    pub fn load(path: &Path) -> Result<Trace, ArrivalsError> {
        let err = |line: usize, message: String| ArrivalsError::Trace {
            path: path.to_path_buf(),
            line,
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(0, e.to_string()))?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(2, ',').map(str::trim);
            let t = parts.next().unwrap_or("");
            let model = parts.next().filter(|m| !m.is_empty()).map(str::to_string);
            match t.parse::<f64>() {
                Ok(v) if v >= 0.0 && v.is_finite() => rows.push((model, v)),
                Ok(v) => return Err(err(i + 1, format!("timestamp {v} is not a time >= 0 s"))),
                Err(_) if rows.is_empty() && i == 0 => {} // header
                Err(_) => return Err(err(i + 1, format!("`{t}` is not a timestamp in seconds"))),
            }
        }
        if rows.is_empty() {
            return Err(err(0, "no timestamps".into()));
        }
        Ok(Trace {
            path: path.to_path_buf(),
            rows,
            as_recorded: false,
        })
    }

    /// The timestamps of one model (all rows when the trace has no model column; rows whose
    /// model is `name` or a prefix of it otherwise), sorted. Unless `as_recorded`, they are
    /// scaled so their mean rate is `rate`.
    fn times(&self, name: &str, rate: f64, duration: Nanos) -> Vec<Nanos> {
        let mut secs: Vec<f64> = self
            .rows
            .iter()
            .filter(|(m, _)| m.as_deref().is_none_or(|m| name.starts_with(m)))
            .map(|(_, t)| *t)
            .collect();
        secs.sort_by(f64::total_cmp);
        let Some(&first) = secs.first() else {
            return Vec::new();
        };
        let scale = if self.as_recorded || secs.len() < 2 {
            1.0
        } else {
            let span = secs[secs.len() - 1] - first;
            let own = (secs.len() - 1) as f64 / span.max(1e-9);
            own / rate
        };
        secs.iter()
            .map(|t| ((t - first) * scale * 1e9) as Nanos)
            .take_while(|&t| t < duration)
            .collect()
    }
}

/// How each model's demand moves over a run: a factor of its base rate at each time.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// The base rate throughout.
    Steady,
    /// Model `model` goes to `factor` x its base rate at `at_s` seconds.
    Step {
        /// Model index.
        model: usize,
        /// When, seconds.
        at_s: f64,
        /// Its rate after, as a multiple of before.
        factor: f64,
    },
    /// A compressed day: model `m` of `n` runs at `1 + amplitude * sin(2 pi (t / period_s + m /
    /// n))`, so the mix drifts slowly while the total stays near its base.
    Diurnal {
        /// Period, seconds.
        period_s: f64,
        /// Amplitude in [0, 1).
        amplitude: f64,
    },
}

impl Shape {
    /// Parses `steady`, `step:MODEL:AT_S:FACTOR` (model index) or
    /// `diurnal:PERIOD_S:AMPLITUDE`.
    pub fn parse(spec: &str) -> Result<Shape, String> {
        let parts: Vec<&str> = spec.split(':').collect();
        let num = |s: &str, what: &str| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("shape `{spec}`: {what} `{s}` is not a number >= 0"))
        };
        match parts.as_slice() {
            ["steady"] => Ok(Shape::Steady),
            ["step", m, at, f] => Ok(Shape::Step {
                model: m
                    .parse()
                    .map_err(|_| format!("shape `{spec}`: model `{m}` is not an index"))?,
                at_s: num(at, "time")?,
                factor: num(f, "factor")?,
            }),
            ["diurnal", period, amp] => {
                let period_s = num(period, "period")?;
                let amplitude = num(amp, "amplitude")?;
                if period_s <= 0.0 || amplitude >= 1.0 {
                    return Err(format!(
                        "shape `{spec}`: the period is positive and the amplitude in [0, 1)"
                    ));
                }
                Ok(Shape::Diurnal {
                    period_s,
                    amplitude,
                })
            }
            _ => Err(format!(
                "unknown shape `{spec}`: expected steady, step:MODEL:AT_S:FACTOR or diurnal:PERIOD_S:AMPLITUDE"
            )),
        }
    }

    /// Model `model`'s (of `models`) factor at `t_s` seconds.
    pub fn factor(&self, model: usize, models: usize, t_s: f64) -> f64 {
        match *self {
            Shape::Steady => 1.0,
            Shape::Step {
                model: m,
                at_s,
                factor,
            } => {
                if m == model && t_s >= at_s {
                    factor
                } else {
                    1.0
                }
            }
            Shape::Diurnal {
                period_s,
                amplitude,
            } => {
                let phase = t_s / period_s + model as f64 / models.max(1) as f64;
                1.0 + amplitude * (std::f64::consts::TAU * phase).sin()
            }
        }
    }

    /// The largest factor of `model` over any run.
    pub fn peak(&self, model: usize) -> f64 {
        match *self {
            Shape::Steady => 1.0,
            Shape::Step {
                model: m, factor, ..
            } => {
                if m == model {
                    factor.max(1.0)
                } else {
                    1.0
                }
            }
            Shape::Diurnal { amplitude, .. } => 1.0 + amplitude.abs(),
        }
    }
}

impl Arrivals {
    /// Arrival times of model `model` of `models` whose rate is `rate` x `shape`'s factor at
    /// each time: the process at the peak rate, thinned (each arrival kept with probability
    /// factor / peak), which keeps Poisson arrivals Poisson and bursts bursty.
    #[allow(clippy::too_many_arguments)]
    pub fn shaped_times(
        &self,
        shape: &Shape,
        model: usize,
        models: usize,
        name: &str,
        rate: f64,
        duration: Nanos,
        seed: u64,
    ) -> Vec<Nanos> {
        let peak = shape.peak(model);
        let mut all = self.times(model, name, rate * peak, duration, seed);
        if *shape == Shape::Steady {
            return all;
        }
        let mut rng = Rng(seed ^ 0x5DEE_CE66_D1CE_5EED);
        all.retain(|&t| rng.next_f64() * peak < shape.factor(model, models, t as f64 / 1e9));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_have_the_asked_mean_rate_and_repeat_with_the_seed() {
        let d = 200_000_000_000; // 200 s
        for a in [Arrivals::Poisson, Arrivals::Bursty { burstiness: 3.0 }] {
            let t = a.times(0, "m", 100.0, d, 1);
            let rate = t.len() as f64 / 200.0;
            assert!((rate - 100.0).abs() < 5.0, "{a:?}: {rate}");
            assert_eq!(t, a.times(0, "m", 100.0, d, 1));
            assert_ne!(t, a.times(0, "m", 100.0, d, 2));
            assert!(t.windows(2).all(|w| w[0] <= w[1]));
        }
        // Bursty has a larger variance of counts per 100 ms than Poisson.
        let var = |t: &[Nanos]| {
            let mut c = vec![0f64; 2000];
            for x in t {
                c[(*x / 100_000_000) as usize] += 1.0;
            }
            let m = c.iter().sum::<f64>() / c.len() as f64;
            c.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c.len() as f64
        };
        let p = var(&Arrivals::Poisson.times(0, "m", 100.0, d, 3));
        let b = var(&Arrivals::Bursty { burstiness: 4.0 }.times(0, "m", 100.0, d, 3));
        assert!(b > 3.0 * p, "bursty {b} vs poisson {p}");
    }

    #[test]
    fn traces_are_read_per_model_and_scaled_unless_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.csv");
        std::fs::write(&f, "time,model\n0.0,a\n0.5,b\n1.0,a\n2.0,a\n").unwrap();
        let mut t = Trace::load(&f).unwrap();
        assert_eq!(
            t.times("a-long-name", 1.0, u64::MAX),
            vec![0, 1_000_000_000, 2_000_000_000]
        );
        // Twice the rate: half the spacing.
        assert_eq!(
            t.times("a", 2.0, u64::MAX),
            vec![0, 500_000_000, 1_000_000_000]
        );
        t.as_recorded = true;
        assert_eq!(
            t.times("a", 50.0, u64::MAX),
            vec![0, 1_000_000_000, 2_000_000_000]
        );
        assert_eq!(t.times("b", 50.0, u64::MAX), vec![0]);
        std::fs::write(&f, "0.1\nx\n").unwrap();
        let e = Trace::load(&f).unwrap_err().to_string();
        assert!(e.ends_with(":2: `x` is not a timestamp in seconds"), "{e}");
        assert!(Arrivals::parse("bursty:7").is_err());
        assert!(Arrivals::parse("gamma").is_err());
    }
}
