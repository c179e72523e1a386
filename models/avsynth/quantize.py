"""Experimental int8 variant of an exported model: static QOperator quantisation of the weight
matmuls only (QLinearMatMul with prequantised per-channel weights; the attention matmuls and
softmax stay f32, see issue 8), calibrated on training windows.

    .venv/bin/python avsynth/quantize.py avsynth-edge.onnx DATA/train OUT.onnx [--windows 64]

DATA/train is an `mbt-edge record` folder recorded with mean 0 / std 1 (the bootstrap); its
audio is re-standardised with the model's own mean/std for calibration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from mbt.export import read_metadata, sha256_file  # noqa: E402
from mbt.train import WindowDataset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    md = read_metadata(args.model)
    ds = WindowDataset(args.data)
    rec = ds.features["audio"]
    a = rec["std"] / md["audio"]["std"]
    b = (rec["mean"] - md["audio"]["mean"]) / md["audio"]["std"]
    idx = np.random.default_rng(0).choice(len(ds), size=min(args.windows, len(ds)), replace=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(idx.tolist())

        def get_next(self):
            i = next(self.items, None)
            if i is None:
                return None
            return {"video": ds.load(i, "video")[None].astype(np.float32),
                    "audio": (ds.load(i, "audio") * a + b)[None].astype(np.float32)}

    m = onnx.load(args.model)
    inits = {t.name for t in m.graph.initializer}
    weight_matmuls = [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    quantize_static(args.model, args.out, Reader(), quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=["MatMul"], nodes_to_quantize=weight_matmuls, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    q = onnx.load(args.out)
    del q.metadata_props[:]
    for p in m.metadata_props:
        q.metadata_props.add().CopyFrom(p)
    onnx.save(q, args.out)
    Path(args.out + ".sha256").write_text(f"{sha256_file(args.out)}  {Path(args.out).name}\n")
    from collections import Counter
    print(json.dumps({"out": args.out, "bytes": Path(args.out).stat().st_size, "quantised_matmuls": len(weight_matmuls),
                      "ops": Counter(n.op_type for n in q.graph.node).most_common(8)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
