//! The planner against an exhaustive search on small instances, the plan checker against
//! hand-broken plans, infeasible inputs, and the CLI on the published profiles.

mod common;

use std::path::Path;
use std::time::Duration;

use poolpipe::planner::check::{Rule, check};
use poolpipe::planner::{self, Cluster, Mode, ModelSpec, Options, Plan, PlanError};
use poolpipe::profile::Profiles;

/// xorshift64*, deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const BLOCKS: usize = 4;
const BATCHES: usize = 4;
const CLASSES: [&str; 2] = ["H", "L"];
const SHARES: u32 = 2;

/// Random profiles of `models` models with 4 blocks on classes H (fast) and L (slow on some
/// blocks, nearly as fast on others), shares 1..2, batch 1..4.
fn synthetic(dir: &Path, models: usize, rng: &mut Rng) -> Profiles {
    std::fs::create_dir_all(dir.join("block-timing")).unwrap();
    std::fs::create_dir_all(dir.join("cut-bytes")).unwrap();
    for m in 0..models {
        let base: Vec<f64> = (0..BLOCKS).map(|_| rng.uniform(1000.0, 8000.0)).collect();
        let slow: Vec<f64> = (0..BLOCKS).map(|_| rng.uniform(1.1, 5.0)).collect();
        let grow: Vec<f64> = (0..BLOCKS).map(|_| rng.uniform(0.3, 0.9)).collect();
        let share_cost: Vec<f64> = (0..BLOCKS).map(|_| rng.uniform(1.2, 2.0)).collect();
        for (ci, class) in CLASSES.iter().enumerate() {
            for share in 1..=SHARES {
                let mut text = String::new();
                for i in 0..BLOCKS {
                    let b1 = base[i]
                        * if ci == 1 { slow[i] } else { 1.0 }
                        * if share == 2 { share_cost[i] } else { 1.0 };
                    let row: Vec<String> = (1..=BATCHES)
                        .map(|b| format!("{}", (b1 * (1.0 + grow[i] * (b - 1) as f64)) as u64))
                        .collect();
                    text.push_str(&row.join(","));
                    text.push('\n');
                }
                std::fs::write(
                    dir.join(format!("block-timing/m{m}-{class}-{share}.csv")),
                    text,
                )
                .unwrap();
            }
        }
        let cuts: Vec<String> = (0..BLOCKS - 1)
            .map(|_| format!("{}", rng.uniform(1e4, 2e6) as u64))
            .collect();
        std::fs::write(dir.join(format!("cut-bytes/m{m}.csv")), cuts.join("\n")).unwrap();
    }
    Profiles::load_dir(dir, None).unwrap()
}

/// One pipeline configuration as the brute force sees it.
struct Config {
    /// (class index, share, per-process rate) per stage.
    stages: Vec<(usize, u32, f64)>,
    batch: usize,
    /// Stage latencies + transfers, and stage latencies alone, seconds.
    fixed: f64,
    run: f64,
}

/// Queueing allowance, pool tiers and the latency budget SLO x (1 - margin).
struct Latency {
    queueing: f64,
    tiers: Vec<u32>,
    budget: f64,
}

impl Latency {
    /// The minimum rate of `c` with pools of at least `smallest` processes, or None when it
    /// cannot meet the SLO at all.
    fn min_rate(&self, c: &Config, smallest: u32) -> Option<f64> {
        let tier = self
            .tiers
            .iter()
            .copied()
            .filter(|&t| t <= smallest)
            .max()
            .unwrap_or(1);
        let fixed = c.fixed + self.queueing * c.run / f64::from(tier);
        if c.batch == 1 {
            (fixed <= self.budget).then_some(0.0)
        } else {
            (fixed < self.budget).then(|| (c.batch - 1) as f64 / (self.budget - fixed))
        }
    }
}

/// Every configuration of `model` meeting the SLO, computed directly from the CSV semantics;
/// `held`: a process holds a batch while it sends it (else it sends while computing the next).
fn configs(p: &Profiles, model: &str, gbps: f64, max_stages: usize, held: bool) -> Vec<Config> {
    let prof = p.model(model).unwrap();
    let link = gbps * 1e9 / 8.0;
    let lat = |c: usize, s: u32, a: usize, b: usize, batch: usize| -> f64 {
        let t = &prof.timing[&(CLASSES[c].to_string(), s)];
        (a..b).map(|i| t.us[i][batch - 1] as f64).sum::<f64>() / 1e6
    };
    let mut out = Vec::new();
    let kinds: Vec<(usize, u32)> = (0..2)
        .flat_map(|c| (1..=SHARES).map(move |s| (c, s)))
        .collect();
    // Partitions: whole, or cut after block j (bytes prof.cut_bytes[j - 1]).
    let mut parts: Vec<Vec<(usize, usize)>> = vec![vec![(0, BLOCKS)]];
    if max_stages >= 2 {
        for j in 1..BLOCKS {
            parts.push(vec![(0, j), (j, BLOCKS)]);
        }
    }
    for part in &parts {
        let assigns: Vec<Vec<(usize, u32)>> = if part.len() == 1 {
            kinds.iter().map(|&k| vec![k]).collect()
        } else {
            kinds
                .iter()
                .flat_map(|&a| kinds.iter().map(move |&b| vec![a, b]))
                .collect()
        };
        for assign in assigns {
            for batch in 1..=BATCHES {
                let mut fixed = 0.0;
                let mut run = 0.0;
                let mut stages = Vec::new();
                for (k, (&(a, b), &(c, s))) in part.iter().zip(&assign).enumerate() {
                    let l = lat(c, s, a, b, batch);
                    let mut rate = batch as f64 / l;
                    if part.len() == 2 {
                        let bytes = prof.cut_bytes[part[0].1 - 1] as f64;
                        if k == 0 {
                            let send = bytes * batch as f64 / link;
                            fixed += send;
                            if held {
                                rate = batch as f64 / (l + send);
                            }
                        }
                        rate = rate.min(link / s as f64 / bytes);
                    }
                    fixed += l;
                    run += l;
                    stages.push((c, s, rate));
                }
                out.push(Config {
                    stages,
                    batch,
                    fixed,
                    run,
                });
            }
        }
    }
    out
}

/// Best throughput of one model for every budget of half-GPUs `(h, l)`: an unbounded knapsack
/// over (configuration, process counts) items.
fn best_by_budget(cfgs: &[Config], lat: &Latency, max_h: usize, max_l: usize) -> Vec<Vec<f64>> {
    let mut items: Vec<([usize; 2], f64)> = Vec::new();
    for c in cfgs {
        let limits: Vec<u32> = c
            .stages
            .iter()
            .map(|&(cl, s, _)| [max_h, max_l][cl] as u32 / 2 * s)
            .collect();
        let mut counts = vec![1u32; c.stages.len()];
        loop {
            let mut cost = [0usize; 2];
            for (&(cl, s, _), &n) in c.stages.iter().zip(&counts) {
                cost[cl] += (n * 2 / s) as usize;
            }
            let v = c
                .stages
                .iter()
                .zip(&counts)
                .map(|(&(_, _, r), &n)| r * n as f64)
                .fold(f64::INFINITY, f64::min);
            let smallest = counts.iter().copied().min().unwrap_or(1);
            let ok = lat
                .min_rate(c, smallest)
                .is_some_and(|r| v >= r * (1.0 - 1e-9));
            if cost[0] <= max_h && cost[1] <= max_l && ok {
                items.push((cost, v));
            }
            let mut i = 0;
            while i < counts.len() {
                counts[i] += 1;
                if counts[i] <= limits[i] {
                    break;
                }
                counts[i] = 1;
                i += 1;
            }
            if i == counts.len() {
                break;
            }
        }
    }
    let mut f = vec![vec![0.0f64; max_l + 1]; max_h + 1];
    for h in 0..=max_h {
        for l in 0..=max_l {
            let mut best: f64 = 0.0;
            if h > 0 {
                best = best.max(f[h - 1][l]);
            }
            if l > 0 {
                best = best.max(f[h][l - 1]);
            }
            for (cost, v) in &items {
                if cost[0] <= h && cost[1] <= l && (cost[0] + cost[1]) > 0 {
                    best = best.max(f[h - cost[0]][l - cost[1]] + v);
                }
            }
            f[h][l] = best;
        }
    }
    f
}

fn specs(p: &Profiles, weights: &[f64], mult: &[f64]) -> Vec<ModelSpec> {
    weights
        .iter()
        .zip(mult)
        .enumerate()
        .map(|(m, (&w, &k))| {
            let name = format!("m{m}");
            let (slo, class) = planner::slo_from_multiplier(p, &name, k).unwrap();
            ModelSpec {
                name,
                weight: w,
                slo,
                slo_basis: format!("{k} x {class}"),
            }
        })
        .collect()
}

#[test]
fn milp_objective_equals_exhaustive_search_on_small_instances() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut checked = 0;
    for instance in 0..12 {
        let dir = tempfile::tempdir().unwrap();
        let profiles = synthetic(dir.path(), 2, &mut rng);
        let (nh, nl) = (1 + (rng.next() % 3) as u32, 1 + (rng.next() % 5) as u32); // <= 8 devices
        let gbps = [0.5, 2.0, 10.0, 10.0][instance % 4];
        // Instances 4..8 hold a process while it sends; the others send while computing.
        let held = (instance / 4) % 2;
        let cluster = Cluster::parse_spec(&format!("H:{nh},L:{nl}"), gbps).unwrap();
        let weights = [rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)];
        let mult = [rng.uniform(1.5, 6.0), rng.uniform(1.5, 6.0)];
        let models = specs(&profiles, &weights, &mult);
        // Queueing allowances 0, 1 and 2; pool tiers [1] or [1, 3].
        let queueing = [0.0, 1.0, 2.0][instance % 3];
        let tiers = if instance % 2 == 0 {
            vec![1]
        } else {
            vec![1, 3]
        };
        for (mode, stages) in [(Mode::Poolpipe, 2), (Mode::Np, 1)] {
            let opts = Options {
                max_stages: 2,
                max_batch: BATCHES,
                max_share: SHARES,
                margin: 0.1,
                queueing,
                pool_tiers: tiers.clone(),
                time_limit: Duration::from_secs(30),
                gap: 0.0,
                mode,
                send_while_computing: held == 0,
                objective: Default::default(),
            };
            let f: Vec<Vec<Vec<f64>>> = models
                .iter()
                .map(|m| {
                    let c = configs(&profiles, &m.name, gbps, stages, held == 1);
                    let lat = Latency {
                        queueing,
                        tiers: tiers.clone(),
                        budget: m.slo.as_secs_f64() * 0.9,
                    };
                    best_by_budget(&c, &lat, 2 * nh as usize, 2 * nl as usize)
                })
                .collect();
            let (mh, ml) = (2 * nh as usize, 2 * nl as usize);
            let mut exhaustive: f64 = 0.0;
            for h in 0..=mh {
                for l in 0..=ml {
                    let v = (f[0][h][l] / weights[0]).min(f[1][mh - h][ml - l] / weights[1]);
                    exhaustive = exhaustive.max(v);
                }
            }
            match planner::plan(&profiles, &cluster, &models, &opts) {
                Ok(plan) => {
                    assert!(
                        (plan.objective - exhaustive).abs() <= 1e-6 * exhaustive.max(1.0),
                        "instance {instance} {mode:?} on {}: MILP {} vs exhaustive {exhaustive}",
                        cluster.describe(),
                        plan.objective
                    );
                    let v = check(&plan, &profiles);
                    assert!(v.is_empty(), "instance {instance}: {v:?}");
                    checked += 1;
                }
                Err(PlanError::Infeasible { model, reason }) => {
                    assert_eq!(
                        exhaustive, 0.0,
                        "instance {instance} {mode:?}: planner says `{model}`: {reason}"
                    );
                }
                Err(e) => panic!("instance {instance}: {e}"),
            }
        }
    }
    assert!(checked >= 12, "only {checked} instances had a plan");
}

fn small_plan(dir: &Path) -> (Profiles, Plan) {
    let mut rng = Rng(42);
    let profiles = synthetic(dir, 2, &mut rng);
    let cluster = Cluster::parse_spec("H:2,L:4", 10.0).unwrap();
    let models = specs(&profiles, &[0.5, 0.5], &[4.0, 4.0]);
    let plan = planner::plan(
        &profiles,
        &cluster,
        &models,
        &Options {
            max_batch: BATCHES,
            max_share: SHARES,
            ..Options::default()
        },
    )
    .unwrap();
    (profiles, plan)
}

#[test]
fn checker_rejects_plans_that_break_each_constraint() {
    let dir = tempfile::tempdir().unwrap();
    let (profiles, plan) = small_plan(dir.path());
    assert!(
        check(&plan, &profiles).is_empty(),
        "{:?}",
        check(&plan, &profiles)
    );
    let rules = |p: &Plan| {
        check(p, &profiles)
            .into_iter()
            .map(|v| v.rule)
            .collect::<Vec<_>>()
    };

    // SLO: the same pipelines under a budget below their latency.
    let mut p = plan.clone();
    p.models[0].slo_ms = p.models[0].pipelines[0].latency_ms * 0.5;
    assert!(rules(&p).contains(&Rule::Slo), "{:?}", check(&p, &profiles));

    // Throughput: planned rate beyond what the stages carry (totals kept consistent).
    let mut p = plan.clone();
    let extra = p.models[0].pipelines[0].throughput * 9.0;
    p.models[0].pipelines[0].throughput += extra;
    p.models[0].throughput += extra;
    p.objective = p
        .models
        .iter()
        .map(|m| m.throughput / m.weight)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(
        rules(&p),
        vec![Rule::Throughput; rules(&p).len()],
        "{:?}",
        check(&p, &profiles)
    );
    assert!(!rules(&p).is_empty());

    // Devices: fewer available than used.
    let mut p = plan.clone();
    let busy = p.classes.iter().position(|c| c.used > 0.0).unwrap();
    p.classes[busy].available = 0;
    assert_eq!(rules(&p), vec![Rule::Devices]);

    // Blocks: a gap between stages or a stage past the end.
    let mut p = plan.clone();
    let st = &mut p.models[1].pipelines[0].stages;
    let last = st.len() - 1;
    st[last].blocks[1] = BLOCKS + 1;
    assert!(
        rules(&p).contains(&Rule::Blocks) || rules(&p).contains(&Rule::Shape),
        "{:?}",
        check(&p, &profiles)
    );

    // Shape: a batch size beyond the profiles.
    let mut p = plan.clone();
    p.models[0].pipelines[0].batch = 99;
    assert!(rules(&p).contains(&Rule::Shape));

    // Latency: a reported stage latency that the profiles do not give.
    let mut p = plan.clone();
    p.models[0].pipelines[0].stages[0].latency_ms += 1.0;
    assert!(rules(&p).contains(&Rule::Latency));

    // Links: a bandwidth too low for the cut (only where the plan has a cut).
    if let Some((mi, pi)) = plan.models.iter().enumerate().find_map(|(mi, m)| {
        m.pipelines
            .iter()
            .position(|p| p.stages.len() > 1)
            .map(|pi| (mi, pi))
    }) {
        let mut p = plan.clone();
        p.bandwidth_gbps = 1e-6;
        let v = check(&p, &profiles);
        assert!(
            v.iter()
                .any(|v| v.rule == Rule::Throughput && v.message.contains("links")),
            "model {mi} pipeline {pi}: {v:?}"
        );
    }

    // Totals: a model throughput that is not the sum of its pipelines.
    let mut p = plan.clone();
    p.models[1].throughput *= 2.0;
    assert!(rules(&p).contains(&Rule::Totals));

    // Unknown: a class the cluster does not have.
    let mut p = plan.clone();
    p.models[0].pipelines[0].stages[0].class = "X9".into();
    assert!(rules(&p).contains(&Rule::Unknown));
}

#[test]
fn infeasible_input_is_a_clear_error_naming_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let profiles = synthetic(dir.path(), 2, &mut rng);
    let cluster = Cluster::parse_spec("H:2,L:4", 10.0).unwrap();
    let mut models = specs(&profiles, &[0.5, 0.5], &[4.0, 4.0]);
    models[1].slo = Duration::from_micros(50);
    let e = planner::plan(&profiles, &cluster, &models, &Options::default()).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, PlanError::Infeasible { ref model, .. } if model == "m1"),
        "{text}"
    );
    assert!(
        text.contains("`m1`") && text.contains("fastest possible latency"),
        "{text}"
    );

    let none = Cluster::parse_spec("H:0,L:0", 10.0).unwrap();
    let models = specs(&profiles, &[0.5, 0.5], &[4.0, 4.0]);
    let e = planner::plan(&profiles, &none, &models, &Options::default()).unwrap_err();
    assert!(e.to_string().contains("no devices"), "{e}");

    // Devices only of a class the model has no profile for.
    let other = Cluster::parse_spec("Z:8", 10.0).unwrap();
    let e = planner::plan(&profiles, &other, &models, &Options::default()).unwrap_err();
    assert!(
        matches!(e, PlanError::Infeasible { ref model, .. } if model == "m0"),
        "{e}"
    );
    assert!(
        e.to_string().contains("no profile for any device class"),
        "{e}"
    );
}

#[test]
fn cli_plans_the_published_profiles_as_json_and_checks_them() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plan.json");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--profiles",
            profiles.to_str().unwrap(),
            "--cluster",
            "L4:25,P4:75",
            "--bandwidth-gbps",
            "6",
            "--models",
            "colorization-v2,googlenet-v3,repvgg-b3",
            "--weights",
            "0.30,0.33,0.37",
            "--slo-multiplier",
            "5",
            "--time-limit",
            "5",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = common::poolpipe(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let pp = run(&["--out", out.to_str().unwrap()]);
    let np = run(&["--baseline", "np"]);
    for key in ["objective", "solve_seconds", "gap"] {
        assert!(pp[key].is_number(), "{key} missing: {pp}");
    }
    let models = pp["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    for m in models {
        assert!(m["name"].is_string() && m["throughput"].as_f64().unwrap() > 0.0);
        let stages = m["pipelines"][0]["stages"].as_array().unwrap();
        assert!(!stages.is_empty() && stages.len() <= 2);
    }
    assert!(
        pp["objective"].as_f64().unwrap() >= np["objective"].as_f64().unwrap() * (1.0 - 1e-9),
        "poolpipe {} below NP {}",
        pp["objective"],
        np["objective"]
    );
    // The written plan reads back and passes the checker.
    let plan = Plan::load(&out).unwrap();
    let p = Profiles::load_dir(&profiles, None).unwrap();
    assert!(check(&plan, &p).is_empty());

    // An infeasible SLO: exit 2 naming the model.
    let o = common::poolpipe(&[
        "plan",
        "--profiles",
        profiles.to_str().unwrap(),
        "--cluster",
        "L4:1",
        "--models",
        "repvgg-b3",
        "--slo-ms",
        "0.5",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("repvgg-b3") && err.contains("SLO"), "{err}");
}
