//! The HTTP API and metrics of a running pipeline, against the real binary: streams added and
//! removed live, reload, validation errors, the bearer token off loopback, `/metrics`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_balanced, bin, header, http, json, read_summary, start, stop, write};
use serde_json::Value;

/// Published frames of each stream, from `/status`.
fn published(api: &str) -> std::collections::HashMap<String, u64> {
    common::status(api)["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["counters"]["published"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A stream's state in `/status` (`absent` when it is not listed).
fn state_of(api: &str, stream: &str, token: Option<&str>) -> String {
    let (_, body) = http("GET", &format!("{api}/status"), token, None);
    json(&body)["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stream)
        .map_or("absent".into(), |s| {
            s["state"].as_str().unwrap().to_string()
        })
}

/// The value of one sample in a metrics page (`name{labels}` exactly as printed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn source(name: &str) -> String {
    format!("[[source]]\nname = \"{name}\"\nuri = \"test://ball\"\nmax_fps = 10\n\n")
}

fn pipeline_text(slo_ms: u64, max_batch: u32, out: &Path) -> String {
    format!(
        "{}{}{}[[stage]]\nname = \"pass\"\nmodel = \"noop\"\nmax_batch = {max_batch}\nmax_wait_ms = 5\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        header("live", slo_ms),
        source("a"),
        source("b"),
        out.display()
    )
}

/// Frames per second of each stream over `secs`.
fn rates(api: &str, secs: f64) -> std::collections::HashMap<String, f64> {
    let before = published(api);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let after = published(api);
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - before.get(k).copied().unwrap_or(0)) as f64 / secs,
            )
        })
        .collect()
}

#[test]
fn streams_come_and_go_through_the_api_and_a_reload_applies_a_new_slo() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let summary = dir.path().join("summary.json");
    let p = write(dir.path(), "live.toml", &pipeline_text(5000, 8, &out));
    let (child, api) = start(&p, &summary, &["--api", "127.0.0.1:0", "--serve"], &[]);
    assert!(api.starts_with("http://127.0.0.1:"), "{api}");

    let (code, body) = http("GET", &format!("{api}/health"), None, None);
    assert_eq!((code, json(&body)["status"].as_str()), (200, Some("ok")));
    std::thread::sleep(Duration::from_secs(2));
    let before = rates(&api, 4.0);
    for s in ["a", "b"] {
        assert!(
            before[s] > 5.0,
            "stream {s} runs at about 10 fps: {before:?}"
        );
    }
    // The flow's demand: two steady 10 fps streams.
    let demand = common::status(&api)["flows"][0]["demand"].clone();
    let fps = demand["fps_10s"].as_f64().unwrap();
    let expected = before["a"] + before["b"];
    assert!(
        (fps - expected).abs() < 0.25 * expected,
        "demand {demand} vs published {before:?}"
    );
    let dispersion = demand["dispersion_10s"].as_f64().unwrap();
    assert!(dispersion < 1.0, "steady cameras are not bursty: {demand}");

    // Add a third stream while the two run.
    let (code, body) = common::add_stream(
        &api,
        r#"{"name": "c", "uri": "test://ball", "max_fps": 10}"#,
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = http(
        "POST",
        &format!("{api}/streams"),
        None,
        Some(("application/json", r#"{"name": "c", "uri": "test://snow"}"#)),
    );
    assert_eq!(code, 409, "a running name is refused: {body}");
    std::thread::sleep(Duration::from_secs(2));
    let with_c = rates(&api, 4.0);
    assert!(with_c["c"] > 5.0, "the added stream publishes: {with_c:?}");

    // Remove one: it stops, the others keep their rate.
    let (code, body) = http("DELETE", &format!("{api}/streams/a"), None, None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(state_of(&api, "a", None), "removed");
    let (code, _) = http("DELETE", &format!("{api}/streams/a"), None, None);
    assert_eq!(code, 404);
    std::thread::sleep(Duration::from_secs(1)); // frames of `a` already in flight finish
    let after = rates(&api, 4.0);
    assert_eq!(
        after["a"], 0.0,
        "a removed stream publishes nothing: {after:?}"
    );
    for s in ["b", "c"] {
        let ratio = after[s] / before["b"];
        assert!(
            (0.75..=1.3).contains(&ratio),
            "stream {s} kept its frame rate: {:.1} fps after vs {:.1} before",
            after[s],
            before["b"]
        );
    }

    // Metrics: per-stream outcomes, histograms, sink counters, in the OpenMetrics text format.
    let (code, metrics) = http("GET", &format!("{api}/metrics"), None, None);
    assert_eq!(code, 200);
    assert!(
        metrics.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    let pub_b = sample(
        &metrics,
        r#"poolpipe_stream_frames_total{stream="b",outcome="published"}"#,
    )
    .expect("published frames of b");
    assert!(pub_b > 50.0, "{pub_b}");
    assert_eq!(
        sample(&metrics, r#"poolpipe_stream_up{stream="a"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, r#"poolpipe_stream_up{stream="c"}"#),
        Some(1.0)
    );
    let batches = sample(&metrics, r#"poolpipe_stage_batches_total{stage="pass"}"#).unwrap();
    let sizes = sample(&metrics, r#"poolpipe_stage_batch_size_count{stage="pass"}"#).unwrap();
    assert!(batches > 0.0);
    assert!(
        (sizes - batches).abs() <= 2.0,
        "every batch is in the size histogram: {sizes} vs {batches}"
    );
    let e2e_count = sample(&metrics, "poolpipe_end_to_end_latency_seconds_count").unwrap();
    let e2e_inf = sample(
        &metrics,
        r#"poolpipe_end_to_end_latency_seconds_bucket{le="+Inf"}"#,
    )
    .unwrap();
    assert_eq!(e2e_count, e2e_inf);
    let offered = sample(
        &metrics,
        r#"poolpipe_sink_messages_total{sink="jsonl",outcome="offered"}"#,
    )
    .expect("sink counters are exported");
    assert!(
        offered >= pub_b,
        "the sink was offered every published frame: {offered} vs {pub_b} of b"
    );
    assert_eq!(sample(&metrics, "poolpipe_slo_seconds"), Some(5.0));
    let rate = sample(
        &metrics,
        r#"poolpipe_flow_arrival_rate{flow="live",window="10s"}"#,
    )
    .expect("the flow's arrival rate is exported");
    assert!(rate > 10.0, "{rate}");

    // An invalid definition gets a 400 with the text `poolpipe validate` prints for it.
    let bad = r#"{"name": "bad", "uri": "test://ball", "max_fps": 5000, "fps": 3}"#;
    let (code, body) = http(
        "POST",
        &format!("{api}/streams"),
        None,
        Some(("application/json", bad)),
    );
    assert_eq!(code, 400, "{body}");
    let api_text = json(&body)["error"].as_str().unwrap().to_string();
    let file = write(
        dir.path(),
        "bad.toml",
        &format!(
            "{}[[source]]\nname = \"bad\"\nuri = \"test://ball\"\nmax_fps = 5000\nfps = 3\n\n\
             [[stage]]\nname = \"pass\"\nmodel = \"noop\"\n",
            header("bad", 1000)
        ),
    );
    let v = common::poolpipe(&["validate", file.to_str().unwrap()]);
    assert_eq!(v.status.code(), Some(2));
    let validate_text = String::from_utf8_lossy(&v.stderr).to_string();
    // Same problems, same words; only the place differs (the request body vs the file).
    let after_place = |line: &str| line.splitn(4, ':').nth(3).unwrap_or("").trim().to_string();
    let api_problems: Vec<String> = api_text.lines().map(after_place).collect();
    let file_problems: Vec<String> = validate_text
        .lines()
        .filter(|l| l.contains("source[0]"))
        .map(after_place)
        .collect();
    assert!(!api_problems.is_empty());
    assert_eq!(
        api_problems, file_problems,
        "API: {api_text}\nvalidate: {validate_text}"
    );
    assert!(api_text.starts_with("request:"), "{api_text}");

    // Reload: a new SLO applies; the file is the truth for streams (a is back, c goes).
    std::fs::write(&p, pipeline_text(400, 8, &out)).unwrap();
    let (code, body) = http("POST", &format!("{api}/reload"), None, None);
    assert_eq!(code, 200, "{body}");
    let applied = &json(&body)["applied"];
    assert_eq!(applied["slo_ms"], 400);
    assert_eq!(applied["added"], serde_json::json!(["a"]));
    assert_eq!(applied["removed"], serde_json::json!(["c"]));
    let (_, status) = http("GET", &format!("{api}/status"), None, None);
    assert_eq!(json(&status)["slo_ms"], 400.0);
    let reloaded_at = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_secs(3));

    // A change that cannot apply live is refused with the reason, and nothing changes.
    std::fs::write(&p, pipeline_text(900, 16, &out)).unwrap();
    let (code, body) = http("POST", &format!("{api}/reload"), None, None);
    assert_eq!(code, 409, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("stage `pass` changed"),
        "{body}"
    );
    let (_, status) = http("GET", &format!("{api}/status"), None, None);
    assert_eq!(
        json(&status)["slo_ms"],
        400.0,
        "a refused reload applies nothing"
    );
    std::fs::write(&p, "[pipeline\nname = ").unwrap();
    let (code, body) = http("POST", &format!("{api}/reload"), None, None);
    assert_eq!(code, 400, "{body}");

    let status = stop(child);
    assert!(status.success(), "{status:?}");
    let summary = read_summary(&summary);
    let streams = assert_balanced(&summary);
    assert!(streams["c"]["published"].as_u64().unwrap() > 20);
    // Frames captured well after the reload carry the new deadline: slack below 400 ms.
    let results = common::read_jsonl(&out);
    let late_ones: Vec<&Value> = results
        .iter()
        .filter(|r| {
            let t = r["captured_at_unix_ms"].as_u64().unwrap();
            let cutoff = reloaded_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
                + 500;
            t > cutoff
        })
        .collect();
    assert!(
        late_ones.len() > 10,
        "{} results after the reload",
        late_ones.len()
    );
    for r in late_ones {
        let slack = r["deadline_slack_ms"].as_f64().unwrap();
        assert!(
            slack <= 400.0,
            "frame after the reload has slack {slack} ms under a 400 ms SLO"
        );
    }
    let early = results.iter().find(|r| r["stream"] == "a").unwrap();
    assert!(
        early["deadline_slack_ms"].as_f64().unwrap() > 400.0,
        "first frames had the 5 s SLO"
    );
}

#[test]
fn off_loopback_the_api_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let summary = dir.path().join("summary.json");
    let p = write(dir.path(), "tok.toml", &pipeline_text(2000, 4, &out));

    // Without a token, a non-loopback address is a configuration error: nothing starts.
    let o = Command::new(bin())
        .args([
            "run",
            p.to_str().unwrap(),
            "--api",
            "0.0.0.0:0",
            "--duration",
            "5",
        ])
        .env_remove("POOLPIPE_API_TOKEN")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("bearer token is required"));

    // Bound to every address (reached here through 127.0.0.1; nothing leaves the machine).
    let (child, api) = start(
        &p,
        &summary,
        &[
            "--api",
            "0.0.0.0:0",
            "--serve",
            "--api-token-env",
            "TEST_TOKEN",
        ],
        &[("TEST_TOKEN", "s3cret-token")],
    );
    let port = api.rsplit(':').next().unwrap();
    let local = format!("http://127.0.0.1:{port}");
    // The API listens before the sources start: `a` is `starting` for a moment.
    let until = Instant::now() + Duration::from_secs(20);
    while state_of(&local, "a", Some("s3cret-token")) == "starting" && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    for path in ["/status", "/metrics"] {
        let (code, body) = http("GET", &format!("{local}{path}"), None, None);
        assert_eq!(code, 401, "{path} without a token: {body}");
        let (code, _) = http("GET", &format!("{local}{path}"), Some("wrong"), None);
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, _) = http("GET", &format!("{local}{path}"), Some("s3cret-token"), None);
        assert_eq!(code, 200, "{path} with the token");
    }
    let (code, _) = http(
        "POST",
        &format!("{local}/streams"),
        None,
        Some(("application/json", r#"{"name": "x", "uri": "test://ball"}"#)),
    );
    assert_eq!(code, 401, "adding a stream needs the token");
    let (code, _) = http("DELETE", &format!("{local}/streams/a"), None, None);
    assert_eq!(code, 401);
    let (code, _) = http("POST", &format!("{local}/reload"), None, None);
    assert_eq!(code, 401);
    let (code, _) = http("GET", &format!("{local}/health"), None, None);
    assert_eq!(code, 200, "health checks need no token");
    // The dashboard page holds no data: it loads without the token and asks for it (what it
    // fetches, /status and the snapshots, needs it).
    let (code, page) = http("GET", &format!("{local}/"), None, None);
    assert_eq!(code, 200);
    assert!(page.contains("needs its bearer token") && page.contains("Authorization"));
    for path in ["/streams/a/snapshot.jpg", "/streams/a/preview.mjpeg"] {
        let (code, _) = http("GET", &format!("{local}{path}"), None, None);
        assert_eq!(code, 401, "{path} without a token");
    }
    assert_eq!(
        state_of(&local, "a", Some("s3cret-token")),
        "running",
        "refused requests changed nothing"
    );
    assert!(stop(child).success());
}

#[test]
fn a_taken_api_port_is_a_runtime_error_and_a_bad_address_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let p = write(dir.path(), "port.toml", &pipeline_text(2000, 4, &out));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = common::poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--api",
        &addr,
        "--duration",
        "5",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("cannot listen on {addr}")));
    let o = common::poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--api",
        "localhost",
        "--duration",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected HOST:PORT"));
    // Re-planning needs a plan, and a band that is a fraction.
    for (extra, says) in [
        (&["--control"][..], "served by a plan"),
        (&["--control", "--band", "1.5"][..], "`band`"),
    ] {
        let mut args = vec!["run", p.to_str().unwrap(), "--duration", "5"];
        args.extend(extra);
        let o = common::poolpipe(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
}
