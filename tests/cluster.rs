//! A pipeline across nodes: `poolpipe node` processes serve workers of a cut model, the front
//! (`poolpipe run`) reaches them over gRPC. On loopback here; `cluster_netns.rs` runs the same
//! on shaped links between network namespaces.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{KillOnDrop, bin, free_port, read_summary, wait_listening, write};
use serde_json::Value;

/// The lab's cut pipeline, its two worker nodes on loopback.
fn cluster_file(
    dir: &Path,
    profiles: &Path,
    nodes: &[(&str, String)],
    fps: u32,
    gbps: f64,
) -> std::path::PathBuf {
    let nodes: Vec<(String, String)> = nodes
        .iter()
        .map(|(n, a)| (n.to_string(), a.clone()))
        .collect();
    write(
        dir,
        "cluster.toml",
        &poolpipe::cluster::netns::cut_pipeline(
            profiles,
            &nodes,
            gbps,
            fps,
            &dir.join("out.jsonl"),
        ),
    )
}

fn node(file: &Path, name: &str, summary: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin())
            .args([
                "node",
                file.to_str().unwrap(),
                "--name",
                name,
                "--summary-json",
            ])
            .arg(summary)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start poolpipe node"),
    )
}

fn node_of<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("no node {name} in {summary}"))
}

fn sum(summary: &Value, key: &str) -> u64 {
    summary["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[key].as_u64().unwrap())
        .sum()
}

#[test]
fn a_cut_model_runs_across_three_nodes_and_survives_losing_one() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (p2, p3) = (free_port(), free_port());
    let file = cluster_file(
        dir.path(),
        &profiles,
        &[
            ("n2", format!("127.0.0.1:{p2}")),
            ("n3", format!("127.0.0.1:{p3}")),
        ],
        8,
        10.0,
    );
    let n2 = node(&file, "n2", &dir.path().join("n2.json"));
    let n3 = node(&file, "n3", &dir.path().join("n3.json"));
    assert!(wait_listening(p2, Duration::from_secs(20)));
    assert!(wait_listening(p3, Duration::from_secs(20)));
    let summary = dir.path().join("front.json");
    let mut front = KillOnDrop(
        Command::new(bin())
            .args([
                "run",
                file.to_str().unwrap(),
                "--duration",
                "15",
                "--api",
                "off",
            ])
            .arg("--summary-json")
            .arg(&summary)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    // n3 dies at 5 s (SIGKILL: no goodbye) and comes back at 9 s.
    std::thread::sleep(Duration::from_secs(5));
    drop(n3);
    std::thread::sleep(Duration::from_secs(4));
    let n3b = node(&file, "n3", &dir.path().join("n3b.json"));
    assert!(wait_listening(p3, Duration::from_secs(20)));
    let status = front.0.wait().unwrap();
    assert!(status.success(), "front exited with {status}");
    let s = read_summary(&summary);
    common::assert_balanced(&s);
    let (ingested, published, lost) = (sum(&s, "ingested"), sum(&s, "published"), sum(&s, "lost"));
    // Frames in flight on n3 when it died are lost, and only those: n3's worker holds one batch
    // at a time, and one more may have been reserved on it before the front saw it go.
    let n3s = node_of(&s, "n3");
    assert_eq!(n3s["lost"].as_u64().unwrap(), lost, "{s}");
    assert!(
        lost <= 2 * 4,
        "lost {lost} frames: more than n3 could hold: {s}"
    );
    assert_eq!(n3s["downs"], 1, "{s}");
    assert_eq!(n3s["up"], true, "n3 rejoined: {s}");
    let tail = &s["stages"][1];
    assert_eq!(tail["lost"].as_u64().unwrap(), lost);
    assert_eq!(tail["failed"], 0, "{s}");
    // n2 carried on alone, and n3 took batches again once it was back.
    let stopped = |n: KillOnDrop, path: &str| -> Value {
        common::stop_with(n, "INT");
        read_summary(&dir.path().join(path))
    };
    let n2s = stopped(n2, "n2.json");
    let n3bs = stopped(n3b, "n3b.json");
    assert!(
        n3bs["batches"].as_u64().unwrap() > 0,
        "n3 did not rejoin: {n3bs}"
    );
    assert!(
        n2s["batches"].as_u64().unwrap() > n3bs["batches"].as_u64().unwrap(),
        "{n2s} {n3bs}"
    );
    assert_eq!(
        node_of(&s, "n2")["frames"].as_u64().unwrap(),
        n2s["frames"].as_u64().unwrap(),
        "the front's count of n2's frames is n2's own"
    );
    // Bytes crossed: every frame sent its cut (about 2.2 MB for this model at block 5).
    let sent = node_of(&s, "n2")["bytes_sent"].as_u64().unwrap();
    let frames = node_of(&s, "n2")["frames"].as_u64().unwrap();
    assert!(
        sent / frames.max(1) > 1_000_000,
        "{sent} bytes for {frames} frames"
    );
    // The load is well within the pool: losing a node for 4 s costs little.
    assert!(
        published as f64 >= 0.8 * ingested as f64,
        "published {published} of {ingested}: {s}"
    );
    assert!(s["end_to_end_p99_ms"].as_f64().unwrap() <= 250.0, "{s}");
}

#[test]
fn cluster_mistakes_are_refused_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let base = |cluster: &str, nodes: &str| {
        format!(
            "{}{cluster}\n[[source]]\nname = \"a\"\nuri = \"test://ball\"\n\n[[stage]]\nname = \"s\"\nmodel = \"noop\"\nworkers = 2\n{nodes}\n\n[[sink]]\ntype = \"jsonl\"\npath = \"-\"\n",
            common::header("c", 100)
        )
    };
    let cases = [
        (
            base("", "nodes = [\"n2\", \"n3\"]"),
            "`nodes` needs a [cluster] section",
        ),
        (
            base(
                "[cluster]\nfront = \"n1\"\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
                "nodes = [\"n2\", \"n9\"]",
            ),
            "no node `n9` in [cluster] (nodes: n1, n2)",
        ),
        (
            base(
                "[cluster]\nfront = \"n1\"\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
                "nodes = [\"n2\"]",
            ),
            "1 nodes for 2 workers",
        ),
        (
            base(
                "[cluster]\nfront = \"n1\"\nnodes = { n2 = \"nowhere\" }\n",
                "",
            ),
            "`nowhere`: expected HOST:PORT",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let f = write(dir.path(), &format!("c{i}.toml"), text);
        let out = common::poolpipe(&["validate", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}\n{err}");
        assert!(err.contains(want), "want {want:?} in:\n{err}");
        assert!(err.contains(&format!("c{i}.toml:")), "located: {err}");
    }
    // A node that the file does not name, or the front, is told what to run instead.
    let f = write(
        dir.path(),
        "ok.toml",
        &base(
            "[cluster]\nfront = \"n1\"\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
            "nodes = [\"n1\", \"n2\"]",
        ),
    );
    let out = common::poolpipe(&["node", f.to_str().unwrap(), "--name", "n1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`n1` is the front: run `poolpipe run"));
}
