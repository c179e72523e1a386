"""`python -m mbt rewrite`: the rewritten graph has no Softmax and one Gelu per block, keeps
metadata, I/O names and the symbolic batch, and gives the same outputs (onnxruntime; the
tract Python bindings, `tract` in requirements-ci.txt, the daemon's tract release). Torch-free."""

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from mbt import rewrite as rw  # noqa: E402
from mbt.compare import OrtEngine, inputs_for, max_abs_diff, model_gmacs  # noqa: E402
from mbt.config import METADATA_KEY  # noqa: E402
from mbt.export import parity_dir, sha256_file  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "testdata" / "mbt-tiny.onnx"


def ops(model):
    return [n.op_type for n in model.graph.node]


def test_tiny_model_rewritten_keeps_contract_and_outputs(tmp_path, capsys):
    out = tmp_path / "tiny-fast.onnx"
    assert rw.main([str(TINY), str(out), "--copy-parity"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rewritten"] == {"softmax": 4, "gelu": 4} and report["opset"] == rw.GELU_OPSET
    assert report["max_abs_diff_vs_original"] < 1e-6

    before, after = onnx.load(str(TINY)), onnx.load(str(out))
    assert "Softmax" not in ops(after) and ops(after).count("Gelu") == 4 and "Tanh" not in ops(after)
    assert ops(after).count("MaxPool") == 4
    meta = lambda m: {p.key: p.value for p in m.metadata_props}  # noqa: E731
    assert meta(after) == meta(before) and METADATA_KEY in meta(after)
    for old, new in ((before.graph.input, after.graph.input), (before.graph.output, after.graph.output)):
        assert [v.name for v in old] == [v.name for v in new]
        assert [str(v.type) for v in old] == [str(v.type) for v in new]  # batch stays symbolic
    digest, name = (tmp_path / "tiny-fast.onnx.sha256").read_text().split()
    assert name == out.name and digest == sha256_file(out)

    # The copied fixture is the original's, and the rewritten model reproduces it.
    assert sorted(p.name for p in parity_dir(out).iterdir()) == sorted(p.name for p in parity_dir(TINY).iterdir())
    _, cfg = model_gmacs(out)
    ins, expected, _ = inputs_for(out, cfg)
    assert max_abs_diff(OrtEngine(out, 1).run(ins), expected)[0] < 1e-5


def test_rewritten_model_in_tract_matches_the_fixture(tmp_path):
    pytest.importorskip("tract")
    from mbt.compare import TractPyEngine

    out = tmp_path / "tiny-fast.onnx"
    model = onnx.load(str(TINY))
    rw.rewrite(model)
    onnx.save(model, str(out))
    _, cfg = model_gmacs(TINY)
    ins, expected, _ = inputs_for(TINY, cfg)
    got = TractPyEngine(out, batch=len(ins["video"])).run(ins)
    assert max_abs_diff(got, expected)[0] < 1e-5


def softmax_model(shape, axis=-1):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=axis, name="/attn/Softmax")], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_softmax_rewrite_is_exact_for_extreme_logits():
    model = softmax_model(["batch", 2, 3, 7])
    assert rw.rewrite_softmax(model) == 1
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 2, 3, 7)) * 300).astype(np.float32)  # exp would overflow
    x[0, 0, 0] = -1e4  # a row far below zero: would underflow to 0/0 without the max
    want = np.exp(x - x.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    got = run(model, x)
    assert np.isfinite(got).all() and np.allclose(got, want, atol=1e-6)


def test_long_rows_keep_tracts_softmax():
    model = softmax_model(["batch", 12, 4, rw.SOFTMAX_MAX_ROW + 1])
    assert rw.rewrite_softmax(model) == 0 and ops(model) == ["Softmax"]
    assert rw.rewrite_softmax(model, max_row=rw.SOFTMAX_MAX_ROW + 1) == 1


def test_softmax_on_another_axis_or_symbolic_rows_is_left_alone():
    model = softmax_model([2, 3, 7], axis=1)
    assert rw.rewrite_softmax(model) == 0 and ops(model) == ["Softmax"]
    model = softmax_model([2, 3, "n"])
    assert rw.rewrite_softmax(model) == 0 and ops(model) == ["Softmax"]


def test_gelu_with_a_shared_intermediate_is_left_alone():
    model = onnx.load(str(TINY))
    graph = model.graph
    tanh = next(n for n in graph.node if n.op_type == "Tanh")
    # Expose the tanh output as an extra graph output: fusing would lose it.
    graph.output.append(helper.make_tensor_value_info(tanh.output[0], TensorProto.FLOAT, None))
    graph.node.append(helper.make_node("Identity", [tanh.output[0]], ["tanh_copy"]))
    assert rw.rewrite_gelu(model) == 3


def test_export_can_rewrite_for_tract(tmp_path):
    torch = pytest.importorskip("torch")
    from mbt.config import preset
    from mbt.export import export_onnx
    from mbt.model import MBT

    torch.manual_seed(0)
    report = export_onnx(MBT(preset("tiny")), tmp_path / "t.onnx", rewrite_for_tract=True)
    assert report["rewritten"] == {"softmax": 4, "gelu": 4}
    assert report["max_rel_diff_onnxruntime"] < 1e-4
    model = onnx.load(str(tmp_path / "t.onnx"))
    assert "Softmax" not in ops(model) and "Gelu" in ops(model)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == rw.GELU_OPSET
