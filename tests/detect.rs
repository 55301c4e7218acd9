//! The detect stage on the bundled sample with the real YOLOv3-tiny (made by ./setup.sh):
//! the converted model against Darknet's own computation, and people found on sampled frames.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Runs the sample (its first `frames` frames, as fast as they decode) through the detector and
/// returns the objects of every frame by seq.
fn detect_sample(dir: &Path, frames: u64, max_batch: u32, extra: &str) -> Vec<(u64, Vec<Value>)> {
    let out = dir.join("out.jsonl");
    let p = write(
        dir,
        "det.toml",
        &format!(
            "{}[[source]]\nname = \"cam\"\nuri = \"{}\"\npace = \"fast\"\n\n\
             [[stage]]\nname = \"detect\"\nmodel = \"yolov3-tiny\"\nthreads = 2\nmax_batch = {max_batch}\nmax_wait_ms = 20\n{extra}\n\n\
             [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
            header("det", 60_000),
            require("samples/campus.mp4").display(),
            out.display()
        ),
    );
    let n = frames.to_string();
    let o = poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--max-frames",
        &n,
        "--api",
        "127.0.0.1:0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut rows: Vec<(u64, Vec<Value>)> = read_jsonl(&out)
        .into_iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["results"]["detect"]["objects"]
                    .as_array()
                    .unwrap()
                    .clone(),
            )
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    assert_eq!(rows.len() as u64, frames, "every frame is published");
    rows
}

fn count(objects: &[Value], label: &str) -> usize {
    objects.iter().filter(|o| o["label"] == label).count()
}

fn edges(o: &Value) -> [f64; 4] {
    let b = &o["box"];
    let f = |k: &str| b[k].as_f64().unwrap();
    [f("x"), f("y"), f("x") + f("w"), f("y") + f("h")]
}

/// Frame 0: the ONNX file computes what Darknet's forward pass computes, and the detect stage
/// (letterbox, decoding, NMS, boxes in frame pixels) finds the boxes that the reference decoding
/// finds, within 10 px.
#[test]
fn the_detector_finds_the_reference_boxes_on_the_first_frame() {
    let dir = tempfile::tempdir().unwrap();
    let yolo = require("engines/yolo");
    let python = require(".venv/bin/python");
    // Frame 0 as packed RGB, decoded by GStreamer as the source does.
    let raw = dir.path().join("f%02d.rgb");
    let st = Command::new("gst-launch-1.0")
        .args(["-q", "filesrc"])
        .arg(format!(
            "location={}",
            require("samples/campus.mp4").display()
        ))
        .args([
            "!",
            "decodebin",
            "!",
            "videoconvert",
            "!",
            "video/x-raw,format=RGB",
        ])
        .args(["!", "identity", "eos-after=2", "!", "multifilesink"])
        .arg(format!("location={}", raw.display()))
        .status()
        .expect("gst-launch-1.0");
    assert!(st.success());
    let frame0 = dir.path().join("f00.rgb");
    assert_eq!(std::fs::metadata(&frame0).unwrap().len(), 768 * 576 * 3);
    // The reference: numpy forward pass over the unfolded Darknet weights and Darknet's own
    // decoding loop; the script fails if ONNX Runtime on the converted file disagrees.
    let o = Command::new(python)
        .arg(root().join("engines/darknet2onnx.py"))
        .arg("check")
        .arg("--cfg")
        .arg(yolo.join("yolov3-tiny.fixed.cfg"))
        .arg("--weights")
        .arg(yolo.join("yolov3-tiny.weights"))
        .arg("--onnx")
        .arg(yolo.join("yolov3-tiny.onnx"))
        .arg("--rgb")
        .arg(&frame0)
        .args(["--width", "768", "--height", "576", "--pad", "127.5"])
        .arg("--names")
        .arg(root().join("engines/coco.names"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        reference["max_diff_xywh"].as_f64().unwrap() < 1e-4,
        "{reference}"
    );
    assert!(
        reference["max_diff_prob"].as_f64().unwrap() < 1e-4,
        "{reference}"
    );
    let want = reference["detections"].as_array().unwrap();
    // What the hand check found on the original clip's first frame: three people, a car
    // and the white van (as a truck).
    assert_eq!(count(want, "person"), 3, "{reference}");
    assert_eq!(count(want, "car"), 1);
    assert_eq!(count(want, "truck"), 1);

    let got = &detect_sample(dir.path(), 1, 1, "")[0];
    assert_eq!(got.0, 0);
    let got = &got.1;
    assert_eq!(got.len(), want.len(), "got {got:?}\nwant {want:?}");
    for w in want {
        let we = edges(w);
        let m = got
            .iter()
            .filter(|g| g["class_id"] == w["class_id"])
            .min_by(|a, b| {
                let d = |o: &Value| {
                    let e = edges(o);
                    (0..4).map(|k| (e[k] - we[k]).abs()).fold(0.0, f64::max)
                };
                d(a).total_cmp(&d(b))
            })
            .unwrap_or_else(|| panic!("no {} found; got {got:?}", w["label"]));
        let ge = edges(m);
        for k in 0..4 {
            assert!((ge[k] - we[k]).abs() <= 10.0, "{m} vs reference {w}");
        }
        assert!(
            (m["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs() < 0.01,
            "{m} vs reference {w}"
        );
    }
}

/// People per sampled frame, in batches of up to 4.
///
/// The ranges come from looking at these frames of samples/campus.mp4 (drawn with the boxes
/// found, by hand): the people visible and at least about 20 px tall, counted by eye, were 3, 6,
/// 7, 7, 7, 7 and 6 at frames 0, 50, ..., 300. Each range allows two of them missed (small
/// people far away, people walking close together) and one extra box (a second box on a partly
/// hidden person).
#[test]
fn people_found_on_sampled_frames_are_within_what_is_visible() {
    let dir = tempfile::tempdir().unwrap();
    let rows = detect_sample(dir.path(), 301, 4, "");
    let visible = [
        (0, 3),
        (50, 6),
        (100, 7),
        (150, 7),
        (200, 7),
        (250, 7),
        (300, 6),
    ];
    let mut total = 0;
    for (seq, v) in visible {
        let objects = &rows[seq].1;
        let n = count(objects, "person");
        assert!(
            (v - 2..=v + 1).contains(&n),
            "frame {seq}: {n} people found, {v} visible: {objects:?}"
        );
        total += n;
        for o in objects {
            let e = edges(o);
            assert!(
                e[0] >= 0.0 && e[1] >= 0.0 && e[2] <= 768.0 && e[3] <= 576.0,
                "{o}"
            );
        }
    }
    assert!(total >= 35, "{total} people over the sampled frames");
    // A stage that keeps only people finds the same people and nothing else.
    let people = detect_sample(dir.path(), 51, 4, "classes = [\"person\"]");
    for seq in [0, 50] {
        let objects = &people[seq].1;
        assert!(
            objects.iter().all(|o| o["label"] == "person"),
            "{objects:?}"
        );
        assert_eq!(objects.len(), count(&rows[seq].1, "person"));
    }
}

/// The people demo's chain (detect, track, a line and a zone) on the sample: events name real
/// tracks of their frames, the results' counts add up to the events, tracks last.
#[test]
fn tracked_people_crossing_a_line_raise_events_that_match_the_counts() {
    let dir = tempfile::tempdir().unwrap();
    // The demo as it ships, read as fast as it decodes.
    let out = dir.path().join("out.jsonl");
    let ev = dir.path().join("events.jsonl");
    let text = people_demo_fast()
        .replace("path = \"-\"", &format!("path = \"{}\"", ev.display()))
        .replace("/tmp/poolpipe-people.jsonl", out.to_str().unwrap());
    let p = write(dir.path(), "people.toml", &text);
    let summary = run_summarized(&p, None);
    let streams = assert_balanced(&summary);
    let cam = &streams["north-gate"];
    assert_eq!(cam["published"], 795, "{cam}");
    let results = read_jsonl(&out);
    let events = read_jsonl(&ev);
    assert!(results.iter().all(|r| r.get("event").is_none()));
    assert!(events.iter().all(|r| r.get("event").is_some()));
    assert_eq!(cam["events"].as_u64().unwrap(), events.len() as u64);
    let by_seq: std::collections::HashMap<u64, &Value> = results
        .iter()
        .map(|r| (r["seq"].as_u64().unwrap(), r))
        .collect();
    let crossings: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "line_crossed")
        .collect();
    assert!(crossings.len() >= 5, "{} crossings", crossings.len());
    let mut per_dir = std::collections::HashMap::new();
    for e in &crossings {
        assert_eq!(e["rule"], "crossing");
        assert_eq!(e["label"], "person");
        let dir = e["direction"].as_str().unwrap();
        assert!(dir == "in" || dir == "out", "{e}");
        *per_dir.entry(dir.to_string()).or_insert(0u64) += 1;
        // The event's object is in its frame's result, with that track id.
        let frame = by_seq[&e["seq"].as_u64().unwrap()];
        let objects = frame["results"]["detect"]["objects"].as_array().unwrap();
        assert!(
            objects.iter().any(|o| o["track_id"] == e["track_id"]),
            "{e}"
        );
    }
    // The last frame's counts are the events' sums.
    let last = by_seq[&794];
    let total = &last["analytics"]["crossing"]["total"];
    for (dir, n) in &per_dir {
        assert_eq!(total[dir]["person"].as_u64().unwrap(), *n, "{total}");
    }
    let zone = &last["analytics"]["road"];
    let entered = events
        .iter()
        .filter(|e| e["event"] == "zone_entered")
        .count() as u64;
    assert_eq!(
        zone["total"]["entered"]["person"].as_u64().unwrap(),
        entered
    );
    // Windows of 30 s: two closed in the 79.5 s clip.
    assert_eq!(events.iter().filter(|e| e["event"] == "window").count(), 2);
    // Tracks last: people tracked over 3 frames or more carry most of the tracked detections.
    let mut lengths: std::collections::HashMap<u64, u64> = Default::default();
    for r in &results {
        for o in r["results"]["detect"]["objects"].as_array().unwrap() {
            if let (Some(id), "person") = (o["track_id"].as_u64(), o["label"].as_str().unwrap()) {
                *lengths.entry(id).or_default() += 1;
            }
        }
    }
    let tracked: u64 = lengths.values().sum();
    let long: u64 = lengths.values().filter(|n| **n >= 30).sum();
    assert!(
        long * 10 >= tracked * 8,
        "{long} of {tracked} tracked detections in tracks of 30+ frames"
    );
}

/// The sample played like a camera (stream `cam`, real time) through the detector, every result
/// to `out`, with the API on a free port: the running process and the API's address.
fn start_camera(dir: &Path, out: &Path) -> (KillOnDrop, String) {
    let p = write(
        dir,
        "camera.toml",
        &format!(
            "{}[[source]]\nname = \"cam\"\nuri = \"{}\"\npace = \"realtime\"\n\n\
             [[stage]]\nname = \"detect\"\nmodel = \"yolov3-tiny\"\nthreads = 2\nmax_batch = 2\nmax_wait_ms = 20\n\n\
             [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
            header("camera", 60_000),
            require("samples/campus.mp4").display(),
            out.display()
        ),
    );
    common::start(
        &p,
        &dir.join("summary.json"),
        &["--api", "127.0.0.1:0"],
        &[],
    )
}

/// `GET /streams/{name}/snapshot.jpg`: the last published frame with its results drawn on it.
/// The boxes of the result with the snapshot's `seq` are outlined in their class colour (person:
/// red) at their place in the picture.
#[test]
fn a_snapshot_shows_the_detections_of_its_frame_where_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let (child, api) = start_camera(dir.path(), &out);
    let (code, _) = common::http(
        "GET",
        &format!("{api}/streams/nope/snapshot.jpg"),
        None,
        None,
    );
    assert_eq!(code, 404);
    // Wait for a frame with people in it.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (jpeg, seq) = loop {
        assert!(std::time::Instant::now() < until, "no snapshot");
        let mut r = agent
            .get(&format!("{api}/streams/cam/snapshot.jpg"))
            .call()
            .unwrap();
        if r.status() == 200 {
            assert_eq!(r.headers()["content-type"], "image/jpeg");
            let seq: u64 = r.headers()["x-poolpipe-seq"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body = r.body_mut().read_to_vec().unwrap();
            if seq >= 20 {
                break (body, seq);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert!(common::stop(child).success());
    let img = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    let row = read_jsonl(&out)
        .into_iter()
        .find(|r| r["seq"].as_u64() == Some(seq))
        .expect("the snapshot's frame was published");
    let people: Vec<[f64; 4]> = row["results"]["detect"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["label"] == "person")
        .map(edges)
        .collect();
    assert!(!people.is_empty(), "{row}");
    // Every object's label band sits above its box (about 20 px high, up to 200 px wide): a
    // person's bottom edge under another object's label is not looked at.
    let all: Vec<[f64; 4]> = row["results"]["detect"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(edges)
        .collect();
    let under_a_label = |b: &[f64; 4]| {
        all.iter().any(|o| {
            o != b
                && b[3] >= o[1] - 22.0
                && b[3] <= o[1] + 2.0
                && b[0] < o[0] + 200.0
                && b[2] > o[0]
        })
    };
    let people: Vec<[f64; 4]> = people.into_iter().filter(|b| !under_a_label(b)).collect();
    // Along each other person's bottom edge (labels sit above boxes), most pixels are red.
    let (w, h) = img.dimensions();
    // The published edges are rounded to 0.1 px and the box was drawn from the unrounded ones, so
    // an edge published as 364.5 may have been drawn as 364 or 365: the bottom row is either.
    let red_in_row = |xs: &[u32], y: u32| {
        xs.iter()
            .filter(|&&x| {
                let p = img.get_pixel(x, y).0;
                i32::from(p[0]) > i32::from(p[1]) + 60 && i32::from(p[0]) > i32::from(p[2]) + 60
            })
            .count()
    };
    for [x0, _, x1, y1] in people {
        let xs: Vec<u32> = (x0.round() as u32 + 3..(x1.round() as u32).saturating_sub(3))
            .filter(|x| *x < w)
            .collect();
        let (red, y) = [y1 - 0.05, y1 + 0.05]
            .iter()
            .map(|e| {
                let y = (e.round() as u32).saturating_sub(1).min(h - 1);
                (red_in_row(&xs, y), y)
            })
            .max()
            .unwrap();
        assert!(
            xs.is_empty() || red * 10 >= xs.len() * 6,
            "box bottom at y {y}: {red} of {} pixels red (frame {seq}; boxes {all:?})",
            xs.len()
        );
    }
}

/// `GET /streams/{name}/preview.mjpeg`: new frames as MJPEG parts; a client that connects and
/// never reads slows nothing (the stream keeps publishing at the camera's rate).
#[test]
fn a_preview_streams_new_frames_and_a_stalled_client_slows_nothing() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (child, api) = start_camera(dir.path(), Path::new("/dev/null"));
    let (code, _) = common::http(
        "GET",
        &format!("{api}/streams/nope/preview.mjpeg"),
        None,
        None,
    );
    assert_eq!(code, 404);
    let addr = api.trim_start_matches("http://").to_string();
    let open = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /streams/cam/preview.mjpeg?fps=10 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        s
    };
    // A reader: the multipart header, then parts with increasing seq.
    let mut reader = open();
    reader
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut seqs: Vec<u64> = Vec::new();
    while seqs.len() < 3 {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "the preview ended");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        seqs = text
            .split("X-Poolpipe-Seq: ")
            .skip(1)
            .filter_map(|t| t.split("\r\n").next()?.parse().ok())
            .collect();
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(
        text.contains("multipart/x-mixed-replace; boundary=poolpipe-frame"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(text.contains("Content-Type: image/jpeg"));
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    drop(reader);
    // A client that never reads, while the camera runs at 10 frames/s.
    let _stalled = open();
    let published = |api: &str| {
        common::status(api)["streams"][0]["counters"]["published"]
            .as_u64()
            .unwrap()
    };
    let before = published(&api);
    std::thread::sleep(std::time::Duration::from_secs(4));
    let after = published(&api);
    assert!(
        after >= before + 30,
        "published {before} -> {after} in 4 s with a stalled preview client"
    );
    let st = common::status(&api);
    assert!(
        st["previews"]["cam"]["sent"].as_u64().unwrap() >= 3,
        "{}",
        st["previews"]
    );
    assert!(common::stop(child).success());
}
