//! One graph rewrite before the model is decluttered for good: a `Gather` of one constant index
//! along an axis (MBT's `x[:, 0]`, the CLS token read after the last layer) as a one-row
//! `Slice` and the axis removed. tract pushes a `Slice` up through the ops that act row by
//! row (LayerNorm, the MLP, the residual adds, attention by query row: `PushSliceUp`), but
//! not a `Gather`: so the last layer then runs its output projection, MLP and attention for
//! the one row read, where it ran them for every token (K and V still take every token).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Gather, Slice};
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Rewrites each `Gather` of a constant scalar index as `Slice` + `AxisOp::Rm`; returns how
/// many. The caller declutters again so that the slices move up.
pub fn gathers_as_slices(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in &model.nodes {
        let Some(gather) = node.op_as::<Gather>() else { continue };
        if node.inputs.len() != 2 || gather.output_type.is_some() {
            continue;
        }
        let data = model.outlet_fact(node.inputs[0])?;
        let indices = model.outlet_fact(node.inputs[1])?;
        let Some(index) = indices.konst.as_ref().filter(|t| t.rank() == 0) else { continue };
        let Ok(index) = index.cast_to_scalar::<i64>() else { continue };
        let Ok(len) = data.shape[gather.axis].to_i64() else { continue };
        let index = if index < 0 { index + len } else { index };
        if (0..len).contains(&index) {
            found.push((node.id, gather.axis, index as usize));
        }
    }
    let mut patch = TypedModelPatch::default();
    for &(id, axis, index) in &found {
        let node = model.node(id);
        let data = patch.tap_model(model, node.inputs[0])?;
        let row = patch.wire_node(format!("{}.slice", node.name), Slice::new(axis, index, index + 1), &[data])?;
        let out = patch.wire_node(format!("{}.rm", node.name), AxisOp::Rm(axis), &row)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), out)?;
    }
    if !found.is_empty() {
        patch.apply(model)?;
        model.compact()?;
    }
    Ok(found.len())
}

/// Moves each `Slice` of an `EinSum`'s output onto the one input that carries the sliced
/// axis, where the slice is the product's only reader: the rows of attention's scores
/// `Q . K^T` that a query-row slice keeps become a slice of Q (which tract then pushes up
/// into Q's projection), instead of every row's scores computed and most dropped. Returns
/// how many; the caller declutters again.
pub fn slices_through_products(model: &mut TypedModel) -> TractResult<usize> {
    move_slices_onto_inputs(model, |product, slice| {
        let einsum = product.op_as::<EinSum>().filter(|op| op.q_params.is_none())?;
        let axis = einsum.axes.axis((InOut::Out(0), slice.axis)).ok()?;
        let carriers: Vec<usize> = (0..product.inputs.len()).filter(|&i| !axis.inputs[i].is_empty()).collect();
        let [input] = carriers[..] else { return None };
        let ([at], [_]) = (&axis.inputs[input][..], &axis.outputs[0][..]) else { return None };
        let sliced = Slice { axis: *at, ..slice.clone() };
        Some((0..product.inputs.len()).map(|i| (i == input).then(|| sliced.clone())).collect())
    })
}

/// Where a `Slice` is the only reader of the one output of a node, and `onto(node, slice)`
/// gives for each of the node's inputs the slice that takes its part (None: the input as it
/// is), runs the node's op on those slices of its inputs instead, and the slice goes.
/// Returns how many; tract's declutter can then move the new slices further up.
pub fn move_slices_onto_inputs(
    model: &mut TypedModel,
    onto: impl Fn(&TypedNode, &Slice) -> Option<TVec<Option<Slice>>>,
) -> TractResult<usize> {
    let outputs = model.output_outlets()?.to_vec();
    let mut found = vec![];
    for node in &model.nodes {
        let Some(slice) = node.op_as::<Slice>() else { continue };
        let product = model.node(node.inputs[0].node);
        let only_reader = product.outputs.len() == 1 && product.outputs[0].successors.len() == 1;
        if !only_reader || outputs.contains(&node.inputs[0]) {
            continue;
        }
        if let Some(slices) = onto(product, slice).filter(|slices| slices.len() == product.inputs.len()) {
            found.push((node.id, product.id, slices));
        }
    }
    let mut patch = TypedModelPatch::default();
    for (slice_id, product_id, slices) in &found {
        let product = model.node(*product_id);
        let mut inputs = tvec![];
        for (ix, (outlet, slice)) in product.inputs.iter().zip(slices).enumerate() {
            let mut wire = patch.tap_model(model, *outlet)?;
            if let Some(slice) = slice {
                let name = format!("{}.input{ix}", model.node(*slice_id).name);
                wire = patch.wire_node(name, slice.clone(), &[wire])?[0];
            }
            inputs.push(wire);
        }
        let out = patch.wire_node(format!("{}.sliced", product.name), product.op.clone(), &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(*slice_id, 0), out)?;
    }
    if !found.is_empty() {
        patch.apply(model)?;
        model.compact()?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_rng::Lcg;
    use tract_onnx::tract_core::ops::math;

    fn run(model: &TypedModel, x: &Tensor) -> Tensor {
        let plan = model.clone().into_optimized().unwrap().into_runnable().unwrap();
        plan.run(tvec!(x.clone().into_tvalue())).unwrap().remove(0).into_tensor()
    }

    fn input(shape: &[usize]) -> Tensor {
        let mut rng = Lcg(23);
        let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.next()).collect();
        tensor1(&values).into_shape(shape).unwrap()
    }

    /// `x [1, 7, 16]`: `y = x . W + b`, then `Gather(axis 1, index)`: a layer's tail and the
    /// CLS read.
    fn cls_model(index: i64) -> TypedModel {
        let mut rng = Lcg(29);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 7, 16])).unwrap();
        let w: Vec<f32> = (0..16 * 32).map(|_| rng.next()).collect();
        let w = model.add_const("w", tensor1(&w).into_shape(&[16, 32]).unwrap()).unwrap();
        let b = model.add_const("b", tensor1(&[0.5f32; 32]).into_shape(&[1, 1, 32]).unwrap()).unwrap();
        let op = EinSum::new("amk,kn->amn".parse().unwrap(), f32::datum_type());
        let y = model.wire_node("mm", op, &[x, w]).unwrap()[0];
        let y = model.wire_node("add", math::add(), &[y, b]).unwrap()[0];
        let i = model.add_const("i", tensor0(index)).unwrap();
        let cls = model.wire_node("cls", Gather { axis: 1, output_type: None }, &[y, i]).unwrap();
        model.select_output_outlets(&cls).unwrap();
        model
    }

    #[test]
    fn a_gather_of_one_index_becomes_a_slice_and_the_product_takes_that_row_only() {
        for index in [0, 3, -1] {
            let model = cls_model(index).into_decluttered().unwrap();
            let x = input(&[1, 7, 16]);
            let want = run(&model, &x);
            let mut sliced = model.clone();
            assert_eq!(gathers_as_slices(&mut sliced).unwrap(), 1);
            sliced.declutter().unwrap();
            assert!(sliced.nodes.iter().all(|n| n.op_as::<Gather>().is_none()));
            let product = sliced.nodes.iter().find(|n| n.op_as::<EinSum>().is_some()).unwrap();
            assert_eq!(product.outputs[0].fact.shape.volume(), 32.to_dim(), "{index}: one row: {sliced}");
            let got = run(&sliced, &x);
            assert_eq!(want.shape(), got.shape());
            want.close_enough(&got, true).unwrap();
        }
        // An index past the axis is left to tract (which refuses it at run time).
        assert_eq!(gathers_as_slices(&mut cls_model(9)).unwrap(), 0);
    }

    /// Scores Q . K^T per head (`ambk,anbk->abmn`, K a constant), then `Slice(axis, 2..3)`.
    fn scores_model(axis: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let q = model.add_source("q", f32::fact([1, 5, 2, 8])).unwrap();
        let k = model.add_const("k", input(&[1, 5, 2, 8])).unwrap();
        let op = EinSum::new("ambk,anbk->abmn".parse().unwrap(), f32::datum_type());
        let s = model.wire_node("scores", op, &[q, k]).unwrap();
        let s = model.wire_node("rows", Slice::new(axis, 2, 3), &s).unwrap();
        model.select_output_outlets(&s).unwrap();
        model
    }

    #[test]
    fn a_slice_of_query_rows_moves_onto_q() {
        let x = input(&[1, 5, 2, 8]);
        // Query rows (axis 2) onto Q's token axis; keys (axis 3) onto K's.
        for (axis, input, sliced_shape) in [(2, 0, [1, 1, 2, 8]), (3, 1, [1, 1, 2, 8])] {
            let model = scores_model(axis);
            let want = run(&model, &x);
            let mut sliced = model.clone();
            assert_eq!(slices_through_products(&mut sliced).unwrap(), 1);
            let product = sliced.nodes.iter().find(|n| n.op_as::<EinSum>().is_some()).unwrap();
            let shape = sliced.outlet_fact(product.inputs[input]).unwrap().shape.as_concrete().map(|s| s.to_vec());
            assert_eq!(shape, Some(sliced_shape.to_vec()));
            want.close_enough(&run(&sliced, &x), true).unwrap();
        }
        // A product read by something besides the slice is left alone; so is a slice of the
        // heads (axis 1), which both inputs carry.
        let mut shared = scores_model(2);
        let scores = shared.nodes.iter().find(|n| n.name == "scores").unwrap().id;
        let rows = shared.nodes.iter().find(|n| n.name == "rows").unwrap().id;
        shared.select_output_outlets(&[OutletId::new(rows, 0), OutletId::new(scores, 0)]).unwrap();
        assert_eq!(slices_through_products(&mut shared).unwrap(), 0);
        let mut model = TypedModel::default();
        let q = model.add_source("q", f32::fact([1, 5, 4, 8])).unwrap();
        let k = model.add_const("k", input(&[1, 5, 4, 8])).unwrap();
        let op = EinSum::new("ambk,anbk->abmn".parse().unwrap(), f32::datum_type());
        let s = model.wire_node("scores", op, &[q, k]).unwrap();
        let s = model.wire_node("heads", Slice::new(1, 0, 2), &s).unwrap();
        model.select_output_outlets(&s).unwrap();
        assert_eq!(slices_through_products(&mut model).unwrap(), 0);
    }
}
