//! `poolpipe bench nodes`: a cut pipeline across three nodes in network namespaces (see
//! [`crate::cluster::netns`]), its two worker nodes behind links shaped to each rate asked for,
//! against the same pipeline in one process (its cut transfers emulated at the same rate):
//! goodput at 99% attainment (searched over the sources' frame rate), the measured link time
//! per frame against size x 8 / rate, and, at the cluster's 99% rate, how long it takes to see
//! a killed node, to settle on the survivor, and to take the node back once it restarts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::clock::unix_ms;
use crate::cluster::netns::{Lab, cut_pipeline, node_to_node_pipeline};

const PORT: u16 = 7070;

/// The figures at one link rate.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Link rate into each worker node, Gbit/s.
    pub gbps: f64,
    /// Per-source frame rate at which 99% of frames are published, three nodes.
    pub fps_99_nodes: u32,
    /// The same, one process.
    pub fps_99_one: u32,
    /// Published frames/s at that rate, three nodes.
    pub goodput_99_nodes: f64,
    /// The same, one process.
    pub goodput_99_one: f64,
    /// Bytes per frame on the link (the cut and its header).
    pub bytes_per_frame: f64,
    /// Size x 8 / rate, ms per frame.
    pub ideal_ms_per_frame: f64,
    /// Measured link time per frame (round trip less the node's own time), ms.
    pub link_ms_per_frame: f64,
    /// Seconds from SIGKILL of n3 to the front taking its worker out.
    pub detect_s: Option<f64>,
    /// Published frames/s in the second after the kill, over the rate with n2 alone (3 to 6 s
    /// after it).
    pub first_second: Option<f64>,
    /// Frames lost with n3.
    pub lost: u64,
    /// Seconds from n3's restart to its worker taking batches again.
    pub rejoin_s: Option<f64>,
    /// Published frames/s before the kill, with n2 alone, and after n3 is back.
    pub rates: [f64; 3],
}

/// With a controller: a planned pipeline (WideResNet-101-2 on L4:1,T4:2, one server each),
/// the last server the plan uses killed and restarted.
#[derive(Debug, Serialize)]
pub struct ControlRow {
    /// Link rate into n2 and n3, Gbit/s.
    pub gbps: f64,
    /// The servers the plan uses, and the one killed.
    pub used: Vec<String>,
    pub killed: String,
    /// Seconds from the SIGKILL to the controller publishing the epoch without the node.
    pub replan_published_s: Option<f64>,
    /// Seconds the re-plan's solve and placement took.
    pub plan_s: Option<f64>,
    /// Seconds from the SIGKILL to the front running that epoch.
    pub replan_running_s: Option<f64>,
    /// Seconds from the restart to the front running the epoch that takes the node back.
    pub rejoin_running_s: Option<f64>,
    /// Frames lost with the node.
    pub lost: u64,
    /// Frames ingested and published over the run.
    pub ingested: u64,
    pub published: u64,
    /// Why the controller could not re-plan, where it could not.
    pub replan_error: Option<String>,
    /// Then the front (in n1) is killed with a standby front in n2: seconds from the SIGKILL
    /// to the standby taking the front lease, and to the first frame it captured (and
    /// published) from the camera.
    pub front_takeover_s: Option<f64>,
    pub camera_back_s: Option<f64>,
    /// Frames the killed front held (ingested, not settled) by its last heartbeat, as the
    /// controller reports them.
    pub front_in_flight: Option<u64>,
    /// Frames the standby ingested and published in its 6 s.
    pub standby_ingested: u64,
    pub standby_published: u64,
}

struct Bench {
    lab: Lab,
    exe: PathBuf,
    dir: PathBuf,
    profiles: PathBuf,
    seconds: u32,
    /// Runs [`node_to_node_pipeline`] (with `direct_links` as said) instead of the cut pipeline.
    node_to_node: std::cell::Cell<Option<bool>>,
}

/// A finished run: the front's summary and its results file.
struct Ran {
    summary: Value,
    out: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    /// Shapes the links into `nodes` to `gbps`.
    fn shape(&self, nodes: std::ops::Range<usize>, gbps: f64) -> anyhow::Result<()> {
        for i in nodes {
            self.lab.shape(i, Some((gbps * 1000.0).round() as u64))?;
        }
        Ok(())
    }

    fn file(&self, nodes: bool, gbps: f64, fps: u32) -> anyhow::Result<(PathBuf, PathBuf)> {
        let out = self.dir.join("out.jsonl");
        let _ = std::fs::remove_file(&out);
        let nodes: Vec<(String, String)> = if nodes {
            (1..3)
                .map(|i| {
                    (
                        format!("n{}", i + 1),
                        format!("{}:{PORT}", self.lab.addr(i)),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let path = self.dir.join("cut.toml");
        let text = match (self.node_to_node.get(), nodes.as_slice()) {
            (Some(direct), [(_, n2), (_, n3)]) => {
                node_to_node_pipeline(&self.profiles, (n2, n3), gbps, fps, &out, direct)
            }
            _ => cut_pipeline(&self.profiles, &nodes, gbps, fps, &out),
        };
        std::fs::write(&path, text)?;
        Ok((path, out))
    }

    fn node(&self, file: &Path, i: usize) -> anyhow::Result<std::process::Child> {
        self.lab
            .command(i, &self.exe)
            .args([
                "node",
                &file.to_string_lossy(),
                "--name",
                &format!("n{}", i + 1),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start a node")
    }

    /// Runs the front for `seconds` (in n1 when `nodes`); `during` gets the node processes
    /// and the file while it runs.
    fn run(
        &self,
        nodes: bool,
        gbps: f64,
        fps: u32,
        seconds: u32,
        during: &mut dyn FnMut(&mut Vec<std::process::Child>, &Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Ran> {
        let (file, out) = self.file(nodes, gbps, fps)?;
        let mut children = Vec::new();
        if nodes {
            for i in 1..3 {
                children.push(self.node(&file, i)?);
            }
        }
        let summary = self.dir.join("front.json");
        let mut front = if nodes {
            self.lab.command(0, &self.exe)
        } else {
            Command::new(&self.exe)
        };
        let mut front = front
            .args(["run", &file.to_string_lossy(), "--api", "off", "--duration"])
            .arg(seconds.to_string())
            .arg("--summary-json")
            .arg(&summary)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the front")?;
        let result = during(&mut children, &file);
        let status = front.wait()?;
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        result?;
        anyhow::ensure!(status.success(), "the front exited with {status}");
        let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
        Ok(Ran { summary, out })
    }

    /// Attainment and goodput of a plain run.
    fn trial(&self, nodes: bool, gbps: f64, fps: u32) -> anyhow::Result<(f64, f64, Value)> {
        let r = self.run(nodes, gbps, fps, self.seconds, &mut |_, _| Ok(()))?;
        let f = &r.summary["flows"][0];
        let n = |k: &str| f[k].as_u64().unwrap_or(0) as f64;
        let done =
            n("published") + n("dropped_late") + n("dropped_overload") + n("failed") + n("lost");
        let attainment = if done > 0.0 {
            n("published") / done
        } else {
            0.0
        };
        let goodput = n("published") / r.summary["elapsed_s"].as_f64().unwrap_or(1.0);
        Ok((attainment, goodput, r.summary))
    }

    /// The highest per-source rate in 1..=`hi` with 99% attainment, its goodput and summary.
    fn search(&self, nodes: bool, gbps: f64, hi: u32) -> anyhow::Result<(u32, f64, Value)> {
        let (mut lo, mut hi) = (0u32, hi + 1);
        let mut best = (0u32, 0.0, Value::Null);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            let (att, goodput, summary) = self.trial(nodes, gbps, mid)?;
            eprintln!(
                "  {} at {gbps} Gbit/s, {mid} fps per source: attainment {att:.3}, {goodput:.1} published/s",
                if nodes { "3 nodes  " } else { "1 process" }
            );
            if att >= 0.99 {
                lo = mid;
                best = (mid, goodput, summary);
            } else {
                hi = mid;
            }
        }
        Ok(best)
    }

    /// Kills n3 at 6 s and restarts it at 12 s of a 20 s run at `fps`.
    fn recovery(&self, gbps: f64, fps: u32, row: &mut Row) -> anyhow::Result<()> {
        let (mut kill_ms, mut restart_ms) = (0u64, 0u64);
        let ran = self.run(true, gbps, fps, 20, &mut |children, file| {
            std::thread::sleep(Duration::from_secs(6));
            children[1].kill()?;
            kill_ms = unix_ms();
            children[1].wait()?;
            std::thread::sleep(Duration::from_secs(6));
            restart_ms = unix_ms();
            children[1] = self.node(file, 2)?;
            Ok(())
        })?;
        let n3 = ran.summary["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == "n3"))
            .context("n3 in the summary")?;
        let at = |k: &str| n3[k].as_u64();
        row.detect_s = at("down_at_unix_ms").map(|t| t.saturating_sub(kill_ms) as f64 / 1e3);
        row.lost = n3["lost"].as_u64().unwrap_or(0);
        // Published frames per 0.5 s by capture time.
        let times: Vec<u64> = std::fs::read_to_string(&ran.out)?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["captured_at_unix_ms"].as_u64())
            .collect();
        let start = times.iter().min().copied().unwrap_or(kill_ms);
        let bin = |t: u64| ((t.saturating_sub(start)) / 500) as usize;
        let mut bins = vec![0u32; bin(times.iter().max().copied().unwrap_or(start)) + 1];
        for t in &times {
            bins[bin(*t)] += 1;
        }
        let rate = |a: usize, b: usize| {
            let b = b.min(bins.len());
            if b <= a {
                return 0.0;
            }
            bins[a..b].iter().sum::<u32>() as f64 / ((b - a) as f64 * 0.5)
        };
        let (k, r) = (bin(kill_ms), bin(restart_ms));
        let before = rate(4, k);
        let alone = rate(k + 6, r);
        let back = rate(r + 6, bins.len().saturating_sub(2));
        row.rates = [before, alone, back];
        row.first_second = (alone > 0.0).then(|| rate(k + 1, k + 3) / alone);
        row.rejoin_s = at("up_at_unix_ms")
            .filter(|t| *t >= restart_ms)
            .map(|t| (t - restart_ms) as f64 / 1e3);
        Ok(())
    }
}

impl Bench {
    /// The controller scenario at `gbps`: nats-server, the controller, the front and server
    /// l4-0 in n1, t4-0 in n2, t4-1 in n3; t4-1 is killed at 6 s and restarted at 12 s of 20.
    fn controlled(&self, gbps: f64) -> anyhow::Result<ControlRow> {
        let dir = self.dir.join("controlled");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let exe = |args: &[&str]| -> anyhow::Result<()> {
            let o = Command::new(&self.exe).args(args).output()?;
            anyhow::ensure!(
                o.status.success(),
                "poolpipe {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
            Ok(())
        };
        let p = |x: &Path| x.to_string_lossy().into_owned();
        let (plan, servers, pipeline, bare) = (
            dir.join("plan.json"),
            dir.join("servers.toml"),
            dir.join("planned.toml"),
            dir.join("bare"),
        );
        let profiles = p(&self.profiles);
        exe(&[
            "plan",
            "--cluster",
            "L4:1,T4:2",
            "--models",
            "wide_resnet101_2",
            "--time-limit",
            "10",
            "--bandwidth-gbps",
            &gbps.to_string(),
            "--profiles",
            &profiles,
            "--out",
            &p(&plan),
        ])?;
        std::fs::write(
            &servers,
            format!(
                "[[servers]]\nname = \"l4\"\nclass = \"L4\"\ngpus = 1\nlink_gbps = {gbps}\n\n[[servers]]\nname = \"t4\"\nclass = \"T4\"\ncount = 2\ngpus = 1\nlink_gbps = {gbps}\n"
            ),
        )?;
        let out = dir.join("out.jsonl");
        std::fs::write(
            &pipeline,
            format!(
                "[pipeline]\nname = \"planned\"\nslo_ms = 1000\nprofiles = \"{profiles}\"\n\n[[flow]]\nname = \"f0\"\nmodel = \"wide_resnet101_2\"\n\n[[source]]\nname = \"cam0\"\nuri = \"test://ball\"\nmax_fps = 10\nflow = \"f0\"\n\n[[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
                out.display()
            ),
        )?;
        let names = ["l4-0", "t4-0", "t4-1"];
        let mut args: Vec<String> = [
            "deploy",
            "--plan",
            &p(&plan),
            "--pipeline",
            &p(&pipeline),
            "--servers",
            &p(&servers),
            "--emit",
            "nodes",
            "--nats",
        ]
        .map(String::from)
        .into();
        args.push(format!("nats://{}:4222", self.lab.addr(0)));
        for (i, n) in names.iter().enumerate() {
            args.push("--address".into());
            args.push(format!("{n}={}:{PORT}", self.lab.addr(i)));
        }
        args.push(p(&bare));
        exe(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let file = p(&bare.join("pipeline.toml"));
        // Every server runs a node (with a controller, idle ones are spares); the last server
        // the placement gives processes to is killed.
        let placed: Value =
            serde_json::from_str(&std::fs::read_to_string(bare.join("plan.json"))?)?;
        let pl = &placed["placement"];
        let used: Vec<usize> = (0..names.len())
            .filter(|&i| {
                pl["processes"].as_array().into_iter().flatten().any(|x| {
                    x["server"]
                        .as_u64()
                        .and_then(|s| pl["servers"][s as usize]["name"].as_str())
                        == Some(names[i])
                })
            })
            .collect();
        let victim = *used.last().context("the plan uses no server")?;
        let quiet = |c: &mut Command| {
            c.env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        let mut children = Vec::new();
        children.push(quiet(
            self.lab
                .command(0, Path::new("nats-server"))
                .args(["-a", "0.0.0.0", "-p", "4222", "-js", "-sd"])
                .arg(dir.join("js")),
        )?);
        let ctl_summary = dir.join("controller.json");
        children.push(quiet(
            self.lab
                .command(0, &self.exe)
                .args(["controller", &file, "--summary-json"])
                .arg(&ctl_summary),
        )?);
        let node = |i: usize| {
            quiet(
                self.lab
                    .command(i, &self.exe)
                    .args(["node", &file, "--name", names[i]]),
            )
        };
        for i in 0..names.len() {
            children.push(node(i)?);
        }
        let k = 2 + victim;
        let summary = dir.join("front.json");
        let mut front = quiet(
            self.lab
                .command(0, &self.exe)
                .args(["run", &file, "--api", "off", "--duration", "20"])
                .arg("--summary-json")
                .arg(&summary),
        )?;
        std::thread::sleep(Duration::from_secs(6));
        children[k].kill()?;
        let killed = unix_ms();
        children[k].wait()?;
        std::thread::sleep(Duration::from_secs(6));
        let restarted = unix_ms();
        children[k] = node(victim)?;
        let status = front.wait()?;
        // The front dies while a standby front waits in n2: the standby takes the camera over.
        let mut old = quiet(self.lab.command(0, &self.exe).args([
            "run",
            &file,
            "--api",
            "off",
            "--duration",
            "60",
        ]))?;
        std::thread::sleep(Duration::from_secs(4));
        let standby_summary = dir.join("standby.json");
        let mut standby = quiet(
            self.lab
                .command(1, &self.exe)
                .args(["run", &file, "--api", "off", "--duration", "6"])
                .arg("--summary-json")
                .arg(&standby_summary),
        )?;
        std::thread::sleep(Duration::from_secs(3));
        old.kill()?;
        let front_killed = unix_ms();
        old.wait()?;
        let standby_status = standby.wait()?;
        // The controller stops on SIGINT and writes what it published.
        let _ = Command::new("kill")
            .args(["-INT", &children[1].id().to_string()])
            .status();
        let _ = children[1].wait();
        for c in children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        anyhow::ensure!(status.success(), "the front exited with {status}");
        anyhow::ensure!(
            standby_status.success(),
            "the standby front exited with {standby_status}"
        );
        let b: Value = serde_json::from_str(&std::fs::read_to_string(&standby_summary)?)?;
        // The standby opened the results file when it took over: its first record.
        let first_captured = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|r| r["captured_at_unix_ms"].as_u64())
            .filter(|&t| t >= front_killed)
            .min();
        let after_kill = |t: Option<u64>| t.map(|t| t.saturating_sub(front_killed) as f64 / 1e3);
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
        let ctl: Value = std::fs::read_to_string(&ctl_summary)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let replan_error = ctl["epochs"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e["error"].as_str().map(String::from));
        let epochs = s["epochs"].as_array().cloned().unwrap_or_default();
        let find = |reason: &str| epochs.iter().find(|e| e["reason"] == reason).cloned();
        let since = |e: &Option<Value>, k: &str, t0: u64| {
            e.as_ref()
                .and_then(|e| e[k].as_u64())
                .map(|t| t.saturating_sub(t0) as f64 / 1e3)
        };
        let (lost_epoch, joined) = (
            find(&format!("lost {}", names[victim])),
            find(&format!("joined {}", names[victim])),
        );
        let f = &s["flows"][0];
        Ok(ControlRow {
            gbps,
            used: used.iter().map(|&i| names[i].to_string()).collect(),
            killed: names[victim].to_string(),
            replan_published_s: since(&lost_epoch, "published_unix_ms", killed),
            plan_s: lost_epoch.as_ref().and_then(|e| e["plan_s"].as_f64()),
            replan_running_s: since(&lost_epoch, "applied_unix_ms", killed),
            rejoin_running_s: since(&joined, "applied_unix_ms", restarted),
            lost: f["lost"].as_u64().unwrap_or(0),
            ingested: f["ingested"].as_u64().unwrap_or(0),
            published: f["published"].as_u64().unwrap_or(0),
            replan_error,
            front_takeover_s: after_kill(b["front_lease"]["taken_unix_ms"].as_u64()),
            camera_back_s: after_kill(first_captured),
            front_in_flight: ctl["fronts_gone"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|g| g["outcome"] == "silent")
                .and_then(|g| g["in_flight"].as_u64()),
            standby_ingested: b["flows"][0]["ingested"].as_u64().unwrap_or(0),
            standby_published: b["flows"][0]["published"].as_u64().unwrap_or(0),
        })
    }
}

/// The controller scenario at each rate.
pub fn run_controlled(profiles: &Path, rates_gbps: &[f64]) -> anyhow::Result<Vec<ControlRow>> {
    let bench = bench(profiles, 10)?;
    let mut rows = Vec::new();
    for &gbps in rates_gbps {
        bench.shape(1..3, gbps)?;
        rows.push(bench.controlled(gbps)?);
    }
    Ok(rows)
}

/// The controller rows as a table.
pub fn control_table(rows: &[ControlRow]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "With a controller (NATS): WideResNet-101-2 planned on L4:1,T4:2 (servers l4-0 in n1 with the front, t4-0 in n2, t4-1 in n3), 10 fps; the last server the plan uses killed at 6 s, restarted at 12 s"
    );
    let _ = writeln!(
        s,
        "{:>6} {:>16} {:>7} {:>12} {:>8} {:>12} {:>12} {:>6} {:>18}",
        "Gbit/s",
        "used",
        "killed",
        "epoch out s",
        "plan s",
        "running s",
        "rejoined s",
        "lost",
        "published/ingested"
    );
    let o = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    for r in rows {
        let _ = writeln!(
            s,
            "{:>6} {:>16} {:>7} {:>12} {:>8} {:>12} {:>12} {:>6} {:>18}",
            r.gbps,
            r.used.join(","),
            r.killed,
            o(r.replan_published_s),
            o(r.plan_s),
            o(r.replan_running_s),
            o(r.rejoin_running_s),
            r.lost,
            format!("{}/{}", r.published, r.ingested),
        );
        if let Some(e) = &r.replan_error {
            let _ = writeln!(s, "       re-plan failed: {e}");
        }
        let _ = writeln!(
            s,
            "       front killed holding {} frames: standby took the lease after {} s, camera back after {} s, standby published {}/{}",
            r.front_in_flight.map_or("-".into(), |n| n.to_string()),
            o(r.front_takeover_s),
            o(r.camera_back_s),
            r.standby_published,
            r.standby_ingested
        );
    }
    let _ = write!(
        s,
        "epoch out / running: from the SIGKILL to the controller publishing the epoch without the killed server / to the front running it.\nrejoined: from the restart to the front running the epoch with it again.\nfront killed: then a front in n1 is SIGKILLed while a standby front waits in n2; camera back: the first frame the standby captured after the kill (and published)."
    );
    s
}

fn bench(profiles: &Path, seconds: u32) -> anyhow::Result<Bench> {
    let lab = Lab::new(3).context("bench nodes needs network namespaces")?;
    Ok(Bench {
        lab,
        exe: std::env::current_exe()?,
        dir: {
            let d =
                std::env::temp_dir().join(format!("poolpipe-bench-nodes-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            d
        },
        profiles: profiles.canonicalize().context("the profiles folder")?,
        seconds,
        node_to_node: std::cell::Cell::new(None),
    })
}

/// Node to node against through the front, at one link rate and one way.
#[derive(Debug, Serialize)]
pub struct DirectRow {
    /// Link rate into every node (the front's too), Gbit/s.
    pub gbps: f64,
    /// `direct_links`.
    pub direct: bool,
    /// Per-source frame rate at which 99% of frames are published.
    pub fps_99: u32,
    /// Published frames/s there.
    pub goodput_99: f64,
    /// End-to-end latency there, ms (median, 99th percentile).
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    /// Bytes per frame through the front's link (sent to the nodes and answered by them).
    pub front_bytes_per_frame: f64,
    /// Bytes per frame from node to node.
    pub direct_bytes_per_frame: f64,
}

/// The node-to-node pipeline (head on n2, tails on n3, the front in n1 runs the cameras) with
/// and without direct links, every node's link shaped to each rate.
pub fn run_direct(
    profiles: &Path,
    rates_gbps: &[f64],
    seconds: u32,
    max_fps: u32,
) -> anyhow::Result<Vec<DirectRow>> {
    let bench = bench(profiles, seconds)?;
    let mut rows = Vec::new();
    for &gbps in rates_gbps {
        bench.shape(0..3, gbps)?;
        for direct in [true, false] {
            bench.node_to_node.set(Some(direct));
            let (fps_99, goodput_99, summary) = bench.search(true, gbps, max_fps)?;
            let nodes = summary["nodes"].as_array().cloned().unwrap_or_default();
            let total = |k: &str| {
                nodes
                    .iter()
                    .map(|n| n[k].as_f64().unwrap_or(0.0))
                    .sum::<f64>()
            };
            let frames = summary["flows"][0]["published"].as_f64().unwrap_or(0.0);
            let per = |b: f64| if frames > 0.0 { b / frames } else { 0.0 };
            rows.push(DirectRow {
                gbps,
                direct,
                fps_99,
                goodput_99,
                e2e_p50_ms: summary["end_to_end_p50_ms"].as_f64(),
                e2e_p99_ms: summary["end_to_end_p99_ms"].as_f64(),
                front_bytes_per_frame: per(total("bytes_sent") + total("bytes_back")),
                direct_bytes_per_frame: per(total("bytes_direct")),
            });
        }
    }
    Ok(rows)
}

/// The direct rows as a table.
pub fn direct_table(rows: &[DirectRow]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Node to node (WideResNet-101-2 at block 5: L4 head on n2, two T4 tails on n3, the front in n1 runs 2 sources), SLO 400 ms, every node's link shaped"
    );
    let _ = writeln!(
        s,
        "{:>6} {:>12} {:>14} {:>10} {:>10} {:>16} {:>16}",
        "Gbit/s", "links", "99% fps", "p50 ms", "p99 ms", "front MB/frame", "n2->n3 MB/frame"
    );
    let o = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    for r in rows {
        let _ = writeln!(
            s,
            "{:>6} {:>12} {:>14} {:>10} {:>10} {:>16.3} {:>16.3}",
            r.gbps,
            if r.direct { "direct" } else { "via front" },
            format!("{} ({:.1}/s)", r.fps_99, r.goodput_99),
            o(r.e2e_p50_ms),
            o(r.e2e_p99_ms),
            r.front_bytes_per_frame / 1e6,
            r.direct_bytes_per_frame / 1e6,
        );
    }
    let _ = write!(
        s,
        "99% fps: highest frame rate per source (1 fps steps) with 99% of frames published, and published frames/s there; latencies and bytes at that rate."
    );
    s
}

/// Runs the benchmark at each rate.
pub fn run(
    profiles: &Path,
    rates_gbps: &[f64],
    seconds: u32,
    max_fps: u32,
) -> anyhow::Result<Vec<Row>> {
    let bench = bench(profiles, seconds)?;
    let mut rows = Vec::new();
    for &gbps in rates_gbps {
        bench.shape(1..3, gbps)?;
        let (fps_n, good_n, summary) = bench.search(true, gbps, max_fps)?;
        let (fps_1, good_1, _) = bench.search(false, gbps, max_fps)?;
        let nodes = summary["nodes"].as_array().cloned().unwrap_or_default();
        let total = |k: &str| {
            nodes
                .iter()
                .map(|n| n[k].as_f64().unwrap_or(0.0))
                .sum::<f64>()
        };
        let (bytes, frames) = (total("bytes_sent"), total("frames"));
        let link_s = total("link_s");
        let per_frame = if frames > 0.0 { bytes / frames } else { 0.0 };
        let mut row = Row {
            gbps,
            fps_99_nodes: fps_n,
            fps_99_one: fps_1,
            goodput_99_nodes: good_n,
            goodput_99_one: good_1,
            bytes_per_frame: per_frame,
            ideal_ms_per_frame: per_frame * 8.0 / (gbps * 1e9) * 1e3,
            link_ms_per_frame: if frames > 0.0 {
                link_s / frames * 1e3
            } else {
                0.0
            },
            detect_s: None,
            first_second: None,
            lost: 0,
            rejoin_s: None,
            rates: [0.0; 3],
        };
        if fps_n > 0 {
            bench.recovery(gbps, fps_n, &mut row)?;
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The rows as a table.
pub fn table(rows: &[Row]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Cut pipeline (WideResNet-101-2 at block 5: L4 head on n1, T4 tails on n2 and n3), 2 sources, SLO 250 ms"
    );
    let _ = writeln!(
        s,
        "{:>6} {:>13} {:>13} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6} {:>8} {:>22}",
        "Gbit/s",
        "99% nodes",
        "99% 1 proc",
        "MB/frame",
        "ideal ms",
        "link ms",
        "detect s",
        "1st s",
        "lost",
        "rejoin s",
        "fps before/alone/back"
    );
    let o = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    for r in rows {
        let _ = writeln!(
            s,
            "{:>6} {:>13} {:>13} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>8} {:>6} {:>8} {:>22}",
            r.gbps,
            format!("{} ({:.1}/s)", r.fps_99_nodes, r.goodput_99_nodes),
            format!("{} ({:.1}/s)", r.fps_99_one, r.goodput_99_one),
            r.bytes_per_frame / 1e6,
            r.ideal_ms_per_frame,
            r.link_ms_per_frame,
            o(r.detect_s),
            o(r.first_second),
            r.lost,
            o(r.rejoin_s),
            format!("{:.1}/{:.1}/{:.1}", r.rates[0], r.rates[1], r.rates[2]),
        );
    }
    let _ = write!(
        s,
        "99%: highest frame rate per source (1 fps steps) with 99% of frames published, and published frames/s there.\n1st s: published rate in the second after n3's SIGKILL over the rate with n2 alone."
    );
    s
}
