//! A planner plan served by `poolpipe run --plan` on emulated devices, against the simulator
//! serving the same plan with the same arrivals; and fairness between streams under overload.
//! Alone in its test binary, and its tests one at a time (`SERIAL`): emulated devices keep wall
//! time, and other tests running at the same time on a 2-core machine would delay their
//! wake-ups.

mod common;

use std::collections::HashMap;
use std::path::Path;

use poolpipe::clock::Nanos;
use poolpipe::config::PolicyKind;
use poolpipe::planner::Plan;
use poolpipe::profile::Profiles;
use poolpipe::sim::{self, Arrivals, SimOptions, SimSetup};
use serde_json::Value;

const MS: Nanos = 1_000_000;

/// Held by each test for its whole run, so that they do not share the cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `poolpipe plan` of `models` on `cluster`, written to `dir/plan.json`.
fn plan(dir: &Path, profiles: &Path, cluster: &str, models: &str) -> Plan {
    let out = dir.join("plan.json");
    let o = common::poolpipe(&[
        "plan",
        "--profiles",
        profiles.to_str().unwrap(),
        "--cluster",
        cluster,
        "--models",
        models,
        "--time-limit",
        "20",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Plan::load(&out).unwrap()
}

/// A pipeline file with one flow per model of the plan, each fed by one test source at
/// `rate(model)` frames per second, every result to a JSON lines file.
fn pipeline_file(dir: &Path, plan: &Plan, cluster: &str, rate: &dyn Fn(f64) -> u32) -> String {
    let mut p = format!(
        "[pipeline]\nname = \"planned\"\nslo_ms = 1000\ncluster = \"{cluster}\"\n\n[[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        dir.join("out.jsonl").display()
    );
    let patterns = ["ball", "smpte", "snow", "pinwheel"];
    for (i, m) in plan.models.iter().enumerate() {
        p += &format!(
            "\n[[flow]]\nname = \"f{i}\"\nmodel = \"{}\"\n\n[[source]]\nname = \"cam{i}\"\nuri = \"test://{}\"\nmax_fps = {}\nflow = \"f{i}\"\n",
            m.name,
            patterns[i % patterns.len()],
            rate(m.throughput)
        );
    }
    p
}

/// Runs `poolpipe run --plan` for `seconds`; returns the summary.
fn run_plan(dir: &Path, profiles: &Path, pipeline: &str, seconds: u32) -> Value {
    let p = common::write(dir, "p.toml", pipeline);
    let summary = dir.join("summary.json");
    let o = common::poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--plan",
        dir.join("plan.json").to_str().unwrap(),
        "--profiles",
        profiles.to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--duration",
        &seconds.to_string(),
        "--summary-json",
        summary.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = common::read_summary(&summary);
    common::assert_balanced(&s);
    s
}

/// Per flow `f{i}`: (attainment, goodput) of the run.
fn run_results(s: &Value) -> HashMap<String, (f64, f64, u64)> {
    let elapsed = s["elapsed_s"].as_f64().unwrap();
    s["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let ingested = f["ingested"].as_u64().unwrap();
            let published = f["published"].as_u64().unwrap();
            (
                f["name"].as_str().unwrap().to_string(),
                (
                    published as f64 / ingested.max(1) as f64,
                    published as f64 / elapsed,
                    ingested,
                ),
            )
        })
        .collect()
}

/// Serves the plan in the simulator with the run's arrivals: per model, its source's frames at
/// its rate, as many as the run ingested, over the run's time. Returns (attainment, goodput).
fn simulate(plan: &Plan, profiles: &Profiles, rates: &[u32], run: &Value) -> Vec<(f64, f64)> {
    let setup = SimSetup::from_plan(plan, profiles).unwrap();
    let elapsed = run["elapsed_s"].as_f64().unwrap();
    let span = (elapsed * 1e9) as Nanos;
    let flows = run_results(run);
    let times: Vec<Vec<Nanos>> = rates
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let n = flows[&format!("f{i}")].2;
            let period = (1e9 / *r as f64) as Nanos;
            (0..n).map(|k| k * period).collect()
        })
        .collect();
    let r = sim::simulate_times(
        &setup,
        &SimOptions {
            policy: PolicyKind::Deadline,
            duration: elapsed,
            load: 1.0,
            arrivals: Arrivals::Poisson,
            seed: 0,
            margin: 2 * MS,
            queue: None,
        },
        &times,
        span,
    );
    r.models
        .iter()
        .map(|m| (m.attainment, m.on_time as f64 / elapsed))
        .collect()
}

/// Asserts that the run and the simulator agree per model within `tolerance` (relative).
fn assert_agree(
    plan: &Plan,
    profiles: &Profiles,
    (rates, run): (&[u32], &Value),
    what: &str,
    tolerance: f64,
) {
    let simulated = simulate(plan, profiles, rates, run);
    let ran = run_results(run);
    for (i, (sa, sg)) in simulated.iter().enumerate() {
        let (ra, rg, _) = ran[&format!("f{i}")];
        let m = &plan.models[i].name;
        eprintln!(
            "{what}, {m}: attainment simulator {sa:.3}, run {ra:.3}; goodput simulator {sg:.1}, run {rg:.1}"
        );
        assert!(
            (sa - ra).abs() <= tolerance * sa.max(ra),
            "{what}, {m}: attainment simulator {sa:.3}, poolpipe run {ra:.3}"
        );
        assert!(
            (sg - rg).abs() <= tolerance * sg.max(rg),
            "{what}, {m}: goodput simulator {sg:.1}, poolpipe run {rg:.1} frames/s"
        );
    }
}

#[test]
fn a_plan_runs_and_agrees_with_the_simulator_below_and_above_its_load() {
    let _one_at_a_time = serial();
    let Some(dir_profiles) = common::shared_profiles() else {
        return;
    };
    let profiles = Profiles::load_dir(&dir_profiles, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = "L4:2,T4:6";
    let plan = plan(
        dir.path(),
        &dir_profiles,
        cluster,
        "wide_resnet101_2,googlenet,repvgg",
    );

    // 0.9 of each model's planned rate: every model meets its SLO for 99% of its frames.
    let rate = |x: f64| (0.9 * x).floor() as u32;
    let rates: Vec<u32> = plan.models.iter().map(|m| rate(m.throughput)).collect();
    let run = run_plan(
        dir.path(),
        &dir_profiles,
        &pipeline_file(dir.path(), &plan, cluster, &rate),
        30,
    );
    for (name, (attainment, _, ingested)) in run_results(&run) {
        assert!(ingested > 0, "flow {name} got no frames");
        assert!(
            attainment >= 0.99,
            "flow {name}: {attainment:.3} of its frames met the SLO at 0.9x the planned load"
        );
    }
    assert_agree(&plan, &profiles, (&rates, &run), "0.9x load", 0.05);
    // Results name their flow and the stages of the planned route they took.
    let out = common::read_jsonl(&dir.path().join("out.jsonl"));
    let first = &out[0];
    let flow = first["flow"].as_str().unwrap();
    assert!(
        first["latency_ms"]["stages"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k.starts_with(&format!("{flow}.p"))),
        "{first}"
    );

    // 1.3x: overload; the runtime and the simulator drop alike.
    let rate = |x: f64| (1.3 * x).round() as u32;
    let rates: Vec<u32> = plan.models.iter().map(|m| rate(m.throughput)).collect();
    let run = run_plan(
        dir.path(),
        &dir_profiles,
        &pipeline_file(dir.path(), &plan, cluster, &rate),
        20,
    );
    assert_agree(&plan, &profiles, (&rates, &run), "1.3x load", 0.05);
}

#[test]
fn a_model_with_two_planned_pipelines_gets_frames_on_both_in_proportion() {
    let _one_at_a_time = serial();
    let Some(dir_profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = "L4:2,T4:8";
    let plan = plan(
        dir.path(),
        &dir_profiles,
        cluster,
        "convnext_large,efficientnet,tf_efficientdet_d1",
    );
    let (mi, two) = plan
        .models
        .iter()
        .enumerate()
        .find(|(_, m)| m.pipelines.len() >= 2)
        .expect("this plan gives one model two pipelines");
    let rate = |x: f64| (0.9 * x).floor() as u32;
    let run = run_plan(
        dir.path(),
        &dir_profiles,
        &pipeline_file(dir.path(), &plan, cluster, &rate),
        30,
    );
    let stage_in: HashMap<String, u64> = run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["frames_in"].as_u64().unwrap(),
            )
        })
        .collect();
    let got: Vec<f64> = (0..two.pipelines.len())
        .map(|k| stage_in[&format!("f{mi}.p{k}.s0")] as f64)
        .collect();
    let total_got: f64 = got.iter().sum();
    let total_planned: f64 = two.pipelines.iter().map(|p| p.throughput).sum();
    for (k, p) in two.pipelines.iter().enumerate() {
        let want = p.throughput / total_planned;
        let share = got[k] / total_got;
        assert!(
            (share - want).abs() <= 0.05 * want,
            "pipeline {k} of {}: {share:.3} of the frames, planned {want:.3}",
            two.name
        );
    }
}

/// Runs one emulated stage (WideResNet-101-2 on a T4 at batch 1, about 16.5 frames/s) fed by
/// four streams at 12 frames/s each (3x overload), with these priorities; returns the frames
/// each stream published.
fn overloaded(priorities: [u32; 4]) -> Vec<u64> {
    let s = overloaded_at(priorities, 12, 15);
    let streams = common::assert_balanced(&s);
    (0..4)
        .map(|i| streams[&format!("cam{i}")]["published"].as_u64().unwrap())
        .collect()
}

/// The same pool fed by four streams at `fps` each for `seconds`; returns the summary.
fn overloaded_at(priorities: [u32; 4], fps: u32, seconds: u32) -> Value {
    let profiles = common::shared_profiles().expect("checked by the caller");
    let dir = tempfile::tempdir().unwrap();
    let mut p = format!(
        "[pipeline]\nname = \"fair\"\nslo_ms = 1000\nprofiles = \"{}\"\n\n\
         [[stage]]\nname = \"net\"\ndevice = \"emulated:T4\"\nprofile = \"wide_resnet101_2\"\n\
         max_batch = 1\nqueue = 2\n\n[[sink]]\ntype = \"jsonl\"\npath = \"/dev/null\"\n",
        profiles.display()
    );
    for (i, pr) in priorities.iter().enumerate() {
        p += &format!(
            "\n[[source]]\nname = \"cam{i}\"\nuri = \"test://ball\"\nmax_fps = {fps}\npriority = {pr}\n"
        );
    }
    let file = common::write(dir.path(), "p.toml", &p);
    let summary = dir.path().join("s.json");
    let o = common::poolpipe(&[
        "run",
        file.to_str().unwrap(),
        "--api",
        "off",
        "--duration",
        &seconds.to_string(),
        "--summary-json",
        summary.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = common::read_summary(&summary);
    common::assert_balanced(&s);
    s
}

fn total(s: &Value, key: &str) -> u64 {
    s["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x[key].as_u64().unwrap())
        .sum()
}

#[test]
fn under_tenfold_overload_frames_are_dropped_before_conversion_and_the_rate_holds() {
    let _one_at_a_time = serial();
    if common::shared_profiles().is_none() {
        return;
    }
    // 4 x 4 frames/s is about the pool's capacity; 4 x 41 is ten times it.
    let one = overloaded_at([1; 4], 4, 10);
    let ten = overloaded_at([1; 4], 41, 10);
    let fps = |s: &Value| total(s, "published") as f64 / s["elapsed_s"].as_f64().unwrap();
    assert!(
        fps(&ten) >= 0.9 * fps(&one),
        "published {:.1} frames/s at 10x, {:.1} at 1x",
        fps(&ten),
        fps(&one)
    );
    let dropped = total(&ten, "dropped_overload") + total(&ten, "dropped_late");
    let early = total(&ten, "dropped_early");
    assert!(
        early * 2 > dropped,
        "at 10x only {early} of {dropped} dropped frames were dropped before conversion"
    );
    assert!(early <= total(&ten, "dropped_overload"));
}

#[test]
fn equal_streams_get_equal_shares_under_overload_and_priority_buys_more() {
    let _one_at_a_time = serial();
    if common::shared_profiles().is_none() {
        return;
    }
    let x: Vec<f64> = overloaded([1, 1, 1, 1])
        .into_iter()
        .map(|n| n as f64)
        .collect();
    let jain = poolpipe::stats::jain_index(&x).expect("frames were published");
    assert!(jain >= 0.95, "Jain's index {jain:.3} over {x:?}");

    let y = overloaded([2, 1, 1, 1]);
    let others = (y[1] + y[2] + y[3]) as f64 / 3.0;
    let ratio = y[0] as f64 / others;
    assert!(
        (ratio - 2.0).abs() <= 0.2,
        "priority 2 published {} frames, the others {:?}: {ratio:.2}x",
        y[0],
        &y[1..]
    );
}

/// Issue 18's runtime step: three planned models at 0.6 of the plan's rate; at 12 s a second
/// camera doubles repvgg-b3's demand, which its planned pipeline (one L4) cannot carry. With
/// `--control` the running pipeline re-plans within 10 s of the step (the plan moves devices
/// from the models with room to spare), the re-planned pipelines serve >= 99% of repvgg's frames
/// within their SLO from 20 s after the step on, and every frame has exactly one outcome through
/// the switch.
#[test]
fn a_demand_step_is_re_planned_while_running_and_attainment_recovers() {
    let _one_at_a_time = serial();
    let Some(dir_profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = "L4:2,T4:6";
    let plan = plan(
        dir.path(),
        &dir_profiles,
        cluster,
        "wide_resnet101_2,googlenet,repvgg",
    );
    let step = plan
        .models
        .iter()
        .position(|m| m.name == "repvgg-b3")
        .unwrap();
    let fps = (0.6 * plan.models[step].throughput).floor() as u32;
    let rate = |_: f64| fps;
    let p = common::write(
        dir.path(),
        "p.toml",
        &pipeline_file(dir.path(), &plan, cluster, &rate),
    );
    let summary = dir.path().join("summary.json");
    let plan_path = dir.path().join("plan.json");
    let (child, api) = common::start(
        &p,
        &summary,
        &[
            "--plan",
            plan_path.to_str().unwrap(),
            "--profiles",
            dir_profiles.to_str().unwrap(),
            "--api",
            "127.0.0.1:0",
            "--control",
        ],
        &[],
    );
    let t0 = std::time::Instant::now();
    let secs = || t0.elapsed().as_secs_f64();
    // (seconds since start, frames of the stepped flow resolved, published)
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let flow = format!("f{step}");
    let mut stepped_at = None;
    let mut last = Value::Null;
    while secs() < 50.0 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let s = common::status(&api);
        let f = s["flows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == flow.as_str())
            .unwrap()["counters"]
            .clone();
        let n = |k: &str| f[k].as_u64().unwrap_or(0);
        samples.push((
            secs(),
            n("published") + n("dropped_late") + n("dropped_overload") + n("failed"),
            n("published"),
        ));
        if stepped_at.is_none() && secs() >= 12.0 {
            let def = format!(
                r#"{{"name": "cam{step}b", "uri": "test://pinwheel", "max_fps": {fps}, "flow": "{flow}"}}"#
            );
            let (code, body) = common::add_stream(&api, &def);
            assert_eq!(code, 201, "{body}");
            // Seconds since the pipeline's start (its API answered before it started).
            stepped_at = Some((secs(), s["uptime_s"].as_f64().unwrap()));
        }
        last = s;
    }
    // A reload of the unchanged file is accepted and keeps the re-planned layout.
    let (code, body) = common::http("POST", &format!("{api}/reload"), None, None);
    assert_eq!(code, 200, "{body}");
    let after_reload = common::status(&api);
    assert!(
        after_reload["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|st| st["active"] == true && st["name"].as_str().unwrap().contains(".e")),
        "the reload put back the file's layout: {after_reload}"
    );
    let (code, metrics) = common::http("GET", &format!("{api}/metrics"), None, None);
    assert_eq!(code, 200);
    let applied = metrics
        .lines()
        .find_map(|l| l.strip_prefix("poolpipe_replans_total{outcome=\"applied\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(applied.is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(common::stop(child).success());
    let s = common::read_summary(&summary);
    common::assert_balanced(&s);

    let (stepped_s, stepped_uptime) = stepped_at.unwrap();
    let replans = last["replans"].as_array().unwrap();
    assert!(!replans.is_empty(), "no re-plan: {last}");
    let first = &replans[0];
    let after = first["at_s"].as_f64().unwrap() - stepped_uptime;
    assert!(
        (0.0..=10.0).contains(&after),
        "the first re-plan came {after:.1} s after the step: {first}"
    );
    assert!(first["error"].is_null(), "{first}");
    // The step overloaded the running plan, and the new plan has room for it.
    assert!(first["serves_before"].as_f64().unwrap() < 1.0, "{first}");
    assert!(first["serves_after"].as_f64().unwrap() >= 1.0, "{first}");
    assert!(first["processes_started"].as_u64().unwrap() > 0, "{first}");
    // The re-planned stages run, the retired ones are listed as such.
    let stages = last["stages"].as_array().unwrap();
    assert!(
        stages
            .iter()
            .any(|st| st["active"] == true && st["name"].as_str().unwrap().contains(".e1.")),
        "{stages:?}"
    );
    assert!(stages.iter().any(|st| st["active"] == false));

    // Attainment of the stepped flow from 20 s after the step to the end.
    let from = samples
        .iter()
        .find(|x| x.0 >= stepped_s + 20.0)
        .copied()
        .unwrap();
    let to = *samples.last().unwrap();
    let resolved = to.1 - from.1;
    let published = to.2 - from.2;
    assert!(resolved > 500, "{resolved} frames resolved after recovery");
    let attainment = published as f64 / resolved as f64;
    assert!(
        attainment >= 0.99,
        "flow {flow}: {attainment:.4} of {resolved} frames on time from 20 s after the step"
    );
}
