//! Bad input never takes poolpipe down: mutated pipeline files are refused without panicking, and
//! a corrupt video file or an RTSP server answering garbage fails only its own stream.

mod common;

use common::*;
use poolpipe::config::load_pipeline_str;
use proptest::prelude::*;

/// Every shipped pipeline file, as (path, text).
fn shipped() -> Vec<(std::path::PathBuf, String)> {
    let mut v: Vec<_> = std::fs::read_dir(root().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    v.sort();
    v
}

/// One edit of a file's text.
#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    Replace(usize, char),
    SwapLines(usize, usize),
    DuplicateLine(usize),
}

fn apply(text: &str, edit: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len().max(1);
    match edit {
        Edit::Delete(at, len) => {
            let a = at % n;
            let b = (a + len).min(chars.len());
            chars[..a].iter().chain(&chars[b..]).collect()
        }
        Edit::Insert(at, s) => {
            let a = at % n;
            chars[..a]
                .iter()
                .copied()
                .chain(s.chars())
                .chain(chars[a..].iter().copied())
                .collect()
        }
        Edit::Replace(at, c) => {
            let mut c2 = chars.clone();
            if !c2.is_empty() {
                c2[at % n] = *c;
            }
            c2.into_iter().collect()
        }
        Edit::SwapLines(a, b) => {
            let mut lines: Vec<&str> = text.lines().collect();
            let m = lines.len().max(1);
            if !lines.is_empty() {
                lines.swap(a % m, b % m);
            }
            lines.join("\n")
        }
        Edit::DuplicateLine(a) => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let i = a % lines.len();
                lines.insert(i, lines[i]);
            }
            lines.join("\n")
        }
    }
}

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop_oneof![
        Just("=".to_string()),
        Just("[".to_string()),
        Just("]]".to_string()),
        Just("\"".to_string()),
        Just("\n".to_string()),
        Just("-1".to_string()),
        Just("1e999".to_string()),
        Just("[[stage]]\n".to_string()),
        Just("blocks = [3, 1]\n".to_string()),
        Just("device = \"emulated:\"\n".to_string()),
        Just("type = \"mqtt\"\n".to_string()),
        Just("topic = \"a/{x}/{stream\"\n".to_string()),
        Just("url = \"redis://:pw@h:99999/x\"\n".to_string()),
        Just("password_env = \"\"\n".to_string()),
        "[ -~]{0,12}",
    ];
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(a, l)| Edit::Delete(a, l)),
        (any::<usize>(), token).prop_map(|(a, s)| Edit::Insert(a, s)),
        (any::<usize>(), any::<char>()).prop_map(|(a, c)| Edit::Replace(a, c)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        any::<usize>().prop_map(Edit::DuplicateLine),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Whatever is done to a valid file, loading it returns a pipeline or diagnostics with a
    /// place and a message; it never panics.
    #[test]
    fn mutated_pipeline_files_never_panic(which in any::<usize>(), edits in proptest::collection::vec(edit(), 1..4)) {
        let files = shipped();
        let (path, text) = &files[which % files.len()];
        let mutated = edits.iter().fold(text.clone(), |t, e| apply(&t, e));
        if let Err(errs) = load_pipeline_str(path, &mutated) {
            prop_assert!(!errs.0.is_empty());
            for d in &errs.0 {
                prop_assert!(!d.message.is_empty(), "{d}");
            }
        }
    }
}

#[test]
fn a_corrupt_video_file_fails_its_stream_only() {
    let sample = require("samples/campus.mp4");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.mp4");
    std::fs::write(
        &garbage,
        (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let truncated = dir.path().join("truncated.mp4");
    let bytes = std::fs::read(&sample).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let pipeline = format!(
        "{}[[source]]\nname = \"garbage\"\nuri = \"{}\"\npace = \"fast\"\n\n\
         [[source]]\nname = \"truncated\"\nuri = \"{}\"\npace = \"fast\"\n\n\
         [[source]]\nname = \"good\"\nuri = \"test://ball\"\nnum_buffers = 30\npace = \"fast\"\n\n\
         [[stage]]\nname = \"pass\"\nmodel = \"noop\"\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        header("corrupt", 60_000),
        garbage.display(),
        truncated.display(),
        dir.path().join("out.jsonl").display()
    );
    let p = write(dir.path(), "p.toml", &pipeline);
    let summary_path = dir.path().join("summary.json");
    let out = poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--summary-json",
        summary_path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary = read_summary(&summary_path);
    let streams = assert_balanced(&summary);
    assert!(
        streams["garbage"]["source_errors"].as_u64().unwrap() >= 1,
        "{summary}"
    );
    assert_eq!(streams["garbage"]["published"], 0);
    assert_eq!(
        streams["good"]["published"], 30,
        "the good stream is untouched: {summary}"
    );
    // The sample's MP4 index (moov) is at its end, so a file cut short cannot be played at all.
    assert!(
        streams["truncated"]["source_errors"].as_u64().unwrap() >= 1,
        "{summary}"
    );
    assert_eq!(streams["truncated"]["published"], 0);
    assert!(
        stderr.contains("Source failed.") && stderr.contains("garbage"),
        "{stderr}"
    );
}

#[test]
fn an_rtsp_server_that_answers_garbage_fails_its_stream_only() {
    // A TCP server on 127.0.0.1 that answers every connection with bytes that are not RTSP.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = connections.clone();
    std::thread::spawn(move || {
        for conn in server.incoming() {
            let Ok(mut conn) = conn else { continue };
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_millis(500)));
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let junk: Vec<u8> = (0..4096u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
                    .collect();
                let _ = conn.write_all(b"SPAM/9.9 999 Nonsense\r\n\x00\x01\x02");
                let _ = conn.write_all(&junk);
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let pipeline = format!(
        "{}[[source]]\nname = \"junk\"\nuri = \"rtsp://127.0.0.1:{port}/cam\"\nreconnect_min_ms = 200\n\
         reconnect_max_ms = 400\nstall_timeout_ms = 1000\n\n\
         [[source]]\nname = \"good\"\nuri = \"test://ball\"\nmax_fps = 10\n\n\
         [[stage]]\nname = \"pass\"\nmodel = \"noop\"\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        header("garbage-rtsp", 5_000),
        dir.path().join("out.jsonl").display()
    );
    let p = write(dir.path(), "p.toml", &pipeline);
    let summary_path = dir.path().join("summary.json");
    let out = poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--duration",
        "8",
        "--summary-json",
        summary_path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary = read_summary(&summary_path);
    let streams = assert_balanced(&summary);
    assert_eq!(streams["junk"]["published"], 0);
    assert!(
        streams["junk"]["source_errors"].as_u64().unwrap() >= 2,
        "each garbage answer is a counted source error: {summary}"
    );
    assert!(
        streams["junk"]["reconnects"].as_u64().unwrap() >= 2,
        "the camera is retried with backoff: {summary}"
    );
    assert!(connections.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    let good = streams["good"]["published"].as_u64().unwrap();
    assert!(
        good >= 50,
        "the other stream runs at its rate (10 fps for 8 s): {good} published; {summary}"
    );
    assert!(
        stderr.contains("Source lost, reconnecting.") && stderr.contains("junk"),
        "{stderr}"
    );
}

#[test]
fn a_panicking_stage_makes_run_exit_1_naming_it_and_every_frame_is_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    // Two stages, two workers on the second; its fifth batch panics. Far more frames than run
    // before the pipeline stops, at full speed, so that frames are queued everywhere when it does.
    let pipeline = format!(
        "{}[[source]]\nname = \"cam\"\nuri = \"test://ball\"\nnum_buffers = 100000\npace = \"fast\"\n\n\
         [[stage]]\nname = \"first\"\nmodel = \"noop\"\n\n\
         [[stage]]\nname = \"second\"\nmodel = \"noop\"\nworkers = 2\nmax_batch = 2\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        header("panics", 60_000),
        dir.path().join("out.jsonl").display()
    );
    let p = write(dir.path(), "p.toml", &pipeline);
    let summary_path = dir.path().join("summary.json");
    let out = std::process::Command::new(bin())
        .args([
            "run",
            p.to_str().unwrap(),
            "--api",
            "off",
            "--summary-json",
            summary_path.to_str().unwrap(),
        ])
        .env("POOLPIPE_PANIC_STAGE", "second:5")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: stage `second` worker")
            && stderr.contains("panicked: injected by POOLPIPE_PANIC_STAGE at batch 5"),
        "the error names the stage: {stderr}"
    );
    let summary = read_summary(&summary_path);
    let streams = assert_balanced(&summary);
    let cam = &streams["cam"];
    assert!(
        cam["failed"].as_u64().unwrap() >= 1,
        "the panicking batch's frames count as failed: {summary}"
    );
    assert!(
        cam["published"].as_u64().unwrap() >= 4,
        "the batches before it were published: {summary}"
    );
    assert!(
        cam["ingested"].as_u64().unwrap() < 100_000,
        "the run stopped early: {summary}"
    );
    let panics = summary["panics"].as_array().expect("panics in the summary");
    assert_eq!(panics.len(), 1, "{summary}");
    assert!(
        panics[0]["thread"]
            .as_str()
            .unwrap()
            .starts_with("stage `second` worker"),
        "{summary}"
    );
    let published = read_jsonl(&dir.path().join("out.jsonl")).len() as u64;
    assert_eq!(published, cam["published"].as_u64().unwrap());
}
