"""`python -m mbt rewrite IN.onnx OUT.onnx`: the same model, written so that tract 0.23 runs it
faster on x86 CPUs. Numerically equivalent (checked with onnxruntime before anything is
written); the `mbt` metadata, the I/O names and the symbolic batch are kept.

Two rewrites, each measured with `python -m mbt compare` (BENCHMARKS.md):

1. `Softmax(axis=-1)` -> `x - rowmax(x)`, `Exp`, `ReduceSum`, `Div`, with the row max taken by
   a 1-D `MaxPool` over the rows (`Reshape` to [rows, 1, n]). The same arithmetic as a
   softmax (exact max subtraction, no overflow for any input). Why: tract 0.23.9's `Softmax`
   on x86 runs its three row kernels per row with an unaligned prefix/suffix each when the
   row length (129 or 133 tokens here) is not a multiple of the SIMD width (its one-pass
   row kernel exists only for ARM and wasm), about 10 ns per element; `ReduceMax` pays an
   ndarray slice and a kernel lookup per row. `MaxPool`, `Exp`, `ReduceSum` and `Div` run over
   the whole tensor with vectorised kernels. edge-small: 15.3 -> 11.7 ms per window.
   Only for rows of at most `SOFTMAX_MAX_ROW` (400) values: tract's own Softmax catches up
   as rows grow (per element, 8.7 ns vs 2.9 ns rewritten at 129, 3.8 vs 3.5 at 385, 3.1 vs
   3.6 at 513, 6.5 vs 11.7 at vit-base's 1573, where the extra passes over a tensor that no
   longer fits in cache cost more than the per-row overhead saved).
2. The tanh-GELU that the TorchScript exporter spells out in 8 nodes
   (`0.5 x (1 + tanh(0.79788456 (x + 0.044715 x^3)))`) -> one `Gelu(approximate="tanh")`
   (opset 20), which tract maps to its `GeluApproximate` kernel and onnxruntime to its
   fused Gelu. The opset becomes 20 (the `Gelu` op needs it); tract-onnx 0.23 and
   onnxruntime >= 1.16 read it.

Not done, because measured slower or undone by tract (BENCHMARKS.md): ONNX `Attention`
(opset 23; tract lowers it to `FlashSDPA`, about 1 ms per call here against 0.8 ms for the
decomposed path), one fused Q/K/V matmul (tract's optimiser splits it back into three).

Needs numpy, onnx, onnxruntime (for the check).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np

GELU_OPSET = 20
SOFTMAX_MAX_ROW = 400  # longer rows: tract's Softmax is faster (measured, see the docstring)
TANH_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
TANH_GELU_A = 0.044715


class _Graph:
    """Producers, consumers and constant values of a graph, for pattern matching."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.g = model.graph
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers = collections.defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.consts = {i.name: numpy_helper.to_array(i) for i in self.g.initializer}
        for n in self.g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)

    def is_scalar(self, name: str, value: float, tol: float = 1e-6) -> bool:
        c = self.consts.get(name)
        return c is not None and c.size == 1 and abs(float(c.reshape(-1)[0]) - value) <= tol * max(1.0, abs(value))

    @staticmethod
    def other_input(node, name: str) -> str | None:
        if len(node.input) != 2:
            return None
        a, b = node.input
        return b if a == name else a if b == name else None

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None

    def replace_nodes(self, drop: set[int], before: dict[int, list]) -> None:
        """Drop nodes (by id), insert new ones before a node (by id), remove dead Constants."""
        new = []
        for n in self.g.node:
            new.extend(before.get(id(n), []))
            if id(n) not in drop:
                new.append(n)
        used = {i for n in new for i in n.input} | {o.name for o in self.g.output}
        new = [n for n in new if not (n.op_type == "Constant" and n.output[0] not in used)]
        del self.g.node[:]
        self.g.node.extend(new)
        keep = [i for i in self.g.initializer if i.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)


def _static_shapes(model) -> dict[str, list]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    return {
        vi.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }


def rewrite_softmax(model, max_row: int = SOFTMAX_MAX_ROW) -> int:
    """Each last-axis Softmax of rank >= 2 with a static row length of at most `max_row` ->
    MaxPool row max, Sub, Exp, ReduceSum, Div. Returns the number rewritten."""
    from onnx import helper, numpy_helper

    shapes = _static_shapes(model)
    g = _Graph(model)
    drop, before = set(), {}
    count = 0
    for node in [n for n in g.g.node if n.op_type == "Softmax"]:
        x, y = node.input[0], node.output[0]
        shape = shapes.get(x)
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if not shape or len(shape) < 2 or axis not in (-1, len(shape) - 1):
            continue
        width = shape[-1]
        middle = shape[1:-1]
        if not isinstance(width, int) or width <= 0 or not all(isinstance(d, int) and d > 0 for d in middle):
            continue
        if width > max_row:
            continue
        p = (node.name or y).rstrip("/") + "_rowmax"
        g.g.initializer.extend([
            numpy_helper.from_array(np.array([-1, 1, width], np.int64), p + "/rows_shape"),
            numpy_helper.from_array(np.array([-1, *middle, 1], np.int64), p + "/max_shape"),
            numpy_helper.from_array(np.array([-1], np.int64), p + "/axes"),
        ])
        before[id(node)] = [
            helper.make_node("Reshape", [x, p + "/rows_shape"], [p + "/rows"], name=p + "/Reshape"),
            helper.make_node("MaxPool", [p + "/rows"], [p + "/row_max"], kernel_shape=[width], name=p + "/MaxPool"),
            helper.make_node("Reshape", [p + "/row_max", p + "/max_shape"], [p + "/max"], name=p + "/Reshape_1"),
            helper.make_node("Sub", [x, p + "/max"], [p + "/shifted"], name=p + "/Sub"),
            helper.make_node("Exp", [p + "/shifted"], [p + "/exp"], name=p + "/Exp"),
            helper.make_node("ReduceSum", [p + "/exp", p + "/axes"], [p + "/sum"], keepdims=1, name=p + "/ReduceSum"),
            helper.make_node("Div", [p + "/exp", p + "/sum"], [y], name=p + "/Div"),
        ]
        drop.add(id(node))
        count += 1
    g.replace_nodes(drop, before)
    return count


def _match_tanh_gelu(g: _Graph, tanh):
    """The nodes of `0.5 * (x * (1 + tanh(c * (x + a * (x * (x * x))))))` around `tanh`
    (as torch.onnx writes F.gelu(approximate="tanh")), or None: (x, nodes, last)."""
    mul_c = g.producer.get(tanh.input[0])
    if mul_c is None or mul_c.op_type != "Mul":
        return None
    c_name = next((i for i in mul_c.input if g.is_scalar(i, TANH_GELU_C)), None)
    if c_name is None:
        return None
    add_inner = g.producer.get(g.other_input(mul_c, c_name))
    if add_inner is None or add_inner.op_type != "Add":
        return None
    for x in add_inner.input:
        mul_a = g.producer.get(g.other_input(add_inner, x) or "")
        if mul_a is None or mul_a.op_type != "Mul":
            continue
        a_name = next((i for i in mul_a.input if g.is_scalar(i, TANH_GELU_A)), None)
        cube = g.producer.get(g.other_input(mul_a, a_name) or "") if a_name else None
        if cube is None or cube.op_type != "Mul" or x not in cube.input:
            continue
        square = g.producer.get(g.other_input(cube, x) or "")
        if square is None or square.op_type != "Mul" or list(square.input) != [x, x]:
            continue
        add_one = g.only_consumer(tanh.output[0])
        if add_one is None or add_one.op_type != "Add" or not g.is_scalar(g.other_input(add_one, tanh.output[0]) or "", 1.0):
            continue
        mul_x = g.only_consumer(add_one.output[0])
        if mul_x is None or mul_x.op_type != "Mul" or g.other_input(mul_x, add_one.output[0]) != x:
            continue
        half = g.only_consumer(mul_x.output[0])
        if half is None or half.op_type != "Mul" or not g.is_scalar(g.other_input(half, mul_x.output[0]) or "", 0.5):
            continue
        inner = [square, cube, mul_a, add_inner, mul_c, tanh, add_one, mul_x]
        if any(g.only_consumer(n.output[0]) is None for n in inner):
            continue  # an intermediate value is used elsewhere: leave it
        return x, inner, half
    return None


def rewrite_gelu(model) -> int:
    """Each spelled-out tanh-GELU -> Gelu(approximate="tanh"); raises the opset to 20 when
    one was found. Returns the number rewritten."""
    from onnx import helper

    g = _Graph(model)
    drop, before = set(), {}
    count = 0
    for tanh in [n for n in g.g.node if n.op_type == "Tanh"]:
        match = _match_tanh_gelu(g, tanh)
        if match is None:
            continue
        x, inner, last = match
        name = (tanh.name.rsplit("/", 1)[0] if "/" in tanh.name else tanh.name) + "/Gelu"
        before[id(last)] = [helper.make_node("Gelu", [x], [last.output[0]], approximate="tanh", name=name)]
        drop.update(id(n) for n in inner + [last])
        count += 1
    if count:
        g.replace_nodes(drop, before)
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < GELU_OPSET:
                op.version = GELU_OPSET
        model.ir_version = max(model.ir_version, 9)
    return count


def rewrite(model, softmax: bool = True, gelu: bool = True, softmax_max_row: int = SOFTMAX_MAX_ROW) -> dict[str, int]:
    """Rewrites `model` (an onnx ModelProto) in place; returns counts per rewrite."""
    done = {"softmax": 0, "gelu": 0}
    if softmax:
        done["softmax"] = rewrite_softmax(model, softmax_max_row)
    if gelu:
        done["gelu"] = rewrite_gelu(model)
    if any(done.values()):
        note = f"mbt rewrite for tract: softmax x{done['softmax']}, gelu x{done['gelu']}"
        model.doc_string = (model.doc_string + "; " if model.doc_string else "") + note
    return done


def check(original: str | Path, rewritten: str | Path, tolerance: float = 1e-4) -> dict[str, float]:
    """onnxruntime outputs of both files on the original's parity fixture inputs (or seeded
    random ones): max |difference| of every output, and against the fixture's outputs."""
    from .compare import OrtEngine, inputs_for, max_abs_diff, model_gmacs

    _, cfg = model_gmacs(original)
    ins, expected, _ = inputs_for(original, cfg)
    before = OrtEngine(original, 1).run(ins)
    after = OrtEngine(rewritten, 1).run(ins)
    if set(before) != set(after):
        raise ValueError(f"outputs differ: {sorted(before)} vs {sorted(after)}")
    worst, scale = max_abs_diff(after, before)
    report = {"max_abs_diff_vs_original": worst, "largest_logit": scale}
    if expected:
        report["max_abs_diff_vs_fixture"] = max_abs_diff(after, expected)[0]
    if not worst <= tolerance:
        raise ValueError(f"rewritten model differs from the original by {worst:.3e} > {tolerance}")
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import shutil
    import tempfile

    import onnx

    from .config import METADATA_KEY
    from .export import parity_dir, sha256_file

    ap = argparse.ArgumentParser(prog="python -m mbt rewrite", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="an ONNX model written by `python -m mbt export`")
    ap.add_argument("output", help="the rewritten NAME.onnx (+ NAME.onnx.sha256); may equal input")
    ap.add_argument("--no-softmax", action="store_true", help="keep Softmax nodes")
    ap.add_argument("--softmax-max-row", type=int, default=SOFTMAX_MAX_ROW,
                    help=f"rewrite softmaxes over rows of at most this many values (default {SOFTMAX_MAX_ROW})")
    ap.add_argument("--no-gelu", action="store_true", help="keep the spelled-out tanh-GELU (and opset)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| allowed (onnxruntime)")
    ap.add_argument("--copy-parity", action="store_true",
                    help="copy INPUT's parity fixture next to OUTPUT (same inputs and PyTorch outputs)")
    args = ap.parse_args(argv)

    model = onnx.load(args.input)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise SystemExit(f"{args.input}: no '{METADATA_KEY}' metadata; not an mbt model")
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    done = rewrite(model, softmax=not args.no_softmax, gelu=not args.no_gelu, softmax_max_row=args.softmax_max_row)
    onnx.checker.check_model(model, full_check=True)
    assert ([i.name for i in model.graph.input], [o.name for o in model.graph.output]) == names
    assert {p.key: p.value for p in model.metadata_props} == props
    out = Path(args.output)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        onnx.save(model, str(staged))
        report = check(args.input, staged, args.tolerance)
        if args.copy_parity and parity_dir(args.input).resolve() != parity_dir(out).resolve():
            shutil.copytree(parity_dir(args.input), parity_dir(out), dirs_exist_ok=True)
        staged.replace(out)
    digest = sha256_file(out)
    Path(str(out) + ".sha256").write_text(f"{digest}  {out.name}\n")
    report.update({"path": str(out), "sha256": digest, "rewritten": done,
                   "opset": max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))})
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
