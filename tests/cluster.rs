//! A pipeline across nodes: `poolpipe node` processes serve workers of a cut model, the front
//! (`poolpipe run`) reaches them over gRPC. On loopback here; `cluster_netns.rs` runs the same
//! on shaped links between network namespaces.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{KillOnDrop, bin, deploy, free_port, planned, read_summary, wait_listening, write};
use serde_json::Value;

/// The lab's cut pipeline, its two worker nodes on loopback.
fn cluster_file(
    dir: &Path,
    profiles: &Path,
    nodes: &[(&str, String)],
    fps: u32,
    gbps: f64,
) -> PathBuf {
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

/// `poolpipe run FILE` for `seconds` on the front, its summary to `summary`.
fn front(file: &Path, seconds: u32, summary: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin())
            .args(["run", file.to_str().unwrap(), "--api", "off", "--duration"])
            .arg(seconds.to_string())
            .arg("--summary-json")
            .arg(summary)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// At least 90% of the frames ingested were published.
fn assert_mostly_published(summary: &Value) {
    let (ingested, published) = (sum(summary, "ingested"), sum(summary, "published"));
    assert!(
        published as f64 >= 0.9 * ingested as f64,
        "published {published} of {ingested}: {summary}"
    );
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
    let mut front = front(&file, 15, &summary);
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
    // Frames in flight on n3 when it died are lost, and only those: the front hands n3's worker
    // up to three batches (one awaited, one behind it, one being handed over: n3 receives the
    // next batch while it computes one), and one more may have been reserved on it before the
    // front saw it go.
    let n3s = common::node_of(&s, "n3");
    assert_eq!(n3s["lost"].as_u64().unwrap(), lost, "{s}");
    assert!(
        lost <= 4 * 4,
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
        common::node_of(&s, "n2")["frames"].as_u64().unwrap(),
        n2s["frames"].as_u64().unwrap(),
        "the front's count of n2's frames is n2's own"
    );
    // Bytes crossed: every frame sent its cut (about 2.2 MB for this model at block 5).
    let sent = common::node_of(&s, "n2")["bytes_sent"].as_u64().unwrap();
    let frames = common::node_of(&s, "n2")["frames"].as_u64().unwrap();
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

/// The cut model with both halves on worker nodes (head on n2, tails on n3) on loopback.
fn node_to_node_file(dir: &Path, profiles: &Path, ports: (u16, u16), direct: bool) -> PathBuf {
    let (n2, n3) = (
        format!("127.0.0.1:{}", ports.0),
        format!("127.0.0.1:{}", ports.1),
    );
    write(
        dir,
        "direct.toml",
        &poolpipe::cluster::netns::node_to_node_pipeline(
            profiles,
            (&n2, &n3),
            10.0,
            8,
            &dir.join("out.jsonl"),
            direct,
        ),
    )
}

#[test]
fn a_cut_goes_from_node_to_node_without_passing_through_the_front() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Per frame on each link, by the front's and the nodes' counts: (front to n3, n3 took from
    // n2, n2's answers to the front), and n2's hand-off counters.
    let mut runs = Vec::new();
    for direct in [true, false] {
        let ports = (free_port(), free_port());
        let file = node_to_node_file(dir.path(), &profiles, ports, direct);
        let n2 = node(&file, "n2", &dir.path().join("n2.json"));
        let n3 = node(&file, "n3", &dir.path().join("n3.json"));
        assert!(wait_listening(ports.0, Duration::from_secs(20)));
        assert!(wait_listening(ports.1, Duration::from_secs(20)));
        let summary = dir.path().join("front.json");
        let status = front(&file, 8, &summary).0.wait().unwrap();
        assert!(status.success(), "front exited with {status}");
        common::stop_with(n2, "INT");
        common::stop_with(n3, "INT");
        let s = read_summary(&summary);
        common::assert_balanced(&s);
        assert_eq!(sum(&s, "lost"), 0, "{s}");
        let (n2s, n3s) = (
            read_summary(&dir.path().join("n2.json")),
            read_summary(&dir.path().join("n3.json")),
        );
        let tail = common::node_of(&s, "n3");
        let frames = tail["frames"].as_u64().unwrap().max(1);
        let head = common::node_of(&s, "n2");
        let per = |v: &Value, frames: u64| v.as_u64().unwrap() / frames;
        runs.push((
            s.clone(),
            per(&tail["bytes_sent"], frames),
            per(&tail["bytes_direct"], frames),
            per(&head["bytes_back"], head["frames"].as_u64().unwrap().max(1)),
            n2s["handoff"].clone(),
            n3s["handoff"].clone(),
        ));
    }
    let (s, to_tail, direct, back, n2h, n3h) = &runs[0];
    assert_mostly_published(s);
    // The cut (about 2.2 MB a frame) went from n2 to n3 alone; the front sent n3 headers and
    // got headers back from n2.
    assert!(
        *to_tail < 20_000,
        "{to_tail} bytes a frame from the front to n3: {s}"
    );
    assert!(
        *direct > 2_000_000,
        "{direct} bytes a frame from n2 to n3: {s}"
    );
    assert!(*back < 20_000, "{back} bytes a frame back from n2: {s}");
    // Every output n2 held was handed over once, to n3; none was left to expire, and the
    // front dropped none before n3 took it.
    let held = n2h["held"].as_u64().unwrap();
    assert!(held > 0, "{n2h}");
    assert_eq!(n2h["given"], n3h["taken"], "{n2h} {n3h}");
    let n = |k: &str| n2h[k].as_u64().unwrap_or_else(|| panic!("no {k} in {n2h}"));
    assert_eq!(n("given") + n("expired") + n("released"), held, "{n2h}");
    assert_eq!(n2h["expired"], 0, "{n2h}");
    assert_eq!(n2h["released"], 0, "{n2h}");
    assert_eq!(n3h["take_failed"], 0, "{n3h}");
    assert_eq!(
        n3h["bytes_taken"].as_u64().unwrap(),
        common::node_of(s, "n3")["bytes_direct"].as_u64().unwrap(),
        "the front's count of what n3 took is n3's own"
    );
    // Through the front (`direct_links = false`): the cut comes back from n2 and goes out to
    // n3, and nothing is held.
    let (s, to_tail, direct, back, n2h, _) = &runs[1];
    assert!(*to_tail > 2_000_000, "{to_tail}: {s}");
    assert!(*back > 2_000_000, "{back}: {s}");
    assert_eq!(*direct, 0, "{s}");
    assert_eq!(n2h["held"], 0, "{n2h}");
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
        (
            base(
                "[cluster]\nfront = \"n1\"\nnats = \"http://127.0.0.1:4222\"\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
                "",
            ),
            "`http://127.0.0.1:4222`: expected nats://HOST:PORT",
        ),
        (
            base(
                "[cluster]\nfront = \"n1\"\nfronts = 2\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
                "",
            ),
            "2 fronts share the cameras through a controller: set `nats`",
        ),
        (
            base(
                "[cluster]\nfront = \"n1\"\nfronts = 0\nnats = \"nats://127.0.0.1:4222\"\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
                "",
            ),
            "at least 1 front runs the cameras",
        ),
        (
            base(
                "[cluster]\nfront = \"n1\"\nhold_ms = 0\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
                "",
            ),
            "`cluster.hold_ms`: a node must hold an output for at least 1 ms",
        ),
        (
            base(
                "[cluster]\nfront = \"n1\"\nhold_mib = 0\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
                "",
            ),
            "`cluster.hold_mib`: a node needs room to hold at least 1 MiB",
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
    // A node that the file does not name joins only with what it offers, through a controller.
    let with_nats = write(
        dir.path(),
        "nats.toml",
        &base(
            "[cluster]\nfront = \"n1\"\nnats = \"nats://127.0.0.1:1\"\nnodes = { n2 = \"127.0.0.1:7000\" }\n",
            "nodes = [\"n1\", \"n2\"]",
        ),
    );
    let node_cases: [(&Path, &[&str], &str); 6] = [
        (
            &f,
            &["--name", "n9"],
            "no node `n9` in [cluster] nodes (n2); to join as a new node, give --gpus",
        ),
        (
            &f,
            &["--name", "n9", "--gpus", "T4:1"],
            "needs a controller: [cluster] has no `nats`",
        ),
        (
            &f,
            &["--name", "n2", "--gpus", "T4:1"],
            "--gpus is for a node the file does not name",
        ),
        (
            &with_nats,
            &["--name", "n9", "--gpus", "T4"],
            "--gpus T4: expected CLASS:COUNT",
        ),
        (
            &with_nats,
            &["--name", "n9", "--gpus", "T4:1"],
            "give --listen HOST:PORT",
        ),
        (
            &with_nats,
            &["--name", "n9", "--gpus", "T4:1", "--listen", "0.0.0.0:7000"],
            "give --advertise HOST:PORT",
        ),
    ];
    for (file, args, want) in node_cases {
        let mut all = vec!["node", file.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = common::poolpipe(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in:\n{err}");
    }
    // A controller needs `nats` in [cluster] (and a placed plan).
    let out = common::poolpipe(&["controller", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[cluster] has no `nats`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_placed_plan_runs_on_the_nodes_deploy_names() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let files = planned(dir.path(), &profiles);
    let names = ["l4-0", "t4-0", "t4-1"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let out = dir.path().join("bare");
    let mut args: Vec<String> = vec!["--emit".into(), "nodes".into()];
    for (n, p) in names.iter().zip(&ports) {
        args.push("--address".into());
        args.push(format!("{n}=127.0.0.1:{p}"));
    }
    let o = deploy(
        &files,
        &out,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = out.join("pipeline.toml");
    let nodes: Vec<KillOnDrop> = names
        .iter()
        .map(|n| node(&file, n, &dir.path().join(format!("{n}.json"))))
        .collect();
    for p in &ports {
        assert!(wait_listening(*p, Duration::from_secs(20)));
    }
    let summary = dir.path().join("front.json");
    let front = Command::new(bin())
        .args([
            "run",
            file.to_str().unwrap(),
            "--duration",
            "6",
            "--api",
            "off",
        ])
        .arg("--summary-json")
        .arg(&summary)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(front.success());
    let s = read_summary(&summary);
    common::assert_balanced(&s);
    let (ingested, published) = (sum(&s, "ingested"), sum(&s, "published"));
    assert!(published as f64 >= 0.95 * ingested as f64, "{s}");
    // Every server of the placement ran the batches of its processes.
    for (n, child) in names.iter().zip(nodes) {
        common::stop_with(child, "INT");
        let ns = read_summary(&dir.path().join(format!("{n}.json")));
        assert!(ns["frames"].as_u64().unwrap() > 0, "{n} ran nothing: {ns}");
        assert_eq!(common::node_of(&s, n)["frames"], ns["frames"], "{n}");
    }
}

#[test]
fn kubernetes_manifests_validate_offline_and_a_missing_class_is_named() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let validate = common::require(".venv/bin/kubernetes-validate");
    let dir = tempfile::tempdir().unwrap();
    let inputs = planned(dir.path(), &profiles);
    let out = dir.path().join("k8s");
    let o = deploy(&inputs, &out, &["--namespace", "video"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "configmap.yaml",
            "front.yaml",
            "node-l4.yaml",
            "node-t4.yaml",
            "service-front.yaml",
            "service-nodes.yaml"
        ]
    );
    let check = |files: &[PathBuf]| {
        Command::new(&validate)
            .args(["--strict", "--quiet"])
            .args(files)
            .output()
            .unwrap()
    };
    let v = check(&files);
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let t4 = std::fs::read_to_string(out.join("node-t4.yaml")).unwrap();
    for want in [
        "replicas: 2",
        "nvidia.com/gpu: 1",
        "nvidia.com/gpu.product: \"Tesla-T4\"",
        "tolerationSeconds: 10",
        "namespace: \"video\"",
    ] {
        assert!(t4.contains(want), "{want} in {t4}");
    }
    let config = std::fs::read_to_string(out.join("configmap.yaml")).unwrap();
    assert!(
        config.contains("t4-1 = \"poolpipe-t4-1.poolpipe-nodes:7070\""),
        "{config}"
    );
    // The validator refuses what Kubernetes would: a misspelt field.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, t4.replace("replicas:", "replica:")).unwrap();
    assert!(
        !check(&[bad]).status.success(),
        "the validator accepts anything"
    );

    // With a controller: a NATS server (JetStream) and two controllers (one holds the lease),
    // and the pipeline's [cluster] points at the NATS Service.
    // A pool of two T4 pods that join by offering their GPUs.
    let ctl = dir.path().join("k8s-ctl");
    let o = deploy(
        &inputs,
        &ctl,
        &["--controller", "--join", "T4:1=2", "--fronts", "2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&ctl)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for want in [
        "controller.yaml",
        "nats.yaml",
        "service-nats.yaml",
        "node-join-t4.yaml",
    ] {
        assert!(files.contains(&ctl.join(want)), "{want} in {files:?}");
    }
    let join = std::fs::read_to_string(ctl.join("node-join-t4.yaml")).unwrap();
    for want in [
        "kind: \"Deployment\"",
        "replicas: 2",
        "--gpus T4:1",
        "--advertise \\\"$POD_IP:7070\\\"",
        "fieldPath: \"status.podIP\"",
        "nvidia.com/gpu.product: \"Tesla-T4\"",
    ] {
        assert!(join.contains(want), "{want} in {join}");
    }
    // Joining nodes need the controller, and a pool says what it is.
    for (extra, says) in [
        (&["--join", "T4:1=2"][..], "needs --emit k8s --controller"),
        (
            &["--controller", "--join", "T4=2"][..],
            "expected CLASS:GPUS=PODS",
        ),
    ] {
        let o = deploy(&inputs, &dir.path().join("k8s-bad"), extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    let v = check(&files);
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let config = std::fs::read_to_string(ctl.join("configmap.yaml")).unwrap();
    assert!(
        config.contains("nats = \"nats://poolpipe-nats:4222\""),
        "{config}"
    );
    assert!(config.contains("fronts = 2"), "{config}");
    let controller = std::fs::read_to_string(ctl.join("controller.yaml")).unwrap();
    assert!(controller.contains("poolpipe controller"), "{controller}");
    assert!(controller.contains("replicas: 2"), "{controller}");
    let nats = std::fs::read_to_string(ctl.join("nats.yaml")).unwrap();
    assert!(nats.contains("\"-js\""), "{nats}");
    // Three fronts, on different machines where there are: the two lease holders run their
    // shares of the cameras and are the Service's ready endpoints; the standby never answers a
    // liveness probe.
    let front = std::fs::read_to_string(ctl.join("front.yaml")).unwrap();
    assert!(front.contains("replicas: 3"), "{front}");
    assert!(front.contains("podAntiAffinity"), "{front}");
    assert!(front.contains("readinessProbe"), "{front}");
    assert!(!front.contains("livenessProbe"), "{front}");
    // Bare-metal nodes need to be told where NATS is.
    let o = deploy(
        &inputs,
        &dir.path().join("bare"),
        &["--emit", "nodes", "--controller"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--nats"));

    // Servers without the plan's T4s: the class is named.
    let l4_only = write(
        dir.path(),
        "l4.toml",
        "[[servers]]\nname = \"l4\"\nclass = \"L4\"\ncount = 4\ngpus = 4\nlink_gbps = 10\n",
    );
    let o = deploy(
        &(inputs.0.clone(), l4_only, inputs.2.clone()),
        &dir.path().join("k8s2"),
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("runs processes on T4, which no server has"),
        "{err}"
    );
}

/// The planned pipeline deployed for bare-metal nodes on loopback (each of `names` on a port of
/// its own) with `[cluster] nats` pointing at a nats-server started here: the pipeline file, the
/// nodes' ports and the server.
fn controlled(dir: &Path, profiles: &Path, names: &[&str]) -> (PathBuf, Vec<u16>, KillOnDrop) {
    controlled_files(dir, &planned(dir, profiles), names)
}

/// [`controlled`] of the plan, servers and pipeline `files`.
fn controlled_files(
    dir: &Path,
    files: &(PathBuf, PathBuf, PathBuf),
    names: &[&str],
) -> (PathBuf, Vec<u16>, KillOnDrop) {
    let nats_port = free_port();
    let out = dir.join("bare");
    let mut args: Vec<String> = vec![
        "--emit".into(),
        "nodes".into(),
        "--nats".into(),
        format!("nats://127.0.0.1:{nats_port}"),
    ];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    for (n, p) in names.iter().zip(&ports) {
        args.push("--address".into());
        args.push(format!("{n}=127.0.0.1:{p}"));
    }
    let o = deploy(
        files,
        &out,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let nats = common::start_nats(&dir.join("js"), nats_port);
    (out.join("pipeline.toml"), ports, nats)
}

/// A controller owns the plan (`[cluster] nats`): when a node dies it re-plans on the servers
/// that remain and publishes the next epoch, which the nodes and the front apply while running;
/// when the node comes back it rejoins in the epoch after. A real nats-server (JetStream) on
/// loopback carries heartbeats, the lease and the epochs.
#[test]
fn a_controller_replans_around_a_lost_node_and_takes_it_back() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = ["l4-0", "t4-0", "t4-1"];
    let (file, ports, _nats) = controlled(dir.path(), &profiles, &names);
    let controller = KillOnDrop(
        Command::new(bin())
            .args(["controller", file.to_str().unwrap(), "--summary-json"])
            .arg(dir.path().join("controller.json"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut nodes: Vec<Option<KillOnDrop>> = names
        .iter()
        .map(|n| Some(node(&file, n, &dir.path().join(format!("{n}.json")))))
        .collect();
    for p in &ports {
        assert!(wait_listening(*p, Duration::from_secs(20)));
    }
    let summary = dir.path().join("front.json");
    let mut front = front(&file, 22, &summary);
    // t4-1 dies at 8 s (SIGKILL) and comes back at 14 s.
    std::thread::sleep(Duration::from_secs(8));
    let killed_ms = poolpipe::clock::unix_ms();
    drop(nodes[2].take());
    std::thread::sleep(Duration::from_secs(6));
    let back = node(&file, "t4-1", &dir.path().join("t4-1b.json"));
    let status = front.0.wait().unwrap();
    assert!(status.success(), "front exited with {status}");
    let s = read_summary(&summary);
    common::assert_balanced(&s);
    assert_eq!(sum(&s, "failed"), 0, "{s}");

    // The front applied epoch 0 (the file's), 1 (without t4-1) and 2 (with it again), each
    // after the nodes it uses had applied it.
    let epochs = s["epochs"].as_array().expect("epochs in the summary");
    let numbers: Vec<u64> = epochs
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [0, 1, 2], "{s}");
    for e in epochs {
        assert!(e.get("error").is_none(), "{e}");
        assert_eq!(e["nodes_not_ready"], serde_json::json!([]), "{e}");
    }
    assert_eq!(epochs[1]["reason"], "lost t4-1");
    assert!(
        !epochs[1]["members"].to_string().contains("t4-1"),
        "{}",
        epochs[1]
    );
    assert_eq!(epochs[2]["reason"], "joined t4-1");
    // Seen and re-planned within 2 s of the kill, and running on the front soon after.
    let published_ms = epochs[1]["published_unix_ms"].as_u64().unwrap();
    let applied_ms = epochs[1]["applied_unix_ms"].as_u64().unwrap();
    assert!(
        published_ms - killed_ms <= 2000,
        "epoch 1 published {} ms after the kill",
        published_ms - killed_ms
    );
    assert!(applied_ms - killed_ms <= 3000, "{}", epochs[1]);
    // Each epoch's routes ran frames: the stages it started carry its number.
    for prefix in ["f0.p0.", "f0.e1.", "f0.e2."] {
        assert!(
            common::frames_out_of(&s, prefix) > 0,
            "no frames on {prefix}*: {s}"
        );
    }
    // The returning node applied epoch 2 and ran batches of it.
    common::stop_with(back, "INT");
    let b = read_summary(&dir.path().join("t4-1b.json"));
    assert!(b["frames"].as_u64().unwrap() > 0, "{b}");
    assert_eq!(b["epochs_applied"], serde_json::json!([2]), "{b}");
    for n in nodes.iter_mut().filter_map(Option::take) {
        common::stop_with(n, "INT");
    }
    common::stop_with(controller, "INT");
    let c = read_summary(&dir.path().join("controller.json"));
    let published_epochs: Vec<u64> = c["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(published_epochs, [0, 1, 2], "{c}");
    // Well within the plan's capacity, on two GPUs as on three: losing one costs the frames in
    // flight on it and little else.
    assert_mostly_published(&s);
}

/// Epoch naming and re-planning, as the controller does them (library calls): a route that the
/// next plan runs unchanged keeps its stages' names, so nodes and the front keep running it;
/// a changed one is named for its epoch; a re-plan without a class the model needs is an error
/// that names what is up.
#[test]
fn epochs_keep_unchanged_routes_and_replan_on_the_servers_that_remain() {
    use poolpipe::cluster::epoch::{Epoch, live_servers, name_routes, replan_on};
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (plan, servers, _) = planned(dir.path(), &profiles);
    let profiles = poolpipe::profile::Profiles::load_dir(&profiles, None).unwrap();
    let mut plan = poolpipe::planner::Plan::load(&plan).unwrap();
    let servers = poolpipe::planner::placement::load_servers(&servers).unwrap();
    plan.placement = Some(
        poolpipe::planner::placement::place(&plan, &servers, &|m, a| profiles.cut_bytes(m, a))
            .unwrap(),
    );
    let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
    let flows = vec![("f0".to_string(), "wide_resnet101_2".to_string())];
    let epoch = |n: u64, plan: &poolpipe::planner::Plan, prev: Option<&Epoch>| Epoch {
        epoch: n,
        members: names.clone(),
        reason: String::new(),
        routes: name_routes(plan, &flows, n, prev),
        addresses: Default::default(),
        shards: Vec::new(),
        plan: plan.clone(),
        plan_s: 0.0,
        at_unix_ms: 0,
    };
    let e0 = epoch(0, &plan, None);
    assert_eq!(e0.routes.len(), plan.models[0].pipelines.len());
    assert!(e0.routes[0].stages[0].starts_with("f0.p0.s"), "{e0:?}");
    // The same plan again: every route keeps its names.
    let e1 = epoch(1, &plan, Some(&e0));
    assert_eq!(e1.routes, e0.routes);
    // Without the last T4 server: a smaller plan, placed only on the servers that remain, its
    // changed routes named for epoch 2.
    let up: Vec<String> = names[..names.len() - 1].to_vec();
    let remaining = live_servers(&servers, &up);
    assert_eq!(remaining.len(), servers.len() - 1);
    let smaller = replan_on(&plan, &remaining, &profiles, Duration::from_secs(5)).unwrap();
    let placed = smaller.placement.as_ref().unwrap();
    assert!(
        placed
            .processes
            .iter()
            .all(|p| up.contains(&placed.servers[p.server].name)),
        "{placed:?}"
    );
    let processes = |p: &poolpipe::planner::Plan| -> u32 {
        p.models[0]
            .pipelines
            .iter()
            .flat_map(|x| &x.stages)
            .map(|s| s.processes)
            .sum()
    };
    assert!(processes(&smaller) < processes(&plan));
    let e2 = epoch(2, &smaller, Some(&e1));
    assert!(
        e2.routes.iter().any(|r| r.stages[0].starts_with("f0.e2.")),
        "{e2:?}"
    );
    assert!(!e2.used_nodes("front").contains(&names[names.len() - 1]));
    // With no server up nothing can be planned, and the error says so.
    let none = replan_on(&plan, &[], &profiles, Duration::from_secs(5)).unwrap_err();
    assert!(none.to_string().contains("no server is up"), "{none}");
}

/// Two controllers: one holds the lease and publishes epoch 0; when it dies (SIGKILL, so it
/// cannot let go) the other takes the lease once it expires and carries on from the epoch it
/// finds instead of starting over.
#[test]
fn a_standby_controller_takes_over_when_the_lease_expires() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (file, _, _nats) = controlled(dir.path(), &profiles, &[]);
    let controller = |id: &str| {
        KillOnDrop(
            Command::new(bin())
                .args(["controller", file.to_str().unwrap(), "--id", id])
                .arg("--summary-json")
                .arg(dir.path().join(format!("{id}.json")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let a = controller("a");
    std::thread::sleep(Duration::from_millis(1500));
    let b = controller("b");
    std::thread::sleep(Duration::from_millis(1000));
    let killed = poolpipe::clock::unix_ms();
    drop(a);
    // The lease lives 3 s after a's last renewal; b tries every second. Stopped before its
    // start-up grace for silent nodes ends, b has nothing to re-plan.
    std::thread::sleep(Duration::from_millis(6000));
    common::stop_with(b, "INT");
    let s = read_summary(&dir.path().join("b.json"));
    let leases = s["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{s}");
    let taken = leases[0]["taken_unix_ms"].as_u64().unwrap();
    assert!(taken > killed, "b took the lease while a held it: {s}");
    assert!(taken - killed <= 5000, "{} ms after a died", taken - killed);
    assert_eq!(leases[0]["found_epoch"], 0, "{s}");
    assert_eq!(s["epochs"], serde_json::json!([]), "b published again: {s}");
}

/// A node that is up but does not run the worker a batch is for (the front and the node disagree
/// on the layout, as when an epoch reached one and not yet the other): the batch fails, counted
/// `failed` with the node's reason, and the node stays up; nothing is `lost`.
#[test]
fn a_batch_for_a_worker_the_node_does_not_run_fails_and_the_node_stays_up() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (p2, p3) = (free_port(), free_port());
    let nodes = [
        ("n2", format!("127.0.0.1:{p2}")),
        ("n3", format!("127.0.0.1:{p3}")),
    ];
    let node_file = cluster_file(dir.path(), &profiles, &nodes, 4, 10.0);
    // The front calls the tail stage by another name.
    let text = std::fs::read_to_string(&node_file).unwrap();
    let front_file = write(
        dir.path(),
        "front.toml",
        &text.replace("name = \"tail\"", "name = \"tail2\""),
    );
    let n2 = node(&node_file, "n2", &dir.path().join("n2.json"));
    let n3 = node(&node_file, "n3", &dir.path().join("n3.json"));
    assert!(wait_listening(p2, Duration::from_secs(20)));
    assert!(wait_listening(p3, Duration::from_secs(20)));
    let summary = dir.path().join("front.json");
    let status = front(&front_file, 4, &summary).0.wait().unwrap();
    assert!(status.success(), "front exited with {status}");
    let s = read_summary(&summary);
    common::assert_balanced(&s);
    assert!(sum(&s, "failed") > 0, "{s}");
    assert_eq!(sum(&s, "lost"), 0, "{s}");
    assert_eq!(sum(&s, "published"), 0, "{s}");
    for n in ["n2", "n3"] {
        let ns = common::node_of(&s, n);
        assert_eq!(ns["downs"], 0, "{ns}");
        assert_eq!(ns["up"], true, "{ns}");
    }
    drop((n2, n3));
}

/// A front that starts (or restarts) after the controller re-planned starts in the current
/// epoch: it waits only for the nodes that epoch uses (t4-1 never came up here) and runs the
/// epoch's routes from its first frame.
#[test]
fn a_front_that_starts_late_starts_in_the_current_epoch() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = ["l4-0", "t4-0", "t4-1"];
    let (file, _, _nats) = controlled(dir.path(), &profiles, &names);
    let _controller = KillOnDrop(
        Command::new(bin())
            .args(["controller", file.to_str().unwrap(), "--startup-grace", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let _nodes: Vec<KillOnDrop> = names[..2]
        .iter()
        .map(|n| node(&file, n, &dir.path().join(format!("{n}.json"))))
        .collect();
    // t4-1 is silent: after the grace the controller plans without it.
    std::thread::sleep(Duration::from_secs(5));
    let summary = dir.path().join("front.json");
    let status = front(&file, 6, &summary).0.wait().unwrap();
    assert!(status.success(), "front exited with {status}");
    let s = read_summary(&summary);
    common::assert_balanced(&s);
    let first = &s["epochs"][0];
    assert_eq!(first["epoch"], 1, "{s}");
    assert_eq!(first["started_in"], true, "{s}");
    assert_eq!(first["reason"], "lost t4-1", "{s}");
    assert!(common::frames_out_of(&s, "f0.e1.") > 0, "{s}");
    assert_eq!(common::frames_out_of(&s, "f0.p0."), 0, "{s}");
    assert_eq!(sum(&s, "failed"), 0, "{s}");
    assert_mostly_published(&s);
}

/// Membership over NATS: a node that the file does not name joins the running cluster by
/// offering its GPUs (`poolpipe node --gpus T4:1 --listen ...`). The controller takes it in at
/// once and re-plans with it ("joined t4-new"); the epoch carries its address, the front links
/// to it while running and sends it batches. An offer of a class the plan has no latencies for
/// is refused and said in the controller's summary.
#[test]
fn a_node_the_file_does_not_name_joins_by_offering_its_gpus() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The file places the plan on l4-0, t4-0 and t4-1; t4-1 never comes.
    let names = ["l4-0", "t4-0", "t4-1"];
    let (file, _, _nats) = controlled(dir.path(), &profiles, &names);
    let controller = KillOnDrop(
        Command::new(bin())
            .args(["controller", file.to_str().unwrap(), "--startup-grace", "1"])
            .arg("--summary-json")
            .arg(dir.path().join("controller.json"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let nodes: Vec<KillOnDrop> = names[..2]
        .iter()
        .map(|n| node(&file, n, &dir.path().join(format!("{n}.json"))))
        .collect();
    // After the grace the controller plans without t4-1 (epoch 1), and the front starts in it.
    std::thread::sleep(Duration::from_secs(4));
    let summary = dir.path().join("front.json");
    let mut front = front(&file, 16, &summary);
    std::thread::sleep(Duration::from_secs(5));
    let joining = |name: &str, gpus: &str| {
        let port = free_port();
        let child = KillOnDrop(
            Command::new(bin())
                .args([
                    "node",
                    file.to_str().unwrap(),
                    "--name",
                    name,
                    "--gpus",
                    gpus,
                ])
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--summary-json")
                .arg(dir.path().join(format!("{name}.json")))
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        assert!(wait_listening(port, Duration::from_secs(20)));
        child
    };
    let joined_ms = poolpipe::clock::unix_ms();
    let new = joining("t4-new", "T4:1");
    let refused = joining("a100-x", "A100:1");
    let status = front.0.wait().unwrap();
    assert!(status.success(), "front exited with {status}");
    let s = read_summary(&summary);
    common::assert_balanced(&s);
    assert_eq!(sum(&s, "failed"), 0, "{s}");
    let epochs = s["epochs"].as_array().expect("epochs in the summary");
    let numbers: Vec<u64> = epochs
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2], "{s}");
    assert_eq!(epochs[1]["reason"], "joined t4-new", "{s}");
    assert!(epochs[1].get("error").is_none(), "{}", epochs[1]);
    assert_eq!(epochs[1]["nodes_not_ready"], serde_json::json!([]));
    assert!(
        epochs[1]["published_unix_ms"].as_u64().unwrap() - joined_ms <= 3000,
        "{}",
        epochs[1]
    );
    // The front linked to the new node and sent it batches of epoch 2's routes.
    assert!(common::frames_out_of(&s, "f0.e2.") > 0, "{s}");
    let n = common::node_of(&s, "t4-new");
    assert_eq!(n["up"], true, "{n}");
    common::stop_with(new, "INT");
    let t = read_summary(&dir.path().join("t4-new.json"));
    assert!(t["frames"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(t["epochs_applied"], serde_json::json!([2]), "{t}");
    // The A100 node was never a member: nothing ran on it.
    common::stop_with(refused, "INT");
    let a = read_summary(&dir.path().join("a100-x.json"));
    assert_eq!(a["frames"], 0, "{a}");
    for n in nodes {
        common::stop_with(n, "INT");
    }
    common::stop_with(controller, "INT");
    let c = read_summary(&dir.path().join("controller.json"));
    let why = c["refused_offers"]["a100-x"].as_str().unwrap_or_default();
    assert!(why.contains("class `A100`"), "{c}");
    let published: Vec<&Value> = c["epochs"].as_array().unwrap().iter().collect();
    assert_eq!(published.len(), 3, "{c}");
    assert_eq!(published[2]["joined"], serde_json::json!(["t4-new"]), "{c}");
    assert_mostly_published(&s);
}

/// Ingest over several fronts at once (`[cluster] fronts = 2`): the controller splits the
/// cameras and routes of a two-model plan into two shards, and each `poolpipe run` of the file
/// takes one front lease, runs only its shard's camera and routes, and makes the reservations
/// of those routes' workers alone. A third front stands by; when one of the two dies (SIGKILL)
/// the standby takes its shard over, while the other front runs on untouched. When the standby
/// stops too and no front is left for that shard, the remaining front takes it over beside its
/// own.
#[test]
fn two_fronts_share_the_cameras_and_a_standby_takes_a_dead_fronts_share() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = common::planned_flows(
        d,
        &profiles,
        &[
            ("wide", "wide_resnet101_2"),
            ("goog", "googlenet-v3-pytorch"),
        ],
    );
    let names = ["l4-0", "t4-0", "t4-1"];
    let (file, ports, _nats) = controlled_files(d, &files, &names);
    let text = std::fs::read_to_string(&file).unwrap();
    // Each front's results to its own stdout.
    let text = text.replace(&d.join("out.jsonl").display().to_string(), "-");
    std::fs::write(
        &file,
        text.replace("[cluster]\n", "[cluster]\nfronts = 2\n"),
    )
    .unwrap();
    let controller = KillOnDrop(
        Command::new(bin())
            .args(["controller", file.to_str().unwrap(), "--summary-json"])
            .arg(d.join("controller.json"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let nodes: Vec<KillOnDrop> = names
        .iter()
        .map(|n| node(&file, n, &d.join(format!("{n}.json"))))
        .collect();
    for p in &ports {
        assert!(wait_listening(*p, Duration::from_secs(20)));
    }
    let a = front(&file, 30, &d.join("a.json"));
    std::thread::sleep(Duration::from_millis(1500));
    let mut b = front(&file, 32, &d.join("b.json"));
    std::thread::sleep(Duration::from_millis(1000));
    let mut c = front(&file, 8, &d.join("c.json"));
    // A and B run a shard each, C stands by; A dies; C runs A's share for 8 s and stops.
    std::thread::sleep(Duration::from_secs(6));
    let killed_ms = poolpipe::clock::unix_ms();
    drop(a);
    for f in [&mut c, &mut b] {
        let status = f.0.wait().unwrap();
        assert!(status.success(), "front exited with {status}");
    }
    let (bs, cs) = (
        read_summary(&d.join("b.json")),
        read_summary(&d.join("c.json")),
    );
    for s in [&bs, &cs] {
        common::assert_balanced(s);
        assert_eq!(sum(s, "failed"), 0, "{s}");
        assert_eq!(s["front_lease"]["fronts"], 2, "{s}");
        assert_mostly_published(s);
    }
    // B and C ran the two shards: different cameras, different flows' routes.
    assert_ne!(bs["front_lease"]["shard"], cs["front_lease"]["shard"]);
    let streams = |s: &Value| -> Vec<(String, u64)> {
        s["streams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["name"].as_str().unwrap().to_string(),
                    x["ingested"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let c_cams = streams(&cs);
    assert_eq!(c_cams.len(), 1, "{cs}");
    let (c_cam, _) = c_cams[0].clone();
    let b_cams = streams(&bs);
    let b_cam = b_cams
        .iter()
        .find(|(n, _)| *n != c_cam)
        .expect("B's own camera")
        .clone();
    let flow_of = |cam: &str| cam.trim_start_matches("cam-").to_string();
    assert!(common::frames_out_of(&cs, &flow_of(&c_cam)) > 0, "{cs}");
    assert_eq!(common::frames_out_of(&cs, &flow_of(&b_cam.0)), 0, "{cs}");
    // C stood by until A's lease ran out, then took A's share within the lease's life.
    let taken = cs["front_lease"]["taken_unix_ms"].as_u64().unwrap();
    assert!(taken > killed_ms, "C ran before A died: {cs}");
    assert!(
        taken - killed_ms <= 5000,
        "{} ms after A died",
        taken - killed_ms
    );
    // B ran its own camera through A's death, and C's: its camera ran the whole time.
    assert!(b_cam.1 >= 280, "{bs}");
    // When C stopped and no standby was left, B took C's share over beside its own.
    let adopted = bs["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("took over shard"))
        })
        .unwrap_or_else(|| panic!("B took no shard over: {bs}"));
    assert_eq!(
        adopted["cameras_taken"],
        serde_json::json!([c_cam]),
        "{adopted}"
    );
    assert_eq!(adopted["shards"].as_array().unwrap().len(), 2, "{adopted}");
    let taken_again = b_cams
        .iter()
        .find(|(n, _)| *n == c_cam)
        .expect("C's camera on B");
    assert!(taken_again.1 > 0, "{bs}");
    assert!(common::frames_out_of(&bs, &flow_of(&c_cam)) > 0, "{bs}");
    // Nodes admitted both fronts' batches.
    for (n, child) in names.iter().zip(nodes) {
        common::stop_with(child, "INT");
        let ns = read_summary(&d.join(format!("{n}.json")));
        assert_eq!(ns["refused_batches"], 0, "{n}: {ns}");
    }
    common::stop_with(controller, "INT");
    let ctl = read_summary(&d.join("controller.json"));
    assert_eq!(ctl["epochs"].as_array().unwrap().len(), 1, "{ctl}");
}

/// The cameras move when the front that runs them is gone: a second `poolpipe run` of the same
/// file stands by (no API, no sources) while the first holds the front lease, and when the
/// first stops answering (SIGSTOP: a front cut off, or dead) it takes the lease once it
/// expires, reconnects to the RTSP camera and runs it in the controller's current epoch. The
/// first, resumed, finds its lease taken and stops with an error (two fronts do not keep
/// running one camera). A standby stopped before it took over exits cleanly having run nothing.
/// (`bench nodes --controller` SIGKILLs the front instead, in network namespaces.)
#[test]
fn a_standby_front_takes_the_camera_over_when_the_front_dies() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let sample = common::require("samples/campus.mp4");
    let dir = tempfile::tempdir().unwrap();
    let names = ["l4-0", "t4-0", "t4-1"];
    let (file, ports, _nats) = controlled(dir.path(), &profiles, &names);
    // The camera is an RTSP server on loopback.
    let rtsp = free_port();
    let _camera = common::start_rtsp_server(sample.to_str().unwrap(), rtsp);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("uri = \"test://ball\""), "{text}");
    std::fs::write(
        &file,
        text.replace(
            "uri = \"test://ball\"",
            &format!("uri = \"rtsp://127.0.0.1:{rtsp}/cam\"\nlatency_ms = 100"),
        ),
    )
    .unwrap();
    let ctl_summary = dir.path().join("controller.json");
    let controller = KillOnDrop(
        Command::new(bin())
            .args(["controller", file.to_str().unwrap(), "--summary-json"])
            .arg(&ctl_summary)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let _nodes: Vec<KillOnDrop> = names
        .iter()
        .map(|n| node(&file, n, &dir.path().join(format!("{n}.json"))))
        .collect();
    for p in &ports {
        assert!(wait_listening(*p, Duration::from_secs(20)));
    }
    let run = |api: u16, extra: &[&str]| {
        KillOnDrop(
            Command::new(bin())
                .args(["run", file.to_str().unwrap(), "--api"])
                .arg(format!("127.0.0.1:{api}"))
                .args(extra)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    };
    let (a_api, b_api, c_api) = (free_port(), free_port(), free_port());
    let a_summary = dir.path().join("a.json");
    let mut a = run(
        a_api,
        &["--serve", "--summary-json", a_summary.to_str().unwrap()],
    );
    assert!(
        wait_listening(a_api, Duration::from_secs(40)),
        "front A did not start"
    );
    common::wait_published(&format!("http://127.0.0.1:{a_api}"), 10);
    let b_summary = dir.path().join("b.json");
    let mut b = run(
        b_api,
        &[
            "--duration",
            "8",
            "--summary-json",
            b_summary.to_str().unwrap(),
        ],
    );
    // B stands by: it serves no API while A holds the camera.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        b.0.try_wait().unwrap().is_none(),
        "the standby front exited"
    );
    assert!(
        !wait_listening(b_api, Duration::from_millis(300)),
        "B serves while A runs"
    );

    let signal = |child: &KillOnDrop, sig: &str| {
        let pid = child.0.id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal(&a, "-STOP");
    let killed_ms = poolpipe::clock::unix_ms();
    assert!(
        wait_listening(b_api, Duration::from_secs(20)),
        "B did not take over"
    );
    // B says in /status which front it is and how long it stood by.
    let b_status = common::status(&format!("http://127.0.0.1:{b_api}"));
    assert!(
        b_status["front_lease"]["waited_s"].as_f64().unwrap() >= 4.0,
        "{b_status}"
    );
    // A comes back: its lease is B's now, so it stops, says why, and keeps its accounting.
    signal(&a, "-CONT");
    common::assert_deposed(&mut a, &a_summary);
    // A third front stands by behind B; stopped before it takes over, it ran nothing.
    let c_summary = dir.path().join("c.json");
    let c = run(c_api, &["--summary-json", c_summary.to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(2));
    let status = common::stop_with(c, "INT");
    assert!(status.success(), "a stopped standby exited with {status}");
    assert!(
        !c_summary.exists(),
        "a standby that ran nothing wrote a summary"
    );

    let status = b.0.wait().unwrap();
    assert!(status.success(), "front B exited with {status}");
    let s = read_summary(&b_summary);
    common::assert_balanced(&s);
    let lease = &s["front_lease"];
    assert_eq!(lease["lost"], false, "{s}");
    assert!(lease["waited_s"].as_f64().unwrap() >= 4.0, "{s}");
    // The lease lives 3 s and was renewed every second: taken at most about 4 s after the kill.
    let taken = lease["taken_unix_ms"].as_u64().unwrap();
    assert!(
        taken >= killed_ms && taken - killed_ms <= 5000,
        "lease taken {} ms after the kill",
        taken as i64 - killed_ms as i64
    );
    // B reconnected to the camera and ran it on the nodes, in the current epoch.
    assert_eq!(s["epochs"][0]["started_in"], true, "{s}");
    assert_eq!(sum(&s, "failed"), 0, "{s}");
    let ingested = sum(&s, "ingested");
    assert!(
        ingested >= 40,
        "B ingested {ingested} frames of a 10 fps camera in 8 s: {s}"
    );
    assert_mostly_published(&s);
    // The controller heard every front that ran the camera: A went silent (stopped) holding
    // frames, and later stopped, deposed; B stopped at its end. Each said what it held.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(common::stop_with(controller, "INT").success());
    let c = read_summary(&ctl_summary);
    let sa = read_summary(&a_summary);
    let gone = c["fronts_gone"].as_array().unwrap();
    let outcomes = |id: &Value| -> Vec<&str> {
        gone.iter()
            .filter(|g| &g["id"] == id)
            .map(|g| g["outcome"].as_str().unwrap())
            .collect()
    };
    assert_eq!(
        outcomes(&sa["front_lease"]["id"]),
        ["silent", "stopped"],
        "{c}"
    );
    assert_eq!(outcomes(&s["front_lease"]["id"]), ["stopped"], "{c}");
    let a_silent = gone
        .iter()
        .find(|g| g["id"] == sa["front_lease"]["id"])
        .unwrap();
    assert!(a_silent["ingested"].as_u64().unwrap() > 0, "{c}");
    assert!(
        a_silent["in_flight"].as_u64().unwrap() <= sa["flows"][0]["ingested"].as_u64().unwrap(),
        "{c}"
    );
}
