"""Evaluate trained MBT checkpoints on an AV-Synth split (default: the held-out test split).

    .venv/bin/python avsynth/evaluate.py RUN [RUN ...] --data /work/scratch/avsynth/data/test

For each run folder (`python -m mbt train --out RUN`) it loads RUN/best.pt and reports on the
split, as JSON (RUN/test.json) and one table row:
- `fused`: top-1 of `logits` with both senses;
- `audio_head` / `video_head`: top-1 of each sense's own logits with both senses present;
- `no_video` / `no_audio`: top-1 of the surviving sense's logits (`logits_audio` /
  `logits_video`) with the other sense zeroed, as the daemon feeds a lost sense;
- `no_video_sound` / `no_audio_visual`: the same logits scored on what that sense alone can
  tell: the predicted class has the right sound (visual) category; background counts as its
  own category. About 100 % is the goal; the top-1 above is then about 50 % by construction.
- `gmacs`: multiply-accumulates per window (mbt.flops, 1 MAC = 1 FLOP as the paper counts),
  `params`.
A one-modality model reports `fused` (its only logits) and the category score of its sense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from mbt.config import MBTConfig  # noqa: E402
from mbt.flops import gmacs  # noqa: E402
from mbt.train import WindowDataset  # noqa: E402
from scenes import BACKGROUND, PAIRS  # noqa: E402

CATEGORY = {"video": {BACKGROUND: "plain", **{k: v[0] for k, v in PAIRS.items()}},
            "audio": {BACKGROUND: "noise", **{k: v[1] for k, v in PAIRS.items()}}}


def evaluate_run(run: Path, ds: WindowDataset, batch_size: int = 64) -> dict:
    import torch

    from mbt.model import MBT, count_parameters

    ck = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    cfg = MBTConfig.from_dict(ck["config"])
    model = MBT(cfg)
    model.load_state_dict(ck["model"])
    model.eval()
    affine = ck.get("audio_affine")
    mods = model.modalities
    labels = cfg.labels
    target = np.array([labels.index(w.labels[0]) for w in ds.windows])
    scores: dict[str, list[np.ndarray]] = {}

    def add(name: str, t) -> None:
        scores.setdefault(name, []).append(t.numpy())

    with torch.no_grad():
        for s in range(0, len(ds), batch_size):
            idx = range(s, min(len(ds), s + batch_size))
            xs = {}
            for m in mods:
                arr = np.stack([ds.load(i, m) for i in idx]).astype(np.float32)
                if m == "audio" and affine is not None:
                    arr = arr * affine[0] + affine[1]
                xs[m] = torch.from_numpy(arr)
            out = model(*(xs[m] for m in mods))
            add("fused", out[0])
            if len(mods) == 2:
                _, la, lv = out
                add("audio_head", la)
                add("video_head", lv)
                _, la0, _ = model(torch.zeros_like(xs["video"]), xs["audio"])
                add("no_video", la0)
                _, _, lv0 = model(xs["video"], torch.zeros_like(xs["audio"]))
                add("no_audio", lv0)
    pred = {k: np.concatenate(v).argmax(1) for k, v in scores.items()}
    res: dict = {"run": run.name, "fusion": cfg.fusion if len(mods) == 2 else "-",
                 "modalities": list(mods), "fusion_layer": cfg.fusion_layer, "layers": cfg.layers,
                 "bottlenecks": cfg.bottlenecks, "windows": len(ds), "epochs": ck["epoch"],
                 "gmacs": gmacs(cfg), "params": count_parameters(model)}
    for k, p in pred.items():
        res[k] = float((p == target).mean())

    def category_acc(p: np.ndarray, sense: str) -> float:
        cat = CATEGORY[sense]
        return float(np.mean([cat[labels[a]] == cat[labels[b]] for a, b in zip(p, target)]))

    if len(mods) == 2:
        res["no_video_sound"] = category_acc(pred["no_video"], "audio")
        res["no_audio_visual"] = category_acc(pred["no_audio"], "video")
    else:
        res[f"{mods[0]}_category"] = category_acc(pred["fused"], mods[0])
    # per-class top-1 of the fused logits
    res["per_class"] = {lab: float((pred["fused"][target == i] == i).mean()) for i, lab in enumerate(labels)
                        if (target == i).any()}
    return res


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(results: list[dict]) -> str:
    lines = ["| variant | fusion | Lf / L | fused top-1 | audio head | video head | no video: audio head (sound ok) "
             "| no audio: video head (visual ok) | GFLOPs | params |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if len(r["modalities"]) == 2:
            nv = f"{pct(r['no_video'])} ({pct(r['no_video_sound'])})"
            na = f"{pct(r['no_audio'])} ({pct(r['no_audio_visual'])})"
            ah, vh = pct(r["audio_head"]), pct(r["video_head"])
            fusion = r["fusion"] + (f", B={r['bottlenecks']}" if r["fusion"] == "bottleneck" else "")
            lf = f"{r['fusion_layer']} / {r['layers']}"
        else:
            m = r["modalities"][0]
            cat = f"{m} category {pct(r[f'{m}_category'])}"
            ah = vh = nv = na = "-"
            if m == "audio":
                ah = cat
            else:
                vh = cat
            fusion, lf = f"{m} only", f"- / {r['layers']}"
        lines.append(f"| {r['run']} | {fusion} | {lf} | {pct(r['fused'])} | {ah} | {vh} | {nv} | {na} "
                     f"| {r['gmacs']:.3f} | {r['params'] / 1e6:.2f} M |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", required=True, help="an AV-Synth split folder (e.g. DATA/test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cached", action="store_true", help="reuse RUN/test.json when present")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    ds = WindowDataset(args.data)
    results = []
    for run in args.runs:
        if not (run / "best.pt").exists():
            print(f"{run}: no best.pt yet, skipped", file=sys.stderr)
            continue
        out = run / f"{Path(args.data).name}.json"
        if args.cached and out.exists() and out.stat().st_mtime > (run / "best.pt").stat().st_mtime:
            r = json.loads(out.read_text())
        else:
            r = evaluate_run(run, ds)
            out.write_text(json.dumps(r, indent=1) + "\n")
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "per_class"}), file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
