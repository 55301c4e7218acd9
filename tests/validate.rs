//! `poolpipe validate`: every shipped pipeline validates; broken files get every error at once,
//! each with file:line:column, key and what was expected.

mod common;

use common::*;
use poolpipe::config::{Diagnostic, load_pipeline_str};

#[test]
fn every_shipped_pipeline_validates() {
    require("engines/ppocr/ch_PP-OCRv4_det_infer.onnx");
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        let needs_profiles = std::fs::read_to_string(&path)
            .unwrap()
            .contains("emulated:");
        let profiles = if needs_profiles {
            match shared_profiles() {
                Some(p) => p.display().to_string(),
                None => continue,
            }
        } else {
            String::new()
        };
        if path.extension().is_some_and(|e| e == "toml") {
            let mut args = vec!["validate", path.to_str().unwrap()];
            if needs_profiles {
                args.extend(["--profiles", profiles.as_str()]);
            }
            let out = poolpipe(&args);
            assert!(
                out.status.success(),
                "{} does not validate:\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 2, "expected the shipped pipelines, found {n}");
}

/// Validates `text` as a file in a temporary folder; returns the diagnostics.
fn errors(text: &str) -> Vec<Diagnostic> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    match load_pipeline_str(&path, text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

/// Asserts a diagnostic with this line, key and message fragment exists.
fn has(errs: &[Diagnostic], line: usize, key: &str, fragment: &str) {
    assert!(
        errs.iter()
            .any(|d| d.line == line && d.key == key && d.message.contains(fragment)),
        "no error at line {line} for `{key}` containing {fragment:?}; got:\n{}",
        errs.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn good_tail() -> String {
    "[[stage]]\nname = \"s\"\nmodel = \"noop\"\n\n[[sink]]\ntype = \"jsonl\"\n".to_string()
}

#[test]
fn reports_every_error_with_its_line_and_key() {
    let text = format!(
        "{}{}",
        header("broken", 1000),
        r#"[[source]]
name = "a"
uri = "test://nope"

[[source]]
name = "b"
uri = "test://ball"
max_fps = "fast"

[[source]]
name = "a"
uri = "ftp://example/x.mp4"

[[stage]]
name = "det"
model = "no-such-model"
device = "gpu:0"
max_batch = 0

[[stage]]
name = "rec"
model = "ppocr-rec"
input = "nowhere"

[[sink]]
type = "amqp"

[[sink]]
type = "jsonl"
colour = "red"
"#
    );
    let errs = errors(&text);
    // The header is 5 lines; the first [[source]] is on line 6.
    has(&errs, 8, "source[0].uri", "unknown test pattern `nope`");
    has(
        &errs,
        13,
        "source[1].max_fps",
        "invalid type: string \"fast\", expected u32",
    );
    has(&errs, 16, "source[2].name", "duplicate source name `a`");
    has(&errs, 17, "source[2].uri", "unsupported scheme `ftp://`");
    has(&errs, 21, "stage[0].model", "no model manifest");
    has(&errs, 22, "stage[0].device", "unknown device `gpu:0`");
    has(&errs, 23, "stage[0].max_batch", "out of range");
    has(
        &errs,
        28,
        "stage[1].input",
        "no earlier stage named `nowhere`",
    );
    has(&errs, 31, "sink[0].type", "unknown value `amqp`");
    has(&errs, 35, "sink[1].colour", "unknown key `colour`");
    assert_eq!(errs.len(), 10, "one error per problem, no more: {errs:#?}");
}

#[test]
fn missing_sections_and_keys_are_named() {
    let errs = errors(
        "[pipeline]\nname = \"x\"\n\n[[sink]]\ntype = \"jsonl\"\npath = \"/no/such/dir/out.jsonl\"\n",
    );
    has(&errs, 1, "pipeline", "missing key `slo_ms`");
    has(&errs, 1, "source", "at least one [[source]]");
    has(&errs, 1, "stage", "at least one [[stage]]");
    has(
        &errs,
        6,
        "sink[0].path",
        "folder /no/such/dir does not exist",
    );
}

#[test]
fn syntax_errors_point_at_the_line() {
    let errs = errors("[pipeline]\nname = \"x\"\nslo_ms = = 5\n");
    assert!(!errs.is_empty());
    assert_eq!(errs[0].line, 3, "{errs:?}");
    assert!(errs[0].message.starts_with("TOML syntax"), "{errs:?}");
}

#[test]
fn impossible_values_and_dangling_references() {
    let text = format!(
        "{}{}",
        header("x", 100),
        r#"[[source]]
name = "cam 1"
uri = "rtsp://user:secret@/live"
loop = true

[[source]]
name = "f"
uri = "missing.mp4"
transport = "udp"

[[stage]]
name = "s"
model = "noop"
max_wait_ms = 100
workers = 65

[[sink]]
type = "jsonl"
"#
    );
    let errs = errors(&text);
    has(&errs, 7, "source[0].name", "only letters, digits");
    has(&errs, 8, "source[0].uri", "has no host");
    has(&errs, 9, "source[0].loop", "not to live cameras");
    has(&errs, 13, "source[1].uri", "missing.mp4 does not exist");
    has(&errs, 14, "source[1].transport", "rtsp:// sources only");
    has(
        &errs,
        19,
        "stage[0].max_wait_ms",
        "leaves nothing of the 100 ms SLO",
    );
    has(&errs, 20, "stage[0].workers", "out of range");
    assert!(
        errs.iter().all(|d| !d.message.contains("secret")),
        "password leaked: {errs:#?}"
    );
}

#[test]
fn a_broken_manifest_is_reported_against_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bad.toml",
        "name = \"bad\"\nkind = \"classify\"\nonnx = \"nope.onnx\"\n",
    );
    let text = "[pipeline]\nname = \"x\"\nslo_ms = 1000\nengines_dir = \".\"\n\n[[source]]\nname = \"t\"\nuri = \"test://ball\"\n\n[[stage]]\nname = \"s\"\nmodel = \"bad\"\n\n[[sink]]\ntype = \"jsonl\"\n";
    let errs = match load_pipeline_str(&dir.path().join("p.toml"), text) {
        Ok(_) => panic!("accepted a broken manifest"),
        Err(e) => e.0,
    };
    has(&errs, 12, "stage[0].model", "is invalid");
    assert!(
        errs.iter().any(|d| d.file.ends_with("bad.toml")
            && d.line == 3
            && d.key == "onnx"
            && d.message.contains("nope.onnx does not exist")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|d| d.file.ends_with("bad.toml") && d.key == "image"),
        "{errs:#?}"
    );
}

#[test]
fn the_cli_prints_every_error_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "p.toml",
        &format!(
            "{}[[source]]\nname = \"a\"\nuri = \"test://nope\"\n\n{}[extra]\nx = 1\n",
            header("x", 1000),
            good_tail()
        ),
    );
    let out = poolpipe(&["validate", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = p.display().to_string();
    assert!(
        stderr.contains(&format!(
            "{file}:8:7: `source[0].uri`: unknown test pattern `nope`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file}:16:2: `extra`: unknown section `extra`")),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
    let ok = poolpipe(&[
        "validate",
        root().join("pipelines/demo.toml").to_str().unwrap(),
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn emulated_stages_are_checked_against_the_profiles() {
    let Some(profiles) = shared_profiles() else {
        return;
    };
    let text = format!(
        "[pipeline]\nname = \"x\"\nslo_ms = 1000\nengines_dir = \"{}\"\nprofiles = \"{}\"\n\n\
         [[source]]\nname = \"t\"\nuri = \"test://ball\"\n\n\
         [[stage]]\nname = \"a\"\ndevice = \"emulated:A100\"\nprofile = \"wide_resnet101_2\"\nblocks = [0, 5]\n\n\
         [[stage]]\nname = \"b\"\ndevice = \"emulated:T4\"\nprofile = \"wide_resnet101_2\"\nblocks = [6, 11]\n\n\
         [[stage]]\nname = \"c\"\ndevice = \"emulated:T4\"\nprofile = \"wide_resnet101_2\"\nmax_batch = 9\nworkers = 0\n\n\
         [[stage]]\nname = \"d\"\ndevice = \"emulated:P4\"\nshare = 2\nprofile = \"no_such_net\"\n\n\
         [[stage]]\nname = \"e\"\ndevice = \"emulated:L4\"\n\n\
         [[sink]]\ntype = \"jsonl\"\n",
        root().join("engines").display(),
        profiles.display()
    );
    let errs = errors(&text);
    has(
        &errs,
        13,
        "stage[0].device",
        "has no profile for class `A100` with share 1 (has: L4/1",
    );
    has(
        &errs,
        21,
        "stage[1].blocks",
        "[6, 11] is not a block range of `wide_resnet101_2`",
    );
    has(&errs, 27, "stage[2].max_batch", "covers batch sizes 1..=8");
    has(&errs, 28, "stage[2].workers", "0 is out of range");
    has(
        &errs,
        34,
        "stage[3].profile",
        "no profile for model `no_such_net`",
    );
    has(
        &errs,
        38,
        "stage[4].device",
        "an emulated device needs `profile`",
    );
    assert_eq!(errs.len(), 6, "{errs:#?}");
}

#[test]
fn consecutive_stages_of_one_model_run_consecutive_blocks() {
    let Some(profiles) = shared_profiles() else {
        return;
    };
    let text = format!(
        "[pipeline]\nname = \"x\"\nslo_ms = 1000\nprofiles = \"{}\"\n\n\
         [[source]]\nname = \"t\"\nuri = \"test://ball\"\n\n\
         [[stage]]\nname = \"a\"\ndevice = \"emulated:L4\"\nprofile = \"wide_resnet101_2\"\nblocks = [0, 5]\n\n\
         [[stage]]\nname = \"b\"\ndevice = \"emulated:T4\"\nprofile = \"wide_resnet101_2\"\nblocks = [4, 10]\n\n\
         [[sink]]\ntype = \"jsonl\"\n",
        profiles.display()
    );
    let errs = errors(&text);
    has(
        &errs,
        20,
        "stage[1].blocks",
        "starts at block 4 but stage `a` ends at block 5",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let no_dir = "[pipeline]\nname = \"x\"\nslo_ms = 1000\n\n[[source]]\nname = \"t\"\nuri = \"test://ball\"\n\n\
                  [[stage]]\nname = \"a\"\ndevice = \"emulated:L4\"\nprofile = \"wide_resnet101_2\"\n\n[[sink]]\ntype = \"jsonl\"\n";
    has(
        &errors(no_dir),
        12,
        "stage[0].profile",
        "set [pipeline] profiles",
    );
}

#[test]
fn the_deadline_policy_needs_a_profile() {
    let text = format!(
        "{}[[source]]\nname = \"t\"\nuri = \"test://ball\"\n\n[[stage]]\nname = \"s\"\nmodel = \"noop\"\npolicy = \"deadline\"\n\n[[stage]]\nname = \"u\"\nmodel = \"noop\"\npolicy = \"eager\"\n\n[[sink]]\ntype = \"jsonl\"\n",
        header("x", 1000)
    );
    let errs = errors(&text);
    has(
        &errs,
        13,
        "stage[0].policy",
        "the deadline policy needs the stage's latency",
    );
    has(
        &errs,
        18,
        "stage[1].policy",
        "unknown value `eager`, expected one of `fixed`, `aimd`, `deadline`",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
}

#[test]
fn broker_sink_settings_are_checked_without_connecting() {
    let text = format!(
        "{}[[source]]\nname = \"t\"\nuri = \"test://ball\"\n\n{}",
        header("sinks", 1000),
        r#"[[stage]]
name = "s"
model = "noop"

[[sink]]
type = "mqtt"
url = "mqtt://broker.local:99999"
topic = "cams/{camera}/text"

[[sink]]
type = "redis"
url = "redis://127.0.0.1"
topic = "cams:{stream}"
qos = 1

[[sink]]
type = "nats"
url = "nats://127.0.0.1"
topic = "cams.{stream}"
password_env = "POOLPIPE_NO_SUCH_VARIABLE"
username = "u"

[[sink]]
type = "http"
url = "ftp://example.org/hook"
when_full = "sometimes"
"#
    );
    let errs = errors(&text);
    has(&errs, 16, "sink[0].url", "bad port `99999`");
    has(
        &errs,
        17,
        "sink[0].topic",
        "unknown template field `{camera}`",
    );
    has(&errs, 23, "sink[1].qos", "does not apply to redis sinks");
    has(
        &errs,
        29,
        "sink[2].password_env",
        "environment variable POOLPIPE_NO_SUCH_VARIABLE is not set",
    );
    has(&errs, 35, "sink[3].when_full", "unknown value `sometimes`");
    assert_eq!(errs.len(), 5, "{errs:#?}");
}

/// A plan from `poolpipe plan` for `models` on L4:2,T4:6, and a pipeline file in `dir` whose
/// flows serve `flows` of them on `cluster`.
fn planned_files(
    dir: &std::path::Path,
    profiles: &std::path::Path,
    models: &str,
    flows: &[&str],
    cluster: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let plan = dir.join("plan.json");
    let o = poolpipe(&[
        "plan",
        "--profiles",
        profiles.to_str().unwrap(),
        "--cluster",
        "L4:2,T4:6",
        "--models",
        models,
        "--time-limit",
        "10",
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut p = format!(
        "[pipeline]\nname = \"p\"\nslo_ms = 100\ncluster = \"{cluster}\"\n\n[[sink]]\ntype = \"jsonl\"\n"
    );
    for (i, m) in flows.iter().enumerate() {
        p += &format!(
            "\n[[flow]]\nname = \"f{i}\"\nmodel = \"{m}\"\n\n[[source]]\nname = \"s{i}\"\nuri = \"test://ball\"\nflow = \"f{i}\"\n"
        );
    }
    (write(dir, "p.toml", &p), plan)
}

fn validate_with_plan(
    p: &std::path::Path,
    plan: &std::path::Path,
    profiles: &std::path::Path,
) -> (i32, String) {
    let o = poolpipe(&[
        "validate",
        p.to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--profiles",
        profiles.to_str().unwrap(),
    ]);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn plans_are_checked_against_the_pipeline_file() {
    let Some(profiles) = shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let models = "wide_resnet101_2,repvgg-b3";
    let (p, plan) = planned_files(
        dir.path(),
        &profiles,
        models,
        &["wide_resnet101_2", "repvgg-b3"],
        "L4:2,T4:6",
    );
    let (code, err) = validate_with_plan(&p, &plan, &profiles);
    assert_eq!(code, 0, "{err}");

    // A plan for a model the file has no flow for: located in the plan file.
    let (p, plan) = planned_files(
        dir.path(),
        &profiles,
        models,
        &["wide_resnet101_2"],
        "L4:2,T4:6",
    );
    let (code, err) = validate_with_plan(&p, &plan, &profiles);
    assert_eq!(code, 2, "{err}");
    let text = std::fs::read_to_string(&plan).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("\"repvgg-b3\""))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("{}:{line}:", plan.display()))
            && err
                .contains("`models.repvgg-b3`: the plan serves model `repvgg-b3` but no [[flow]]"),
        "{err}"
    );

    // More devices than the file's cluster: at `pipeline.cluster`.
    let (p, plan) = planned_files(
        dir.path(),
        &profiles,
        models,
        &["wide_resnet101_2", "repvgg-b3"],
        "L4:1,T4:6",
    );
    let (code, err) = validate_with_plan(&p, &plan, &profiles);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:4:11: `pipeline.cluster`", p.display()))
            && err.contains("L4 device(s) but the cluster `L4:1,T4:6` has 1"),
        "{err}"
    );

    // Two flows of one model would each run all of its planned devices: refused at the second.
    let (p, plan) = planned_files(
        dir.path(),
        &profiles,
        models,
        &["wide_resnet101_2", "repvgg-b3", "wide_resnet101_2"],
        "L4:2,T4:6",
    );
    let (code, err) = validate_with_plan(&p, &plan, &profiles);
    assert_eq!(code, 2, "{err}");
    let text_p = std::fs::read_to_string(&p).unwrap();
    let line = text_p
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("model = \"wide_resnet101_2\""))
        .nth(1)
        .unwrap()
        .0
        + 1;
    assert!(
        err.contains(&format!("{}:{line}:", p.display()))
            && err.contains("`flow[2].model`: flow `f2` serves model `wide_resnet101_2`, which flow `f0` serves too"),
        "{err}"
    );

    // A plan that `planner::check` rejects names the rule.
    let mut tampered: serde_json::Value = serde_json::from_str(&text).unwrap();
    let st = &mut tampered["models"][0]["pipelines"][0]["stages"][0];
    st["latency_ms"] = serde_json::json!(st["latency_ms"].as_f64().unwrap() / 2.0);
    let bad = write(
        dir.path(),
        "tampered.json",
        &serde_json::to_string_pretty(&tampered).unwrap(),
    );
    let (p, _) = planned_files(
        dir.path(),
        &profiles,
        models,
        &["wide_resnet101_2", "repvgg-b3"],
        "L4:2,T4:6",
    );
    let (code, err) = validate_with_plan(&p, &bad, &profiles);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the plan breaks rule Latency"), "{err}");

    // Not JSON: the line and column of the plan file.
    let junk = write(dir.path(), "junk.json", "{\n  \"mode\": nope\n}\n");
    let (code, err) = validate_with_plan(&p, &junk, &profiles);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:2:", junk.display())) && err.contains("not JSON"),
        "{err}"
    );

    // A flow with a model but no plan.
    let o = poolpipe(&[
        "validate",
        p.to_str().unwrap(),
        "--profiles",
        profiles.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("`flow[0].model`: a flow with `model` is served by a plan"),
        "{err}"
    );
}

#[test]
fn flows_sources_and_stages_name_each_other() {
    let text = "[pipeline]\nname = \"p\"\nslo_ms = 100\n\n\
        [[flow]]\nname = \"a\"\n\n[[flow]]\nname = \"b\"\nslo_ms = 50\n\n\
        [[source]]\nname = \"x\"\nuri = \"test://ball\"\nflow = \"a\"\n\n\
        [[source]]\nname = \"y\"\nuri = \"test://ball\"\nflow = \"nope\"\npriority = 0\n\n\
        [[source]]\nname = \"z\"\nuri = \"test://ball\"\n\n\
        [[stage]]\nname = \"s\"\nmodel = \"noop\"\nflow = \"a\"\n\n\
        [[stage]]\nname = \"t\"\nmodel = \"noop\"\nflow = \"c\"\n\n\
        [[sink]]\ntype = \"jsonl\"\n";
    let errs = errors(text);
    has(
        &errs,
        20,
        "source[1].flow",
        "no [[flow]] named `nope`, expected one of: a, b",
    );
    has(&errs, 21, "source[1].priority", "expected 1..=100");
    has(
        &errs,
        23,
        "source[2]",
        "missing key `flow`: the file has several [[flow]]s (a, b)",
    );
    has(&errs, 35, "stage[1].flow", "no [[flow]] named `c`");
    has(&errs, 8, "flow[1]", "no [[stage]] names flow `b`");
}

#[test]
fn malformed_rules_are_located_errors() {
    require("engines/yolo/yolov3-tiny.onnx");
    let text = format!(
        "{}[[source]]\nname = \"cam\"\nuri = \"test://ball\"\n\n\
         [[stage]]\nname = \"detect\"\nmodel = \"yolov3-tiny\"\n\n\
         [[rule]]\nname = \"door\"\ntype = \"line\"\nframe = [768, 576]\nline = [[10, 10], [900, 10]]\n\n\
         [[rule]]\nname = \"yard\"\ntype = \"zone\"\npolygon = [[0.1, 0.1], [0.5, 0.5], [0.5, 0.1], [0.1, 0.5]]\nclasses = [\"unicorn\"]\nstreams = [\"nope\"]\n\n\
         [[rule]]\nname = \"door\"\ntype = \"zone\"\npolygon = [[0.1, 0.1], [0.5, 0.5]]\n\n\
         [[sink]]\ntype = \"jsonl\"\n",
        header("x", 1000)
    );
    let errs = errors(&text);
    // The header is 5 lines; sources 6-8, the stage 10-12, the rules from 14.
    has(&errs, 18, "rule[0].line", "outside the frame");
    has(&errs, 23, "rule[1].polygon", "edges cross");
    has(&errs, 24, "rule[1].classes", "`unicorn` is not a label");
    has(&errs, 25, "rule[1].streams", "no [[source]] named `nope`");
    has(&errs, 28, "rule[2].name", "already exists");
    has(&errs, 30, "rule[2].polygon", "at least 3");
    assert_eq!(errs.len(), 6, "{errs:?}");
    // Rules need a detector to follow.
    let no_detector = format!(
        "{}[[source]]\nname = \"cam\"\nuri = \"test://ball\"\n\n[[stage]]\nname = \"s\"\nmodel = \"noop\"\n\n\
         [tracker]\nhigh_score = 2.0\n\n[[sink]]\ntype = \"jsonl\"\n",
        header("x", 1000)
    );
    let errs = errors(&no_detector);
    has(&errs, 15, "tracker.high_score", "[0, 1]");
    has(&errs, 14, "tracker", "needs a `detect` stage");
}

#[test]
fn detect_classes_rule_names_and_shared_files_are_checked() {
    require("engines/yolo/yolov3-tiny.onnx");
    let text = format!(
        "{}[[source]]\nname = \"cam\"\nuri = \"test://ball\"\n\n\
         [[stage]]\nname = \"detect\"\nmodel = \"yolov3-tiny\"\nclasses = [\"person\", \"unicorn\"]\n\n\
         [[stage]]\nname = \"pass\"\nmodel = \"noop\"\nclasses = [\"person\"]\n\n\
         [[rule]]\nname = \"front door\"\ntype = \"line\"\nline = [[0.1, 0.5], [0.9, 0.5]]\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"/tmp/x.jsonl\"\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"/tmp/x.jsonl\"\n",
        header("x", 1000)
    );
    let errs = errors(&text);
    has(
        &errs,
        13,
        "stage[0].classes",
        "`unicorn` is neither a label",
    );
    has(&errs, 18, "stage[1].classes", "detect stages only");
    has(&errs, 21, "rule[0].name", "letters, digits");
    has(&errs, 31, "sink[1].path", "writes /tmp/x.jsonl already");
}

#[test]
fn bad_outputs_are_located() {
    let text = format!(
        "{}[[source]]\nname = \"cam\"\nuri = \"test://ball\"\n\n{}\n\
         [[output]]\ntype = \"jpeg\"\nfolder = \"snaps\"\nstreams = [\"nope\"]\nevery_s = 1\n\n\
         [[output]]\ntype = \"jpeg\"\nfolder = \"snaps\"\n\n\
         [[output]]\ntype = \"rtsp\"\nfolder = \"x\"\nport = 8554\n\n\
         [[output]]\ntype = \"file\"\nquality = 300\n\n\
         [[output]]\ntype = \"mp3\"\n\n\
         [[output]]\ntype = \"rtsp\"\nport = 9001\ncolors = [\"red\"]\n",
        header("outs", 1000),
        good_tail()
    );
    let errs = errors(&text);
    has(&errs, 20, "output[0].streams", "no stream named `nope`");
    has(
        &errs,
        23,
        "output[1]",
        "needs `every_s`, `classes` or `text = true`",
    );
    has(
        &errs,
        29,
        "output[2].folder",
        "does not apply to a `rtsp` output",
    );
    has(&errs, 32, "output[3]", "needs `folder`");
    has(&errs, 34, "output[3].quality", "does not apply");
    has(&errs, 37, "output[4].type", "mp3");
    has(&errs, 42, "output[5].colors", "`red` is not a colour");
    assert!(
        !errs.iter().any(|d| d.message.contains("duplicate")),
        "default names are numbered per kind"
    );
}
