//! The simulator: accounting, determinism, link contention, arrivals and the CLI.

mod common;

use poolpipe::batcher::deadline::StageCost;
use poolpipe::clock::Nanos;
use poolpipe::config::PolicyKind;
use poolpipe::sim::{
    self, Arrivals, SimModel, SimOptions, SimPipeline, SimResult, SimSetup, SimStage,
};

const MS: Nanos = 1_000_000;

/// One model, two stages: `head` ms on 1 worker then `tail` ms on 2 workers (plus `send` ms to
/// move a batch between them), batch latency growing by half per extra frame.
fn two_stage(head: u64, send: u64, tail: u64, share: u32, planned: f64) -> SimSetup {
    let cost = |base: u64, tr: u64| StageCost {
        latency: (1..=4).map(|b| base * MS * (1 + b) / 2).collect(),
        transfer: (1..=4).map(|b| tr * MS * b).collect(),
        send_while_computing: false,
        receive: Vec::new(),
    };
    SimSetup {
        models: vec![SimModel {
            name: "m".into(),
            slo: 100 * MS,
            weight: 1.0,
            planned,
        }],
        pipelines: vec![SimPipeline {
            model: 0,
            batch: 4,
            weight: 1.0,
            stages: vec![
                SimStage {
                    cost: cost(head, send),
                    workers: 2,
                    share,
                    class: 0,
                },
                SimStage {
                    cost: cost(tail, 0),
                    workers: 2,
                    share: 1,
                    class: 1,
                },
            ],
            wait: None,
        }],
        classes: vec![("H".into(), 2), ("L".into(), 2)],
    }
}

fn opts(policy: PolicyKind, load: f64, arrivals: Arrivals) -> SimOptions {
    SimOptions {
        policy,
        duration: 20.0,
        load,
        arrivals,
        seed: 3,
        margin: 2 * MS,
        queue: None,
    }
}

fn balanced(r: &SimResult) {
    for m in &r.models {
        assert_eq!(
            m.offered,
            m.on_time + m.finished_late + m.dropped_late + m.dropped_overload,
            "{m:?}"
        );
    }
}

#[test]
fn every_frame_is_accounted_and_the_same_seed_gives_the_same_run() {
    let setup = two_stage(10, 1, 20, 1, 150.0);
    for policy in [PolicyKind::Deadline, PolicyKind::Fixed, PolicyKind::Aimd] {
        for load in [0.5, 1.0, 2.0] {
            let o = opts(policy, load, Arrivals::Poisson);
            let a = sim::simulate(&setup, &o);
            balanced(&a);
            assert!(a.models[0].offered > 0);
            let b = sim::simulate(&setup, &o);
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                serde_json::to_string(&b).unwrap()
            );
            let c = sim::simulate(&setup, &SimOptions { seed: 4, ..o });
            assert_ne!(a.models[0].offered, c.models[0].offered);
        }
    }
}

#[test]
fn the_deadline_policy_never_finishes_a_frame_late_and_drops_early_under_overload() {
    let setup = two_stage(10, 1, 20, 1, 150.0);
    let r = sim::simulate(&setup, &opts(PolicyKind::Deadline, 2.0, Arrivals::Poisson));
    balanced(&r);
    let m = &r.models[0];
    assert_eq!(m.finished_late, 0, "{m:?}");
    assert!(m.dropped_late > 0 && m.on_time > 0, "{m:?}");
    assert!(m.p99_ms <= 100.0, "{m:?}");
    // Fixed batching under the same overload finishes frames late instead.
    let f = sim::simulate(&setup, &opts(PolicyKind::Fixed, 2.0, Arrivals::Poisson));
    assert!(f.models[0].finished_late > 0, "{:?}", f.models[0]);
    assert!(m.on_time > f.models[0].on_time);
}

#[test]
fn processes_sharing_a_gpu_share_its_link() {
    // Sending dominates: 8 ms per frame on the link, 1 ms of compute. Two processes on two GPUs
    // send in parallel; two on one GPU (share 2) wait for each other's transfers.
    let mut separate = two_stage(1, 8, 1, 1, 1.0);
    let mut shared = two_stage(1, 8, 1, 2, 1.0);
    // Measure what the pools carry, not deadlines.
    separate.models[0].slo = 10_000 * MS;
    shared.models[0].slo = 10_000 * MS;
    let o = SimOptions {
        load: 400.0, // 400 frames/s offered: far beyond either
        ..opts(PolicyKind::Fixed, 1.0, Arrivals::Poisson)
    };
    let a = sim::simulate(&separate, &o);
    let b = sim::simulate(&shared, &o);
    balanced(&a);
    balanced(&b);
    let (ga, gb) = (
        a.models[0].on_time + a.models[0].finished_late,
        b.models[0].on_time + b.models[0].finished_late,
    );
    let ratio = gb as f64 / ga as f64;
    assert!(
        (0.4..0.65).contains(&ratio),
        "finished with a shared link {gb}, separate links {ga}"
    );
}

#[test]
fn a_stage_that_sends_while_computing_carries_up_to_its_compute_rate_with_exact_reservations() {
    // Head: 25 ms to compute a batch of 4, 20 ms to send it; tail 5 ms. Held for compute + send,
    // a head worker does a batch every 45 ms; sending while computing, every 25 ms.
    let held = two_stage(10, 5, 2, 1, 1.0);
    let mut overlapped = held.clone();
    overlapped.pipelines[0].stages[0].cost.send_while_computing = true;
    let finished = |setup: &SimSetup, policy, slo_ms: u64| {
        let mut setup = setup.clone();
        setup.models[0].slo = slo_ms * MS;
        let r = sim::simulate(
            &setup,
            &SimOptions {
                load: 400.0, // 400 frames/s offered: beyond both
                ..opts(policy, 1.0, Arrivals::Poisson)
            },
        );
        balanced(&r);
        r.models[0].clone()
    };
    let (a, b) = (
        finished(&held, PolicyKind::Fixed, 10_000),
        finished(&overlapped, PolicyKind::Fixed, 10_000),
    );
    let ratio = (b.on_time + b.finished_late) as f64 / (a.on_time + a.finished_late) as f64;
    assert!(
        (1.6..1.9).contains(&ratio),
        "sending while computing finished {ratio:.2}x as many frames ({b:?} vs {a:?})"
    );
    // Under the deadline policy the reservations follow the hand-offs and transfers: under
    // overload nothing finishes late, and more finishes on time than when held.
    let (a, b) = (
        finished(&held, PolicyKind::Deadline, 150),
        finished(&overlapped, PolicyKind::Deadline, 150),
    );
    assert_eq!(b.finished_late, 0, "{b:?}");
    assert!(b.on_time as f64 > 1.4 * a.on_time as f64, "{b:?} vs {a:?}");
}

#[test]
fn bursty_arrivals_cost_attainment_at_the_same_mean_load() {
    let setup = two_stage(10, 1, 20, 1, 150.0);
    let p = sim::simulate(&setup, &opts(PolicyKind::Deadline, 0.9, Arrivals::Poisson));
    let b = sim::simulate(
        &setup,
        &opts(
            PolicyKind::Deadline,
            0.9,
            Arrivals::Bursty { burstiness: 4.0 },
        ),
    );
    assert!(
        b.attainment < p.attainment,
        "bursty {} vs poisson {}",
        b.attainment,
        p.attainment
    );
    // The search finds a load that holds 99% and is below one where it does not.
    let found = sim::find_load(
        &setup,
        &opts(PolicyKind::Deadline, 1.0, Arrivals::Poisson),
        0.99,
        0.0,
        3.0,
        8,
        |_| {},
    );
    assert!(found.min_attainment >= 0.99, "{found:?}");
    let above = sim::simulate(
        &setup,
        &opts(PolicyKind::Deadline, found.load * 1.5, Arrivals::Poisson),
    );
    assert!(above.min_attainment < 0.99, "{above:?}");
}

#[test]
fn cli_plans_then_simulates_and_repeats_itself_with_the_same_seed() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    let o = common::poolpipe(&[
        "plan",
        "--profiles",
        profiles.to_str().unwrap(),
        "--cluster",
        "L4:3,T4:9",
        "--models",
        "convnext_large,repvgg-b3",
        "--time-limit",
        "5",
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "simulate",
            "--plan",
            plan.to_str().unwrap(),
            "--profiles",
            profiles.to_str().unwrap(),
            "--duration",
            "10",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = common::poolpipe(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for k in ["wall_seconds", "events_per_second"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    let a = run(&["--load", "0.8"]);
    assert_eq!(a, run(&["--load", "0.8"]));
    assert_eq!(a["models"].as_array().unwrap().len(), 2);
    for k in ["attainment", "goodput", "min_attainment"] {
        assert!(a[k].as_f64().unwrap() > 0.0, "{k}: {a}");
    }
    assert!(
        a["busy"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["class"] == "T4")
    );
    let found = run(&["--find-99", "--arrivals", "bursty"]);
    assert!(found["min_attainment"].as_f64().unwrap() >= 0.99, "{found}");
    // The load sweep drawn as a PNG.
    let png = dir.path().join("sweep.png");
    run(&["--plot", png.to_str().unwrap()]);
    let bytes = std::fs::read(&png).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
    // A trace replayed as recorded: three frames.
    let trace = common::write(dir.path(), "t.csv", "0.0\n0.1\n0.2\n");
    let t = run(&["--arrivals", &format!("trace:{}", trace.display())]);
    let offered: u64 = t["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offered"].as_u64().unwrap())
        .sum();
    assert_eq!(offered, 6, "each model replays the three timestamps: {t}");
}

#[test]
fn the_analytic_batch_and_wait_match_a_grid_search_where_the_demand_can_be_served() {
    let Some(dir) = common::shared_profiles() else {
        eprintln!("skipped: the published profiles are not beside the repository");
        return;
    };
    let profiles = poolpipe::profile::Profiles::load_dir(&dir, None).unwrap();
    let models = poolpipe::bench::analytic::main_models(&dir, &profiles);
    assert_eq!(models.len(), 18, "the paper's 18 models: {models:?}");
    // At 30% and 60% of the pool's capacity every model's demand can be served within the SLO.
    let rows =
        poolpipe::bench::analytic::compare(&profiles, &models, "L4", 2, &[0.3, 0.6], 20.0).unwrap();
    assert_eq!(rows.len(), 36);
    for r in &rows {
        assert!(
            r.ratio >= 0.95,
            "{} at {:.0}/s: analytic {:?} gives {:.1}/s, the grid's best {:?}",
            r.model,
            r.rate,
            r.choice,
            r.analytic,
            r.best
        );
        assert!(
            r.choose_us < 1000.0,
            "{} took {} us to choose",
            r.model,
            r.choose_us
        );
    }
}

/// The online control plane on a small cluster: a demand step of one model of three (1x to 2.5x
/// at 10 s) against the static plan on the same arrivals; then steady demand, where it must not
/// re-plan on the mix at all.
#[test]
fn re_planning_after_a_demand_step_misses_fewer_frames_than_the_static_plan() {
    use poolpipe::control::ControlSettings;
    use poolpipe::planner::{self, Cluster, Options};
    use poolpipe::sim::arrivals::Shape;
    let Some(dir) = common::shared_profiles() else {
        return;
    };
    let group = ["colorization-v2", "googlenet-v3", "repvgg-b3"];
    let profiles = poolpipe::profile::Profiles::load_dir(&dir, None).unwrap();
    let specs = poolpipe::bench::planner::group_specs(&profiles, &group, 5.0).unwrap();
    let cluster = Cluster::parse_spec("L4:4,T4:12", 10.0).unwrap();
    let opts = Options {
        time_limit: std::time::Duration::from_secs(10),
        ..Options::default()
    };
    let plan = planner::plan(&profiles, &cluster, &specs, &opts).unwrap();
    let setup = SimSetup::from_plan(&plan, &profiles).unwrap();
    let settings = ControlSettings::default();
    let case = poolpipe::bench::control::Case {
        profiles: &profiles,
        cluster: &cluster,
        specs: &specs,
        opts: &opts,
        plan: &plan,
        setup: &setup,
    };
    let run = |adaptive: bool, shape: &Shape| {
        case.run(&settings, adaptive, shape, &Arrivals::Poisson, 0.5, 60.0, 5)
    };
    // Bursts (independent per model) move each model's share of a short window a lot: the
    // dispersion-scaled guard keeps the mix trigger quiet.
    let (bursty, _) = case.run(
        &settings,
        true,
        &Shape::Steady,
        &Arrivals::Bursty { burstiness: 2.0 },
        0.5,
        60.0,
        5,
    );
    assert!(
        bursty.replans.iter().all(|p| !p.reason.starts_with("mix")),
        "{:?}",
        bursty.replans
    );
    let step = Shape::Step {
        model: 0,
        at_s: 10.0,
        factor: 2.5,
    };
    let (fixed, _) = run(false, &step);
    let (online, last) = run(true, &step);
    eprintln!("static: {fixed:?}\nonline: {online:?}");
    assert_eq!(fixed.offered, online.offered, "the same arrivals");
    assert!(fixed.replans.is_empty());
    // The step leaves the first model short on the static plan.
    assert!(fixed.attainment < 0.97, "{fixed:?}");
    let first = online.replans.first().expect("a re-plan after the step");
    assert!(
        first.at_s > 10.0 && first.at_s <= 20.0,
        "re-planned at {} s: {:?}",
        first.at_s,
        online.replans
    );
    assert!(
        first.reason.contains("colorization"),
        "{:#?} {:?}",
        online.replans,
        fixed.windows
    );
    assert!(first.after > first.before, "{first:?}");
    assert!(first.moves.started > 0, "{first:?}");
    assert!(
        online.missed * 2 <= fixed.missed,
        "online missed {} vs static {}",
        online.missed,
        fixed.missed
    );
    // After the switch the windows are back near the target.
    let tail = &online.windows[2..];
    assert!(tail.iter().all(|a| *a >= 0.97), "{:?}", online.windows);
    // The plan that runs at the end is a valid plan of this cluster.
    assert!(planner::check::check(&last, &profiles).is_empty());
    assert!(last.models[0].throughput > plan.models[0].throughput);

    // Steady demand: no mix trigger (attainment ones are allowed).
    let (steady, _) = run(true, &Shape::Steady);
    assert!(
        steady.replans.iter().all(|p| !p.reason.starts_with("mix")),
        "{:?}",
        steady.replans
    );
    assert!(steady.attainment >= 0.99, "{steady:?}");
}

/// Accuracy scaling: a family of three published classifiers at 1x, 1.5x and 2x the demand its
/// most accurate variant can carry. The family's plan serves every frame in time while the
/// cheaper variant's capacity allows, at a higher accuracy than always using the cheapest; the
/// best variant alone drops what it cannot carry.
#[test]
fn a_model_family_serves_overload_with_cheaper_variants_and_keeps_accuracy_where_it_can() {
    use poolpipe::bench::family;
    use poolpipe::planner::Cluster;
    let Some(dir) = common::shared_profiles() else {
        return;
    };
    let profiles = poolpipe::profile::Profiles::load_dir(&dir, None).unwrap();
    let cluster = Cluster::parse_spec("L4:4,T4:12", 10.0).unwrap();
    let rows = family::run(&profiles, &cluster, &[1.0, 1.5, 2.0], 0.8, 10.0).unwrap();
    eprintln!("{}", family::table(&rows));
    assert_eq!(rows.len(), 9);
    let best_acc = family::FAMILY[0].1;
    let cheapest_acc = family::FAMILY[2].1;
    for load in [1.0, 1.5, 2.0] {
        let row = |p: &str| {
            rows.iter()
                .find(|r| r.load == load && r.policy == p)
                .unwrap()
        };
        let (fam, best, cheap) = (row("family"), row("best"), row("cheapest"));
        assert!(fam.attainment >= 0.99, "family at {load}x: {fam:?}");
        assert!(
            fam.accuracy >= cheap.accuracy + 0.5 || load == 2.0,
            "family at {load}x serves {:.2} vs cheapest {:.2}",
            fam.accuracy,
            cheap.accuracy
        );
        assert!(fam.accuracy >= cheapest_acc - 1e-9 && fam.accuracy <= best_acc + 1e-9);
        if load == 1.0 {
            // The best variant carries it all: nothing is given up.
            assert!((fam.accuracy - best_acc).abs() < 0.01, "{fam:?}");
            assert!(best.attainment >= 0.99, "{best:?}");
        } else {
            // The best alone drops what it cannot carry; the family does not.
            assert!(best.attainment < 0.9 * fam.attainment, "{best:?}");
            let shares: f64 = fam.plan.variants.iter().map(|v| v.share).sum();
            assert!((shares - 1.0).abs() < 1e-6, "{:?}", fam.plan.variants);
        }
    }
    // Bad input: an accuracy outside 0..100, a variant named twice.
    let mut vars = family::variants(&profiles).unwrap();
    let opts = poolpipe::planner::Options::default();
    vars[1].accuracy = 120.0;
    let e = poolpipe::planner::family::plan_family(&profiles, &cluster, &vars, 100.0, 0.8, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("wide_resnet101_2") && e.contains("0..100"),
        "{e}"
    );
    vars[1] = vars[0].clone();
    let e = poolpipe::planner::family::plan_family(&profiles, &cluster, &vars, 100.0, 0.8, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("named twice"), "{e}");
}

/// `poolpipe simulate --shape --control`: the online control plane on a plan file.
#[test]
fn cli_simulates_a_demand_step_with_and_without_re_planning() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    let p = profiles.to_str().unwrap();
    let o = common::poolpipe(&[
        "plan",
        "--profiles",
        p,
        "--cluster",
        "L4:4,T4:12",
        "--models",
        "colorization-v2,googlenet-v3,repvgg-b3",
        "--weights",
        "0.3,0.33,0.37",
        "--time-limit",
        "10",
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sim = |shape: &str, extra: &[&str]| {
        let mut args = vec![
            "simulate",
            "--plan",
            plan.to_str().unwrap(),
            "--profiles",
            p,
            "--load",
            "0.5",
            "--duration",
            "40",
            "--shape",
            shape,
        ];
        args.extend_from_slice(extra);
        common::poolpipe(&args)
    };
    let missed = |o: &std::process::Output, who: &str| -> u64 {
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let line = out
            .lines()
            .find(|l| l.starts_with(who))
            .unwrap_or_else(|| panic!("no `{who}` line: {out}"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let fixed = sim("step:0:10:2.5", &[]);
    let online = sim("step:0:10:2.5", &["--control"]);
    let out = String::from_utf8_lossy(&online.stdout).to_string();
    assert!(
        out.lines()
            .any(|l| l.starts_with("re-plan at") && l.contains("mix: colorization-v2")),
        "{out}"
    );
    assert!(
        missed(&online, "online:") < missed(&fixed, "static:"),
        "{out}"
    );
    // Bad input: a model the plan lacks, a band that is not a fraction.
    let o = sim("step:9:10:2", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("model 9 is not in the plan"));
    let o = sim("steady", &["--control", "--band", "1.5"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("`band`"));
}
