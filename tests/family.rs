//! A model family served by `poolpipe run --plan`: the plan (`poolpipe plan --demand
//! --accuracy`) splits a task's demand across its variants, the runtime routes frames to them in
//! the planned proportions, and every result says which variant served it.

mod common;

use std::collections::HashMap;

use poolpipe::planner::Plan;

#[test]
fn a_family_flow_routes_frames_to_its_variants_in_the_planned_proportions() {
    let Some(profiles) = common::shared_profiles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan_path = dir.path().join("plan.json");
    // Within 200 ms, ConvNeXt-L alone carries about 37 frames/s at 80% of two T4s; 60 frames/s
    // needs the cheaper Inception v3 for part of them.
    let o = common::poolpipe(&[
        "plan",
        "--profiles",
        profiles.to_str().unwrap(),
        "--cluster",
        "T4:2",
        "--models",
        "convnext_large,googlenet-v3",
        "--accuracy",
        "84.414,77.294",
        "--demand",
        "60",
        "--slo-ms",
        "200,200",
        "--time-limit",
        "20",
        "--out",
        plan_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("family (planned for 75.0 frames/s"),
        "{stdout}"
    );
    let plan = Plan::load(&plan_path).unwrap();
    let rates: HashMap<String, f64> = plan
        .models
        .iter()
        .map(|m| (m.name.clone(), m.throughput))
        .collect();
    let total: f64 = rates.values().sum();
    assert!(
        rates.values().all(|r| *r > 0.1 * total),
        "both variants serve part of the demand: {rates:?}"
    );
    assert_eq!(plan.models[0].accuracy, Some(84.414));
    let names: Vec<String> = plan.models.iter().map(|m| m.name.clone()).collect();
    let out = dir.path().join("out.jsonl");
    let pipeline = format!(
        "[pipeline]\nname = \"fam\"\nslo_ms = 1000\ncluster = \"T4:2\"\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n\n\
         [[flow]]\nname = \"cls\"\nfamily = [\"{}\", \"{}\"]\n\n\
         [[source]]\nname = \"a\"\nuri = \"test://ball\"\nmax_fps = 30\nflow = \"cls\"\n\n\
         [[source]]\nname = \"b\"\nuri = \"test://smpte\"\nmax_fps = 30\nflow = \"cls\"\n",
        out.display(),
        names[0],
        names[1]
    );
    let p = common::write(dir.path(), "p.toml", &pipeline);
    let summary = dir.path().join("summary.json");
    let o = common::poolpipe(&[
        "run",
        p.to_str().unwrap(),
        "--plan",
        plan_path.to_str().unwrap(),
        "--profiles",
        profiles.to_str().unwrap(),
        "--duration",
        "10",
        "--summary-json",
        summary.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = common::read_summary(&summary);
    common::assert_balanced(&s);
    let results = common::read_jsonl(&out);
    assert!(results.len() > 200, "{} results", results.len());
    let mut by: HashMap<String, usize> = HashMap::new();
    for r in &results {
        let v = &r["variant"];
        let model = v["model"].as_str().expect("every result names its variant");
        let acc = v["accuracy"].as_f64().expect("and its accuracy");
        let want = if model == names[0] { 84.414 } else { 77.294 };
        assert_eq!(acc, want, "{r}");
        *by.entry(model.to_string()).or_default() += 1;
    }
    let n = results.len() as f64;
    for (name, rate) in &rates {
        let share = by.get(name).copied().unwrap_or(0) as f64 / n;
        assert!(
            (share - rate / total).abs() < 0.1,
            "{name}: {share:.3} of the results, planned {:.3} ({by:?})",
            rate / total
        );
    }

    // Bad input: a variant the plan lacks; `model` and `family` together.
    let bad = pipeline.replace(&format!("\"{}\"]", names[1]), "\"resnet9000\"]");
    let validate = |name: &str, text: &str| {
        let bp = common::write(dir.path(), name, text);
        common::poolpipe(&[
            "validate",
            bp.to_str().unwrap(),
            "--plan",
            plan_path.to_str().unwrap(),
            "--profiles",
            profiles.to_str().unwrap(),
        ])
    };
    let o = validate("bad.toml", &bad);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("bad.toml:12:")
            && err.contains("flow[0].family")
            && err.contains("resnet9000"),
        "{err}"
    );
    let both = pipeline.replace(
        "name = \"cls\"\nfamily",
        "name = \"cls\"\nmodel = \"x\"\nfamily",
    );
    let o = validate("both.toml", &both);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not both"), "{err}");
}
