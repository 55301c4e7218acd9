//! Sinks against real brokers started by the test on 127.0.0.1 (mosquitto, nats-server,
//! redis-server from Debian; a Kafka-compatible broker when one is installed), and a webhook
//! receiver in the test. Each test runs the real binary on a pipeline of test-pattern sources
//! and a pass-through stage, writes the same results to a JSON lines file as ground truth, and
//! checks what a subscriber received: every result, in order per stream, with the schema.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A broker process on a free port, killed when dropped.
struct Broker {
    name: &'static str,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl Broker {
    fn start(name: &'static str, program: &str, args: Vec<String>, port: u16, dir: &Path) -> Self {
        let mut b = Broker {
            name,
            port,
            args: std::iter::once(program.to_string()).chain(args).collect(),
            child: None,
            log: dir.join(format!("{name}.log")),
        };
        b.restart();
        b
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.args[0])
            .args(&self.args[1..])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (run ./setup.sh): {e}", self.args[0]));
        self.child = Some(child);
        assert!(
            wait_listening(self.port, Duration::from_secs(15)),
            "{} did not listen on {}: {}",
            self.name,
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Stops the broker: SIGKILL, or SIGTERM when `graceful`.
    fn stop(&mut self, graceful: bool) {
        if let Some(mut c) = self.child.take() {
            if graceful {
                unsafe { libc_kill(c.id() as i32, 15) };
            } else {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        // Wait until the port is free again.
        let until = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop(false);
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A pipeline: streams `a` and `b` of `n` frames each at `fps` (0 = as fast as possible), a
/// pass-through stage, the sink under test, and a JSON lines file of the same results.
fn pipeline(dir: &Path, n: u32, fps: u32, sink: &str) -> PathBuf {
    let pace = if fps == 0 {
        "pace = \"fast\"".to_string()
    } else {
        format!("max_fps = {fps}")
    };
    let text = format!(
        "{}[[source]]\nname = \"a\"\nuri = \"test://ball\"\nnum_buffers = {n}\n{pace}\n\n\
         [[source]]\nname = \"b\"\nuri = \"test://snow\"\nnum_buffers = {n}\n{pace}\n\n\
         [[stage]]\nname = \"s\"\nmodel = \"noop\"\nmax_wait_ms = 1\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n\n{sink}",
        header("sinks", 600_000),
        dir.join("truth.jsonl").display()
    );
    write(dir, "p.toml", &text)
}

/// Runs the pipeline; returns the summary and stderr. Panics unless it exits 0.
fn run(p: &Path, env: &[(&str, &str)]) -> (Value, String) {
    let (status, summary, stderr) = run_status(p, env);
    assert!(status, "poolpipe run failed:\n{stderr}");
    (summary.expect("summary"), stderr)
}

fn run_status(p: &Path, env: &[(&str, &str)]) -> (bool, Option<Value>, String) {
    let summary = p.with_file_name("summary.json");
    let _ = std::fs::remove_file(&summary);
    let out = Command::new(bin())
        .args([
            "run",
            p.to_str().unwrap(),
            "--api",
            "127.0.0.1:0",
            "--summary-json",
        ])
        .arg(&summary)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let s = std::fs::read_to_string(&summary)
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap());
    (out.status.success(), s, stderr)
}

/// Runs the pipeline while the broker goes away `after_ms` into the run for `down_ms`
/// (SIGKILL, or SIGTERM when `graceful`) and comes back; returns the summary and stderr.
fn run_with_outage(
    p: &Path,
    broker: &mut Broker,
    after_ms: u64,
    down_ms: u64,
    graceful: bool,
) -> (Value, String) {
    let runner = {
        let p = p.to_path_buf();
        std::thread::spawn(move || run(&p, &[]))
    };
    std::thread::sleep(Duration::from_millis(after_ms));
    broker.stop(graceful);
    std::thread::sleep(Duration::from_millis(down_ms));
    broker.restart();
    runner.join().unwrap()
}

/// The outage runs (2 x 150 live frames at 50 fps) publish what they ingest, all but a few
/// frames a loaded machine's sources may drop (counted): the sink must deliver every result
/// published (`published`, the ground-truth file's), whatever that number is.
fn assert_published_nearly_all(summary: &Value, published: usize) {
    let streams = summary["streams"].as_array().unwrap();
    let total = |k: &str| streams.iter().map(|s| n(s, k)).sum::<u64>();
    assert_eq!(total("published"), published as u64, "{summary}");
    assert!(
        published >= 290,
        "only {published} of 300 published: {summary}"
    );
}

/// The sink's counters from a summary.
fn sink_counters(summary: &Value, name: &str) -> Value {
    summary["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no sink {name} in {summary}"))
        .clone()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Checks a sink's accounting identity and returns (delivered, dropped_overflow, resent).
fn sink_balance(summary: &Value, name: &str) -> (u64, u64, u64) {
    let s = sink_counters(summary, name);
    assert_eq!(
        n(&s, "offered") + n(&s, "recovered"),
        n(&s, "delivered")
            + n(&s, "dropped_overflow")
            + n(&s, "dropped_rejected")
            + n(&s, "dropped_corrupt")
            + n(&s, "left_at_shutdown")
            + n(&s, "buffered"),
        "sink accounting broken: {s}"
    );
    (
        n(&s, "delivered"),
        n(&s, "dropped_overflow"),
        n(&s, "resent"),
    )
}

/// Every result of the ground-truth file, by (stream, seq).
fn truth(dir: &Path) -> BTreeMap<(String, u64), Value> {
    read_jsonl(&dir.join("truth.jsonl"))
        .into_iter()
        .map(|v| {
            (
                (
                    v["stream"].as_str().unwrap().to_string(),
                    v["seq"].as_u64().unwrap(),
                ),
                v,
            )
        })
        .collect()
}

/// Checks received results against the truth. `exact`: no duplicates allowed and every result
/// expected. Returns the number of duplicates.
fn check_received(
    received: &[Value],
    truth: &BTreeMap<(String, u64), Value>,
    exact: bool,
) -> usize {
    let mut seen: HashMap<(String, u64), usize> = HashMap::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    for v in received {
        for key in [
            "pipeline",
            "stream",
            "seq",
            "captured_at",
            "latency_ms",
            "results",
        ] {
            assert!(v.get(key).is_some(), "result without `{key}`: {v}");
        }
        let stream = v["stream"].as_str().unwrap().to_string();
        let seq = v["seq"].as_u64().unwrap();
        let first = !seen.contains_key(&(stream.clone(), seq));
        *seen.entry((stream.clone(), seq)).or_default() += 1;
        if first {
            // First deliveries come in order per stream; a resend may repeat earlier ones.
            if let Some(prev) = last.get(&stream) {
                assert!(seq > *prev, "stream {stream}: seq {seq} after {prev}");
            }
            last.insert(stream.clone(), seq);
            assert_eq!(
                Some(v),
                truth.get(&(stream.clone(), seq)),
                "result differs from the JSON lines file"
            );
        }
    }
    let missing: Vec<_> = truth.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} results never arrived, e.g. {:?}",
        missing.len(),
        truth.len(),
        &missing[..missing.len().min(5)]
    );
    let dups = received.len() - seen.len();
    if exact {
        assert_eq!(dups, 0, "duplicates without any outage");
    }
    dups
}

// ---------------------------------------------------------------------------------------------
// MQTT

fn mosquitto(dir: &Path, password: Option<(&str, &str)>) -> Broker {
    let port = free_port();
    let data = dir.join("mosquitto-data");
    std::fs::create_dir_all(&data).unwrap();
    // Started as root, mosquitto drops to its own user, which must be able to save its database.
    use std::os::unix::fs::PermissionsExt;
    for d in [dir, data.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mut conf = format!(
        "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\n\
         max_queued_messages 100000\n",
        data.display()
    );
    match password {
        Some((user, pw)) => {
            let file = dir.join("passwd");
            let st = Command::new("mosquitto_passwd")
                .args(["-c", "-b"])
                .arg(&file)
                .args([user, pw])
                .status()
                .expect("mosquitto_passwd (run ./setup.sh)");
            assert!(st.success());
            conf += &format!("allow_anonymous false\npassword_file {}\n", file.display());
        }
        None => conf += "allow_anonymous true\n",
    }
    let cfg = write(dir, "mosquitto.conf", &conf);
    Broker::start(
        "mosquitto",
        "mosquitto",
        vec!["-c".into(), cfg.to_str().unwrap().into()],
        port,
        dir,
    )
}

/// `mosquitto_sub` with a persistent QoS 1 session, restarted whenever it exits (the broker
/// went away); collects payloads.
struct MqttSubscriber {
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MqttSubscriber {
    fn start(port: u16, topic: &str) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, s, topic) = (lines.clone(), stop.clone(), topic.to_string());
        let ready = Arc::new(std::sync::Barrier::new(2));
        let r = ready.clone();
        let thread = std::thread::spawn(move || {
            let mut first = true;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let mut child = Command::new("mosquitto_sub")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", &topic])
                    .args(["-q", "1", "-c", "-i", "poolpipe-test-sub", "-v"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("mosquitto_sub (run ./setup.sh)");
                let out = child.stdout.take().unwrap();
                let l2 = l.clone();
                let reader = std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        l2.lock().unwrap().push(line);
                    }
                });
                if first {
                    // Give it time to subscribe before frames flow.
                    std::thread::sleep(Duration::from_millis(500));
                    r.wait();
                    first = false;
                }
                while !s.load(std::sync::atomic::Ordering::SeqCst) {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        ready.wait();
        Self {
            lines,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until `count` messages arrived (or 20 s), then stops; returns the payloads.
    fn finish(mut self, count: usize) -> Vec<Value> {
        let until = Instant::now() + Duration::from_secs(20);
        while self.lines.lock().unwrap().len() < count && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Anything late (duplicates) gets a moment too.
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let lines = self.lines.lock().unwrap().clone();
        lines
            .iter()
            .map(|l| {
                let (topic, payload) = l.split_once(' ').unwrap();
                let v: Value = serde_json::from_str(payload).unwrap();
                assert_eq!(
                    topic,
                    format!("cams/{}/results", v["stream"].as_str().unwrap())
                );
                v
            })
            .collect()
    }
}

fn mqtt_sink(port: u16, extra: &str) -> String {
    format!(
        "[[sink]]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic = \"cams/{{stream}}/results\"\n\
         retry_initial_ms = 50\nretry_max_ms = 500\nflush_timeout_ms = 15000\n{extra}\n"
    )
}

#[test]
fn mqtt_delivers_every_result_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = mosquitto(dir.path(), None);
    let sub = MqttSubscriber::start(broker.port, "cams/#");
    let p = pipeline(dir.path(), 60, 0, &mqtt_sink(broker.port, ""));
    let (summary, _) = run(&p, &[]);
    let truth = truth(dir.path());
    assert_eq!(truth.len(), 120);
    let got = sub.finish(truth.len());
    check_received(&got, &truth, true);
    let (delivered, dropped, _) = sink_balance(&summary, "mqtt");
    assert_eq!((delivered, dropped), (120, 0));
}

#[test]
fn mqtt_outage_buffers_and_delivers_everything_after_the_broker_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = mosquitto(dir.path(), None);
    let sub = MqttSubscriber::start(broker.port, "cams/#");
    // 2 x 150 frames at 50 fps: 3 s; the broker is away from 0.8 s to 2.0 s.
    let p = pipeline(dir.path(), 150, 50, &mqtt_sink(broker.port, ""));
    // mosquitto keeps queued messages for offline subscribers only across a clean stop, so it
    // is stopped with SIGTERM (for poolpipe the outage looks the same: refused connections).
    let (summary, stderr) = run_with_outage(&p, &mut broker, 800, 1200, true);
    let truth = truth(dir.path());
    assert_published_nearly_all(&summary, truth.len());
    let got = sub.finish(truth.len());
    let dups = check_received(&got, &truth, false);
    let (delivered, dropped, resent) = sink_balance(&summary, "mqtt");
    assert_eq!(
        (delivered, dropped),
        (truth.len() as u64, 0),
        "{}",
        sink_counters(&summary, "mqtt")
    );
    // Duplicates come from poolpipe's resends and, on the broker-to-subscriber leg, from the
    // subscriber's QoS 1 messages in flight when the broker stopped (mosquitto allows 20).
    assert!(
        dups as u64 <= resent + 20,
        "{dups} duplicates arrived; poolpipe counted {resent} resent"
    );
    assert!(
        n(&sink_counters(&summary, "mqtt"), "retries") > 0,
        "no retry seen:\n{stderr}"
    );
    assert!(stderr.contains("Sink delivering again"), "{stderr}");
}

#[test]
fn a_long_outage_overflows_the_buffer_and_the_drops_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = mosquitto(dir.path(), None);
    let sink = mqtt_sink(broker.port, "buffer = 20\nwhen_full = \"drop_oldest\"");
    let p = pipeline(dir.path(), 150, 50, &sink);
    let (summary, stderr) = run_with_outage(&p, &mut broker, 500, 2000, false);
    let (delivered, dropped, _) = sink_balance(&summary, "mqtt");
    assert!(
        dropped >= 40,
        "a 2 s outage at 100 results/s should overflow 20: {dropped}"
    );
    assert!(delivered >= 50, "{}", sink_counters(&summary, "mqtt"));
    assert!(stderr.contains("Sink buffer full"), "{stderr}");
    // The pipeline itself did not stall: every frame was published on time.
    for s in assert_balanced(&summary).values() {
        assert_eq!(s["published"], s["ingested"], "{s}");
    }
}

#[test]
fn a_wrong_mqtt_password_is_a_clear_error_that_never_shows_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let broker = mosquitto(dir.path(), Some(("camera", "right-pass-123")));
    let sink = mqtt_sink(
        broker.port,
        "name = \"alarms\"\nusername = \"camera\"\npassword_env = \"POOLPIPE_TEST_MQTT_PW\"",
    );
    let p = pipeline(dir.path(), 5, 0, &sink);
    let (ok, _, stderr) = run_status(&p, &[("POOLPIPE_TEST_MQTT_PW", "wrong-pass-456")]);
    assert!(!ok, "ran with a wrong password:\n{stderr}");
    assert!(stderr.contains("sink alarms"), "{stderr}");
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(
        !stderr.contains("wrong-pass-456"),
        "password in the log:\n{stderr}"
    );
    // The right one works, and is not printed either.
    let (summary, stderr) = run(&p, &[("POOLPIPE_TEST_MQTT_PW", "right-pass-123")]);
    assert_eq!(sink_balance(&summary, "alarms").0, 10);
    assert!(!stderr.contains("right-pass-123"), "{stderr}");
    // `poolpipe check` tells which sink fails and why.
    let out = Command::new(bin())
        .args(["check", p.to_str().unwrap()])
        .env("POOLPIPE_TEST_MQTT_PW", "wrong-pass-456")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("alarms") && text.contains("FAILED"), "{text}");
    assert!(text.contains("jsonl") && text.contains("ok"), "{text}");
    assert!(!text.contains("wrong-pass-456"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Redis

fn redis(dir: &Path, password: Option<&str>) -> Broker {
    let port = free_port();
    let data = dir.join("redis-data");
    std::fs::create_dir_all(&data).unwrap();
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        data.to_str().unwrap(),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(pw) = password {
        args.extend(["--requirepass".to_string(), pw.to_string()]);
    }
    Broker::start("redis", "redis-server", args, port, dir)
}

/// Reads every entry of the Redis streams `cams:a` and `cams:b` with redis-cli.
fn redis_entries(port: u16) -> Vec<Value> {
    let mut out = Vec::new();
    for key in ["cams:a", "cams:b"] {
        let o = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--no-raw", "XRANGE", key, "-", "+"])
            .output()
            .expect("redis-cli (run ./setup.sh)");
        // Raw mode prints one field per line: id, then field/value pairs.
        let o2 = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--raw", "XRANGE", key, "-", "+"])
            .output()
            .unwrap();
        assert!(o.status.success());
        let text = String::from_utf8_lossy(&o2.stdout).to_string();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            if lines[i] == "result" && i + 1 < lines.len() {
                out.push(serde_json::from_str(lines[i + 1]).unwrap());
                i += 2;
            } else {
                i += 1;
            }
        }
    }
    out
}

fn redis_sink(port: u16, extra: &str) -> String {
    format!(
        "[[sink]]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\ntopic = \"cams:{{stream}}\"\n\
         retry_initial_ms = 50\nretry_max_ms = 500\nflush_timeout_ms = 15000\n{extra}\n"
    )
}

#[test]
fn redis_streams_get_every_result_and_survive_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = redis(dir.path(), None);
    // First without an outage: exact.
    let p = pipeline(dir.path(), 40, 0, &redis_sink(broker.port, ""));
    let (summary, _) = run(&p, &[]);
    let t = truth(dir.path());
    check_received(&redis_entries(broker.port), &t, true);
    assert_eq!(sink_balance(&summary, "redis").0, 80);
    // Then killed (SIGKILL; the append-only file keeps what it acknowledged) and restarted.
    let _ = Command::new("redis-cli")
        .args(["-p", &broker.port.to_string(), "DEL", "cams:a", "cams:b"])
        .output();
    let p = pipeline(dir.path(), 150, 50, &redis_sink(broker.port, ""));
    let (summary, _) = run_with_outage(&p, &mut broker, 800, 1200, false);
    let t = truth(dir.path());
    assert_published_nearly_all(&summary, t.len());
    let dups = check_received(&redis_entries(broker.port), &t, false);
    let (delivered, dropped, resent) = sink_balance(&summary, "redis");
    assert_eq!((delivered, dropped), (t.len() as u64, 0));
    assert!(dups as u64 <= resent, "{dups} duplicates, {resent} counted");
    assert!(n(&sink_counters(&summary, "redis"), "retries") > 0);
}

#[test]
fn a_wrong_redis_password_is_refused_at_start_without_printing_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = redis(dir.path(), Some("redis-right-777"));
    let sink = redis_sink(broker.port, "password_env = \"POOLPIPE_TEST_REDIS_PW\"");
    let p = pipeline(dir.path(), 5, 0, &sink);
    let (ok, _, stderr) = run_status(&p, &[("POOLPIPE_TEST_REDIS_PW", "redis-wrong-888")]);
    assert!(!ok);
    assert!(stderr.contains("sink redis"), "{stderr}");
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(!stderr.contains("redis-wrong-888"), "{stderr}");
    let (summary, _) = run(&p, &[("POOLPIPE_TEST_REDIS_PW", "redis-right-777")]);
    assert_eq!(sink_balance(&summary, "redis").0, 10);
}

// ---------------------------------------------------------------------------------------------
// NATS

fn nats(dir: &Path) -> Broker {
    let port = free_port();
    let store = dir.join("nats-store");
    Broker::start(
        "nats",
        "nats-server",
        poolpipe::bench::sinks::nats_args(port, &store),
        port,
        dir,
    )
}

/// Every message of a JetStream stream, read with async-nats.
fn jetstream_messages(port: u16, stream: &str) -> Vec<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream(stream).await.unwrap();
        let last = s.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = s.get_raw_message(seq).await {
                out.push(serde_json::from_slice(&m.payload).unwrap());
            }
        }
        out
    })
}

/// A core NATS subscriber collecting `count` payloads (or for 20 s) in a thread.
fn nats_subscribe(port: u16, subject: &str, count: usize) -> std::thread::JoinHandle<Vec<Value>> {
    let subject = subject.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        use futures_util::StreamExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
                .await
                .unwrap();
            let mut sub = client.subscribe(subject).await.unwrap();
            client.flush().await.unwrap();
            tx.send(()).unwrap();
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            let mut got = Vec::new();
            while got.len() < count {
                match tokio::time::timeout_at(until, sub.next()).await {
                    Ok(Some(m)) => got.push(serde_json::from_slice(&m.payload).unwrap()),
                    _ => break,
                }
            }
            got
        })
    });
    rx.recv().unwrap();
    t
}

fn nats_sink(port: u16, extra: &str) -> String {
    format!(
        "[[sink]]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:{port}\"\ntopic = \"cams.{{stream}}.results\"\n\
         retry_initial_ms = 50\nretry_max_ms = 500\nflush_timeout_ms = 15000\n{extra}\n"
    )
}

#[test]
fn nats_jetstream_gets_every_result_once_even_across_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = nats(dir.path());
    let sink = nats_sink(broker.port, "jetstream = true\nstream = \"CAMS\"");
    let p = pipeline(dir.path(), 150, 50, &sink);
    let (summary, _) = run_with_outage(&p, &mut broker, 800, 1200, false);
    let t = truth(dir.path());
    let got = jetstream_messages(broker.port, "CAMS");
    // The message ids let JetStream drop the resends: exactly once in the stream.
    check_received(&got, &t, true);
    assert_published_nearly_all(&summary, t.len());
    let (delivered, dropped, _) = sink_balance(&summary, "nats");
    assert_eq!((delivered, dropped), (t.len() as u64, 0));
    assert!(n(&sink_counters(&summary, "nats"), "retries") > 0);
}

#[test]
fn core_nats_subscribers_get_every_result_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = nats(dir.path());
    let sub = nats_subscribe(broker.port, "cams.>", 120);
    let p = pipeline(dir.path(), 60, 0, &nats_sink(broker.port, ""));
    let (summary, _) = run(&p, &[]);
    let t = truth(dir.path());
    check_received(&sub.join().unwrap(), &t, true);
    assert_eq!(sink_balance(&summary, "nats").0, 120);
}

// ---------------------------------------------------------------------------------------------
// HTTP webhook

/// A webhook receiver: answers each POST with the next status of `script` (then 200), records
/// the bodies it answered 2xx to and the Authorization headers it saw.
struct Webhook {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
    auth: Arc<Mutex<Vec<String>>>,
}

fn webhook(script: Vec<u16>) -> Webhook {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let auth = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
    let (b, a) = (bodies.clone(), auth.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (b, a, script) = (b.clone(), a.clone(), script.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap(),
                            "authorization" => a.lock().unwrap().push(v.trim().to_string()),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let status = script.lock().unwrap().pop_front().unwrap_or(200);
                    if (200..300).contains(&status) {
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        b.lock()
                            .unwrap()
                            .extend(v.as_array().unwrap().iter().cloned());
                    }
                    let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                    if w.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Webhook { port, bodies, auth }
}

fn http_sink(port: u16, extra: &str) -> String {
    format!(
        "[[sink]]\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/hook\"\nbatch = 16\n\
         token_env = \"POOLPIPE_TEST_TOKEN\"\nretry_initial_ms = 20\nretry_max_ms = 100\n{extra}\n"
    )
}

#[test]
fn the_webhook_gets_json_batches_retries_5xx_and_drops_what_it_refuses() {
    let dir = tempfile::tempdir().unwrap();
    // Two 503s (retried), then one 400 (that batch is refused for good), then 200s.
    let hook = webhook(vec![503, 503, 400]);
    let p = pipeline(dir.path(), 40, 0, &http_sink(hook.port, ""));
    let (summary, stderr) = run(&p, &[("POOLPIPE_TEST_TOKEN", "tok-secret-1")]);
    let s = sink_counters(&summary, "http");
    sink_balance(&summary, "http");
    assert_eq!(n(&s, "retries"), 2, "{s}");
    let refused = n(&s, "dropped_rejected");
    assert!((1..=16).contains(&refused), "{s}");
    let got = hook.bodies.lock().unwrap().clone();
    assert_eq!(got.len() as u64 + refused, 80, "{s}");
    assert_eq!(n(&s, "delivered"), got.len() as u64);
    assert!(
        hook.auth
            .lock()
            .unwrap()
            .iter()
            .all(|a| a == "Bearer tok-secret-1")
    );
    assert!(!stderr.contains("tok-secret-1"), "{stderr}");
    assert!(stderr.contains("refused results"), "{stderr}");
    // What arrived is in order per stream and equal to the file's results.
    let t = truth(dir.path());
    let mut last: HashMap<String, u64> = HashMap::new();
    for v in &got {
        let (stream, seq) = (
            v["stream"].as_str().unwrap().to_string(),
            v["seq"].as_u64().unwrap(),
        );
        assert!(last.get(&stream).is_none_or(|p| seq > *p));
        last.insert(stream.clone(), seq);
        assert_eq!(Some(v), t.get(&(stream, seq)));
    }
}

#[test]
fn the_webhook_in_order_without_faults() {
    let dir = tempfile::tempdir().unwrap();
    let hook = webhook(vec![]);
    let p = pipeline(dir.path(), 50, 0, &http_sink(hook.port, ""));
    let (summary, _) = run(&p, &[("POOLPIPE_TEST_TOKEN", "t")]);
    let t = truth(dir.path());
    check_received(&hook.bodies.lock().unwrap(), &t, true);
    assert_eq!(sink_balance(&summary, "http").0, 100);
}

// ---------------------------------------------------------------------------------------------
// Kafka

#[test]
fn kafka_gets_every_result_in_order() {
    let Some(tansu) = poolpipe::bench::sinks::tansu(&root()) else {
        eprintln!("SKIPPED: no Kafka-compatible broker (tansu) installed; run ./setup.sh kafka");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Broker::start(
        "tansu",
        tansu.to_str().unwrap(),
        poolpipe::bench::sinks::tansu_args(port),
        port,
        dir.path(),
    );
    let sink = format!(
        "[[sink]]\ntype = \"kafka\"\nurl = \"kafka://127.0.0.1:{port}\"\ntopic = \"cams.{{stream}}\"\ncreate_topic = true\n"
    );
    let p = pipeline(dir.path(), 40, 0, &sink);
    let (summary, _) = run(&p, &[]);
    assert_eq!(sink_balance(&summary, "kafka").0, 80);
    let t = truth(dir.path());
    // Read both topics back from offset 0 with rskafka.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got: Vec<Value> = rt.block_on(async {
        use rskafka::client::partition::UnknownTopicHandling;
        let client = rskafka::client::ClientBuilder::new(vec![format!("127.0.0.1:{port}")])
            .build()
            .await
            .unwrap();
        let mut out = Vec::new();
        for topic in ["cams.a", "cams.b"] {
            let pc = client
                .partition_client(topic, 0, UnknownTopicHandling::Error)
                .await
                .unwrap();
            let mut offset = 0;
            loop {
                let (records, _high) = pc.fetch_records(offset, 1..1_000_000, 1_000).await.unwrap();
                if records.is_empty() {
                    break;
                }
                for r in records {
                    offset = r.offset + 1;
                    out.push(serde_json::from_slice(&r.record.value.unwrap()).unwrap());
                }
            }
        }
        out
    });
    check_received(&got, &t, true);
}

#[test]
fn a_blocking_sink_whose_broker_never_comes_does_not_hang_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens here
    let sink = format!(
        "[[sink]]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic = \"cams/{{stream}}\"\n\
         buffer = 5\nwhen_full = \"block\"\nflush_timeout_ms = 1000\nretry_max_ms = 200\n"
    );
    let p = pipeline(dir.path(), 30, 0, &sink);
    let t0 = Instant::now();
    let (summary, stderr) = run(&p, &[]);
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let s = sink_counters(&summary, "mqtt");
    sink_balance(&summary, "mqtt");
    assert_eq!(n(&s, "delivered"), 0);
    assert_eq!(n(&s, "offered"), 60);
    assert!(
        n(&s, "left_at_shutdown") > 0 && n(&s, "dropped_overflow") > 0,
        "{s}"
    );
    assert!(stderr.contains("undelivered results"), "{stderr}");
    // The file sink beside it got everything.
    assert_eq!(truth(dir.path()).len(), 60);
}

/// A private CA and a server certificate for 127.0.0.1, made with the openssl CLI.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let sh = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (run ./setup.sh)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=poolpipe-test-ca",
        "-days",
        "2",
    ]);
    sh(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    // mosquitto drops to its own user when started as root; it must read its key.
    use std::os::unix::fs::PermissionsExt;
    for f in ["server.key", "server.crt", "ca.crt"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

#[test]
fn mqtt_over_tls_checks_the_broker_against_the_given_ca() {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ca, cert, key) = make_certs(dir.path());
    let port = free_port();
    let conf = write(
        dir.path(),
        "mosquitto-tls.conf",
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    let _broker = Broker::start(
        "mosquitto-tls",
        "mosquitto",
        vec!["-c".into(), conf.to_str().unwrap().into()],
        port,
        dir.path(),
    );
    let sink = |ca_file: &Path| {
        format!(
            "[[sink]]\ntype = \"mqtt\"\nurl = \"mqtts://127.0.0.1:{port}\"\ntopic = \"cams/{{stream}}\"\n\
             tls_ca_file = \"{}\"\n",
            ca_file.display()
        )
    };
    let p = pipeline(dir.path(), 20, 0, &sink(&ca));
    let (summary, _) = run(&p, &[]);
    assert_eq!(sink_balance(&summary, "mqtt").0, 40);
    // A CA that did not sign the broker's certificate: refused at start, naming the sink.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = make_certs(other.path());
    let p = pipeline(dir.path(), 5, 0, &sink(&other_ca));
    let (ok, _, stderr) = run_status(&p, &[]);
    assert!(!ok, "connected to a broker its CA did not sign:\n{stderr}");
    assert!(
        stderr.contains("sink mqtt") && stderr.contains("TLS"),
        "{stderr}"
    );
}

#[test]
fn nats_over_tls_delivers_with_the_right_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path());
    let port = free_port();
    let _broker = Broker::start(
        "nats-tls",
        "nats-server",
        vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "--tls".into(),
            "--tlscert".into(),
            cert.to_str().unwrap().into(),
            "--tlskey".into(),
            key.to_str().unwrap().into(),
        ],
        port,
        dir.path(),
    );
    let sink = format!(
        "[[sink]]\ntype = \"nats\"\nurl = \"tls://127.0.0.1:{port}\"\ntopic = \"cams.{{stream}}\"\n\
         tls_ca_file = \"{}\"\n",
        ca.display()
    );
    let p = pipeline(dir.path(), 20, 0, &sink);
    let (summary, _) = run(&p, &[]);
    assert_eq!(sink_balance(&summary, "nats").0, 40);
}

#[test]
fn rule_events_reach_mqtt_on_their_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let broker = mosquitto(dir.path(), None);
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-t", "events/#", "-t", "cams/#", "-q", "1", "-v"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (run ./setup.sh)");
    let out = sub.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    // The people demo's detector and rules on the first 300 frames; only events go to MQTT.
    let demo = people_demo_fast();
    let text = demo.split("[[sink]]").next().unwrap().to_string()
        + &mqtt_sink(broker.port, "messages = \"events\"");
    let p = write(dir.path(), "people.toml", &text);
    let o = poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--max-frames",
        "300",
        "--api",
        "127.0.0.1:0",
        "--summary-json",
        dir.path().join("summary.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = read_summary(&dir.path().join("summary.json"));
    let events = summary["streams"][0]["events"].as_u64().unwrap() as usize;
    assert!(events >= 5, "{events} events");
    let until = Instant::now() + Duration::from_secs(20);
    while lines.lock().unwrap().len() < events && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = sub.kill();
    let _ = sub.wait();
    reader.join().unwrap();
    let got = lines.lock().unwrap().clone();
    assert_eq!(
        got.len(),
        events,
        "results must not reach a sink of events only"
    );
    for line in &got {
        let (topic, payload) = line.split_once(' ').unwrap();
        let v: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(
            topic,
            format!("events/north-gate/{}", v["rule"].as_str().unwrap()),
            "{v}"
        );
        assert!(v["event"].is_string() && v["seq"].is_u64(), "{v}");
    }
    let (delivered, dropped, _) = sink_balance(&summary, "mqtt");
    assert_eq!((delivered as usize, dropped), (events, 0));
}

// ---------------------------------------------------------------------------------------------
// Disk buffers: results survive `kill -9` while the broker is down.

/// A sink's counter in a running pipeline's `/status`.
fn live_sink_counter(api: u16, sink: &str, key: &str) -> Option<u64> {
    let mut r = ureq::get(&format!("http://127.0.0.1:{api}/status"))
        .call()
        .ok()?;
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
    v["sinks"].as_array()?.iter().find(|s| s["name"] == sink)?[key].as_u64()
}

/// Runs `p` until `count` results were offered to sink `sink` and the JSON lines file has them
/// all, then kills poolpipe with SIGKILL (no flush, no shutdown); returns its log.
fn run_and_kill(p: &Path, sink: &str, count: u64) -> String {
    let api = free_port();
    let log = p.with_file_name("killed.log");
    let mut child = Command::new(bin())
        .args([
            "run",
            p.to_str().unwrap(),
            "--api",
            &format!("127.0.0.1:{api}"),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(240);
    loop {
        let offered = live_sink_counter(api, sink, "offered").unwrap_or(0);
        let written = live_sink_counter(api, "jsonl", "delivered").unwrap_or(0);
        if offered >= count && written >= count {
            break;
        }
        let log = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            child.try_wait().unwrap().is_none(),
            "poolpipe exited before it was killed:\n{}",
            log()
        );
        assert!(
            Instant::now() < until,
            "{offered} of {count} offered:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::read_to_string(&log).unwrap_or_default()
}

/// Checks what arrived after a crash and a restart. Per stream, results arrive in order: the
/// first run's (as its JSON lines file holds them), then the second run's, each exactly as
/// written (nothing garbled), less `lost` of the first run's (corrupted on disk). Returns the
/// number of duplicates.
fn check_recovered(received: &[Value], first: &[Value], second: &[Value], lost: usize) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    for v in received {
        let text = v.to_string();
        if seen.insert(text.clone()) {
            got.entry(v["stream"].as_str().unwrap().to_string())
                .or_default()
                .push(text);
        }
    }
    let dups = received.len() - seen.len();
    let mut missing = 0;
    for stream in ["a", "b"] {
        let of = |run: &[Value]| -> Vec<String> {
            run.iter()
                .filter(|v| v["stream"] == stream)
                .map(Value::to_string)
                .collect()
        };
        let (one, two) = (of(first), of(second));
        assert!(
            !one.is_empty() && !two.is_empty(),
            "stream {stream} had no results"
        );
        let expected: Vec<&String> = one.iter().chain(two.iter()).collect();
        let got = got.remove(stream).unwrap_or_default();
        // `got` must be `expected` with some of the first run's left out, in order.
        let mut i = 0;
        for (k, g) in got.iter().enumerate() {
            while i < expected.len() && expected[i] != g {
                assert!(
                    i < one.len(),
                    "stream {stream}: result {k} of the second run missing or out of order"
                );
                missing += 1;
                i += 1;
            }
            assert!(
                i < expected.len(),
                "stream {stream}: result {k} is not one that was published, or out of order: {g}"
            );
            i += 1;
        }
        assert_eq!(
            i,
            expected.len(),
            "stream {stream}: the last results never arrived"
        );
    }
    assert!(got.is_empty(), "results of unknown streams: {got:?}");
    assert_eq!(missing, lost, "results missing after the restart");
    dups
}

fn disk_sink(head: &str) -> String {
    format!(
        "[[sink]]\n{head}\nbuffer_type = \"disk\"\nretry_initial_ms = 50\nretry_max_ms = 500\n\
         flush_timeout_ms = 60000\n"
    )
}

/// With the broker stopped, runs a pipeline of 2 x `n` results to the disk-buffered sink
/// `head` (its type names it) and kills it with SIGKILL once they are all offered. Returns the
/// pipeline and the results it published.
fn crash_during_outage(
    dir: &Path,
    broker: &mut Broker,
    head: &str,
    n: u32,
) -> (PathBuf, Vec<Value>) {
    broker.stop(true);
    let kind = head.split('"').nth(1).unwrap();
    let p = pipeline(dir, n, 0, &disk_sink(head));
    run_and_kill(&p, kind, 2 * u64::from(n));
    let first = read_jsonl(&dir.join("truth.jsonl"));
    assert_eq!(first.len(), 2 * n as usize);
    (p, first)
}

#[test]
fn a_disk_buffer_delivers_after_kill_9_what_the_broker_never_got() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = mosquitto(dir.path(), None);
    let head = format!(
        "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\ntopic = \"cams/{{stream}}/results\"",
        broker.port
    );
    let (p, first) = crash_during_outage(dir.path(), &mut broker, &head, 2500);
    let buffer = dir.path().join("poolpipe-data/sinks/mqtt");
    assert!(
        buffer.join("lock").is_file(),
        "no buffer in {}",
        buffer.display()
    );

    // The broker is back; the same pipeline again.
    broker.restart();
    let sub = MqttSubscriber::start(broker.port, "cams/#");
    let (summary, _) = run(&p, &[]);
    let second = read_jsonl(&dir.path().join("truth.jsonl"));
    assert_eq!(second.len(), 5000);
    let got = sub.finish(10_000);
    let dups = check_recovered(&got, &first, &second, 0);
    let s = sink_counters(&summary, "mqtt");
    assert_eq!(n(&s, "recovered"), 5000, "{s}");
    assert_eq!(n(&s, "delivered"), 10_000, "{s}");
    assert_eq!(n(&s, "dropped_corrupt"), 0, "{s}");
    sink_balance(&summary, "mqtt");
    // Nothing reached the broker before the kill: no duplicates from the first run, and any
    // from the second's own retries are counted.
    assert!(
        dups as u64 <= n(&s, "resent") + 20,
        "{dups} duplicates: {s}"
    );
}

#[test]
fn a_torn_tail_and_a_flipped_byte_lose_only_those_records_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = redis(dir.path(), None);
    let head = format!(
        "type = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\ntopic = \"cams:{{stream}}\"",
        broker.port
    );
    let (p, first) = crash_during_outage(dir.path(), &mut broker, &head, 2500);
    // The crash tore the last record, and a byte in the middle flipped.
    let buffer = dir.path().join("poolpipe-data/sinks/redis");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&buffer)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let mut data = std::fs::read(&segs[0]).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x10;
    std::fs::write(&segs[0], &data).unwrap();
    let last = segs.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    assert!(len > 100, "{} is {len} bytes", last.display());
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - 37)
        .unwrap();

    broker.restart();
    let (summary, stderr) = run(&p, &[]);
    let second = read_jsonl(&dir.path().join("truth.jsonl"));
    let got = redis_entries(broker.port);
    let dups = check_recovered(&got, &first, &second, 2);
    let s = sink_counters(&summary, "redis");
    assert_eq!(n(&s, "recovered"), 5000, "{s}");
    assert_eq!(n(&s, "dropped_corrupt"), 2, "{s}");
    assert_eq!(n(&s, "delivered"), 9998, "{s}");
    assert_eq!(dups, 0);
    sink_balance(&summary, "redis");
    assert!(stderr.contains("failed their checksum"), "{stderr}");
}

#[test]
fn a_disk_buffer_is_refused_to_a_second_process_and_a_bad_folder_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let sink = disk_sink("type = \"jsonl\"\nname = \"out\"\npath = \"/dev/null\"");
    // One process holds the buffer (its sources run for minutes)...
    let p = pipeline(dir.path(), 100_000, 20, &sink);
    let buffer = dir.path().join("poolpipe-data/sinks/out");
    let holder = Command::new(bin())
        .args(["run", p.to_str().unwrap(), "--api", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _holder = KillOnDrop(holder);
    let until = Instant::now() + Duration::from_secs(30);
    while !buffer.join("ack").is_file() {
        assert!(
            Instant::now() < until,
            "the first process never opened its buffer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...so a second one on the same file stops at start, naming the folder.
    let (ok, _, stderr) = run_status(&p, &[]);
    assert!(!ok, "a second process shared the buffer");
    assert!(
        stderr.contains("in use by another poolpipe process"),
        "{stderr}"
    );
    assert!(stderr.contains(&buffer.display().to_string()), "{stderr}");

    // A data folder that cannot be created stops the start too.
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, "").unwrap();
    let data = blocker.join("data");
    let (ok, _, stderr) = run_status(&p, &[("POOLPIPE_DATA_DIR", data.to_str().unwrap())]);
    assert!(!ok, "started without its buffer folder");
    let folder = data.join("sinks/out");
    assert!(
        stderr.contains(&folder.display().to_string()),
        "the error does not name {}:\n{stderr}",
        folder.display()
    );
}
