//! `[[output]]`: annotated video out of a running pipeline. An RTSP client (GStreamer) pulls
//! the demo's annotated stream and finds the drawn text box where the results put it; an MP4
//! recording made during a run stopped by SIGINT plays to its end; JPEG snapshots are written
//! and named in the results; a taken RTSP port and a folder that cannot be written stop the
//! start with a clear message.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{require, stop_with, write};
use serde_json::Value;

/// The demo (OCR of the text burned into the sample) with an RTSP output, results to a file.
fn demo_with_rtsp(dir: &Path, port: u16) -> std::path::PathBuf {
    let text = std::fs::read_to_string(common::root().join("pipelines/demo.toml"))
        .unwrap()
        .replace(
            "../samples/campus.mp4",
            require("samples/campus.mp4").to_str().unwrap(),
        )
        .replace(
            "slo_ms = 3000",
            &format!(
                "slo_ms = 3000\nengines_dir = \"{}\"",
                common::root().join("engines").display()
            ),
        )
        .replace(
            "path = \"-\"",
            &format!("path = \"{}\"", dir.join("out.jsonl").display()),
        );
    write(
        dir,
        "demo.toml",
        &format!("{text}\n[[output]]\ntype = \"rtsp\"\nport = {port}\nthickness = 4\n"),
    )
}

#[test]
fn an_rtsp_client_sees_the_drawn_boxes_where_the_results_put_them() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let p = demo_with_rtsp(dir.path(), port);
    let (child, api) = common::start(
        &p,
        &dir.path().join("summary.json"),
        &["--api", "127.0.0.1:0"],
        &[],
    );
    common::wait_published(&api, 3);
    // A client: decode the stream to raw RGB frames, one file each, for 10 s.
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let client = Command::new("timeout")
        .args(["12", "gst-launch-1.0", "-q", "rtspsrc"])
        .arg(format!("location=rtsp://127.0.0.1:{port}/north-gate"))
        .args([
            "latency=0",
            "!",
            "rtph264depay",
            "!",
            "avdec_h264",
            "!",
            "videoconvert",
            "!",
            "video/x-raw,format=RGB",
            "!",
            "multifilesink",
        ])
        .arg(format!("location={}/f-%04d.rgb", frames.display()))
        .status()
        .unwrap();
    // `timeout` ends the client (124): it was still receiving.
    assert_eq!(client.code(), Some(124), "the RTSP client failed");
    let status = common::status(&api);
    assert!(common::stop(child).success());

    let out = status["outputs"].as_array().unwrap();
    assert_eq!(out[0]["kind"], "rtsp");
    assert!(
        out[0]["urls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == format!("rtsp://127.0.0.1:{port}/north-gate").as_str()),
        "{out:?}"
    );
    assert!(out[0]["written"].as_u64().unwrap() > 10, "{out:?}");

    // Where the text boxes are: the camera name's box (the first one) in every result.
    let results = common::read_jsonl(&dir.path().join("out.jsonl"));
    let boxes: Vec<(f64, f64, f64)> = results
        .iter()
        .filter_map(|r| {
            let b = &r["results"]["ocr"]["texts"][0]["box"];
            Some((b["x"].as_f64()?, b["y"].as_f64()?, b["h"].as_f64()?))
        })
        .collect();
    assert!(boxes.len() > 10);
    let median = |k: usize| {
        let mut v: Vec<f64> = boxes.iter().map(|b| [b.0, b.1, b.2][k]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (x, y, h) = (median(0), median(1), median(2));
    // The recognised text's colour (the display's second colour, 72,249,10) on the box's left
    // edge, within a few pixels (the box moves a pixel or two; H.264 blurs the line).
    let (w, height) = (768usize, 576usize);
    let mut files: Vec<_> = std::fs::read_dir(&frames)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{} frames decoded", files.len());
    let mut seen = 0;
    for f in &files {
        let d = std::fs::read(f).unwrap();
        assert_eq!(d.len(), w * height * 3, "768x576 RGB frames");
        let row = (y + h / 2.0) as usize;
        let found = (x as usize).saturating_sub(4)..(x as usize + 8).min(w);
        if found.into_iter().any(|c| {
            let o = (row * w + c) * 3;
            let (r, g, b) = (d[o] as i32, d[o + 1] as i32, d[o + 2] as i32);
            g > 200 && r < 140 && b < 90
        }) {
            seen += 1;
        }
    }
    let share = f64::from(seen) / files.len() as f64;
    assert!(
        share >= 0.9,
        "the box's colour at its place in {seen} of {} frames",
        files.len()
    );
}

#[test]
fn recordings_play_to_the_end_after_sigint_and_snapshots_are_named_in_results() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::two_test_streams(
        dir.path(),
        "rec",
        15,
        "[[output]]\ntype = \"file\"\nfolder = \"rec\"\nstreams = [\"left\"]\n\n\
         [[output]]\ntype = \"jpeg\"\nfolder = \"snaps\"\nevery_s = 1\n",
    );
    let (child, api) = common::start(
        &p,
        &dir.path().join("summary.json"),
        &["--api", "127.0.0.1:0"],
        &[],
    );
    common::wait_published(&api, 1);
    std::thread::sleep(Duration::from_secs(5));
    let (code, metrics) = common::http("GET", &format!("{api}/metrics"), None, None);
    assert_eq!(code, 200);
    let written = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("poolpipe_output_frames_total{output=\"file\",outcome=\"written\"} ")
        })
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(written.is_some_and(|n| n > 30.0), "{metrics}");
    assert!(stop_with(child, "INT").success());

    // One recording, of `left` only, finalised: it has a duration and decodes to its end.
    let recs: Vec<_> = std::fs::read_dir(dir.path().join("rec"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let name = recs[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with("left-") && name.ends_with(".mp4"),
        "{name}"
    );
    let o = Command::new("gst-discoverer-1.0")
        .arg(&recs[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{text}");
    let duration = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Duration: "))
        .unwrap_or_else(|| panic!("no duration: {text}"));
    let parts: Vec<f64> = duration.split(':').map(|v| v.parse().unwrap()).collect();
    let secs = parts[0] * 3600.0 + parts[1] * 60.0 + parts[2];
    assert!(secs >= 4.0, "recorded {secs:.2} s of a 5 s run");
    let played = Command::new("gst-launch-1.0")
        .args(["-q", "filesrc"])
        .arg(format!("location={}", recs[0].display()))
        .args([
            "!",
            "qtdemux",
            "!",
            "h264parse",
            "!",
            "avdec_h264",
            "!",
            "fakesink",
        ])
        .status()
        .unwrap();
    assert!(played.success(), "the recording does not play to its end");

    // Snapshots: about one a second per stream, each named in its result and a real JPEG of
    // the frame.
    let results = common::read_jsonl(&dir.path().join("out.jsonl"));
    let named: Vec<(&str, String)> = results
        .iter()
        .filter_map(|r| {
            let p = r["snapshots"]["jpeg"].as_str()?;
            Some((r["stream"].as_str().unwrap(), p.to_string()))
        })
        .collect();
    for stream in ["left", "right"] {
        let n = named.iter().filter(|(s, _)| *s == stream).count();
        assert!(
            (4..=8).contains(&n),
            "{n} snapshots of {stream} in about 6 s"
        );
    }
    for (_, path) in &named {
        let img = image::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((img.width(), img.height()), (320, 240), "{path}");
    }
}

#[test]
fn a_taken_rtsp_port_or_a_folder_that_cannot_be_written_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(dir.path().join("a-file"), b"").unwrap();
    for (output, says) in [
        (
            format!("type = \"rtsp\"\nport = {port}\n"),
            format!("output `rtsp`: cannot listen for RTSP on 127.0.0.1:{port}"),
        ),
        (
            "type = \"jpeg\"\nfolder = \"a-file/snaps\"\nevery_s = 1\n".to_string(),
            "output `jpeg`: cannot write to".to_string(),
        ),
    ] {
        let p = write(
            dir.path(),
            "bad.toml",
            &format!(
                "{}[[source]]\nname = \"cam\"\nuri = \"test://ball\"\n\n\
                 [[stage]]\nname = \"pass\"\nmodel = \"noop\"\n\n\
                 [[sink]]\ntype = \"jsonl\"\n\n[[output]]\n{output}",
                common::header("bad", 5_000)
            ),
        );
        let o = common::poolpipe(&["run", p.to_str().unwrap(), "--duration", "5"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&says), "{says:?} not in: {err}");
    }
    drop(taken);
}

/// The load check, as `poolpipe bench outputs` measures it: the demo as shipped with an
/// RTSP output watched by a client, a recording, snapshots and 3 MJPEG preview clients publishes
/// at least 0.9x the frames/s of the same run without them, and drops nothing.
#[test]
fn outputs_and_preview_clients_do_not_slow_the_demo() {
    let o = common::poolpipe(&[
        "bench",
        "outputs",
        "--json",
        "--pipeline",
        common::root().join("pipelines/demo.toml").to_str().unwrap(),
        "--seconds",
        "10",
        "--pairs",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ratio = r["ratio"].as_f64().unwrap();
    assert!(
        ratio >= 0.9,
        "published fps with outputs / without: {ratio:.3}"
    );
    let with = &r["runs"][1];
    assert_eq!(with["mode"], "outputs");
    assert_eq!(with["dropped"], 0, "{with}");
    for out in with["outputs"].as_array().unwrap() {
        assert_eq!(out["dropped"], 0, "{out}");
        assert!(out["written"].as_u64().unwrap() > 0, "{out}");
    }
    assert!(with["preview_frames"].as_u64().unwrap() > 20, "{with}");
}
