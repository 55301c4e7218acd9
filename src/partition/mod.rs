//! Cutting ONNX models into consecutive blocks.
//!
//! A *cut point* is a position between two compute nodes of the graph (in its topological order)
//! where exactly one activation tensor crosses from the nodes before to the nodes after, so a
//! skip connection is never cut. Constants do not count: initializers, and the outputs of nodes
//! that only read constants (`Constant` nodes, which exporters such as Paddle's put at the start
//! of the graph). Each block carries the constants it reads. [`extract`] writes the sub-model
//! between two cut points as a standalone model whose batch dimension is dynamic.
//!
//! Positions count compute nodes only (nodes that read at least one activation).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use onnx_protobuf::{
    GraphProto, Message, ModelProto, NodeProto, TypeProto, ValueInfoProto, tensor_shape_proto,
    type_proto,
};

/// Errors of model cutting.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// The file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// Which file.
        path: String,
        /// Why.
        message: String,
    },
    /// The file is not an ONNX model.
    #[error("{path} is not an ONNX model: {message}")]
    Parse {
        /// Which file.
        path: String,
        /// Why.
        message: String,
    },
    /// The model has no position where a single tensor crosses.
    #[error("the model has no valid cut point (no position where exactly one tensor crosses)")]
    NoCut,
    /// More blocks were asked for than the cut points allow.
    #[error(
        "{asked} blocks asked for, but the model has {cuts} valid cut points, so at most {max} blocks"
    )]
    TooManyBlocks {
        /// Blocks asked for.
        asked: usize,
        /// Valid cut points.
        cuts: usize,
        /// Most blocks possible.
        max: usize,
    },
}

pub mod split;

/// Reads an ONNX model.
pub fn load(path: &Path) -> Result<ModelProto, PartitionError> {
    let bytes = std::fs::read(path).map_err(|e| PartitionError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    ModelProto::parse_from_bytes(&bytes).map_err(|e| PartitionError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Writes an ONNX model.
pub fn save(model: &ModelProto, path: &Path) -> Result<(), PartitionError> {
    let io = |e: String| PartitionError::Io {
        path: path.display().to_string(),
        message: e,
    };
    let bytes = model.write_to_bytes().map_err(|e| io(e.to_string()))?;
    std::fs::write(path, bytes).map_err(|e| io(e.to_string()))
}

/// A position where the graph can be cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutPoint {
    /// The cut is before this node (nodes `0..position` come before it).
    pub position: usize,
    /// The one tensor that crosses it.
    pub tensor: String,
}

/// Every tensor name a node reads, including names its subgraphs (If, Loop, Scan) read from the
/// enclosing graph.
fn node_reads(node: &NodeProto, out: &mut Vec<String>) {
    out.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
    for attr in &node.attribute {
        let graphs = attr.g.as_ref().into_iter().chain(attr.graphs.iter());
        for g in graphs {
            for n in &g.node {
                node_reads(n, out);
            }
        }
    }
}

/// Splits the nodes into constant nodes (read only constants) and compute nodes, in order, and
/// returns the names of all constant tensors.
fn classify_nodes(graph: &GraphProto) -> (Vec<usize>, Vec<usize>, HashSet<String>) {
    let mut constants: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    let mut const_nodes = Vec::new();
    let mut compute = Vec::new();
    let mut reads = Vec::new();
    for (k, node) in graph.node.iter().enumerate() {
        reads.clear();
        node_reads(node, &mut reads);
        let random = node.op_type.starts_with("Random");
        if !random && reads.iter().all(|r| constants.contains(r)) {
            constants.extend(node.output.iter().filter(|o| !o.is_empty()).cloned());
            const_nodes.push(k);
        } else {
            compute.push(k);
        }
    }
    (const_nodes, compute, constants)
}

/// The valid cut points of a graph, in order.
pub fn cut_points(graph: &GraphProto) -> Vec<CutPoint> {
    let (_, compute, constants) = classify_nodes(graph);
    let n = compute.len();
    // Where each activation is produced (graph inputs before the first compute node) and last
    // read (graph outputs after the last), in positions among compute nodes.
    let mut produced: HashMap<String, usize> = HashMap::new();
    for i in &graph.input {
        if !constants.contains(&i.name) {
            produced.insert(i.name.clone(), 0);
        }
    }
    for (k, &idx) in compute.iter().enumerate() {
        for o in graph.node[idx].output.iter().filter(|o| !o.is_empty()) {
            produced.insert(o.clone(), k + 1);
        }
    }
    let mut last_read: HashMap<String, usize> = HashMap::new();
    let mut reads = Vec::new();
    for (k, &idx) in compute.iter().enumerate() {
        reads.clear();
        node_reads(&graph.node[idx], &mut reads);
        for r in &reads {
            last_read.insert(r.clone(), k + 1);
        }
    }
    for o in &graph.output {
        last_read.insert(o.name.clone(), n + 1);
    }
    // A tensor produced at `p` (after compute node p-1) and last read by compute node `r - 1`
    // crosses every position in p..r, that is, cuts before compute nodes p..r-1.
    let mut crossing: Vec<Vec<&str>> = vec![Vec::new(); n + 1];
    for (name, &p) in &produced {
        let Some(&r) = last_read.get(name) else {
            continue;
        };
        for c in crossing.iter_mut().take(r.min(n + 1)).skip(p.max(1)) {
            c.push(name.as_str());
        }
    }
    (1..n)
        .filter_map(|pos| match crossing[pos].as_slice() {
            [one] => Some(CutPoint {
                position: pos,
                tensor: (*one).to_string(),
            }),
            _ => None,
        })
        .collect()
}

/// A value-info for `name` with the element type and shape the model declares for it, if any, and
/// the first dimension made dynamic (`N`).
fn value_info(graph: &GraphProto, name: &str) -> ValueInfoProto {
    let declared = graph
        .value_info
        .iter()
        .chain(&graph.input)
        .chain(&graph.output)
        .find(|v| v.name == name);
    let mut vi = declared.cloned().unwrap_or_else(|| {
        let mut t = type_proto::Tensor::new();
        t.elem_type = 1; // FLOAT
        let mut tp = TypeProto::new();
        tp.value = Some(type_proto::Value::TensorType(t));
        let mut v = ValueInfoProto::new();
        v.name = name.to_string();
        v.type_ = Some(tp).into();
        v
    });
    if let Some(type_proto::Value::TensorType(t)) =
        vi.type_.as_mut().and_then(|tp| tp.value.as_mut())
        && let Some(shape) = t.shape.as_mut()
        && let Some(first) = shape.dim.first_mut()
    {
        first.value = Some(tensor_shape_proto::dimension::Value::DimParam("N".into()));
    }
    vi
}

/// The sub-model of compute nodes `from.position..to.position` (from the start / to the end when
/// `None`), carrying only the initializers and constant nodes it reads.
pub fn extract(model: &ModelProto, from: Option<&CutPoint>, to: Option<&CutPoint>) -> ModelProto {
    let empty = GraphProto::new();
    let g = model.graph.as_ref().unwrap_or(&empty);
    let (const_nodes, compute, _) = classify_nodes(g);
    let a = from.map_or(0, |c| c.position);
    let b = to.map_or(compute.len(), |c| c.position);
    let mut reads = Vec::new();
    for &idx in &compute[a..b] {
        node_reads(&g.node[idx], &mut reads);
    }
    // Constant nodes the block needs, found backwards so that constants of constants come too.
    let mut needed: HashSet<String> = reads.iter().cloned().collect();
    let mut keep_const = vec![false; const_nodes.len()];
    for (j, &idx) in const_nodes.iter().enumerate().rev() {
        let node = &g.node[idx];
        if node.output.iter().any(|o| needed.contains(o)) {
            keep_const[j] = true;
            let mut r = Vec::new();
            node_reads(node, &mut r);
            needed.extend(r);
        }
    }
    let nodes: Vec<NodeProto> = const_nodes
        .iter()
        .zip(&keep_const)
        .filter(|(_, keep)| **keep)
        .map(|(&idx, _)| g.node[idx].clone())
        .chain(compute[a..b].iter().map(|&idx| g.node[idx].clone()))
        .collect();
    let read: HashSet<&str> = needed.iter().map(String::as_str).collect();
    let constants: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut sub = GraphProto::new();
    sub.name = format!("{}_nodes_{a}_{b}", g.name);
    sub.initializer = g
        .initializer
        .iter()
        .filter(|t| read.contains(t.name.as_str()))
        .cloned()
        .collect();
    sub.input = match from {
        None => g
            .input
            .iter()
            .filter(|i| !constants.contains(i.name.as_str()) || read.contains(i.name.as_str()))
            .filter(|i| !constants.contains(i.name.as_str()))
            .cloned()
            .collect(),
        Some(c) => vec![value_info(g, &c.tensor)],
    };
    sub.output = match to {
        None => g.output.clone(),
        Some(c) => vec![value_info(g, &c.tensor)],
    };
    let produced: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    sub.value_info = g
        .value_info
        .iter()
        .filter(|v| {
            produced.contains(v.name.as_str()) && !sub.output.iter().any(|o| o.name == v.name)
        })
        .cloned()
        .collect();
    sub.node = nodes;
    // Everything but the graph, without copying the original graph's weights.
    let mut m = ModelProto::new();
    m.ir_version = model.ir_version;
    m.opset_import = model.opset_import.clone();
    m.producer_name = "poolpipe".into();
    m.domain = model.domain.clone();
    m.model_version = model.model_version;
    m.metadata_props = model.metadata_props.clone();
    m.functions = model.functions.clone();
    m.graph = Some(sub).into();
    m
}

/// Chooses `k - 1` of the cut points to make `k` blocks whose costs are as even as possible
/// (minimising the largest block), preferring cuts with small activations among equally even
/// choices. `segment_cost[i]` is the cost of the nodes between consecutive candidate cuts `i - 1`
/// and `i` (so there is one more segment than cut points); `cut_bytes[i]` the size of cut `i`.
pub fn balance(
    segment_cost: &[f64],
    cut_bytes: &[u64],
    k: usize,
) -> Result<Vec<usize>, PartitionError> {
    let cuts = cut_bytes.len();
    if cuts == 0 {
        return Err(PartitionError::NoCut);
    }
    if k == 0 || k > cuts + 1 {
        return Err(PartitionError::TooManyBlocks {
            asked: k,
            cuts,
            max: cuts + 1,
        });
    }
    let s = segment_cost.len();
    debug_assert_eq!(s, cuts + 1);
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(segment_cost.iter().scan(0.0, |acc, c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    // best[j][i]: (largest block, bytes) for the first i segments in j blocks; choice of last cut.
    let inf = (f64::INFINITY, u64::MAX);
    let mut best = vec![vec![inf; s + 1]; k + 1];
    let mut choice = vec![vec![0usize; s + 1]; k + 1];
    best[0][0] = (0.0, 0);
    for j in 1..=k {
        for i in j..=s {
            for p in (j - 1)..i {
                let (prev, bytes) = best[j - 1][p];
                if prev.is_infinite() {
                    continue;
                }
                let block = prefix[i] - prefix[p];
                let cut = if p > 0 { cut_bytes[p - 1] } else { 0 };
                let cand = (prev.max(block), bytes.saturating_add(cut));
                // Even-ness first (within 1%), then fewer bytes crossing cuts.
                let better = {
                    let (b, bb) = best[j][i];
                    cand.0 < b * 0.99 || (cand.0 <= b * 1.01 && cand.1 < bb)
                };
                if better {
                    best[j][i] = cand;
                    choice[j][i] = p;
                }
            }
        }
    }
    let mut chosen = Vec::new();
    let mut i = s;
    for j in (1..=k).rev() {
        let p = choice[j][i];
        if p > 0 {
            chosen.push(p - 1);
        }
        i = p;
    }
    chosen.reverse();
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![output.into()];
        n
    }

    fn vi(name: &str) -> ValueInfoProto {
        let mut v = ValueInfoProto::new();
        v.name = name.into();
        v
    }

    /// X -> Relu a -> Relu b -> Relu c -> Add(a, c) d -> Relu Y, with a weight W read by n1.
    fn skip_graph() -> GraphProto {
        let mut g = GraphProto::new();
        g.input = vec![vi("X")];
        g.output = vec![vi("Y")];
        let mut w = onnx_protobuf::TensorProto::new();
        w.name = "W".into();
        g.initializer = vec![w];
        g.node = vec![
            node("Relu", &["X"], "a"),
            node("Mul", &["a", "W"], "b"),
            node("Relu", &["b"], "c"),
            node("Add", &["a", "c"], "d"),
            node("Relu", &["d"], "Y"),
        ];
        g
    }

    #[test]
    fn a_skip_connection_is_never_cut() {
        let cuts = cut_points(&skip_graph());
        assert_eq!(
            cuts,
            vec![
                CutPoint {
                    position: 1,
                    tensor: "a".into()
                },
                CutPoint {
                    position: 4,
                    tensor: "d".into()
                },
            ]
        );
    }

    #[test]
    fn constant_nodes_do_not_block_cuts_and_travel_with_the_blocks_that_read_them() {
        // A Constant node first (as Paddle exports), read by the last node.
        let mut g = skip_graph();
        let mut k = node("Constant", &[], "k");
        k.input.clear();
        g.node.insert(0, k);
        g.node[5] = node("Mul", &["d", "k"], "Y");
        let cuts = cut_points(&g);
        assert_eq!(
            cuts.iter().map(|c| c.tensor.as_str()).collect::<Vec<_>>(),
            vec!["a", "d"]
        );
        let mut m = ModelProto::new();
        m.graph = Some(g).into();
        let tail = extract(&m, Some(&cuts[1]), None);
        let ops: Vec<&str> = tail
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.as_str())
            .collect();
        assert_eq!(
            ops,
            vec!["Constant", "Mul"],
            "the tail carries the constant it reads"
        );
        let head = extract(&m, None, Some(&cuts[0]));
        assert_eq!(
            head.graph.as_ref().unwrap().node.len(),
            1,
            "the head does not"
        );
    }

    #[test]
    fn extraction_keeps_only_what_a_block_reads() {
        let mut m = ModelProto::new();
        m.graph = Some(skip_graph()).into();
        let cuts = cut_points(m.graph.as_ref().unwrap());
        let mid = extract(&m, Some(&cuts[0]), Some(&cuts[1]));
        let g = mid.graph.as_ref().unwrap();
        assert_eq!(g.node.len(), 3);
        assert_eq!(
            g.input.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            vec!["a"]
        );
        assert_eq!(
            g.output.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            vec!["d"]
        );
        assert_eq!(g.initializer.len(), 1, "W is read by the Mul");
        let head = extract(&m, None, Some(&cuts[0]));
        assert!(
            head.graph.as_ref().unwrap().initializer.is_empty(),
            "the head reads no weight"
        );
    }

    #[test]
    fn balancing_evens_blocks_and_prefers_small_cuts() {
        // Segments 1,1,1,1 with cuts of 100, 10, 100 bytes: two blocks -> the middle cut.
        assert_eq!(
            balance(&[1.0, 1.0, 1.0, 1.0], &[100, 10, 100], 2).unwrap(),
            vec![1]
        );
        // Uneven segments: 3,1,1,1 in two blocks -> cut after the first.
        assert_eq!(
            balance(&[3.0, 1.0, 1.0, 1.0], &[1, 1, 1], 2).unwrap(),
            vec![0]
        );
        assert_eq!(
            balance(&[1.0, 1.0, 1.0, 1.0], &[1, 1, 1], 4).unwrap(),
            vec![0, 1, 2]
        );
        assert_eq!(balance(&[1.0, 1.0], &[5], 1).unwrap(), Vec::<usize>::new());
        assert!(matches!(
            balance(&[1.0, 1.0], &[5], 3),
            Err(PartitionError::TooManyBlocks { max: 2, .. })
        ));
        assert!(matches!(
            balance(&[1.0], &[], 2),
            Err(PartitionError::NoCut)
        ));
    }
}
