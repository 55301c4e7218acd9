//! `poolpipe bench sinks`: results/s and publish latency of each sink on loopback, against
//! brokers this bench starts itself (mosquitto, nats-server, redis-server, tansu when installed)
//! and a webhook receiver in this process, next to the broker's own client tool doing the same
//! work where Debian has one (mosquitto_pub, redis-benchmark).
//!
//! Throughput: `n` results of a realistic size offered at once (buffer = n, block), timed until
//! the last is acknowledged. Latency: results offered one at a time at a fixed rate; offer to
//! acknowledgement, p50 and p99.
//!
//! Disk buffers: the jsonl, redis and mqtt sinks again with `buffer_type = "disk"`, next to the
//! memory-buffered row of the same run (ratio = disk / memory); and the time a restart takes to
//! deliver 100,000 results a crashed run left in the buffer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sinks::spec::{Ctx, SinkConfig, validate};
use crate::sinks::{self, Message, SinkSpec};

/// One sink's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Sink.
    pub sink: String,
    /// Results per second, poolpipe.
    pub results_per_s: f64,
    /// p50 offer-to-ack at the paced rate, ms.
    pub p50_ms: Option<f64>,
    /// p99 offer-to-ack at the paced rate, ms.
    pub p99_ms: Option<f64>,
    /// The reference client tool, if any.
    pub tool: Option<String>,
    /// Its messages per second doing the same work.
    pub tool_per_s: Option<f64>,
    /// poolpipe / tool.
    pub ratio: Option<f64>,
    /// Why a row is missing figures.
    pub note: String,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Results per throughput run.
    pub results: usize,
    /// Payload bytes per result.
    pub payload_bytes: usize,
    /// Batch size of the sinks.
    pub batch: usize,
    /// Paced rate of the latency runs.
    pub paced_per_s: f64,
    /// Rows.
    pub rows: Vec<Row>,
    /// Recovery after a restart, per disk-buffered sink.
    pub recovery: Vec<Recovery>,
}

/// How long a restart takes to deliver what a crashed run left in a disk buffer.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// Sink.
    pub sink: String,
    /// Results left in the buffer.
    pub results: u64,
    /// Seconds from opening the sink until the destination acknowledged the last.
    pub seconds: f64,
    /// Results per second.
    pub results_per_s: f64,
    /// What went wrong, if it did.
    pub note: String,
}

impl Report {
    /// A table.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} results of {} B per throughput run, batch {}; latency at {:.0} results/s",
            self.results, self.payload_bytes, self.batch, self.paced_per_s
        );
        let _ = writeln!(
            s,
            "{:<12} {:>12} {:>8} {:>8} {:<16} {:>12} {:>7}  note",
            "sink", "results/s", "p50 ms", "p99 ms", "tool", "tool msg/s", "ratio"
        );
        let f = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<12} {:>12.0} {:>8} {:>8} {:<16} {:>12} {:>7}  {}",
                r.sink,
                r.results_per_s,
                f(r.p50_ms, 2),
                f(r.p99_ms, 2),
                r.tool.as_deref().unwrap_or("-"),
                f(r.tool_per_s, 0),
                f(r.ratio, 2),
                r.note
            );
        }
        if !self.recovery.is_empty() {
            let _ = writeln!(s, "recovery after a restart (disk buffer):");
            let _ = writeln!(
                s,
                "{:<8} {:>10} {:>9} {:>12}  note",
                "sink", "results", "seconds", "results/s"
            );
            for r in &self.recovery {
                let _ = writeln!(
                    s,
                    "{:<8} {:>10} {:>9.2} {:>12.0}  {}",
                    r.sink, r.results, r.seconds, r.results_per_s, r.note
                );
            }
        }
        s
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start(program: &str, args: &[String], port: u16) -> anyhow::Result<Proc> {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {program} (run ./setup.sh): {e}"))?;
    let p = Proc(child);
    let until = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < until, "{program} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

/// A webhook receiver answering 200 to every POST (keep-alive).
fn webhook() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || serve(conn));
        }
    });
    Ok(port)
}

fn serve(conn: TcpStream) -> Option<()> {
    let mut r = BufReader::new(conn.try_clone().ok()?);
    let mut w = conn;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().ok()?;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .ok()?;
    }
}

/// A result of realistic size (one OCR'd frame).
fn payload(seq: u64) -> String {
    serde_json::json!({
        "pipeline": "bench", "stream": "cam-1", "seq": seq, "pts_ms": seq as f64 * 33.3,
        "captured_at": "2026-11-28T13:20:33.123Z", "captured_at_unix_ms": 1_795_872_033_123u64,
        "latency_ms": {"end_to_end": 41.2, "stages": {"det": 18.4, "rec": 21.9}},
        "deadline_slack_ms": 58.8,
        "results": {
            "det": {"boxes": [[12, 40, 230, 40, 230, 72, 12, 72], [300, 400, 520, 400, 520, 440, 300, 440]]},
            "rec": {"texts": [{"text": "CAM-01 NORTH GATE", "score": 0.981}, {"text": "2026-11-28 13:20:33", "score": 0.964}]}
        }
    })
    .to_string()
}

fn spec(toml_text: &str, data_dir: &Path) -> anyhow::Result<SinkSpec> {
    let table: toml::Table = toml::from_str(toml_text)?;
    let keys: Vec<String> = table.keys().cloned().collect();
    let c = SinkConfig::from_table(&table).map_err(anyhow::Error::msg)?;
    let env = |_: &str| None;
    let ctx = Ctx {
        pipeline: "bench",
        dir: Path::new("."),
        env: &env,
        data_dir: Some(data_dir),
    };
    let name = c.kind.as_str().to_string();
    validate(&c, &keys, name, &ctx).map_err(|p| anyhow::anyhow!("bench sink spec: {p:?}"))
}

/// Throughput (results/s) and paced latency (p50, p99) of one sink.
fn measure(
    spec: &SinkSpec,
    n: usize,
    paced: usize,
    rate: f64,
) -> anyhow::Result<(f64, Option<f64>, Option<f64>)> {
    let stream: Arc<str> = Arc::from("cam-1");
    let payloads: Vec<Arc<str>> = (0..n as u64).map(|s| Arc::from(payload(s))).collect();
    // Warm-up (connection, topic creation).
    let mut h = sinks::open(spec, "bench")?;
    for (i, p) in payloads.iter().take(100).enumerate() {
        h.offer(Message::result(
            stream.clone(),
            i as u64,
            p.clone(),
            Instant::now(),
        ));
    }
    let warm = h.close();
    anyhow::ensure!(
        warm.delivered == 100.min(n as u64),
        "warm-up not delivered: {warm:?}"
    );
    let mut big = spec.clone();
    big.delivery.buffer = n;
    big.delivery.when_full = crate::sinks::spec::WhenFull::Block;
    big.delivery.flush_timeout = Duration::from_secs(120);
    let mut h = sinks::open(&big, "bench")?;
    let t0 = Instant::now();
    for (i, p) in payloads.iter().enumerate() {
        h.offer(Message::result(
            stream.clone(),
            i as u64,
            p.clone(),
            Instant::now(),
        ));
    }
    let s = h.close();
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        s.delivered == n as u64,
        "{} of {n} delivered: {s:?}",
        s.delivered
    );
    let throughput = n as f64 / secs;
    // Paced: one result every 1/rate s.
    let mut h = sinks::open(spec, "bench")?;
    let start = Instant::now();
    for i in 0..paced {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        h.offer(Message::result(
            stream.clone(),
            i as u64,
            payloads[i % n].clone(),
            Instant::now(),
        ));
    }
    let s = h.close();
    anyhow::ensure!(s.delivered == paced as u64, "paced run lost results: {s:?}");
    Ok((throughput, s.p50_ms, s.p99_ms))
}

/// Leaves `n` results in the disk buffer of `spec` as a crashed run would, then times a
/// restart delivering them.
fn recover(spec: &SinkSpec, n: u64) -> anyhow::Result<f64> {
    let disk = spec
        .delivery
        .disk
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("not disk-buffered"))?;
    let _ = std::fs::remove_dir_all(&disk.dir);
    let stream: Arc<str> = Arc::from("cam-1");
    {
        let counters = Arc::new(sinks::SinkCounters::default());
        let b = sinks::disk::DiskBuffer::open(disk, spec.delivery.when_full, counters)?;
        for i in 0..n {
            let _ = b.offer(Message::result(
                stream.clone(),
                i,
                payload(i).into(),
                Instant::now(),
            ));
        }
        b.sync();
    }
    let t0 = Instant::now();
    let h = sinks::open(spec, "bench")?;
    let c = h.counters().clone();
    let until = t0 + Duration::from_secs(600);
    while c.delivered.load(std::sync::atomic::Ordering::Relaxed) < n {
        anyhow::ensure!(Instant::now() < until, "not delivered within 600 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = t0.elapsed().as_secs_f64();
    let s = h.close();
    anyhow::ensure!(
        s.recovered == n && s.delivered == n,
        "recovered {} and delivered {} of {n}",
        s.recovered,
        s.delivered
    );
    Ok(secs)
}

fn mosquitto_pub(port: u16, n: usize) -> anyhow::Result<f64> {
    let mut lines = String::new();
    for s in 0..n as u64 {
        lines.push_str(&payload(s));
        lines.push('\n');
    }
    let t0 = Instant::now();
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "bench/tool",
        ])
        .args(["-q", "1", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(lines.as_bytes())?;
    let st = child.wait()?;
    anyhow::ensure!(st.success(), "mosquitto_pub failed");
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn redis_benchmark(port: u16, n: usize, pipeline: usize) -> anyhow::Result<f64> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-c", "1", "-q"])
        .args(["-n", &n.to_string(), "-P", &pipeline.to_string()])
        .args(["XADD", "bench:tool", "MAXLEN", "~", "100000", "*", "result"])
        .arg(payload(0))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "XADD ... <payload>: 123456.79 requests per second, p50=..." (the last \r-separated part)
    let last = text.rsplit('\r').next().unwrap_or("");
    let rps = last
        .split(" requests per second")
        .next()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|t| t.parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("cannot read redis-benchmark output: {text}"))?;
    Ok(rps)
}

/// The Kafka-compatible broker, if installed: `POOLPIPE_TANSU`, `tansu` on PATH, or what
/// `./setup.sh kafka` built under `$POOLPIPE_TOOLS` (default `~/.cache/poolpipe`), or under
/// `repo/.cache/tansu` (where earlier versions of the setup put it).
pub fn tansu(repo: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::env::var("POOLPIPE_TANSU") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    let tools = std::env::var_os("POOLPIPE_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/poolpipe")));
    let installed = tools.and_then(|t| {
        let p = t.join("tansu-0.6.0/bin/tansu");
        p.is_file().then_some(p)
    });
    on_path.or(installed).or_else(|| {
        let p = repo.join(".cache/tansu/bin/tansu");
        p.is_file().then_some(p)
    })
}

/// `nats-server` arguments: JetStream on, storing under `store`, listening on 127.0.0.1:`port`
/// (shared with the sink tests).
pub fn nats_args(port: u16, store: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["-a", "127.0.0.1", "-p"].map(String::from).into();
    a.extend([port.to_string(), "-js".into(), "-sd".into()]);
    a.push(store.display().to_string());
    a
}

/// `tansu` arguments: a broker with memory storage on 127.0.0.1:`port` (shared with the tests).
pub fn tansu_args(port: u16) -> Vec<String> {
    let url = format!("tcp://127.0.0.1:{port}");
    vec![
        "broker".into(),
        "--listener-url".into(),
        url.clone(),
        "--advertised-listener-url".into(),
        url,
        "--storage-engine".into(),
        "memory://tansu/".into(),
    ]
}

/// Runs the benchmark.
pub fn run(n: usize, batch: usize, rate: f64) -> anyhow::Result<Report> {
    let dir = tempfile_dir()?;
    let paced = (rate * 3.0) as usize;
    let delivery = format!("batch = {batch}\nwhen_full = \"block\"\nflush_timeout_ms = 60000\n");
    let common = format!("{delivery}buffer = 10000\n");
    // The same sink with a disk buffer in this run's folder.
    let on_disk = format!("{delivery}buffer_type = \"disk\"\nmax_bytes = 1073741824\n");
    let spec = |text: &str| spec(text, &dir);
    let mut recovery = Vec::new();
    let mut recover_row = |sink: &str, s: anyhow::Result<SinkSpec>| {
        let n = 100_000;
        let r = match s.and_then(|s| recover(&s, n)) {
            Ok(secs) => Recovery {
                sink: sink.into(),
                results: n,
                seconds: secs,
                results_per_s: n as f64 / secs,
                note: String::new(),
            },
            Err(e) => Recovery {
                sink: sink.into(),
                results: n,
                seconds: 0.0,
                results_per_s: 0.0,
                note: format!("failed: {e}"),
            },
        };
        eprintln!("bench sinks: {sink} recovery done");
        recovery.push(r);
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |sink: &str,
                   spec: anyhow::Result<SinkSpec>,
                   tool: Option<(&str, anyhow::Result<f64>)>,
                   note: &str| {
        let measured = spec.and_then(|s| measure(&s, n, paced, rate));
        let (tool_name, tool_rate) = match tool {
            // A disk row is compared with the memory row of the same sink, just measured.
            Some(("memory buffer", _)) => (
                Some("memory buffer".to_string()),
                rows.last().map(|r| r.results_per_s).filter(|r| *r > 0.0),
            ),
            Some((t, r)) => (Some(t.to_string()), r.ok()),
            None => (None, None),
        };
        let r = match measured {
            Ok((tput, p50, p99)) => Row {
                sink: sink.into(),
                results_per_s: tput,
                p50_ms: p50,
                p99_ms: p99,
                ratio: tool_rate.map(|t| tput / t),
                tool: tool_name,
                tool_per_s: tool_rate,
                note: note.to_string(),
            },
            Err(e) => Row {
                sink: sink.into(),
                results_per_s: 0.0,
                p50_ms: None,
                p99_ms: None,
                tool: tool_name,
                tool_per_s: tool_rate,
                ratio: None,
                note: format!("failed: {e}"),
            },
        };
        eprintln!("bench sinks: {} done", r.sink);
        rows.push(r);
    };

    // MQTT, QoS 1: mosquitto as Debian configures it, and with TCP_NODELAY on the broker side.
    for nodelay in [false, true] {
        let port = free_port()?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n\
                 max_queued_messages 0\nset_tcp_nodelay {nodelay}\n"
            ),
        )?;
        let broker = start(
            "mosquitto",
            &["-c".into(), conf.display().to_string()],
            port,
        )?;
        let s = spec(&format!(
            "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic = \"bench/{{stream}}\"\n{common}"
        ));
        let tool = mosquitto_pub(port, n);
        let name = if nodelay { "mqtt-nd" } else { "mqtt" };
        let note = if nodelay {
            "broker: set_tcp_nodelay true"
        } else {
            "broker: Debian defaults (Nagle on PUBACKs)"
        };
        row(name, s, Some(("mosquitto_pub -q1", tool)), note);
        let disk = |c: &str| {
            format!(
                "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic = \"bench/{{stream}}\"\nname = \"{name}-disk\"\n{c}"
            )
        };
        row(
            &format!("{name}-disk"),
            spec(&disk(&on_disk)),
            Some(("memory buffer", Ok(0.0))),
            "disk buffer, fsync every 100 ms",
        );
        recover_row(name, spec(&disk(&on_disk)));
        drop(broker);
    }

    // NATS, core and JetStream.
    let port = free_port()?;
    let store = dir.join("nats");
    let broker = start("nats-server", &nats_args(port, &store), port)?;
    let s = spec(&format!(
        "type = \"nats\"\nurl = \"nats://127.0.0.1:{port}\"\ntopic = \"bench.{{stream}}\"\n{common}"
    ));
    row(
        "nats",
        s,
        None,
        "core NATS; delivered = flushed to the server",
    );
    let s = spec(&format!(
        "type = \"nats\"\nurl = \"nats://127.0.0.1:{port}\"\ntopic = \"benchjs.{{stream}}\"\njetstream = true\nstream = \"BENCH\"\n{common}"
    ));
    row(
        "nats-js",
        s,
        None,
        "JetStream file store, acked per message",
    );
    drop(broker);

    // Redis Streams.
    let port = free_port()?;
    let broker = start(
        "redis-server",
        &[
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
        ],
        port,
    )?;
    let s = spec(&format!(
        "type = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\ntopic = \"bench:{{stream}}\"\n{common}"
    ));
    let tool = redis_benchmark(port, n, batch);
    row(
        "redis",
        s,
        Some(("redis-benchmark", tool)),
        "XADD MAXLEN ~, pipelined per batch; tool: -c 1 -P batch",
    );
    let disk = format!(
        "type = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\ntopic = \"bench:{{stream}}\"\nname = \"redis-disk\"\n{on_disk}"
    );
    row(
        "redis-disk",
        spec(&disk),
        Some(("memory buffer", Ok(0.0))),
        "disk buffer, fsync every 100 ms",
    );
    recover_row("redis", spec(&disk));
    drop(broker);

    // Kafka, when a broker is installed.
    match tansu(Path::new(".")) {
        Some(bin) => {
            let port = free_port()?;
            let broker = start(&bin.display().to_string(), &tansu_args(port), port)?;
            let s = spec(&format!(
                "type = \"kafka\"\nurl = \"kafka://127.0.0.1:{port}\"\ntopic = \"bench.{{stream}}\"\ncreate_topic = true\n{common}"
            ));
            row(
                "kafka",
                s,
                None,
                "tansu, memory storage; kcat cannot talk to it",
            );
            drop(broker);
        }
        None => row(
            "kafka",
            Err(anyhow::anyhow!(
                "no Kafka-compatible broker installed (./setup.sh kafka builds tansu)"
            )),
            None,
            "",
        ),
    }

    // HTTP webhook.
    let port = webhook()?;
    let s = spec(&format!(
        "type = \"http\"\nurl = \"http://127.0.0.1:{port}/hook\"\n{common}"
    ));
    row("http", s, None, "receiver in this process, keep-alive");

    // JSON lines file.
    let file = dir.join("out.jsonl");
    let s = spec(&format!(
        "type = \"jsonl\"\npath = \"{}\"\n{common}",
        file.display()
    ));
    row("jsonl", s, None, "file, flushed per batch");
    let disk = format!(
        "type = \"jsonl\"\npath = \"{}\"\nname = \"jsonl-disk\"\n{on_disk}",
        file.display()
    );
    row(
        "jsonl-disk",
        spec(&disk),
        Some(("memory buffer", Ok(0.0))),
        "disk buffer, fsync every 100 ms",
    );
    recover_row("jsonl", spec(&disk));

    let _ = std::fs::remove_dir_all(&dir);
    Ok(Report {
        results: n,
        payload_bytes: payload(0).len(),
        batch,
        paced_per_s: rate,
        rows,
        recovery,
    })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("poolpipe-bench-sinks-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
