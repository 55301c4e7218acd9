//! Helpers shared by the integration tests: paths, running the binary, reading its output.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The poolpipe binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_poolpipe"))
}

/// Fails with a clear message when ./setup.sh has not been run.
pub fn require(path: &str) -> PathBuf {
    let p = root().join(path);
    assert!(
        p.exists(),
        "{} is missing: run ./setup.sh first",
        p.display()
    );
    p
}

/// A pipeline header whose model names resolve to the repository's engines/.
pub fn header(name: &str, slo_ms: u64) -> String {
    format!(
        "[pipeline]\nname = \"{name}\"\nslo_ms = {slo_ms}\nengines_dir = \"{}\"\n\n",
        root().join("engines").display()
    )
}

/// Writes `text` as `name` in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `poolpipe` with these arguments, run to completion.
pub fn poolpipe(args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env("RUST_LOG", "info");
    // Where the published profiles are, for commands that default to POOLPIPE_PROFILES.
    let shared = root().join("../shared/data/ppipe-profiles");
    if shared.is_dir() {
        c.env("POOLPIPE_PROFILES", shared);
    }
    c.output().expect("run poolpipe")
}

/// `poolpipe run PIPELINE` with the API on a free port (for `duration` seconds, else until its
/// sources end) writing its summary beside the pipeline file; asserts that it succeeded and
/// returns the summary.
pub fn run_summarized(pipeline: &Path, duration: Option<&str>) -> Value {
    let summary = pipeline.with_file_name("summary.json");
    let mut args = vec!["run", pipeline.to_str().unwrap(), "--api", "127.0.0.1:0"];
    if let Some(d) = duration {
        args.extend(["--duration", d]);
    }
    args.extend(["--summary-json", summary.to_str().unwrap()]);
    let o = poolpipe(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    read_summary(&summary)
}

/// Reads a JSON lines file.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Reads a `--summary-json` file.
pub fn read_summary(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("summary written")).unwrap()
}

/// Asserts `ingested = published + dropped_late + dropped_overload + failed + lost` for every
/// stream, and returns the streams' counters by name.
pub fn assert_balanced(summary: &Value) -> std::collections::HashMap<String, Value> {
    let mut out = std::collections::HashMap::new();
    for s in summary["streams"].as_array().unwrap() {
        let n = |k: &str| s[k].as_u64().unwrap();
        assert_eq!(
            n("ingested"),
            n("published") + n("dropped_late") + n("dropped_overload") + n("failed") + n("lost"),
            "accounting identity broken for {s}"
        );
        out.insert(s["name"].as_str().unwrap().to_string(), s.clone());
    }
    out
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on the port.
pub fn wait_listening(port: u16, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A child process killed when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `poolpipe serve-rtsp MEDIA --port PORT` and waits until it listens.
pub fn start_rtsp_server(media: &str, port: u16) -> KillOnDrop {
    let child = Command::new(bin())
        .args(["serve-rtsp", media, "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve-rtsp");
    let server = KillOnDrop(child);
    assert!(
        wait_listening(port, Duration::from_secs(10)),
        "RTSP server did not start on port {port}"
    );
    server
}

/// The published profiles beside the repository (`../shared/data/ppipe-profiles`). Their README
/// asks readers to skip with a clear message when they are absent, so callers return early then.
pub fn shared_profiles() -> Option<PathBuf> {
    let d = root().join("../shared/data/ppipe-profiles");
    if d.is_dir() {
        Some(d)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; this test needs the published profiles",
            d.display()
        );
        None
    }
}

/// `pipelines/people.toml` as shipped, but reading the sample as fast as it decodes, with a
/// generous SLO and absolute paths (so it runs from a temporary folder).
pub fn people_demo_fast() -> String {
    std::fs::read_to_string(root().join("pipelines/people.toml"))
        .unwrap()
        .replace(
            "../samples/campus.mp4",
            require("samples/campus.mp4").to_str().unwrap(),
        )
        .replace("pace = \"realtime\"", "pace = \"fast\"")
        .replace(
            "slo_ms = 2000",
            &format!(
                "slo_ms = 60000\nengines_dir = \"{}\"",
                root().join("engines").display()
            ),
        )
}

/// One HTTP request: `(status, body)`.
pub fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        ("DELETE", _) => {
            let mut r = agent.delete(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        ("POST", b) => {
            let mut r = agent.post(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            let (ctype, text) = b.unwrap_or(("application/json", ""));
            r.header("Content-Type", ctype).send(text)
        }
        _ => unreachable!("{method}"),
    };
    let mut resp = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Starts `poolpipe run` with these extra arguments and waits for the API address it prints.
pub fn start(
    pipeline: &Path,
    summary: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (KillOnDrop, String) {
    let mut child: Child = Command::new(bin())
        .args(["run", pipeline.to_str().unwrap(), "--summary-json"])
        .arg(summary)
        .args(extra)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start poolpipe");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("HTTP API and metrics listening") {
                let url = line
                    .split("api=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(url);
                sent = true;
            }
            eprintln!("poolpipe: {line}");
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("poolpipe printed where its API listens");
    (KillOnDrop(child), url)
}

/// SIGTERM, then the exit status.
pub fn stop(child: KillOnDrop) -> std::process::ExitStatus {
    stop_with(child, "TERM")
}

/// Sends signal `sig` (`TERM`, `INT`) and waits (30 s at most) for the process to exit.
pub fn stop_with(mut child: KillOnDrop, sig: &str) -> std::process::ExitStatus {
    let pid = child.0.id().to_string();
    Command::new("kill")
        .args([format!("-{sig}").as_str(), &pid])
        .status()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < until, "poolpipe did not stop on SIG{sig}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /status` of a running pipeline, as JSON.
pub fn status(api: &str) -> Value {
    let (code, body) = http("GET", &format!("{api}/status"), None, None);
    assert_eq!(code, 200, "{body}");
    json(&body)
}

/// `POST /streams` with this JSON definition: `(status, body)`.
pub fn add_stream(api: &str, definition: &str) -> (u16, String) {
    http(
        "POST",
        &format!("{api}/streams"),
        None,
        Some(("application/json", definition)),
    )
}

/// A pipeline file `NAME.toml` in `dir`: streams `left` (test://ball) and `right`
/// (test://smpte) at `fps`, a pass-through stage, results to `dir/out.jsonl`, then `extra`.
pub fn two_test_streams(dir: &Path, name: &str, fps: u32, extra: &str) -> PathBuf {
    write(
        dir,
        &format!("{name}.toml"),
        &format!(
            "{}[[source]]\nname = \"left\"\nuri = \"test://ball\"\nmax_fps = {fps}\n\n\
             [[source]]\nname = \"right\"\nuri = \"test://smpte\"\nmax_fps = {fps}\n\n\
             [[stage]]\nname = \"pass\"\nmodel = \"noop\"\n\n\
             [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n\n{extra}",
            header(name, 5_000),
            dir.join("out.jsonl").display()
        ),
    )
}

/// Waits (up to 60 s) until every stream of the running pipeline has published `n` frames;
/// returns its status then.
pub fn wait_published(api: &str, n: u64) -> Value {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(api);
        let streams = s["streams"].as_array().cloned().unwrap_or_default();
        if !streams.is_empty()
            && streams
                .iter()
                .all(|x| x["counters"]["published"].as_u64().unwrap_or(0) >= n)
        {
            return s;
        }
        assert!(Instant::now() < until, "streams did not publish: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Node `name` of a cluster front's summary (`nodes`).
pub fn node_of<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("no node {name} in {summary}"))
}

/// A plan of WideResNet-101-2 on L4:1,T4:2, and servers holding exactly those GPUs.
pub fn planned(dir: &Path, profiles: &Path) -> (PathBuf, PathBuf, PathBuf) {
    planned_flows(dir, profiles, &[("f0", "wide_resnet101_2")])
}

/// A plan on L4:1,T4:2 of the models of `flows` (flow, model), servers holding exactly those
/// GPUs, and a pipeline with one 10 fps `test://` camera per flow (`cam0`, ... when there is
/// one flow, `cam-FLOW` otherwise).
pub fn planned_flows(
    dir: &Path,
    profiles: &Path,
    flows: &[(&str, &str)],
) -> (PathBuf, PathBuf, PathBuf) {
    let plan = dir.join("plan.json");
    let models: Vec<&str> = flows.iter().map(|f| f.1).collect();
    let o = poolpipe(&[
        "plan",
        "--cluster",
        "L4:1,T4:2",
        "--models",
        &models.join(","),
        "--time-limit",
        "5",
        "--profiles",
        profiles.to_str().unwrap(),
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let servers = write(
        dir,
        "servers.toml",
        "[[servers]]\nname = \"l4\"\nclass = \"L4\"\ngpus = 1\nlink_gbps = 10\n\n[[servers]]\nname = \"t4\"\nclass = \"T4\"\ncount = 2\ngpus = 1\nlink_gbps = 10\n",
    );
    let mut text = format!(
        "[pipeline]\nname = \"planned\"\nslo_ms = 1000\nprofiles = \"{}\"\n",
        profiles.display()
    );
    for (flow, model) in flows {
        text += &format!("\n[[flow]]\nname = \"{flow}\"\nmodel = \"{model}\"\n");
    }
    for (i, (flow, _)) in flows.iter().enumerate() {
        let cam = if flows.len() == 1 {
            format!("cam{i}")
        } else {
            format!("cam-{flow}")
        };
        text += &format!(
            "\n[[source]]\nname = \"{cam}\"\nuri = \"test://ball\"\nmax_fps = 10\nflow = \"{flow}\"\n"
        );
    }
    text += &format!(
        "\n[[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        dir.join("out.jsonl").display()
    );
    let pipeline = write(dir, "planned.toml", &text);
    (plan, servers, pipeline)
}

/// `poolpipe deploy` of the plan, pipeline and servers, into `out`, with `extra` arguments.
pub fn deploy(
    files: &(PathBuf, PathBuf, PathBuf),
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    let (plan, servers, pipeline) = files;
    let mut args = vec![
        "deploy",
        "--plan",
        plan.to_str().unwrap(),
        "--pipeline",
        pipeline.to_str().unwrap(),
        "--servers",
        servers.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    poolpipe(&args)
}

/// Frames out of the stages whose names start with `prefix`, in a front's summary.
pub fn frames_out_of(summary: &Value, prefix: &str) -> u64 {
    summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["name"].as_str().unwrap().starts_with(prefix))
        .map(|x| x["frames_out"].as_u64().unwrap())
        .sum()
}

/// nats-server with JetStream (its store in `store`) on 127.0.0.1:`port`, listening.
pub fn start_nats(store: &Path, port: u16) -> KillOnDrop {
    let child = KillOnDrop(
        Command::new("nats-server")
            .args(poolpipe::bench::sinks::nats_args(port, store))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (./setup.sh installs it)"),
    );
    assert!(wait_listening(port, Duration::from_secs(10)));
    child
}

/// Waits (40 s at most) for a front whose front lease another front took to stop: it exits
/// with an error, its summary says the lease was lost, and its accounting balances.
pub fn assert_deposed(front: &mut KillOnDrop, summary: &Path) {
    let until = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = front.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "the deposed front kept running");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "a deposed front exited with {status}");
    let s = read_summary(summary);
    assert_eq!(s["front_lease"]["lost"], true, "{s}");
    assert_balanced(&s);
}
