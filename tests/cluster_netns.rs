//! The cut pipeline of `cluster.rs` across three network namespaces on a bridge, with the links
//! into the two worker nodes shaped by a token bucket: the time a cut takes on the link is its
//! size over the link's rate, and a link too slow for the load makes the front drop (and
//! count) frames while its memory stays flat. Needs root and iproute2; skips with a message
//! where namespaces cannot be made.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{KillOnDrop, bin, read_summary, write};
use poolpipe::clock::unix_ms;
use poolpipe::cluster::netns::{Lab, cut_pipeline};
use serde_json::Value;

const PORT: u16 = 7070;

fn file(dir: &Path, profiles: &Path, lab: &Lab, gbps: f64, fps: u32) -> std::path::PathBuf {
    let nodes = [1, 2].map(|i| (format!("n{}", i + 1), format!("{}:{PORT}", lab.addr(i))));
    write(
        dir,
        "cluster.toml",
        &cut_pipeline(profiles, &nodes, gbps, fps, &dir.join("out.jsonl")),
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the front in n1 against nodes n2 and n3 for `seconds`; returns its summary and its
/// resident memory (KiB) sampled every second after the first two. `at_second(t)` runs after
/// second `t`.
fn run(
    lab: &Lab,
    dir: &Path,
    pipeline: &Path,
    seconds: u32,
    at_second: &mut dyn FnMut(u32),
) -> (Value, Vec<u64>) {
    let nodes: Vec<KillOnDrop> = (1..3)
        .map(|i| {
            KillOnDrop(
                lab.command(i, &bin())
                    .args(["node", pipeline.to_str().unwrap(), "--name"])
                    .arg(format!("n{}", i + 1))
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let summary = dir.join("front.json");
    let mut front = KillOnDrop(
        lab.command(0, &bin())
            .args([
                "run",
                pipeline.to_str().unwrap(),
                "--api",
                "off",
                "--duration",
            ])
            .arg(seconds.to_string())
            .arg("--summary-json")
            .arg(&summary)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = front.0.id();
    let mut rss = Vec::new();
    for t in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        if t >= 2 {
            rss.push(rss_kib(pid));
        }
        at_second(t + 1);
    }
    let status = front.0.wait().unwrap();
    assert!(status.success(), "front exited with {status}");
    drop(nodes);
    (read_summary(&summary), rss)
}

/// Three namespaces on a bridge; `None` (with a message) where they cannot be made.
fn lab() -> Option<Lab> {
    Lab::new(3).inspect_err(|e| eprintln!("SKIPPED: {e}")).ok()
}

/// A lab whose links into n2 and n3 run at 1 Gbit/s, and the cut pipeline at 5 fps per source
/// told so; `None` (with a message) where profiles or namespaces are missing.
fn lab_at_1_gbit() -> Option<(
    Lab,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
)> {
    let profiles = common::shared_profiles()?;
    let lab = lab()?;
    let dir = tempfile::tempdir().unwrap();
    for i in 1..3 {
        lab.shape(i, Some(1000)).unwrap();
    }
    let pipeline = file(dir.path(), &profiles, &lab, 1.0, 5);
    Some((lab, dir, profiles, pipeline))
}

#[test]
fn cut_transfers_take_their_size_over_the_link_rate_and_a_slow_link_drops_at_the_front() {
    let Some((lab, dir, profiles, pipeline)) = lab_at_1_gbit() else {
        return;
    };
    let (s, _) = run(&lab, dir.path(), &pipeline, 10, &mut |_| {});
    common::assert_balanced(&s);
    for n in ["n2", "n3"] {
        let n = common::node_of(&s, n);
        let gbps = n["link_gbps"].as_f64().unwrap();
        // Payload over time on the link: the bucket's rate less TCP/IP and HTTP/2 framing
        // (about 4%), within 10%.
        assert!(
            (0.9..=1.1).contains(&(gbps / 1.0)),
            "{} measured {gbps:.3} Gbit/s on a 1 Gbit/s link: {n}",
            n["name"]
        );
        assert!(n["batches"].as_u64().unwrap() >= 10, "{n}");
    }
    let (ingested, published) = (
        s["flows"][0]["ingested"].as_u64().unwrap(),
        s["flows"][0]["published"].as_u64().unwrap(),
    );
    assert!(
        published as f64 >= 0.9 * ingested as f64,
        "published {published} of {ingested} at 1 Gbit/s: {s}"
    );

    // 100 Mbit/s: a 2.2 MB cut takes ~180 ms, so each link carries at most ~5.6 frames/s, one
    // at a time (two would miss 250 ms). Two sources at 10 fps are more than the two links
    // carry: the rest is dropped (counted) at the front, and memory stays where it was.
    for i in 1..3 {
        lab.shape(i, Some(100)).unwrap();
    }
    let pipeline = file(dir.path(), &profiles, &lab, 0.1, 10);
    let (s, rss) = run(&lab, dir.path(), &pipeline, 12, &mut |_| {});
    common::assert_balanced(&s);
    let f = &s["flows"][0];
    let dropped = f["dropped_late"].as_u64().unwrap() + f["dropped_overload"].as_u64().unwrap();
    assert!(
        dropped as f64 > 0.3 * f["ingested"].as_u64().unwrap() as f64,
        "a 100 Mbit/s link drops most frames: {f}"
    );
    assert_eq!(f["failed"], 0, "{f}");
    let gbps = common::node_of(&s, "n2")["link_gbps"].as_f64().unwrap();
    assert!((0.09..=0.11).contains(&gbps), "{gbps} Gbit/s on 100 Mbit/s");
    let (first, last) = (rss[0], *rss.last().unwrap());
    assert!(
        last <= first + 20 * 1024,
        "front memory grew from {first} KiB to {last} KiB: {rss:?}"
    );
}

#[test]
fn a_node_whose_link_goes_down_is_taken_out_within_two_seconds_and_back_when_it_returns() {
    let Some((lab, dir, _, pipeline)) = lab_at_1_gbit() else {
        return;
    };
    // n3's cable is pulled at 4 s (no reset, no goodbye: only missed pings tell) and put back
    // at 8 s.
    let (mut cut, mut back) = (0u64, 0u64);
    let (s, _) = run(&lab, dir.path(), &pipeline, 14, &mut |t| match t {
        4 => {
            lab.set_link(2, false).unwrap();
            cut = unix_ms();
        }
        8 => {
            lab.set_link(2, true).unwrap();
            back = unix_ms();
        }
        _ => {}
    });
    common::assert_balanced(&s);
    let n3 = common::node_of(&s, "n3");
    assert_eq!(n3["downs"], 1, "{n3}");
    let down_at = n3["down_at_unix_ms"].as_u64().unwrap();
    assert!(
        down_at >= cut && down_at - cut <= 2000,
        "n3 seen down {} ms after its link went down: {n3}",
        down_at as i64 - cut as i64
    );
    assert_eq!(n3["up"], true, "n3 back after its link returned: {n3}");
    assert!(n3["up_at_unix_ms"].as_u64().unwrap() >= back, "{n3}");
    // Only what n3 held when its link went is lost (one batch, and one reserved on it before
    // the front saw it go), and it took batches again afterwards.
    let lost = s["flows"][0]["lost"].as_u64().unwrap();
    assert_eq!(lost, n3["lost"].as_u64().unwrap(), "{s}");
    assert!(lost <= 8, "{lost} lost: {s}");
    assert!(
        n3["batches"].as_u64().unwrap()
            > common::node_of(&s, "n2")["batches"].as_u64().unwrap() / 3,
        "{s}"
    );
    let f = &s["flows"][0];
    assert!(
        f["published"].as_u64().unwrap() as f64 >= 0.8 * f["ingested"].as_u64().unwrap() as f64,
        "{f}"
    );
}

/// A controller across namespaces: the front, nats-server and server `l4-0` in n1, `t4-0` in
/// n2, `t4-1` in n3 (links into n2 and n3 at 1 Gbit/s). t4-1's cable is pulled at 6 s (no
/// reset: its heartbeats just stop) and put back at 12 s: the controller re-plans on the
/// servers that remain, and when t4-1's heartbeats return (its NATS client reconnects) it takes
/// it back, t4-1 applying the new epoch it missed.
/// The planned pipeline deployed on the lab's three namespaces (server `l4-0` in n1, `t4-0` in
/// n2, `t4-1` in n3) with nats-server in n1 (at its second address), a controller in n1 and the three nodes started:
/// the pipeline file, and the processes (dropped: killed).
fn controlled(dir: &Path, profiles: &Path, lab: &Lab) -> (std::path::PathBuf, Vec<KillOnDrop>) {
    let files = common::planned(dir, profiles);
    let names = ["l4-0", "t4-0", "t4-1"];
    // NATS is reached at n1's second address, so that a test can cut a front off from it alone.
    lab.add_alias(0).unwrap();
    let url = format!("nats://{}:4222", lab.alias(0));
    let mut args: Vec<String> = vec!["--emit".into(), "nodes".into(), "--nats".into(), url];
    for (i, n) in names.iter().enumerate() {
        args.push("--address".into());
        args.push(format!("{n}={}:{PORT}", lab.addr(i)));
    }
    let out = dir.join("bare");
    let o = common::deploy(
        &files,
        &out,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = out.join("pipeline.toml");
    let mut procs = vec![KillOnDrop(
        lab.command(0, Path::new("nats-server"))
            .args(["-a", "0.0.0.0", "-p", "4222", "-js", "-sd"])
            .arg(dir.join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (./setup.sh installs it)"),
    )];
    procs.push(KillOnDrop(
        lab.command(0, &bin())
            .args(["controller", file.to_str().unwrap(), "--summary-json"])
            .arg(dir.join("controller.json"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    ));
    for (i, n) in names.iter().enumerate() {
        procs.push(KillOnDrop(
            lab.command(i, &bin())
                .args([
                    "node",
                    file.to_str().unwrap(),
                    "--name",
                    n,
                    "--summary-json",
                ])
                .arg(dir.join(format!("{n}.json")))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        ));
    }
    (file, procs)
}

#[test]
fn a_controller_replans_when_a_cable_is_pulled_and_takes_the_node_back() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let Some(lab) = lab() else {
        return;
    };
    for i in 1..3 {
        lab.shape(i, Some(1000)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, procs) = controlled(dir.path(), &profiles, &lab);
    let summary = dir.path().join("front.json");
    let mut front = KillOnDrop(
        lab.command(0, &bin())
            .args([
                "run",
                file.to_str().unwrap(),
                "--api",
                "off",
                "--duration",
                "22",
            ])
            .arg("--summary-json")
            .arg(&summary)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(6));
    lab.set_link(2, false).unwrap();
    let cut = unix_ms();
    std::thread::sleep(Duration::from_secs(6));
    lab.set_link(2, true).unwrap();
    let status = front.0.wait().unwrap();
    assert!(status.success(), "front exited with {status}");
    let s = read_summary(&summary);
    common::assert_balanced(&s);
    let f = &s["flows"][0];
    assert_eq!(f["failed"], 0, "{f}");
    let epochs = s["epochs"].as_array().expect("epochs in the summary");
    let numbers: Vec<u64> = epochs
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [0, 1, 2], "{s}");
    assert_eq!(epochs[1]["reason"], "lost t4-1", "{s}");
    assert_eq!(epochs[2]["reason"], "joined t4-1", "{s}");
    for e in epochs {
        assert_eq!(e["nodes_not_ready"], serde_json::json!([]), "{e}");
    }
    let published = epochs[1]["published_unix_ms"].as_u64().unwrap();
    assert!(
        published >= cut && published - cut <= 2000,
        "epoch 1 published {} ms after the cable was pulled",
        published as i64 - cut as i64
    );
    drop(procs);
    // Each epoch's routes ran frames, t4-1's too once it was back.
    for prefix in ["f0.p0.", "f0.e1.", "f0.e2."] {
        assert!(
            common::frames_out_of(&s, prefix) > 0,
            "no frames on {prefix}*: {s}"
        );
    }
    let t41 = common::node_of(&s, "t4-1");
    assert!(t41["frames"].as_u64().unwrap() > 0, "{t41}");
    assert!(
        f["published"].as_u64().unwrap() as f64 >= 0.8 * f["ingested"].as_u64().unwrap() as f64,
        "{f}"
    );
}

/// Two fronts and their summary files.
type Fronts = (
    KillOnDrop,
    KillOnDrop,
    std::path::PathBuf,
    std::path::PathBuf,
);

/// The [`controlled`] lab with front A in n3 (for 60 s), then, 5 s later, a standby front B in
/// n1 (for `b_seconds` once it runs the cameras), both still running 3 s later. `None` (with a
/// message) where profiles or namespaces are missing.
fn two_fronts(b_seconds: u32) -> Option<(Lab, tempfile::TempDir, Vec<KillOnDrop>, Fronts)> {
    let profiles = common::shared_profiles()?;
    let lab = lab()?;
    let dir = tempfile::tempdir().unwrap();
    let (file, procs) = controlled(dir.path(), &profiles, &lab);
    let fronts = start_fronts(&lab, dir.path(), &file, b_seconds);
    Some((lab, dir, procs, fronts))
}

fn start_fronts(lab: &Lab, dir: &Path, file: &Path, b_seconds: u32) -> Fronts {
    let front = |ns: usize, summary: &Path, seconds: u32| {
        KillOnDrop(
            lab.command(ns, &bin())
                .args(["run", file.to_str().unwrap(), "--api", "off", "--duration"])
                .arg(seconds.to_string())
                .arg("--summary-json")
                .arg(summary)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    };
    let (a_summary, b_summary) = (dir.join("a.json"), dir.join("b.json"));
    let mut a = front(2, &a_summary, 60);
    std::thread::sleep(Duration::from_secs(5));
    let mut b = front(0, &b_summary, b_seconds);
    std::thread::sleep(Duration::from_secs(3));
    assert!(a.0.try_wait().unwrap().is_none(), "front A exited");
    assert!(b.0.try_wait().unwrap().is_none(), "the standby exited");
    (a, b, a_summary, b_summary)
}

/// The cameras move when the front's cable is pulled: front A runs in n3 (beside node t4-1), a
/// standby front B waits in n1. With n3 cut off, the controller re-plans without t4-1, A's
/// front lease expires and B takes it, reconnects to the camera and runs it; when the cable is
/// back, A finds its lease taken and stops with an error, and t4-1 rejoins B's layout.
#[test]
fn a_standby_front_takes_the_cameras_over_when_the_fronts_cable_is_pulled() {
    let Some((lab, _dir, procs, (mut a, mut b, a_summary, b_summary))) = two_fronts(12) else {
        return;
    };
    lab.set_link(2, false).unwrap();
    let cut = unix_ms();
    std::thread::sleep(Duration::from_secs(7));
    lab.set_link(2, true).unwrap();
    common::assert_deposed(&mut a, &a_summary);

    let status = b.0.wait().unwrap();
    assert!(status.success(), "front B exited with {status}");
    drop(procs);
    let s = read_summary(&b_summary);
    common::assert_balanced(&s);
    let lease = &s["front_lease"];
    assert_eq!(lease["lost"], false, "{s}");
    let taken = lease["taken_unix_ms"].as_u64().unwrap();
    assert!(
        taken >= cut && taken - cut <= 5000,
        "B took the lease {} ms after the cable was pulled",
        taken as i64 - cut as i64
    );
    let f = &s["flows"][0];
    assert_eq!(f["failed"], 0, "{f}");
    assert!(f["ingested"].as_u64().unwrap() >= 60, "{f}");
    assert!(
        f["published"].as_u64().unwrap() as f64 >= 0.8 * f["ingested"].as_u64().unwrap() as f64,
        "{f}"
    );
    // B started in the epoch without t4-1 and took it back when its cable returned.
    let reasons: Vec<&str> = s["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["lost t4-1", "joined t4-1"], "{s}");
    assert_eq!(s["epochs"][0]["started_in"], true, "{s}");
}

#[test]
fn a_front_cut_off_from_nats_alone_is_fenced_off_by_the_nodes() {
    let Some((lab, _dir, procs, (mut a, mut b, a_summary, b_summary))) = two_fronts(10) else {
        return;
    };
    // A loses NATS and nothing else: it still reaches its cameras and every node. Its lease
    // runs out, B takes the cameras over, and the nodes, which see NATS, refuse A's batches:
    // A stops while it is still cut off (its own lease keeper cannot tell it).
    lab.reach(2, &lab.alias(0), false).unwrap();
    let cut = Instant::now();
    let status = loop {
        if let Some(s) = a.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(15),
            "front A ran on, cut off from NATS, while B ran the cameras"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stopped_after = cut.elapsed();
    lab.reach(2, &lab.alias(0), true).unwrap();
    assert!(!status.success(), "a fenced front exited with {status}");
    let s = read_summary(&a_summary);
    assert_eq!(s["front_lease"]["lost"], true, "{s}");
    common::assert_balanced(&s);
    assert!(
        s["flows"][0]["failed"].as_u64().unwrap() > 0,
        "the refused batch fails: {s}"
    );
    eprintln!("front A stopped {stopped_after:?} after it lost NATS");

    let status = b.0.wait().unwrap();
    assert!(status.success(), "front B exited with {status}");
    drop(procs);
    let s = read_summary(&b_summary);
    common::assert_balanced(&s);
    assert_eq!(s["front_lease"]["lost"], false, "{s}");
    let f = &s["flows"][0];
    assert_eq!(f["failed"], 0, "{f}");
    assert!(
        f["published"].as_u64().unwrap() as f64 >= 0.8 * f["ingested"].as_u64().unwrap() as f64,
        "{f}"
    );
}
