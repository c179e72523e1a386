//! The graph a GPU backend gets. `python -m mbt rewrite` (models/mbt/rewrite.py) spells each
//! Softmax as a row max by `MaxPool`, then Sub, Exp, ReduceSum and Div, which tract runs much
//! faster on x86 CPUs; but tract-cuda has no `MaxPool` kernel, so on CUDA that node would run on
//! the CPU with a device sync on each side, in every attention layer. For a GPU backend the
//! daemon puts the one `Softmax` back (tract-cuda has a softmax kernel): [`restore_softmax`]
//! undoes exactly what rewrite.py wrote, recognised by its node names and checked by op type
//! and wiring, and leaves everything else alone.

use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto, attribute_proto::AttributeType};

/// The seven nodes rewrite.py writes for one Softmax, by name suffix and op type, in order.
const CHAIN: [(&str, &str); 7] = [
    ("/Reshape", "Reshape"),
    ("/MaxPool", "MaxPool"),
    ("/Reshape_1", "Reshape"),
    ("/Sub", "Sub"),
    ("/Exp", "Exp"),
    ("/ReduceSum", "ReduceSum"),
    ("/Div", "Div"),
];

/// Replaces each rewritten softmax chain of `model` by one last-axis `Softmax`; returns how
/// many. A chain whose nodes or wiring differ from rewrite.py's is left as it is.
pub fn restore_softmax(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let by_name = |name: &str| graph.node.iter().position(|node| node.name == name);
    let mut replace: Vec<(Vec<usize>, NodeProto)> = Vec::new();
    for div in graph.node.iter().filter(|node| node.op_type == "Div" && node.name.ends_with("_rowmax/Div")) {
        let prefix = &div.name[..div.name.len() - "/Div".len()];
        let Some(indices) = CHAIN
            .iter()
            .map(|(suffix, op)| by_name(&format!("{prefix}{suffix}")).filter(|&i| graph.node[i].op_type == *op))
            .collect::<Option<Vec<usize>>>()
        else {
            continue;
        };
        let [reshape, maxpool, reshape_1, sub, exp, reduce_sum, div_node] =
            [0, 1, 2, 3, 4, 5, 6].map(|k| &graph.node[indices[k]]);
        let x = reshape.input.first();
        let wired = x.is_some()
            && sub.input.first() == x
            && maxpool.input.first() == reshape.output.first()
            && reshape_1.input.first() == maxpool.output.first()
            && sub.input.get(1) == reshape_1.output.first()
            && exp.input.first() == sub.output.first()
            && reduce_sum.input.first() == exp.output.first()
            && div_node.input.first() == exp.output.first()
            && div_node.input.get(1) == reduce_sum.output.first()
            && div_node.output.len() == 1;
        // The chain's inner values must not feed anything else.
        let inner: Vec<&String> =
            [reshape, maxpool, reshape_1, sub, exp, reduce_sum].iter().flat_map(|node| node.output.iter()).collect();
        let private = graph
            .node
            .iter()
            .enumerate()
            .all(|(i, node)| indices.contains(&i) || !node.input.iter().any(|input| inner.contains(&input)))
            && !graph.output.iter().any(|output| inner.contains(&&output.name));
        if !(wired && private) {
            continue;
        }
        let softmax = NodeProto {
            name: prefix.trim_end_matches("_rowmax").to_string(),
            op_type: "Softmax".to_string(),
            input: vec![reshape.input[0].clone()],
            output: div_node.output.clone(),
            attribute: vec![AttributeProto {
                name: "axis".to_string(),
                r#type: AttributeType::Int as i32,
                i: -1,
                ..Default::default()
            }],
            ..Default::default()
        };
        replace.push((indices, softmax));
    }
    let count = replace.len();
    if count == 0 {
        return 0;
    }
    // Each Softmax takes the place of its Div (its input exists before the chain's first node,
    // its output's readers come after the Div), so the node order stays topological.
    let mut at_div = std::collections::HashMap::new();
    let mut dropped = std::collections::HashSet::new();
    for (indices, softmax) in replace {
        dropped.extend(indices.iter().copied());
        at_div.insert(indices[6], softmax);
    }
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter_map(|(i, node)| match at_div.remove(&i) {
            Some(softmax) => Some(softmax),
            None if dropped.contains(&i) => None,
            None => Some(node),
        })
        .collect();
    count
}

#[cfg(test)]
mod tests {
    use tract_onnx::prelude::*;

    use super::*;
    use crate::model::ModelInfo;
    use crate::model::test_rng::Lcg;

    fn shipped() -> ModelInfo {
        ModelInfo::read(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/avsynth-edge.onnx")).unwrap()
    }

    fn run(proto: &ModelProto, video: &Tensor, audio: &Tensor) -> Vec<Tensor> {
        let model = tract_onnx::onnx()
            .model_for_proto_model(proto)
            .unwrap()
            .with_input_fact(0, f32::fact([1, 8, 3, 64, 64]).into())
            .unwrap()
            .with_input_fact(1, f32::fact([1, 256, 128]).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        model
            .run(tvec![video.clone().into(), audio.clone().into()])
            .unwrap()
            .into_iter()
            .map(|v| v.into_tensor())
            .collect()
    }

    #[test]
    fn the_shipped_models_softmaxes_come_back_and_the_logits_do_not_change() {
        let info = shipped();
        let count_ops = |proto: &ModelProto, op: &str| {
            proto.graph.as_ref().unwrap().node.iter().filter(|node| node.op_type == op).count()
        };
        assert!(count_ops(&info.proto, "MaxPool") > 0, "the shipped model is the rewritten one");
        let mut restored = info.proto.clone();
        let count = restore_softmax(&mut restored);
        assert_eq!(count, count_ops(&info.proto, "MaxPool"));
        assert_eq!(count_ops(&restored, "MaxPool"), 0);
        assert_eq!(count_ops(&restored, "Softmax"), count);
        assert_eq!(restore_softmax(&mut restored), 0, "a second pass finds nothing");

        let mut rng = Lcg(7);
        let mut next = || rng.next();
        let video =
            Tensor::from_shape(&[1, 8, 3, 64, 64], &(0..8 * 3 * 64 * 64).map(|_| next()).collect::<Vec<_>>()).unwrap();
        let audio = Tensor::from_shape(&[1, 256, 128], &(0..256 * 128).map(|_| next()).collect::<Vec<_>>()).unwrap();
        let before = run(&info.proto, &video, &audio);
        let after = run(&restored, &video, &audio);
        assert_eq!(before.len(), after.len());
        for (a, b) in before.iter().zip(&after) {
            let (a, b) = (a.try_as_plain_ram().unwrap(), b.try_as_plain_ram().unwrap());
            let worst = a
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .zip(b.as_slice::<f32>().unwrap())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "logits moved by {worst}");
        }
    }

    #[test]
    fn a_graph_without_the_chain_is_left_alone() {
        let tiny =
            ModelInfo::read(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/testdata/mbt-tiny.onnx"))
                .unwrap();
        let mut proto = tiny.proto.clone();
        assert_eq!(restore_softmax(&mut proto), 0);
        assert_eq!(proto, tiny.proto);
    }
}
