//! A recurrent cell's manifest resolved against its model's tensors: which input is the step's,
//! which outputs feed which state inputs, their shapes and initial values. `validate` reports
//! every problem with the stage; a stage loads only a cell that resolves.

use ndarray::{ArrayD, IxDyn};

use super::ModelManifest;
use crate::engine::Engine;

/// A state tensor of the cell, resolved against the model.
#[derive(Debug, Clone)]
pub struct StateIo {
    /// The cell's state input.
    pub input: String,
    /// Index of its output among the model's outputs.
    pub output: usize,
    /// Shape of one item's state (without the batch dimension).
    pub shape: Vec<usize>,
    /// One item's initial state.
    pub initial: ArrayD<f32>,
}

/// How the cell's tensors are fed and read, checked against the model.
#[derive(Debug, Clone)]
pub struct CellIo {
    /// The step input (the item's image).
    pub step_input: String,
    /// The states, in manifest order.
    pub states: Vec<StateIo>,
    /// Index of the published output.
    pub output: usize,
    /// Size of the published output (one item).
    pub output_len: usize,
    /// Decoders: the token input, fed with the one-hot of the previous token.
    pub feedback: Option<String>,
    /// Token strings (decode) or labels (stream).
    pub labels: Vec<String>,
}

fn fixed_dims(shape: &[i64]) -> Option<Vec<usize>> {
    shape
        .iter()
        .skip(1)
        .map(|d| usize::try_from(*d).ok().filter(|d| *d > 0))
        .collect()
}

fn show(shape: &[i64]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| if *d < 0 { "N".into() } else { d.to_string() })
        .collect();
    format!("[{}]", dims.join(", "))
}

/// Resolves a recurrent manifest against its model's tensors; every problem is listed.
pub fn resolve_io(engine: &dyn Engine, m: &ModelManifest) -> Result<CellIo, Vec<String>> {
    let Some(r) = &m.recurrent else {
        return Err(vec!["not a recurrent model".into()]);
    };
    let info = engine.info();
    let mut problems = Vec::new();
    let input = |name: &str| info.inputs.iter().find(|t| t.name == name);
    let output = |name: &str| info.outputs.iter().position(|t| t.name == name);
    let names = |ts: &[crate::engine::TensorInfo]| {
        ts.iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut fed: Vec<&str> = Vec::new();
    let mut states = Vec::new();
    for s in &r.state {
        fed.push(&s.input);
        let (Some(i), Some(o)) = (input(&s.input), output(&s.output)) else {
            if input(&s.input).is_none() {
                problems.push(format!(
                    "state input `{}` is not an input of the model (it has: {})",
                    s.input,
                    names(&info.inputs)
                ));
            }
            if output(&s.output).is_none() {
                problems.push(format!(
                    "state output `{}` is not an output of the model (it has: {})",
                    s.output,
                    names(&info.outputs)
                ));
            }
            continue;
        };
        let out_shape = &info.outputs[o].shape;
        let dims = fixed_dims(&i.shape);
        if out_shape.len() != i.shape.len()
            || fixed_dims(out_shape).is_some_and(|d| Some(&d) != dims.as_ref())
        {
            problems.push(format!(
                "state output `{}` has shape {} but its input `{}` has {}: a step's state output must have the shape of its state input",
                s.output,
                show(out_shape),
                s.input,
                show(&i.shape)
            ));
            continue;
        }
        let Some(dims) = dims else {
            problems.push(format!(
                "state input `{}` has shape {}: every dimension but the batch must be fixed",
                s.input,
                show(&i.shape)
            ));
            continue;
        };
        let size: usize = dims.iter().product();
        let initial = match &s.initial {
            None => ArrayD::zeros(IxDyn(&dims)),
            Some(key) => {
                let values: Option<Vec<f32>> = engine
                    .metadata(key)
                    .and_then(|v| v.split(',').map(|x| x.trim().parse::<f32>().ok()).collect());
                match values.filter(|v| v.len() == size) {
                    Some(v) => ArrayD::from_shape_vec(IxDyn(&dims), v).expect("sized"),
                    None => {
                        problems.push(format!(
                            "the initial state of `{}` (metadata `{key}`) is not {size} comma-separated numbers",
                            s.input
                        ));
                        continue;
                    }
                }
            }
        };
        states.push(StateIo {
            input: s.input.clone(),
            output: o,
            shape: dims,
            initial,
        });
    }
    let out = output(&r.output);
    let output_len = out
        .and_then(|o| fixed_dims(&info.outputs[o].shape))
        .map(|d| d.iter().product::<usize>());
    match (out, output_len) {
        (None, _) => problems.push(format!(
            "output `{}` is not an output of the model (it has: {})",
            r.output,
            names(&info.outputs)
        )),
        (Some(o), None) => problems.push(format!(
            "output `{}` has shape {}: every dimension but the batch must be fixed",
            r.output,
            show(&info.outputs[o].shape)
        )),
        _ => {}
    }
    if let Some(f) = &r.feedback {
        fed.push(&f.input);
        match input(&f.input) {
            None => problems.push(format!(
                "feedback input `{}` is not an input of the model (it has: {})",
                f.input,
                names(&info.inputs)
            )),
            Some(t) if fixed_dims(&t.shape).map(|d| d.iter().product::<usize>()) != output_len => {
                problems.push(format!(
                    "feedback input `{}` has shape {}: it takes the one-hot of a token of `{}`, so its size must be that output's",
                    f.input,
                    show(&t.shape),
                    r.output
                ))
            }
            _ => {}
        }
    }
    if let (Some(t), Some(n)) = (r.end_token, output_len)
        && t >= n
    {
        problems.push(format!(
            "end_token {t} is not a token of `{}` (it has {n})",
            r.output
        ));
    }
    let step_input = match &m.input {
        Some(name) => name.clone(),
        None => info
            .inputs
            .iter()
            .map(|t| t.name.clone())
            .find(|n| !fed.contains(&n.as_str()))
            .unwrap_or_default(),
    };
    if input(&step_input).is_none() {
        problems.push(format!(
            "the step input `{step_input}` is not an input of the model (it has: {}); name it with `input`",
            names(&info.inputs)
        ));
    }
    fed.push(&step_input);
    for t in &info.inputs {
        if !fed.contains(&t.name.as_str()) {
            problems.push(format!(
                "input `{}` is fed by nothing: name it as the step `input`, a state, or the feedback",
                t.name
            ));
        }
    }
    let labels = match &r.labels_metadata_key {
        None => Vec::new(),
        Some(key) => match engine.metadata(key) {
            Some(v) => v.lines().map(str::to_string).collect(),
            None => {
                problems.push(format!("the model has no `{key}` metadata"));
                Vec::new()
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(CellIo {
        step_input,
        states,
        output: out.unwrap_or(0),
        output_len: output_len.unwrap_or(0),
        feedback: r.feedback.as_ref().map(|f| f.input.clone()),
        labels,
    })
}

/// Problems of a recurrent model's tensors against its manifest (empty: none).
pub fn check_io(engine: &dyn Engine, m: &ModelManifest) -> Vec<String> {
    resolve_io(engine, m).err().unwrap_or_default()
}
