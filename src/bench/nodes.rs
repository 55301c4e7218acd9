//! `poolpipe bench nodes`: a cut pipeline across three nodes in network namespaces (see
//! [`crate::cluster::netns`]), its two worker nodes behind links shaped to each rate asked for,
//! against the same pipeline in one process (its cut transfers emulated at the same rate):
//! goodput at 99% attainment (searched over the sources' frame rate), the measured link time
//! per frame against size x 8 / rate, and, at the cluster's 99% rate, how long it takes to see
//! a killed node, to settle on the survivor, and to take the node back once it restarts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::cluster::netns::{Lab, cut_pipeline};

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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Bench {
    lab: Lab,
    exe: PathBuf,
    dir: PathBuf,
    profiles: PathBuf,
    seconds: u32,
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
        std::fs::write(&path, cut_pipeline(&self.profiles, &nodes, gbps, fps, &out))?;
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

/// Runs the benchmark at each rate.
pub fn run(
    profiles: &Path,
    rates_gbps: &[f64],
    seconds: u32,
    max_fps: u32,
) -> anyhow::Result<Vec<Row>> {
    let lab = Lab::new(3).context("bench nodes needs network namespaces")?;
    let bench = Bench {
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
    };
    let mut rows = Vec::new();
    for &gbps in rates_gbps {
        for i in 1..3 {
            bench.lab.shape(i, Some((gbps * 1000.0).round() as u64))?;
        }
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
