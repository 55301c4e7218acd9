//! `max_batch = "auto"` / `max_wait_ms = "auto"`: a `fixed` stage's batch size and wait chosen
//! while running from the measured demand (the analytic model of `batcher::analytic`).

mod common;

use std::time::{Duration, Instant};

use common::{assert_balanced, read_summary, shared_profiles, start, status, stop, write};
use poolpipe::config::load_pipeline_str;

fn pipeline(profiles: &std::path::Path, stage_extra: &str, fps: u32) -> String {
    format!(
        "[pipeline]\nname = \"auto\"\nslo_ms = 400\nprofiles = \"{}\"\n\n\
         [[source]]\nname = \"a\"\nuri = \"test://ball\"\nmax_fps = {fps}\n\n\
         [[source]]\nname = \"b\"\nuri = \"test://smpte\"\nmax_fps = {fps}\n\n\
         [[stage]]\nname = \"cls\"\ndevice = \"emulated:T4\"\nprofile = \"wide_resnet101_2\"\n{stage_extra}\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"/dev/null\"\n",
        profiles.display()
    )
}

/// The stage's `/status` entry.
fn auto(api: &str) -> serde_json::Value {
    status(api)["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "cls")
        .expect("stage cls")["auto_batching"]
        .clone()
}

#[test]
fn auto_limits_follow_the_measured_rate_and_are_shown_with_their_reason() {
    let Some(profiles) = shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Two cameras at 15 frames/s into two emulated T4s running WideResNet-101-2 whole (about
    // 62 ms a frame at batch 1, 55 ms a frame at batch 8): batch 1 would keep the workers 94%
    // busy and its queue past the SLO; the chooser must batch.
    let p = write(
        dir.path(),
        "p.toml",
        &pipeline(
            &profiles,
            "policy = \"fixed\"\nmax_batch = \"auto\"\nmax_wait_ms = \"auto\"\nworkers = 2",
            15,
        ),
    );
    let summary = dir.path().join("summary.json");
    let (child, api) = start(&p, &summary, &["--api", "127.0.0.1:0", "--serve"], &[]);
    let until = Instant::now() + Duration::from_secs(30);
    let mut seen = serde_json::Value::Null;
    while Instant::now() < until {
        seen = auto(&api);
        let rate = seen["last"]["rate"].as_f64().unwrap_or(0.0);
        // Wait until the 10 s window holds mostly steady arrivals.
        if seen["changes"].as_u64().unwrap_or(0) >= 1 && (24.0..=36.0).contains(&rate) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("auto batching: {seen:#}");
    let rate = seen["last"]["rate"].as_f64().unwrap_or(0.0);
    assert!((24.0..=36.0).contains(&rate), "{seen:#}");
    assert_eq!(seen["auto"]["max_batch"], true);
    let batch = seen["max_batch"].as_u64().unwrap();
    assert!(
        (2..=8).contains(&batch),
        "30 frames/s on two T4 workers needs batches: {seen:#}"
    );
    assert_eq!(seen["last"]["choice"]["feasible"], true, "{seen:#}");
    assert_eq!(seen["last"]["choice"]["max_batch"].as_u64(), Some(batch));
    assert!(
        seen["last"]["why"].as_str().unwrap().contains("frames/s"),
        "{seen:#}"
    );
    // The stage runs what was chosen: from here on its batches average more than one frame
    // and never more than the chosen size (before the first choice it took up to 8).
    let counters = |api: &str| {
        let st = status(api);
        let c = st["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "cls")
            .unwrap()["counters"]
            .clone();
        (
            c["frames_out"].as_f64().unwrap(),
            c["batches"].as_f64().unwrap(),
        )
    };
    let (f0, b0) = counters(&api);
    let before = auto(&api)["max_batch"].as_f64().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let (f1, b1) = counters(&api);
    // The choice may move with the measured rate; the limit in force was one of these.
    let limit = auto(&api)["max_batch"].as_f64().unwrap().max(before);
    let mean = (f1 - f0) / (b1 - b0).max(1.0);
    eprintln!("mean batch since the choice: {mean:.2} (limit {limit})");
    assert!(b1 > b0 + 10.0, "batches ran: {b0} -> {b1}");
    assert!(
        mean > 1.05 && mean <= limit + 1e-9,
        "mean batch {mean}, limit {limit}"
    );
    assert!(stop(child).success());
    let s = read_summary(&summary);
    assert_balanced(&s);
}

#[test]
fn auto_needs_a_fixed_stage_with_a_profile_and_a_known_word() {
    let Some(profiles) = shared_profiles() else {
        return;
    };
    let errs = |extra: &str| {
        let path = std::path::Path::new("/tmp/p.toml");
        match load_pipeline_str(path, &pipeline(&profiles, extra, 10)) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        }
    };
    // The deadline policy (the default with a profile) takes no "auto".
    let e = errs("max_batch = \"auto\"");
    assert!(
        e.iter()
            .any(|d| d.contains("stage[0].max_batch") && d.contains("policy = \"fixed\"")),
        "{e:?}"
    );
    let e = errs("policy = \"fixed\"\nmax_wait_ms = \"automatic\"");
    assert!(
        e.iter()
            .any(|d| d.contains("max_wait_ms") && d.contains("\"auto\"")),
        "{e:?}"
    );
    assert!(errs("policy = \"fixed\"\nmax_batch = \"auto\"\nmax_wait_ms = 5").is_empty());
    // Without a profile there is no latency to choose from.
    let text = "[pipeline]\nname = \"x\"\nslo_ms = 500\n\n[[source]]\nname = \"a\"\nuri = \"test://ball\"\n\n\
                [[stage]]\nname = \"s\"\nmodel = \"noop\"\nmax_batch = \"auto\"\n\n[[sink]]\ntype = \"jsonl\"\n";
    let text = format!(
        "{}{}",
        common::header("x", 500),
        &text[text.find("[[source]]").unwrap()..]
    );
    let e = match load_pipeline_str(std::path::Path::new("/tmp/p.toml"), &text) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
    };
    assert!(
        e.iter()
            .any(|d| d.contains("stage[0].max_batch") && d.contains("profile")),
        "{e:?}"
    );
}
