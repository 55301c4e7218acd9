//! `poolpipe bench outputs`: what annotated outputs cost the analytics. Paired runs of a
//! pipeline (the demo by default): plain, then with an RTSP output watched by one client, an
//! MP4 recording, a JPEG snapshot a second per stream, and N MJPEG preview clients, alternating;
//! published frames/s of each run, their medians and the ratio. The machine is shared and
//! noisy, so runs alternate and medians are compared.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::api::{ApiOptions, serve};
use crate::config::{DrawItem, OutputKind, OutputSpec, Pace, Pipeline, SnapshotWhen};
use crate::pipeline::{self, RunOptions, Shutdown};

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `plain` or `outputs`.
    pub mode: String,
    /// Published frames per second.
    pub published_fps: f64,
    /// Frames dropped (late or overload).
    pub dropped: u64,
    /// With outputs: frames each output wrote, and dropped from its queue.
    pub outputs: Vec<crate::outputs::OutputSummary>,
    /// With outputs: preview frames the clients received.
    pub preview_frames: u64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The pipeline.
    pub pipeline: String,
    /// Pace of its file sources.
    pub pace: String,
    /// Seconds per run.
    pub seconds: f64,
    /// Preview clients.
    pub previews: usize,
    /// Every run, in order.
    pub runs: Vec<Run>,
    /// Median published fps, plain.
    pub plain_fps: f64,
    /// Median published fps, with outputs.
    pub outputs_fps: f64,
    /// outputs / plain.
    pub ratio: f64,
}

fn output(kind: OutputKind, name: &str, folder: &Path, port: u16) -> OutputSpec {
    OutputSpec {
        name: name.into(),
        kind,
        streams: Vec::new(),
        folder: folder.to_path_buf(),
        when: SnapshotWhen {
            every: Some(Duration::from_secs(1)),
            ..Default::default()
        },
        quality: 85,
        segment: Duration::from_secs(300),
        max_bytes: 0,
        bitrate_kbps: 2000,
        address: "127.0.0.1".into(),
        port,
        draw: vec![
            DrawItem::Boxes,
            DrawItem::Labels,
            DrawItem::Text,
            DrawItem::Classes,
            DrawItem::Header,
        ],
        colors: Vec::new(),
        font_px: 14.0,
        thickness: 2,
        queue: 8,
    }
}

/// A free TCP port on loopback.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Reads an MJPEG preview until `stop`; returns the frames (parts) received.
fn preview_client(addr: std::net::SocketAddr, stream: &str, stop: Arc<AtomicBool>) -> u64 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let req = format!(
        "GET /streams/{stream}/preview.mjpeg?fps=5 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut parts = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut tail: Vec<u8> = Vec::new();
    let needle = b"--poolpipe-frame";
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                while let Some(i) = tail.windows(needle.len()).position(|w| w == needle) {
                    parts += 1;
                    tail.drain(..i + needle.len());
                }
                let keep = tail.len().saturating_sub(needle.len());
                tail.drain(..keep);
            }
            Err(_) => continue,
        }
    }
    parts
}

fn one_run(p: &Pipeline, seconds: f64, with: Option<(usize, &Path)>) -> anyhow::Result<Run> {
    let mut p = p.clone();
    let mut rtsp_port = None;
    if let Some((_, dir)) = with {
        let port = free_port()?;
        rtsp_port = Some(port);
        p.outputs = vec![
            output(OutputKind::Rtsp, "rtsp", dir, port),
            output(OutputKind::File, "file", &dir.join("rec"), 0),
            output(OutputKind::Jpeg, "jpeg", &dir.join("snaps"), 0),
        ];
    }
    let opts = RunOptions {
        duration: Some(Duration::from_secs_f64(seconds)),
        ..Default::default()
    };
    let running = pipeline::start(&p, &opts)?;
    let live = running.live().clone();
    let mut clients = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut server = None;
    let mut rtsp_client = None;
    if let Some((previews, _)) = with {
        let s = serve(
            &ApiOptions {
                listen: "127.0.0.1:0".parse()?,
                token: None,
            },
            live.clone(),
        )?;
        let addr = s.addr;
        server = Some(s);
        let names: Vec<String> = p.sources.iter().map(|s| s.name.clone()).collect();
        for k in 0..previews {
            let name = names[k % names.len().max(1)].clone();
            let stop = stop.clone();
            clients.push(std::thread::spawn(move || {
                // The stream publishes its first frame a little after the start.
                std::thread::sleep(Duration::from_secs(2));
                preview_client(addr, &name, stop)
            }));
        }
        if let (Some(port), Some(name)) = (rtsp_port, names.first()) {
            let url = format!("location=rtsp://127.0.0.1:{port}/{name}");
            rtsp_client = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "sleep 2; exec gst-launch-1.0 -q rtspsrc {url} latency=0 ! rtph264depay ! avdec_h264 ! fakesink"
                ))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok();
        }
    }
    let summary = running.wait(&Shutdown::new())?;
    let outputs = live.outputs();
    stop.store(true, Ordering::SeqCst);
    let preview_frames = clients
        .into_iter()
        .map(|c| c.join().unwrap_or(0))
        .sum::<u64>();
    if let Some(mut c) = rtsp_client {
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(s) = server {
        s.stop();
    }
    let dropped = summary
        .streams
        .iter()
        .map(|s| s.dropped_late + s.dropped_overload)
        .sum();
    Ok(Run {
        mode: if with.is_some() { "outputs" } else { "plain" }.into(),
        published_fps: summary.published_fps(),
        dropped,
        outputs,
        preview_frames,
    })
}

/// Runs `pairs` pairs of runs of `pipeline` (file sources at `pace`), `seconds` each.
pub fn run(
    pipeline: &Path,
    pace: Pace,
    seconds: f64,
    pairs: usize,
    previews: usize,
) -> anyhow::Result<Report> {
    let mut p = crate::config::load_pipeline(pipeline)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("loading {}", pipeline.display()))?;
    for s in &mut p.sources {
        s.pace = pace;
    }
    // Results go nowhere (the demo prints them on stdout, which is the table's).
    p.sinks = vec![crate::sinks::SinkSpec::jsonl_file("/dev/null")];
    let dir = tempfile_dir()?;
    let mut runs = Vec::new();
    for _ in 0..pairs {
        runs.push(one_run(&p, seconds, None)?);
        runs.push(one_run(&p, seconds, Some((previews, &dir)))?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let med = |mode: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.mode == mode)
            .map(|r| r.published_fps)
            .collect();
        super::median_of(&v).unwrap_or(0.0)
    };
    let (plain_fps, outputs_fps) = (med("plain"), med("outputs"));
    Ok(Report {
        pipeline: pipeline.display().to_string(),
        pace: format!("{pace:?}").to_lowercase(),
        seconds,
        previews,
        runs,
        plain_fps,
        outputs_fps,
        ratio: if plain_fps > 0.0 {
            outputs_fps / plain_fps
        } else {
            0.0
        },
    })
}

/// A fresh folder for the recordings and snapshots.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("poolpipe-bench-outputs-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

impl Report {
    /// A table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "{} (pace {}), {} s per run, {} preview clients + 1 RTSP client + recording + a snapshot/s per stream\n",
            self.pipeline, self.pace, self.seconds, self.previews
        );
        let _ = writeln!(
            s,
            "{:<8} {:>13} {:>8} {:>15} {:>15} {:>15} {:>9}",
            "run",
            "published fps",
            "dropped",
            "rtsp sent/drop",
            "file rec/drop",
            "jpeg wr/drop",
            "previews"
        );
        for r in &self.runs {
            let o = |name: &str| {
                r.outputs
                    .iter()
                    .find(|x| x.name == name)
                    .map_or("-".to_string(), |x| format!("{}/{}", x.written, x.dropped))
            };
            let _ = writeln!(
                s,
                "{:<8} {:>13.2} {:>8} {:>15} {:>15} {:>15} {:>9}",
                r.mode,
                r.published_fps,
                r.dropped,
                o("rtsp"),
                o("file"),
                o("jpeg"),
                r.preview_frames
            );
        }
        let _ = writeln!(
            s,
            "median published fps: plain {:.2}, with outputs {:.2}: ratio {:.3}",
            self.plain_fps, self.outputs_fps, self.ratio
        );
        s
    }
}
