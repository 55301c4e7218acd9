//! GPU devices on a machine without a GPU (CI): every way a GPU cannot be used is a clear error,
//! located in the pipeline file where it can be, and never a silent fall back to the CPU. Runs in
//! both builds: the default one (no GPU support) and `--features gpu` (no driver here).

mod common;

use common::*;
use poolpipe::config::{Diagnostic, load_pipeline_str};
use poolpipe::gpu::NOT_BUILT;

fn errors(text: &str) -> Vec<Diagnostic> {
    let dir = tempfile::tempdir().unwrap();
    match load_pipeline_str(&dir.path().join("p.toml"), text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

fn show(errs: &[Diagnostic]) -> String {
    errs.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A pipeline of one test source and one resnet18 stage with `stage` lines added.
fn pipeline(stage: &str) -> String {
    format!(
        "{}[[source]]\nname = \"a\"\nuri = \"test://ball\"\n\n[[stage]]\nname = \"cls\"\nmodel = \"resnet18\"\n{stage}\n[[sink]]\ntype = \"jsonl\"\n",
        header("gpu", 1000)
    )
}

/// Whether this build finds the NVIDIA driver here (the library's own probe).
fn driver_present() -> bool {
    use poolpipe::gpu::GpuError;
    !matches!(
        poolpipe::gpu::count(),
        Err(GpuError::NoDriver { .. } | GpuError::NotBuilt)
    )
}

#[test]
fn a_gpu_device_is_refused_at_its_line_with_the_reason() {
    // The header is 5 lines, the source 4 and a blank; `device` is on line 13.
    let errs = errors(&pipeline("device = \"cuda:7\"\n"));
    let e = errs
        .iter()
        .find(|d| d.key == "stage[0].device")
        .unwrap_or_else(|| panic!("no error at stage[0].device:\n{}", show(&errs)));
    assert_eq!(e.line, 13, "{e}");
    if !cfg!(feature = "gpu") {
        assert_eq!(e.message, NOT_BUILT);
    } else if !driver_present() {
        assert!(
            e.message
                .starts_with("no NVIDIA driver: libcuda.so.1 cannot be loaded"),
            "{e}"
        );
    } else {
        assert!(e.message.starts_with("cuda:7: this machine has"), "{e}");
    }
    let errs = errors(&pipeline("devices = [\"tensorrt:0\", \"tensorrt:9\"]\n"));
    assert!(
        errs.iter().any(|d| d.key == "stage[0].devices"),
        "{}",
        show(&errs)
    );
}

#[test]
fn gpu_keys_are_checked_before_anything_starts() {
    let errs = errors(&pipeline("device = \"cpu\"\nprecision = \"fp16\"\n"));
    assert!(
        errs.iter()
            .any(|d| d.key == "stage[0].precision" && d.message.contains("applies to GPU devices")),
        "{}",
        show(&errs)
    );
    let errs = errors(&pipeline("device = \"cuda:0\"\ndevices = [\"cuda:1\"]\n"));
    assert!(
        errs.iter()
            .any(|d| d.key == "stage[0].devices" && d.message.contains("not both")),
        "{}",
        show(&errs)
    );
    let errs = errors(&pipeline("devices = [\"cuda:0\", \"tensorrt:1\"]\n"));
    assert!(
        errs.iter()
            .any(|d| d.message.contains("mixes cuda: and tensorrt:")),
        "{}",
        show(&errs)
    );
    let errs = errors(&pipeline("device = \"cuda:0\"\nprecision = \"fp16\"\n"));
    assert!(
        errs.iter()
            .any(|d| d.key == "stage[0].precision"
                && d.message.contains("needs a `tensorrt:N` device")),
        "{}",
        show(&errs)
    );
    let errs = errors(&pipeline("device = \"cuda:one\"\n"));
    assert!(
        errs.iter()
            .any(|d| d.message.contains("expected cuda:<GPU index>")),
        "{}",
        show(&errs)
    );
}

#[test]
fn nvdec_without_the_nvidia_decoder_names_the_element_and_the_driver() {
    let has_nvdec = std::process::Command::new("gst-inspect-1.0")
        .arg("nvh264dec")
        .output()
        .is_ok_and(|o| o.status.success());
    if has_nvdec {
        eprintln!("SKIPPED: this machine has NVIDIA's decoder; the error cannot be shown here");
        return;
    }
    let text = format!(
        "{}[[source]]\nname = \"a\"\nuri = \"{}\"\ndecode = \"nvdec\"\n\n[[stage]]\nname = \"s\"\nmodel = \"noop\"\n\n[[sink]]\ntype = \"jsonl\"\n",
        header("nvdec", 1000),
        require("samples/campus.mp4").display()
    );
    let errs = errors(&text);
    let e = errs
        .iter()
        .find(|d| d.key == "source[0].decode")
        .unwrap_or_else(|| panic!("{}", show(&errs)));
    assert_eq!(e.line, 9, "{e}");
    assert!(e.message.contains("`nvh264dec` is missing"), "{e}");
    assert!(e.message.contains("libnvcuvid.so.1"), "{e}");
    // Keys of nvdec without it, and nvdec on a generated source.
    let errs = errors(&format!(
        "{}[[source]]\nname = \"a\"\nuri = \"test://ball\"\ncodec = \"h265\"\n\n[[source]]\nname = \"b\"\nuri = \"test://ball\"\ndecode = \"nvdec\"\n\n{}",
        header("nvdec", 1000),
        "[[stage]]\nname = \"s\"\nmodel = \"noop\"\n\n[[sink]]\ntype = \"jsonl\"\n"
    ));
    assert!(
        errs.iter().any(|d| d.key == "source[0].codec"),
        "{}",
        show(&errs)
    );
    assert!(
        errs.iter()
            .any(|d| d.key == "source[1].decode" && d.message.contains("not decoded")),
        "{}",
        show(&errs)
    );
}

#[test]
fn devices_says_why_there_is_no_gpu_and_run_refuses_one() {
    if driver_present() && cfg!(feature = "gpu") {
        eprintln!("SKIPPED: this machine has a GPU");
        return;
    }
    let out = poolpipe(&["devices"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("cpu "), "{text}");
    let reason = if cfg!(feature = "gpu") {
        "no GPUs: no NVIDIA driver: libnvidia-ml.so.1 cannot be loaded"
    } else {
        "no GPUs: this build has no GPU support; build with --features gpu (./setup.sh gpu)"
    };
    assert!(text.contains(reason), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&poolpipe(&["devices", "--json"]).stdout).unwrap();
    assert!(
        json["gpus"].is_null() && json["gpu_error"].is_string(),
        "{json}"
    );
    assert!(json["cpu"]["cores"].as_u64().unwrap() >= 1);

    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "p.toml", &pipeline("device = \"tensorrt:0\"\n"));
    for cmd in ["run", "build-engines"] {
        let out = poolpipe(&[cmd, p.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(
            stderr.contains(":13:10: `stage[0].device`"),
            "{cmd}: {stderr}"
        );
    }
    let p = write(dir.path(), "q.toml", &pipeline("device = \"cpu\"\n"));
    let out = poolpipe(&["build-engines", p.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to build"));
}

/// With GPU support built in, a session asked for a GPU fails when the GPU cannot be used: it
/// never runs on the CPU instead.
#[cfg(feature = "gpu")]
#[test]
fn a_gpu_session_never_falls_back_to_the_cpu() {
    use poolpipe::engine::ort::{OrtConfig, OrtEngine};
    use poolpipe::gpu::{GpuBackend, GpuSession, Precision};
    if driver_present() {
        eprintln!("SKIPPED: this machine has a GPU (tests/gpu/check.sh measures it)");
        return;
    }
    let model = require("engines/bench/resnet18.onnx");
    for backend in [GpuBackend::Cuda, GpuBackend::TensorRt] {
        let e = OrtEngine::load(&OrtConfig {
            model: model.clone(),
            input: None,
            threads: 1,
            library: Some(require("engines/lib/libonnxruntime.so")),
            optimize: true,
            spin: false,
            gpu: Some(GpuSession {
                backend,
                index: 0,
                precision: Precision::Fp32,
                cache: std::env::temp_dir(),
                max_batch: 4,
                blocks: None,
                input_hint: None,
            }),
        })
        .err()
        .expect("a GPU session without a driver must fail");
        assert!(e.to_string().contains("no NVIDIA driver"), "{e}");
    }
}
