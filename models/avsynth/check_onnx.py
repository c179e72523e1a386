"""Run an exported model (onnxruntime) over `mbt-edge record` folders: the served model on the
daemon's own inputs.

    .venv/bin/python avsynth/check_onnx.py avsynth-edge.onnx DIR [DIR ...] [--per-window]

The folder must have been recorded with this model (its features.json equals the model's
metadata, so the audio is standardised with the model's own mean/std, as the daemon does).
Prints top-1 of `logits`, of each sense's logits, and of the surviving sense's logits with the
other sense zeroed; `--per-window` prints every window's source, label and prediction (for the
demo sources, whose windows carry no meaningful label).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from mbt.export import read_metadata  # noqa: E402
from mbt.train import WindowDataset  # noqa: E402


def same_recipe(a: dict | None, b: dict | None) -> bool:
    """Equal recipes; floats within 1e-12 relative (the Rust JSON round trip may move the
    last digit)."""
    if a is None or b is None or set(a) != set(b):
        return a == b
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) or isinstance(y, float):
            if abs(float(x) - float(y)) > 1e-12 * max(1.0, abs(float(y))):
                return False
        elif x != y:
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--per-window", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import onnxruntime as ort

    md = read_metadata(args.model)
    labels = md["labels"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    for root in args.data:
        ds = WindowDataset(root)
        if ds.features is not None and not same_recipe(ds.features.get("audio"), md.get("audio")):
            print(f"{root}: recorded with another audio standardisation than {args.model}; record it with this model",
                  file=sys.stderr)
            return 1
        preds: dict[str, list[int]] = {}
        for s in range(0, len(ds), 32):
            idx = range(s, min(len(ds), s + 32))
            feed = {m: np.stack([ds.load(i, m) for i in idx]).astype(np.float32) for m in inputs}
            runs = {"": feed}
            if len(inputs) == 2:
                runs["no_video:"] = {**feed, "video": np.zeros_like(feed["video"])}
                runs["no_audio:"] = {**feed, "audio": np.zeros_like(feed["audio"])}
            for tag, f in runs.items():
                for name, out in zip(outputs, sess.run(outputs, f)):
                    if tag == "no_video:" and name != "logits_audio" or tag == "no_audio:" and name != "logits_video":
                        continue
                    preds.setdefault(tag + name, []).extend(out.argmax(1).tolist())
        truth = np.array([labels.index(w.labels[0]) if w.labels[0] in labels else -1 for w in ds.windows])
        report = {"data": root, "windows": len(ds)}
        for k, p in preds.items():
            report[k] = round(float((np.array(p) == truth).mean()), 4)
        print(json.dumps(report))
        if args.per_window:
            for i, w in enumerate(ds.windows):
                extra = " ".join(f"{k}={labels[v[i]]}" for k, v in preds.items() if k != "logits")
                print(f"{w.source} {w.stem} label={w.labels[0]} -> {labels[preds['logits'][i]]}  ({extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
