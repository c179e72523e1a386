"""The int8 variant of an exported model, in the form tract 0.23 runs fastest on x86 (issues 5, 8):

    .venv/bin/python avsynth/quantize.py avsynth-edge.onnx DATA/train OUT.onnx [--windows 64] [--check DATA/test]

Writes OUT.onnx, OUT.onnx.sha256 and OUT.parity/ (the f32 model's parity inputs, this file's
outputs with exact integer matmuls: `exact_outputs`; onnxruntime's u8 x s8 kernel on x86
CPUs without VNNI sums pairs of products in saturating int16 and can be off by far more than
the quantisation, so its outputs depend on the machine and are only reported). DATA/train is an `mbt-edge record` folder recorded with mean 0 / std 1
(the bootstrap); its audio is re-standardised with the model's own mean/std for calibration.
`--check DATA/test` (recorded with the model itself) prints top-1 agreement with the f32 model.
DATA = `synthetic` calibrates on WINDOWS random inputs of the model's shapes instead (the parity
inputs' distributions, seeds 1..WINDOWS): for random-weight models such as BENCHMARKS.md's
vit-base, whose int8 file is only timed.

What it does to the graph, and why (measured with tract 0.23.9, models/README.md "int8"):

1. The 48 weight matmuls (Q/K/V/out projections, MLP) become `MatMulInteger` with u8
   activations and per-output-channel symmetric int8 weights, then `Cast` to f32 and one `Mul`
   by (activation scale x channel scale); the bias `Add` stays. Each distinct matmul input is
   quantised once as `Cast<u8>(Clip(x * 1/s + zp + 0.5, 0, 255.25))` with s and zp calibrated
   (min/max) on training windows. tract lowers `MatMulInteger` to its AMX/VNNI int8 kernel and
   fuses the zero-point correction into it. On CPUs with AMX the daemon replaces each such chain
   (quantiser, `MatMulInteger`, `Cast`, `Mul`, bias `Add`) by one fused op (src/model/int8.rs,
   about 2x the f32 model's speed); keep this form, or update that file's matcher with it.
   Not `QuantizeLinear`: tract runs it as scalar code with a branchy ties-to-even rounding,
   about 3x the cost of the `Cast` here. Not `QLinearMatMul`: same kernel, one more 8-bit
   rounding of the output, no faster. Not per-tensor-only: with `MatMulInteger` the per-channel
   scale is free. Attention matmuls, softmax, LayerNorm, GELU and the patch embeddings stay f32
   (int8 patch embeddings measured slower: quantising the 98k-value video input costs more than
   the matmul saves).
2. The tanh-GELU spelled out in 8 nodes -> one `Gelu` (opset 20): `mbt.rewrite.rewrite_gelu`.
3. Only with `--softmax exp`: `Softmax(S)` -> `E = Exp(Clip(S, -80, 80))`, `P.V` ->
   `(E.V) / ReduceSum(E)`. tract's own `Softmax` (and `ReduceMax`) on x86 run per-row kernels,
   about 4x the time of the Exp and sums. By default (`--softmax keep`) a `Softmax` stays: the
   daemon's x86 kernel paths fuse it with both attention products (`AttnSoftmaxMix`,
   src/model/f32fuse.rs), which they do not for the Exp(Clip) form: vit-base int8 on an AVX2
   EPYC, 1 thread, 5.3 s per window kept against 7.1 s as Exp(Clip) (BENCHMARKS.md). A model
   rewritten by `python -m mbt rewrite` (the shipped one) has no `Softmax` left for either.
   Exact for attention scores within +-80 (no max subtraction is needed: exp(80) x 133 keys
   stays finite, exp(-80) stays above zero); the largest |score| of the shipped model on the test
   split and on constant extreme inputs is 52. Scores beyond +-80 would saturate, never NaN.

Steps 2 and 3 are not int8: applied to the f32 model alone they give most of the speed-up
(README), so compare an int8 file with the f32 model rewritten the same way too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from mbt.config import MBTConfig  # noqa: E402
from mbt.export import parity_dir, parity_inputs, read_metadata, run_onnx, sha256_file  # noqa: E402
from mbt.train import WindowDataset  # noqa: E402

SCORE_CLIP = 80.0


def calibration_feeds(md: dict, data: str, windows: int) -> list[dict[str, np.ndarray]]:
    if data == "synthetic":
        cfg = MBTConfig.from_metadata(md)
        return [parity_inputs(cfg, batch=1, seed=seed) for seed in range(1, windows + 1)]
    ds = WindowDataset(data)
    feeds = []
    idx = np.random.default_rng(0).choice(len(ds), size=min(windows, len(ds)), replace=False)
    rec = ds.features["audio"] if ds.features else None
    for i in idx.tolist():
        feed = {}
        if "video" in md:
            feed["video"] = ds.load(i, "video")[None].astype(np.float32)
        if "audio" in md:
            a = ds.load(i, "audio")
            if rec is not None:  # re-standardise with the model's own mean/std
                a = (a * rec["std"] + rec["mean"] - md["audio"]["mean"]) / md["audio"]["std"]
            feed["audio"] = a[None].astype(np.float32)
        feeds.append(feed)
    return feeds


def tensor_values(model, names: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """onnxruntime values of intermediate tensors over `feeds`, flattened."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = type(model)()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    acc: dict[str, list] = {n: [] for n in names}
    for f in feeds:
        for n, v in zip(names, sess.run(names, f)):
            acc[n].append(v.ravel())
    return {n: np.concatenate(v) for n, v in acc.items()}


def exp_softmax(model, clip: float = SCORE_CLIP) -> int:
    """Each Softmax whose only consumer is a MatMul (attention) -> Exp(Clip) and the division by
    the row sums moved after that MatMul. Returns the number rewritten."""
    from onnx import helper, numpy_helper

    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes, after, count = [], {}, 0
    for n in g.node:
        users = consumers.get(n.output[0], [])
        if n.op_type != "Softmax" or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != n.output[0]:
            nodes.append(n)
            continue
        p = n.name.rsplit("/", 1)[0] + "/expsm"
        g.initializer.extend([numpy_helper.from_array(np.array(-clip, np.float32), p + "_lo"),
                              numpy_helper.from_array(np.array(clip, np.float32), p + "_hi"),
                              numpy_helper.from_array(np.array([-1], np.int64), p + "_axes")])
        nodes += [helper.make_node("Clip", [n.input[0], p + "_lo", p + "_hi"], [p + "_clip"], name=p + "_clip"),
                  helper.make_node("Exp", [p + "_clip"], [n.output[0]], name=p + "_exp"),
                  helper.make_node("ReduceSum", [n.output[0], p + "_axes"], [p + "_sum"], name=p + "_sum", keepdims=1)]
        pv = users[0]
        after[id(pv)] = helper.make_node("Div", [p + "_pv", p + "_sum"], [pv.output[0]], name=p + "_div")
        pv.output[0] = p + "_pv"
        count += 1
    out = []
    for n in nodes:
        out.append(n)
        if id(n) in after:
            out.append(after[id(n)])
    del g.node[:]
    g.node.extend(out)
    return count


def quantize_weight_matmuls(model, feeds: list[dict]) -> int:
    """Step 1 of the module docstring, in place. Returns the number of matmuls quantised."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    mms = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]
    xs = sorted({n.input[0] for n in mms})
    values = tensor_values(model, xs, feeds)
    new_inits = []

    def const(name: str, value) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    after_producer: dict[str, list] = {}
    quant: dict[str, tuple[str, float, int]] = {}
    for x in xs:
        lo, hi = min(float(values[x].min()), 0.0), max(float(values[x].max()), 0.0)
        s = (hi - lo) / 255.0
        zp = int(np.clip(round(-lo / s), 0, 255))
        q = x.replace("/", "_").strip("_") + "_u8"
        after_producer[x] = [
            helper.make_node("Mul", [x, const(q + "_inv_scale", np.float32(1.0 / s))], [q + "_scaled"], name=q + "/Mul"),
            helper.make_node("Add", [q + "_scaled", const(q + "_offset", np.float32(zp + 0.5))], [q + "_shifted"], name=q + "/Add"),
            helper.make_node("Clip", [q + "_shifted", const(q + "_lo", np.float32(0.0)), const(q + "_hi", np.float32(255.25))],
                             [q + "_clipped"], name=q + "/Clip"),
            helper.make_node("Cast", [q + "_clipped"], [q], name=q + "/Cast", to=TensorProto.UINT8),
        ]
        quant[x] = (q, s, zp)
    replace = {}
    for n in mms:
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)  # [K, N]
        sw = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        wq = np.clip(np.round(w / sw), -127, 127).astype(np.int8)
        q, s, zp = quant[n.input[0]]
        p = n.name.rsplit("/", 1)[0] + "/int8"
        replace[id(n)] = [
            helper.make_node("MatMulInteger", [q, const(p + "_weight", wq), const(p + "_zero_point", np.uint8(zp))],
                             [p + "_i32"], name=p + "/MatMulInteger"),
            helper.make_node("Cast", [p + "_i32"], [p + "_f32"], name=p + "/Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [p + "_f32", const(p + "_scale", (np.float32(s) * sw).astype(np.float32))], [n.output[0]],
                             name=p + "/Mul"),
        ]
    out = []
    for n in g.node:
        out.extend(replace.get(id(n), [n]))
        for o in n.output:
            out.extend(after_producer.pop(o, []))
    if after_producer:
        raise ValueError(f"matmul inputs without a producer node: {sorted(after_producer)}")
    used = {i for n in out for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    del g.node[:]
    g.node.extend(out)
    return len(mms)


def exact_outputs(model_path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs (onnxruntime) with every `MatMulInteger` computed exactly: the u8
    input minus its zero point times the int8 weights, in float64 (sums below 2^53 are exact
    integers), instead of onnxruntime's CPU-dependent integer kernel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(model_path))
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.op_type != "MatMulInteger":
            nodes.append(n)
            continue
        a, b, zp = n.input
        p = n.name + "/exact"
        m.graph.initializer.extend([
            numpy_helper.from_array(numpy_helper.to_array(inits[b]).astype(np.float64), p + "_weight"),
            numpy_helper.from_array(np.array(numpy_helper.to_array(inits[zp]), np.float64), p + "_zero_point"),
        ])
        nodes += [helper.make_node("Cast", [a], [p + "_a"], name=p + "/Cast", to=TensorProto.DOUBLE),
                  helper.make_node("Sub", [p + "_a", p + "_zero_point"], [p + "_centred"], name=p + "/Sub"),
                  helper.make_node("MatMul", [p + "_centred", p + "_weight"], [n.output[0]], name=p + "/MatMul")]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]  # the MatMulInteger outputs are float64 now
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # the int8 initializers are unused now
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))


def agreement(f32: str, int8: str, data: str) -> dict:
    """Top-1 of `logits` of both files (onnxruntime) on a folder recorded with the model."""
    import onnxruntime as ort

    ds = WindowDataset(data)
    md = read_metadata(f32)
    labels = md["labels"]
    sessions = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in (f32, int8)]
    inputs = [i.name for i in sessions[0].get_inputs()]
    preds: list[list[int]] = [[], []]
    for start in range(0, len(ds), 48):
        idx = range(start, min(len(ds), start + 48))
        feed = {m: np.stack([ds.load(i, m) for i in idx]).astype(np.float32) for m in inputs}
        for k, s in enumerate(sessions):
            preds[k].extend(s.run(["logits"], feed)[0].argmax(1).tolist())
    a, b = np.array(preds[0]), np.array(preds[1])
    truth = np.array([labels.index(w.labels[0]) if w.labels[0] in labels else -1 for w in ds.windows])
    return {"windows": len(ds), "agree": int((a == b).sum()), "top1_f32": round(float((a == truth).mean()), 4),
            "top1_int8": round(float((b == truth).mean()), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data", help="an `mbt-edge record` folder, or `synthetic` (random inputs, see above)")
    ap.add_argument("out")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--check", metavar="DATA/test", help="print top-1 agreement with the f32 model on this folder")
    ap.add_argument("--softmax", choices=["keep", "exp"], default="keep",
                    help="keep (default): leave attention's Softmax, which the daemon's x86 kernel paths fuse with "
                         "both attention products; exp: rewrite it as Exp(Clip) (step 3 of the docstring)")
    args = ap.parse_args()
    import onnx

    from mbt.rewrite import rewrite_gelu

    md = read_metadata(args.model)
    m = onnx.load(args.model)
    gelu = rewrite_gelu(m)
    softmax = exp_softmax(m) if args.softmax == "exp" else 0
    matmuls = quantize_weight_matmuls(m, calibration_feeds(md, args.data, args.windows))
    m.doc_string = (m.doc_string + "; " if m.doc_string else "") + (
        f"int8 (avsynth/quantize.py): weight matmuls x{matmuls} MatMulInteger u8 x s8 per channel, "
        f"gelu x{gelu}, softmax x{softmax} as Exp(Clip(+-{SCORE_CLIP:g}))")
    onnx.checker.check_model(m)
    out = Path(args.out)
    onnx.save(m, str(out))
    Path(str(out) + ".sha256").write_text(f"{sha256_file(out)}  {out.name}\n")
    inputs = parity_inputs(MBTConfig.from_metadata(md))
    outputs = exact_outputs(out, inputs)
    onnxruntime_outputs = run_onnx(out, inputs)
    pdir = parity_dir(out)
    pdir.mkdir(exist_ok=True)
    for old in pdir.glob("*.npy"):
        old.unlink()
    for name, a in list(inputs.items()) + list(outputs.items()):
        np.save(pdir / f"{name}.npy", a.astype(np.float32))
    reference = run_onnx(args.model, inputs)
    report = {"out": str(out), "bytes": out.stat().st_size, "sha256": sha256_file(out), "quantised_matmuls": matmuls,
              "gelu": gelu, "softmax": softmax, "parity": str(pdir),
              "parity_max_abs_diff_vs_f32": float(max(np.abs(outputs[k] - reference[k]).max() for k in outputs)),
              "onnxruntime_max_abs_diff_vs_exact": float(max(np.abs(onnxruntime_outputs[k] - outputs[k]).max()
                                                             for k in outputs))}
    if args.check:
        report["check"] = agreement(args.model, str(out), args.check)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
