//! Cutting real models into blocks: the blocks in sequence give the whole model's output.

mod common;

use common::*;
use poolpipe::partition::split::{
    RunConfig, read_manifest, run_blocks, run_whole, sample_input, split,
};

/// Splits `model` into `k` blocks, then compares the chained blocks with the whole model at
/// batch 1 and 4 (graph optimisations off on both sides, so the same kernels run in the same
/// order). Returns the largest absolute difference seen.
fn blocks_match_whole(model: &str, k: usize, sample: &[usize]) -> f32 {
    let path = require(model);
    let dir = tempfile::tempdir().unwrap();
    let measure = RunConfig {
        sample_shape: sample.to_vec(),
        threads: 2,
        optimize: true,
    };
    let m = split(&path, k, dir.path(), &measure).unwrap();
    assert_eq!(m.blocks.len(), k);
    assert_eq!(
        read_manifest(dir.path()).unwrap(),
        m,
        "the manifest on disk is what split returned"
    );
    for (i, b) in m.blocks.iter().enumerate() {
        assert!(dir.path().join(&b.file).is_file());
        assert_eq!(
            b.cut_bytes == 0,
            i == k - 1,
            "every block but the last sends a cut: {b:?}"
        );
        if i + 1 < k {
            assert_eq!(
                b.cut_bytes,
                b.output_shape.iter().product::<usize>() as u64 * 4
            );
        }
    }
    let exact = RunConfig {
        optimize: false,
        ..measure
    };
    let mut worst = 0.0f32;
    for batch in [1, 4] {
        let x = sample_input(batch, sample, 7 + batch as u64);
        let whole = run_whole(&path, &x, &exact).unwrap();
        let chained = run_blocks(dir.path(), &m, &x, &exact).unwrap();
        assert_eq!(whole.shape(), chained.shape());
        let diff = whole
            .iter()
            .zip(chained.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff <= 1e-4,
            "{model} batch {batch}: max abs difference {diff}"
        );
        eprintln!("{model} batch {batch}: max abs difference {diff:e}");
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn resnet50_blocks_give_the_whole_models_output() {
    blocks_match_whole("engines/bench/resnet50.onnx", 4, &[3, 224, 224]);
}

#[test]
fn mobilenetv2_blocks_give_the_whole_models_output() {
    blocks_match_whole("engines/bench/mobilenetv2.onnx", 4, &[3, 224, 224]);
}

#[test]
fn ppocr_detector_blocks_give_the_whole_models_output() {
    blocks_match_whole("engines/ppocr/ch_PP-OCRv4_det_infer.onnx", 2, &[3, 96, 128]);
}

#[test]
fn too_many_blocks_and_uncuttable_models_are_clear_errors() {
    let resnet = require("engines/bench/resnet18.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = poolpipe(&[
        "split",
        resnet.to_str().unwrap(),
        "--blocks",
        "500",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("500 blocks asked for, but the model has"),
        "{stderr}"
    );

    // One node: no position inside the graph to cut at.
    use onnx_protobuf::{GraphProto, ModelProto, NodeProto, ValueInfoProto};
    use poolpipe::partition::{PartitionError, save, split::SplitError};
    let mut g = GraphProto::new();
    let mut n = NodeProto::new();
    n.op_type = "Relu".into();
    n.input = vec!["x".into()];
    n.output = vec!["y".into()];
    g.node = vec![n];
    for (name, list) in [("x", &mut g.input), ("y", &mut g.output)] {
        let mut v = ValueInfoProto::new();
        v.name = name.into();
        list.push(v);
    }
    let mut m = ModelProto::new();
    m.ir_version = 8;
    m.graph = Some(g).into();
    let p = dir.path().join("one.onnx");
    save(&m, &p).unwrap();
    let cfg = RunConfig {
        sample_shape: vec![4],
        threads: 1,
        optimize: true,
    };
    let e = split(&p, 2, &dir.path().join("one.blocks"), &cfg).unwrap_err();
    assert!(
        matches!(e, SplitError::Partition(PartitionError::NoCut)),
        "{e}"
    );
    assert!(e.to_string().contains("no valid cut point"), "{e}");
}

#[test]
fn a_profile_of_the_blocks_is_readable_as_a_profile() {
    let path = require("engines/bench/mobilenetv2.onnx");
    let dir = tempfile::tempdir().unwrap();
    let cfg = RunConfig {
        sample_shape: vec![3, 224, 224],
        threads: 2,
        optimize: true,
    };
    let blocks = dir.path().join("blocks");
    split(&path, 2, &blocks, &cfg).unwrap();
    let out = dir.path().join("profile");
    let table = poolpipe::partition::split::profile(&blocks, 3, 2, &out, &cfg).unwrap();
    assert_eq!(table.len(), 2);
    let p = poolpipe::profile::Profiles::load_dir(&out, None).unwrap();
    let lat = |b| p.latency("mobilenetv2", "cpu", 1, 0..2, b).unwrap();
    assert!(lat(1) > std::time::Duration::ZERO);
    assert_eq!(p.model("mobilenetv2").unwrap().cut_bytes.len(), 1);

    // Two processes sharing the CPU: the `share` 2 file, read back at share 2.
    let out = out.to_str().unwrap();
    let o = poolpipe(&[
        "profile",
        blocks.to_str().unwrap(),
        "--batch",
        "1..2",
        "--runs",
        "2",
        "--share",
        "2",
        "--threads",
        "1",
        "--out",
        out,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = poolpipe::profile::Profiles::load_dir(std::path::Path::new(out), None).unwrap();
    assert!(p.latency("mobilenetv2", "cpu", 2, 0..2, 2).unwrap() > std::time::Duration::ZERO);
    // A GPU in a build without GPU support says how to get one; an emulated device is refused.
    if !cfg!(feature = "gpu") {
        let o = poolpipe(&[
            "profile",
            blocks.to_str().unwrap(),
            "--device",
            "cuda:0",
            "--out",
            out,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(poolpipe::gpu::NOT_BUILT), "{err}");
    }
    let o = poolpipe(&[
        "profile",
        blocks.to_str().unwrap(),
        "--device",
        "emulated:T4",
        "--out",
        out,
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn cpu_stages_of_a_cut_model_run_under_the_deadline_policy_with_a_measured_profile() {
    let model = require("engines/bench/mobilenetv2.onnx");
    let dir = tempfile::tempdir().unwrap();
    let cfg = RunConfig {
        sample_shape: vec![3, 224, 224],
        threads: 1,
        optimize: true,
    };
    let blocks = dir.path().join("blocks");
    split(&model, 2, &blocks, &cfg).unwrap();
    let profiles = dir.path().join("profiles");
    poolpipe::partition::split::profile(&blocks, 4, 2, &profiles, &cfg).unwrap();
    let manifest = std::fs::read_to_string(root().join("engines/mobilenetv2.toml"))
        .unwrap()
        .replace(
            "onnx = \"bench/mobilenetv2.onnx\"",
            &format!(
                "onnx = \"{}\"\nsplit = \"{}\"",
                model.display(),
                blocks.display()
            ),
        );
    write(dir.path(), "mobilenetv2.toml", &manifest);
    let pipeline = format!(
        "[pipeline]\nname = \"cut-deadline\"\nslo_ms = 20000\nengines_dir = \"{}\"\nprofiles = \"{}\"\n\n\
         [[source]]\nname = \"pattern\"\nuri = \"test://ball\"\nnum_buffers = 16\npace = \"fast\"\n\n\
         [[stage]]\nname = \"head\"\nmodel = \"mobilenetv2\"\nblocks = [0, 1]\nprofile = \"mobilenetv2\"\nmax_batch = 4\n\n\
         [[stage]]\nname = \"tail\"\nmodel = \"mobilenetv2\"\nblocks = [1, 2]\nprofile = \"mobilenetv2\"\nmax_batch = 4\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        dir.path().display(),
        profiles.display(),
        dir.path().join("out.jsonl").display()
    );
    let p = write(dir.path(), "p.toml", &pipeline);
    let s = run_summarized(&p, None);
    let streams = assert_balanced(&s);
    assert_eq!(streams["pattern"]["published"], 16, "{s}");
    let results = read_jsonl(&dir.path().join("out.jsonl"));
    let seqs: Vec<u64> = results.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..16).collect::<Vec<_>>());
    for r in &results {
        assert_eq!(
            r["results"]["head"]["partial"]["blocks"],
            serde_json::json!([0, 1])
        );
        assert_eq!(r["results"]["tail"]["classes"].as_array().unwrap().len(), 5);
    }
}
