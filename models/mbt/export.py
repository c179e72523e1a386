"""ONNX export of an MBT with the `mbt` metadata (models/METADATA.md), a sha256 file and a
parity fixture for the Rust tests.

Writes, for OUT = path/to/NAME.onnx:
  NAME.onnx          opset 17, one file, inputs video/audio, outputs logits/logits_audio/
                     logits_video, symbolic batch dim `batch`, metadata_props key `mbt`
  NAME.onnx.sha256   `<hex>  NAME.onnx` (sha256sum format)
  NAME.parity/       video.npy audio.npy logits.npy logits_audio.npy logits_video.npy:
                     f32 C-order .npy, a batch of a few seeded random inputs and the
                     PyTorch outputs for them (absent modalities have no file)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from .config import METADATA_KEY, MBTConfig

OPSET = 17


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parity_dir(onnx_path: str | os.PathLike) -> Path:
    p = Path(onnx_path)
    return p.with_name(p.stem + ".parity")


def read_metadata(onnx_path: str | os.PathLike) -> dict:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{onnx_path}: no '{METADATA_KEY}' metadata property")
    return json.loads(props[METADATA_KEY])


def parity_inputs(cfg: MBTConfig, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    if cfg.has_video:
        out["video"] = rng.uniform(-1.0, 1.0, (batch, cfg.frames, 3, cfg.height, cfg.width)).astype(np.float32)
    if cfg.has_audio:
        out["audio"] = rng.standard_normal((batch, cfg.n_frames, cfg.n_mels)).astype(np.float32)
    return out


def run_onnx(onnx_path: str | os.PathLike, inputs: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))


def export_onnx(model, out_path: str | os.PathLike, *, parity_batch: int = 2, seed: int = 0,
                write_parity: bool = True, check: bool = True, rewrite_for_tract: bool = False) -> dict:
    """Export `model` (mbt.model.MBT) to `out_path`; returns a small report dict.
    `rewrite_for_tract`: apply mbt/rewrite.py (opset 20) before the sha256 and the check."""
    import onnx
    import torch

    cfg: MBTConfig = model.cfg
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    inputs = parity_inputs(cfg, parity_batch, seed)
    names_in, names_out = model.input_names(), model.output_names()
    args = tuple(torch.from_numpy(inputs[n]) for n in names_in)
    dynamic = {n: {0: "batch"} for n in names_in + names_out}
    # The TorchScript exporter (dynamo=False) is deprecated upstream but gives the plain,
    # single-file graph tract wants; silence its deprecation notices.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, args, str(out_path),
            input_names=names_in, output_names=names_out, dynamic_axes=dynamic,
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
        ref = [t.numpy() for t in model(*args)]
    m = onnx.load(str(out_path))
    del m.metadata_props[:]
    prop = m.metadata_props.add()
    prop.key = METADATA_KEY
    prop.value = cfg.metadata_json()
    m.producer_name = "mbt-edge models/mbt"
    m.doc_string = f"MBT {cfg.name}: {cfg.fusion} fusion, Lf={cfg.fusion_layer}, labels={len(cfg.labels)}"
    rewritten = None
    if rewrite_for_tract:
        from .rewrite import rewrite

        rewritten = rewrite(m)
    onnx.checker.check_model(m)
    onnx.save(m, str(out_path))
    digest = sha256_file(out_path)
    Path(str(out_path) + ".sha256").write_text(f"{digest}  {out_path.name}\n")
    report = {"path": str(out_path), "sha256": digest, "bytes": out_path.stat().st_size}
    if rewritten is not None:
        report["rewritten"] = rewritten
    if write_parity:
        pdir = parity_dir(out_path)
        pdir.mkdir(exist_ok=True)
        for old in pdir.glob("*.npy"):
            old.unlink()
        for n, a in inputs.items():
            np.save(pdir / f"{n}.npy", a)
        for n, a in zip(names_out, ref):
            np.save(pdir / f"{n}.npy", a.astype(np.float32))
        report["parity"] = str(pdir)
    if check:
        got = run_onnx(out_path, inputs)
        worst = 0.0
        for n, a in zip(names_out, ref):
            worst = max(worst, float(np.max(np.abs(got[n] - a) / (np.abs(a) + 1e-3))))
        report["max_rel_diff_onnxruntime"] = worst
    return report


def load_checkpoint_model(path: str | os.PathLike):
    """An MBT from a train.py checkpoint (.pt with 'config' and 'model')."""
    import torch

    from .model import MBT

    ck = torch.load(str(path), map_location="cpu", weights_only=False)
    cfg = MBTConfig.from_dict(ck["config"])
    model = MBT(cfg)
    model.load_state_dict(ck["model"])
    return model


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    from .config import PRESETS, preset
    from .model import MBT

    ap = argparse.ArgumentParser(prog="python -m mbt export", description="export an MBT to ONNX with metadata")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a train.py checkpoint (.pt)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random weights (bootstrap / tests)")
    ap.add_argument("--out", required=True, help="output NAME.onnx")
    ap.add_argument("--name", help="model name in the metadata (default: the config's)")
    ap.add_argument("--labels", help="comma-separated labels (presets only)")
    ap.add_argument("--fusion", choices=["bottleneck", "vanilla", "cross_attention"])
    ap.add_argument("--fusion-layer", type=int)
    ap.add_argument("--audio-mean", type=float)
    ap.add_argument("--audio-std", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--rewrite", action="store_true",
                    help="also apply `python -m mbt rewrite` (faster in tract on x86; opset 20)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = load_checkpoint_model(args.checkpoint)
        changes = {}
    else:
        changes = {}
        if args.labels:
            changes["labels"] = [s.strip() for s in args.labels.split(",") if s.strip()]
        if args.fusion:
            changes["fusion"] = args.fusion
        if args.fusion_layer is not None:
            changes["fusion_layer"] = args.fusion_layer
        model = MBT(preset(args.preset, **changes))
        changes = {}
    for key, val in (("name", args.name), ("audio_mean", args.audio_mean), ("audio_std", args.audio_std)):
        if val is not None:
            changes[key] = val
    if changes:  # metadata-only changes keep the weights
        model.cfg = model.cfg.replace(**changes).validate()
    report = export_onnx(model, args.out, seed=args.seed, write_parity=not args.no_parity,
                         rewrite_for_tract=args.rewrite)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0
