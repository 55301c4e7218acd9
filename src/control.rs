//! The online control plane: when to re-plan, and re-planning a running simulation.
//!
//! A plan is made for one demand mix (the models' weights). The [`Controller`] watches each
//! model's arrivals and outcomes and asks for a re-plan when
//!
//! - **the mix leaves its band**: a model's share of the measured arrival rate (over
//!   `window`) differs from its share of the planned weights by more than `band` (relative),
//!   plus a noise guard of two standard errors of the count (`2 sqrt(D / arrivals in the
//!   window)`, with `D >= 1` the measured index of dispersion: 1 for Poisson, more for bursts),
//!   so that a quiet model's few frames or a bursty camera do not trigger re-plans; or
//! - **attainment stays low**: a model's share of frames on time among those whose outcome
//!   became known in each look stays under `target` for `under_for`.
//!
//! After a re-plan it waits `cooldown` before it asks again (the new plan needs time to show its
//! effect). A mix change is acted on only when the running plan serves the measured demand with
//! less than `headroom` to spare on some model (a plan with room for the new mix is left
//! alone: moving processes has a cost); attainment triggers always are. The re-plan itself ([`crate::planner::replan`]) takes the measured rates as the new
//! weights, starts from the running plan and charges `move_cost` per process started.
//!
//! [`PlanSupervisor`] runs this loop inside the simulator ([`crate::sim::Supervisor`]): the
//! same controller and planner on the simulator's clock, the new plan taking over after the
//! solve's own wall time plus a start-up delay for the processes it starts.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::clock::Nanos;
use crate::demand::Demand;
use crate::planner::{self, Cluster, ModelSpec, Moves, Options, Plan};
use crate::profile::Profiles;
use crate::sim::{ModelResult, SimSetup, Supervisor};

const SEC: Nanos = 1_000_000_000;

/// Errors of control settings.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A setting is out of range.
    #[error("control setting `{key}`: {message}")]
    Setting {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// When and how to re-plan.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSettings {
    /// How far (relative) a model's measured share of the demand may move from its planned
    /// share before a re-plan (0.2 = +-20%); a fraction in (0, 1].
    pub band: f64,
    /// Attainment under which a model counts as missing its target.
    pub target: f64,
    /// How long a model may stay under `target` before a re-plan.
    pub under_for: Nanos,
    /// The shortest time between re-plans.
    pub cooldown: Nanos,
    /// The window the arrival rates are measured over.
    pub window: Nanos,
    /// Objective cost of one process started (a fraction of the demand).
    pub move_cost: f64,
    /// Time limit of a re-plan's solve.
    pub time_limit: Duration,
    /// How often the controller looks.
    pub interval: Nanos,
    /// Spare capacity (a fraction of the measured demand) under which a mix change re-plans.
    pub headroom: f64,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings {
            band: 0.2,
            target: 0.99,
            under_for: 5 * SEC,
            cooldown: 10 * SEC,
            window: 5 * SEC,
            move_cost: 0.002,
            time_limit: Duration::from_secs(2),
            interval: SEC,
            headroom: 0.15,
        }
    }
}

impl ControlSettings {
    /// Refuses settings out of range, naming the setting.
    pub fn check(&self) -> Result<(), ControlError> {
        let bad = |key, message: String| Err(ControlError::Setting { key, message });
        if !(self.band > 0.0 && self.band <= 1.0) {
            return bad(
                "band",
                format!("a fraction in (0, 1] (0.2 = +-20%), got {}", self.band),
            );
        }
        if !(self.target > 0.0 && self.target <= 1.0) {
            return bad(
                "target",
                format!("an attainment in (0, 1], got {}", self.target),
            );
        }
        if !(0.0..=1.0).contains(&self.move_cost) {
            return bad(
                "move_cost",
                format!(
                    "a fraction of the demand per process in [0, 1], got {}",
                    self.move_cost
                ),
            );
        }
        if self.window < SEC || self.interval == 0 || self.interval > self.window {
            return bad(
                "window",
                format!(
                    "at least 1 s and at least the look interval ({} ms), got {} ms",
                    self.interval / 1_000_000,
                    self.window / 1_000_000
                ),
            );
        }
        if !(0.0..=10.0).contains(&self.headroom) {
            return bad(
                "headroom",
                format!("a fraction of the demand in [0, 10], got {}", self.headroom),
            );
        }
        if self.time_limit.is_zero() {
            return bad("time_limit", "must be positive".into());
        }
        Ok(())
    }
}

/// Why a re-plan was asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// A model's share of the demand left its band.
    Mix {
        /// Model index.
        model: usize,
        /// Its planned share of the demand.
        planned: f64,
        /// Its measured share.
        measured: f64,
    },
    /// A model's attainment stayed under the target.
    Attainment {
        /// Model index.
        model: usize,
        /// Its attainment in the last look.
        attainment: f64,
        /// For how long it has been under the target, seconds.
        seconds: f64,
    },
}

impl Trigger {
    /// A line for logs and tables, with the model's name.
    pub fn describe(&self, names: &[String]) -> String {
        let name = |m: &usize| names.get(*m).map_or("?", |s| s.as_str());
        match self {
            Trigger::Mix {
                model,
                planned,
                measured,
            } => format!(
                "mix: {} at {:.1}% of the demand, planned {:.1}%",
                name(model),
                measured * 100.0,
                planned * 100.0
            ),
            Trigger::Attainment {
                model,
                attainment,
                seconds,
            } => format!(
                "attainment: {} at {:.2}% for {:.0} s",
                name(model),
                attainment * 100.0,
                seconds
            ),
        }
    }
}

/// Decides when to re-plan (pure state, driven by the times passed in).
#[derive(Debug, Clone)]
pub struct Controller {
    settings: ControlSettings,
    /// Each model's planned share of the demand.
    planned: Vec<f64>,
    demand: Vec<Demand>,
    /// Per model: `(resolved, on_time)` at the last look.
    last: Vec<(u64, u64)>,
    under_since: Vec<Option<Nanos>>,
    /// No trigger before this time.
    quiet_until: Nanos,
    /// The first look (a mix is judged on a full window only).
    first: Option<Nanos>,
}

fn shares(weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().map(|w| w.max(0.0)).sum();
    weights
        .iter()
        .map(|w| if total > 0.0 { w.max(0.0) / total } else { 0.0 })
        .collect()
}

impl Controller {
    /// A controller for a plan made for `weights` (one per model).
    pub fn new(settings: ControlSettings, weights: &[f64]) -> Controller {
        let n = weights.len();
        Controller {
            settings,
            planned: shares(weights),
            demand: vec![Demand::default(); n],
            last: vec![(0, 0); n],
            under_since: vec![None; n],
            quiet_until: 0,
            first: None,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ControlSettings {
        &self.settings
    }

    /// Each model's arrival rate over the window (0 before two looks).
    pub fn rates(&self) -> Vec<f64> {
        self.demand
            .iter()
            .map(|d| d.rate(self.settings.window).unwrap_or(0.0))
            .collect()
    }

    /// Looks at the cumulative counts of every model at `now`: frames arrived, frames whose
    /// outcome is known, frames on time. Returns why to re-plan, if it is time to.
    pub fn observe(
        &mut self,
        now: Nanos,
        arrived: &[u64],
        resolved: &[u64],
        on_time: &[u64],
    ) -> Option<Trigger> {
        let first = *self.first.get_or_insert(now);
        for (d, &a) in self.demand.iter_mut().zip(arrived) {
            d.observe(now, a);
        }
        // Attainment of the frames resolved since the last look.
        let mut low: Option<Trigger> = None;
        for m in 0..self.last.len() {
            let (r0, o0) = self.last[m];
            let (r, o) = (resolved[m], on_time[m]);
            self.last[m] = (r, o);
            if r <= r0 {
                continue;
            }
            let attainment = o.saturating_sub(o0) as f64 / (r - r0) as f64;
            if attainment >= self.settings.target {
                self.under_since[m] = None;
                continue;
            }
            let since = *self.under_since[m].get_or_insert(now);
            if now - since >= self.settings.under_for && low.is_none() {
                low = Some(Trigger::Attainment {
                    model: m,
                    attainment,
                    seconds: (now - since) as f64 / 1e9,
                });
            }
        }
        if now < self.quiet_until {
            return None;
        }
        if now - first >= self.settings.window
            && let Some(t) = self.mix_trigger()
        {
            return Some(t);
        }
        low
    }

    fn mix_trigger(&self) -> Option<Trigger> {
        let rates = self.rates();
        let measured = shares(&rates);
        let secs = self.settings.window as f64 / 1e9;
        let mut worst: Option<(f64, Trigger)> = None;
        for (m, (&p, &s)) in self.planned.iter().zip(&measured).enumerate() {
            if p <= 0.0 {
                continue;
            }
            let count = rates[m] * secs;
            let dispersion = self.demand[m]
                .dispersion(self.settings.window)
                .unwrap_or(1.0)
                .max(1.0);
            let guard = if count > 0.0 {
                2.0 * (dispersion / count).sqrt()
            } else {
                1.0
            };
            let off = (s / p - 1.0).abs();
            if off > self.settings.band + guard && worst.as_ref().is_none_or(|(w, _)| off > *w) {
                worst = Some((
                    off,
                    Trigger::Mix {
                        model: m,
                        planned: p,
                        measured: s,
                    },
                ));
            }
        }
        worst.map(|(_, t)| t)
    }

    /// A new plan for `weights` was made at `now`.
    pub fn replanned(&mut self, now: Nanos, weights: &[f64]) {
        self.planned = shares(weights);
        self.under_since.iter_mut().for_each(|u| *u = None);
        self.quiet_until = now + self.settings.cooldown;
    }
}

/// One re-plan of a supervised run.
#[derive(Debug, Clone, Serialize)]
pub struct Replan {
    /// When it was asked for, seconds into the run.
    pub at_s: f64,
    /// Why.
    pub reason: String,
    /// Wall time of the solve, seconds.
    pub solve_s: f64,
    /// The running plan's objective under the measured demand (1.0 = it serves all of it).
    pub before: f64,
    /// The new plan's.
    pub after: f64,
    /// Processes started and stopped.
    pub moves: Moves,
    /// The solve's error, when it failed (the running plan stays).
    pub error: Option<String>,
}

impl std::fmt::Display for Replan {
    /// `at 34.0 s (why): solve 1.10 s, serves 0.942 -> 1.192 of the demand, started 8 stopped 12`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at {:.1} s ({}): solve {:.2} s, serves {:.3} -> {:.3} of the demand, started {} stopped {}",
            self.at_s,
            self.reason,
            self.solve_s,
            self.before,
            self.after,
            self.moves.started,
            self.moves.stopped
        )?;
        match &self.error {
            Some(e) => write!(f, ", failed: {e}"),
            None => Ok(()),
        }
    }
}

/// The controller and the planner, supervising a simulated run.
pub struct PlanSupervisor<'a> {
    /// The controller.
    pub controller: Controller,
    profiles: &'a Profiles,
    cluster: &'a Cluster,
    specs: Vec<ModelSpec>,
    opts: Options,
    current: Plan,
    /// Start-up time of a new plan's processes (added to the solve's wall time).
    pub startup: Nanos,
    /// Every re-plan, in order.
    pub log: Vec<Replan>,
    /// Re-plan (`true`, the default) or only watch (the static plan).
    pub adaptive: bool,
    /// At each look: `(time, frames resolved, frames on time)`, all models.
    pub samples: Vec<(Nanos, u64, u64)>,
    /// Looks where the mix had left its band but the running plan had room for it.
    pub skipped: u64,
}

impl<'a> PlanSupervisor<'a> {
    /// Supervises a run of `plan`, made for `specs` on `cluster`.
    pub fn new(
        settings: ControlSettings,
        profiles: &'a Profiles,
        cluster: &'a Cluster,
        specs: &[ModelSpec],
        opts: &Options,
        plan: Plan,
    ) -> PlanSupervisor<'a> {
        let weights: Vec<f64> = specs.iter().map(|s| s.weight).collect();
        PlanSupervisor {
            controller: Controller::new(settings.clone(), &weights),
            profiles,
            cluster,
            specs: specs.to_vec(),
            opts: Options {
                time_limit: settings.time_limit,
                ..opts.clone()
            },
            current: plan,
            startup: SEC,
            log: Vec::new(),
            adaptive: true,
            samples: Vec::new(),
            skipped: 0,
        }
    }

    /// The plan that runs (or takes over next).
    pub fn plan(&self) -> &Plan {
        &self.current
    }
}

/// `min(throughput / rate)` of `plan` over the models with a positive rate.
fn serves(plan: &Plan, rates: &[f64]) -> f64 {
    plan.models
        .iter()
        .zip(rates)
        .filter(|(_, r)| **r > 0.0)
        .map(|(m, r)| m.throughput / r)
        .fold(f64::INFINITY, f64::min)
}

impl Supervisor for PlanSupervisor<'_> {
    fn interval(&self) -> Nanos {
        self.controller.settings.interval
    }

    fn look(&mut self, now: Nanos, seen: &[ModelResult]) -> Option<(Nanos, SimSetup)> {
        let arrived: Vec<u64> = seen.iter().map(|m| m.offered).collect();
        let resolved: Vec<u64> = seen
            .iter()
            .map(|m| m.on_time + m.finished_late + m.dropped_late + m.dropped_overload)
            .collect();
        let on_time: Vec<u64> = seen.iter().map(|m| m.on_time).collect();
        self.samples
            .push((now, resolved.iter().sum(), on_time.iter().sum()));
        if !self.adaptive {
            return None;
        }
        let problem = Problem {
            profiles: self.profiles,
            cluster: self.cluster,
            specs: &self.specs,
            opts: &self.opts,
        };
        let (mut entry, plan) = self.controller.look_and_replan(
            now,
            [&arrived, &resolved, &on_time],
            &self.current,
            &problem,
            &mut self.skipped,
        )?;
        let solve = Duration::from_secs_f64(entry.solve_s);
        let next = plan.map(|plan| {
            let setup = SimSetup::from_plan(&plan, self.profiles)?;
            Ok::<_, crate::profile::ProfileError>((plan, setup))
        });
        match next {
            Some(Ok((plan, setup))) => {
                self.current = plan;
                self.log.push(entry);
                let at = now + solve.as_nanos() as Nanos + self.startup;
                Some((at, setup))
            }
            Some(Err(e)) => {
                entry.error = Some(e.to_string());
                entry.after = entry.before;
                self.log.push(entry);
                None
            }
            None => {
                self.log.push(entry);
                None
            }
        }
    }
}

/// What a re-plan solves: the models (weights are replaced by the measured rates), the
/// planner's options, and the devices.
pub struct Problem<'a> {
    /// Latency profiles.
    pub profiles: &'a Profiles,
    /// The devices.
    pub cluster: &'a Cluster,
    /// The models, in the plan's order.
    pub specs: &'a [ModelSpec],
    /// The planner's options (with the re-plan's time limit).
    pub opts: &'a Options,
}

impl Controller {
    /// Looks at the counts (`[arrived, resolved, on_time]`, as [`Controller::observe`]) and,
    /// when it is time, re-plans from `current` for the measured rates. `None`: nothing to do
    /// (a mix change the running plan has room for counts in `skipped`). Otherwise the log
    /// entry and the new plan (`None` when the solve failed; the entry says why).
    pub fn look_and_replan(
        &mut self,
        now: Nanos,
        counts: [&[u64]; 3],
        current: &Plan,
        problem: &Problem<'_>,
        skipped: &mut u64,
    ) -> Option<(Replan, Option<Plan>)> {
        let [arrived, resolved, on_time] = counts;
        let trigger = self.observe(now, arrived, resolved, on_time)?;
        let names: Vec<String> = problem.specs.iter().map(|s| s.name.clone()).collect();
        let rates = self.rates();
        // A model with no arrivals keeps a token weight, so it stays planned.
        let top = rates.iter().copied().fold(0.0, f64::max).max(1.0);
        let specs: Vec<ModelSpec> = problem
            .specs
            .iter()
            .zip(&rates)
            .map(|(s, r)| ModelSpec {
                weight: r.max(top * 1e-3),
                ..s.clone()
            })
            .collect();
        let weights: Vec<f64> = specs.iter().map(|s| s.weight).collect();
        let before = serves(current, &weights);
        if matches!(trigger, Trigger::Mix { .. }) && before >= 1.0 + self.settings.headroom {
            *skipped += 1;
            return None;
        }
        let t0 = Instant::now();
        let opts = Options {
            time_limit: self.settings.time_limit,
            ..problem.opts.clone()
        };
        let result = planner::replan(
            problem.profiles,
            problem.cluster,
            &specs,
            &opts,
            current,
            self.settings.move_cost,
        );
        self.replanned(now, &weights);
        let mut entry = Replan {
            at_s: now as f64 / 1e9,
            reason: trigger.describe(&names),
            solve_s: t0.elapsed().as_secs_f64(),
            before,
            after: before,
            moves: Moves::default(),
            error: None,
        };
        match result {
            Ok(plan) => {
                entry.after = serves(&plan, &weights);
                entry.moves = Moves::between(current, &plan);
                tracing::info!(
                    at_s = entry.at_s,
                    reason = %entry.reason,
                    solve_s = entry.solve_s,
                    started = entry.moves.started,
                    stopped = entry.moves.stopped,
                    "re-planned"
                );
                Some((entry, Some(plan)))
            }
            Err(e) => {
                entry.error = Some(e.to_string());
                Some((entry, None))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctl() -> Controller {
        Controller::new(ControlSettings::default(), &[1.0, 1.0, 1.0])
    }

    /// Feeds `fps` per model for `secs` seconds from `t` (one look a second), all on time.
    fn feed(
        c: &mut Controller,
        t: &mut Nanos,
        n: &mut [u64],
        fps: &[u64],
        secs: u64,
    ) -> Vec<Trigger> {
        let mut out = Vec::new();
        for _ in 0..secs {
            *t += SEC;
            for (k, f) in n.iter_mut().zip(fps) {
                *k += f;
            }
            if let Some(tr) = c.observe(*t, n, n, n) {
                out.push(tr);
            }
        }
        out
    }

    #[test]
    fn a_steady_mix_never_triggers_and_a_step_does() {
        let mut c = ctl();
        let (mut t, mut n) = (0, vec![0u64; 3]);
        assert!(feed(&mut c, &mut t, &mut n, &[100, 100, 100], 30).is_empty());
        // Model 0 doubles: its share goes from 1/3 to 1/2.
        let hits = feed(&mut c, &mut t, &mut n, &[200, 100, 100], 5);
        let Some(Trigger::Mix {
            model, measured, ..
        }) = hits.first()
        else {
            panic!("no mix trigger: {hits:?}");
        };
        assert_eq!(*model, 0);
        assert!(*measured > 0.4, "{measured}");
        // Re-planned for the new mix: quiet again.
        c.replanned(t, &c.rates());
        let later = feed(&mut c, &mut t, &mut n, &[200, 100, 100], 30);
        assert!(later.is_empty(), "{later:?}");
    }

    #[test]
    fn a_quiet_model_does_not_trigger_on_noise() {
        let mut c = Controller::new(ControlSettings::default(), &[1.0, 0.01]);
        let (mut t, mut n) = (0, vec![0u64; 2]);
        // 1 frame/s against 100: one second with 2, the next with 0, is 100% off its share
        // over a short span but within the noise guard of 5 frames.
        let mut hits = Vec::new();
        for k in 0..30 {
            hits.extend(feed(&mut c, &mut t, &mut n, &[100, (k % 2) * 2], 1));
        }
        assert!(hits.is_empty(), "{hits:?}");
    }

    #[test]
    fn attainment_under_target_triggers_after_the_set_time() {
        let mut c = ctl();
        let mut t = 0;
        let mut n = vec![0u64; 3];
        let mut on_time = vec![0u64; 3];
        let mut hit = None;
        for s in 1..=20u64 {
            t = s * SEC;
            for k in 0..3 {
                n[k] += 100;
                on_time[k] += if k == 2 && s > 10 { 90 } else { 100 };
            }
            if let Some(tr) = c.observe(t, &n, &n, &on_time) {
                hit = Some((s, tr));
                break;
            }
        }
        let (s, tr) = hit.expect("a trigger");
        // Under from second 11; 5 s later.
        assert_eq!(s, 16);
        assert!(matches!(tr, Trigger::Attainment { model: 2, .. }), "{tr:?}");
        let _ = t;
    }

    #[test]
    fn bad_settings_are_named() {
        let s = ControlSettings {
            band: 1.5,
            ..Default::default()
        };
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("`band`") && e.contains("1.5"), "{e}");
        let s = ControlSettings {
            move_cost: -0.1,
            ..Default::default()
        };
        assert!(s.check().unwrap_err().to_string().contains("move_cost"));
        assert!(ControlSettings::default().check().is_ok());
    }
}
