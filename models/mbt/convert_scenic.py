"""Convert an official scenic MBT checkpoint (Flax msgpack TrainState) to our PyTorch
weights and on to ONNX.

Reading the msgpack needs only numpy + msgpack (no JAX/Flax); building the ONNX model
needs torch. Parameter names follow scenic/projects/mbt/model.py:

  embedding/{kernel [t,h,w,3,d] | [h,w,3,d], bias}      rgb patch embedding (3D or 2D)
  embedding_spectrogram/{kernel [h,w,C,d], bias}           C = 3: scenic tiles the spectrogram
  cls, clsspectrogram [1,1,d]                              classifier 'token' only
  bottleneck [1,B,d]                                        B+1 tokens with classifier 'token'
  Transformer/posembed_input{,_spectrogram}/pos_embedding [1,T(+1),d]
  Transformer/encoderblock_{i}{,_spectrogram}/
      LayerNorm_0, LayerNorm_1 {scale, bias}
      MultiHeadDotProductAttention_0/{query,key,value}/{kernel [d,h,k], bias [h,k]}
      MultiHeadDotProductAttention_0/out/{kernel [h,k,d], bias [d]}
      MlpBlock_0/Dense_0, Dense_1 {kernel [in,out], bias}
  Transformer/encoder_norm {scale, bias}
  output_projection {kernel [d,C], bias [C]}

What the parameters cannot tell (give them with flags or --config JSON): fusion_layer
(required), frames/height/width (token count must match the positional embedding),
labels, multi_label, the log-mel recipe and its mean/std. scenic's share_encoder=True
(vanilla fusion) has no `_spectrogram` blocks: the rgb blocks are copied to our audio
stream for the layers before Lf.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# ---- Flax msgpack (flax.serialization.msgpack_restore / msgpack_serialize) -------------
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
    import msgpack

    shape, dtype_name, buf = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    if name == "bfloat16":
        raise ValueError("bfloat16 checkpoints: convert to float32 first (needs ml_dtypes)")
    return np.frombuffer(buf, dtype=np.dtype(name)).reshape(shape)


def _ext_hook(code: int, data: bytes):
    import msgpack

    if code == _EXT_NDARRAY:
        return _ndarray_from_bytes(data)
    if code == _EXT_NPSCALAR:
        return _ndarray_from_bytes(data)[()]
    if code == _EXT_COMPLEX:
        re, im = msgpack.unpackb(data)
        return complex(re, im)
    return msgpack.ExtType(code, data)


def _unchunk(tree):
    if isinstance(tree, dict):
        if tree.get(_CHUNKED):
            chunks = tree["chunks"]
            flat = np.concatenate([np.asarray(chunks[str(i)]).reshape(-1) for i in range(len(chunks))])
            return flat.reshape(tuple(tree["shape"]))
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def msgpack_restore(data: bytes) -> dict:
    import msgpack

    return _unchunk(msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False))


def _ext_default(obj):
    import msgpack

    if isinstance(obj, np.ndarray):
        payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(_EXT_NDARRAY, payload)
    if isinstance(obj, np.generic):
        payload = msgpack.packb(((), obj.dtype.name, np.asarray(obj).tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(_EXT_NPSCALAR, payload)
    raise TypeError(f"cannot serialise {type(obj)}")


def msgpack_serialize(tree: dict) -> bytes:
    """Flax-compatible bytes of a nested dict of numpy arrays (used by tests)."""
    import msgpack

    return msgpack.packb(tree, default=_ext_default, use_bin_type=True)


def find_params(state: dict) -> dict:
    """The parameter tree of a TrainState: optimizer.target (flax.optim era), params
    (optax era), or the tree itself; an extra {'params': ...} level is removed."""
    for path in (("optimizer", "target"), ("params",), ()):
        node: Any = state
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if "params" in node and isinstance(node["params"], dict) and "Transformer" in node["params"]:
                node = node["params"]
            if "Transformer" in node:
                return node
    raise ValueError("no MBT parameters found (looked at optimizer.target, params, and the root)")


def load_params(path: str | Path) -> dict:
    return find_params(msgpack_restore(Path(path).read_bytes()))


# ---- inference of the config from shapes -----------------------------------------------

def infer_config(params: dict, *, fusion_layer: int, overrides: dict | None = None):
    """An MBTConfig for `params`; `overrides` are MBTConfig fields (frames, labels, ...)."""
    from .config import vit_base

    overrides = dict(overrides or {})
    tr = params["Transformer"]
    has_v, has_a = "embedding" in params, "embedding_spectrogram" in params
    mods = tuple(m for m, ok in (("video", has_v), ("audio", has_a)) if ok)
    blk = tr["encoderblock_0"] if "encoderblock_0" in tr else tr["encoderblock_0_spectrogram"]
    q = blk["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    hidden, heads, head_dim = q.shape
    mlp = blk["MlpBlock_0"]["Dense_0"]["kernel"].shape[1]
    layers = len([k for k in tr if k.startswith("encoderblock_") and k[len("encoderblock_"):].isdigit()])
    if layers == 0:
        layers = len([k for k in tr if k.startswith("encoderblock_")])
    classifier = "token" if ("cls" in params or "clsspectrogram" in params) else "gap"
    if "pre_logits" in params:
        raise ValueError("checkpoints with representation_size (pre_logits) are not supported")
    classes = params["output_projection"]["kernel"].shape[1]
    two = has_v and has_a
    if two and "bottleneck" in params:
        fusion, bottlenecks = "bottleneck", int(params["bottleneck"].shape[1])
    elif two and "encoderblock_0_spectrogram" not in tr:
        fusion, bottlenecks = "vanilla", 4
    else:
        fusion, bottlenecks = "cross_attention", 4
    base = vit_base()
    kw: dict[str, Any] = dict(
        name="mbt-scenic", hidden=hidden, heads=heads, head_dim=head_dim if head_dim * heads != hidden else None,
        mlp=mlp, layers=layers, fusion=fusion, fusion_layer=fusion_layer, bottlenecks=bottlenecks,
        modalities=mods, classifier=classifier, labels=[f"class_{i}" for i in range(classes)],
        multi_label=True,
    )
    extra = 1 if classifier == "token" else 0
    if has_v:
        k = params["embedding"]["kernel"]
        patch = tuple(k.shape[:3]) if k.ndim == 5 else (1,) + tuple(k.shape[:2])
        kw["video_patch"] = patch
        if k.ndim == 5 and "frames" not in overrides:
            kw["frames"] = 32  # scenic AudioSet config: 32 frames, 2x16x16 tubelets
        n_tok = tr["posembed_input"]["pos_embedding"].shape[1] - extra
        frames = overrides.get("frames", kw.get("frames", base.frames))
        h = overrides.get("height", base.height)
        w = overrides.get("width", base.width)
        want = (frames // patch[0]) * (h // patch[1]) * (w // patch[2])
        if want != n_tok:
            raise ValueError(
                f"video: {frames}x{h}x{w} with patch {patch} gives {want} tokens, the checkpoint's "
                f"positional embedding has {n_tok}; pass --frames/--height/--width"
            )
    if has_a:
        k = params["embedding_spectrogram"]["kernel"]
        kw["audio_patch"] = tuple(k.shape[:2])
        n_tok = tr["posembed_input_spectrogram"]["pos_embedding"].shape[1] - extra
        n_mels = overrides.get("n_mels", base.n_mels)
        per_row = n_mels // k.shape[1]
        if n_tok % per_row:
            raise ValueError(f"audio: {n_tok} tokens is not a multiple of {per_row} (n_mels {n_mels})")
        n_frames = n_tok // per_row * k.shape[0]
        kw["n_frames"] = overrides.get("n_frames", n_frames)
        kw["window_seconds"] = kw["n_frames"] * base.hop_length / base.sample_rate
    kw.update(overrides)
    changes = {k: (tuple(v) if isinstance(v, list) and k != "labels" else v) for k, v in kw.items()}
    return base.replace(**changes).validate()


# ---- mapping to our state dict -------------------------------------------------------------

def _block_state(p: dict, prefix: str) -> dict[str, np.ndarray]:
    att = p["MultiHeadDotProductAttention_0"]
    s = {
        f"{prefix}.ln1.weight": p["LayerNorm_0"]["scale"], f"{prefix}.ln1.bias": p["LayerNorm_0"]["bias"],
        f"{prefix}.ln2.weight": p["LayerNorm_1"]["scale"], f"{prefix}.ln2.bias": p["LayerNorm_1"]["bias"],
        f"{prefix}.fc1.weight": p["MlpBlock_0"]["Dense_0"]["kernel"].T,
        f"{prefix}.fc1.bias": p["MlpBlock_0"]["Dense_0"]["bias"],
        f"{prefix}.fc2.weight": p["MlpBlock_0"]["Dense_1"]["kernel"].T,
        f"{prefix}.fc2.bias": p["MlpBlock_0"]["Dense_1"]["bias"],
    }
    for name in ("query", "key", "value"):
        k = att[name]["kernel"]  # [d, h, k]
        s[f"{prefix}.attn.{name}.weight"] = k.reshape(k.shape[0], -1).T
        s[f"{prefix}.attn.{name}.bias"] = att[name]["bias"].reshape(-1)
    k = att["out"]["kernel"]  # [h, k, d]
    s[f"{prefix}.attn.out.weight"] = k.reshape(-1, k.shape[-1]).T
    s[f"{prefix}.attn.out.bias"] = att["out"]["bias"]
    return s


def to_state_dict(params: dict, cfg) -> dict[str, np.ndarray]:
    """scenic parameter tree -> numpy arrays named as mbt.model.MBT's state dict."""
    tr = params["Transformer"]
    s: dict[str, np.ndarray] = {}
    two = cfg.has_video and cfg.has_audio
    if cfg.has_video:
        k = params["embedding"]["kernel"]
        s["video_embed.proj.weight"] = k.transpose(4, 3, 0, 1, 2) if k.ndim == 5 else k.transpose(3, 2, 0, 1)[:, :, None]
        s["video_embed.proj.bias"] = params["embedding"]["bias"]
        s["video_pos"] = tr["posembed_input"]["pos_embedding"]
        if cfg.classifier == "token":
            s["video_cls"] = params["cls"]
        for i in range(cfg.layers):
            s.update(_block_state(tr[f"encoderblock_{i}"], f"video_blocks.{i}"))
    if cfg.has_audio:
        k = params["embedding_spectrogram"]["kernel"]  # [h, w, C, d]
        # scenic feeds C identical copies of the spectrogram: summing over C is exact.
        s["audio_embed.proj.weight"] = k.sum(axis=2).transpose(2, 0, 1)[:, None]
        s["audio_embed.proj.bias"] = params["embedding_spectrogram"]["bias"]
        s["audio_pos"] = tr["posembed_input_spectrogram"]["pos_embedding"]
        if cfg.classifier == "token":
            s["audio_cls"] = params["clsspectrogram" if two else "cls"]
        n_audio = cfg.fusion_layer if (two and cfg.fusion == "vanilla") else cfg.layers
        for i in range(n_audio):
            name = f"encoderblock_{i}_spectrogram"
            if name not in tr and two and cfg.fusion == "vanilla":
                name = f"encoderblock_{i}"  # share_encoder: one set of weights
            s.update(_block_state(tr[name], f"audio_blocks.{i}"))
    if two and cfg.fusion == "bottleneck":
        s["bottleneck"] = params["bottleneck"]
    s["encoder_norm.weight"] = tr["encoder_norm"]["scale"]
    s["encoder_norm.bias"] = tr["encoder_norm"]["bias"]
    s["head.weight"] = params["output_projection"]["kernel"].T
    s["head.bias"] = params["output_projection"]["bias"]
    return {k: np.array(v, dtype=np.float32, order="C", copy=True) for k, v in s.items()}


def build_model(params: dict, cfg):
    import torch

    from .model import MBT

    model = MBT(cfg)
    state = {k: torch.from_numpy(v) for k, v in to_state_dict(params, cfg).items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint gives {tuple(v.shape)}, model wants {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mbt convert-scenic", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="scenic checkpoint file (msgpack TrainState, e.g. checkpoint_NNNN)")
    ap.add_argument("--out", required=True, help="output NAME.onnx")
    ap.add_argument("--config", help="JSON file of MBTConfig fields to set (labels, frames, audio_mean, ...)")
    ap.add_argument("--fusion-layer", type=int, help="Lf of the checkpoint (scenic config model.fusion_layer)")
    ap.add_argument("--fusion", choices=["bottleneck", "vanilla", "cross_attention"],
                    help="override the fusion mode read from the parameter names")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--labels", help="text file, one label per line, in class-index order")
    ap.add_argument("--single-label", action="store_true", help="softmax classes (VGGSound); default multi-label")
    ap.add_argument("--name")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--save-pt", help="also save the PyTorch weights here (train --init / export --checkpoint format)")
    args = ap.parse_args(argv)

    overrides: dict[str, Any] = {}
    if args.config:
        overrides.update(json.loads(Path(args.config).read_text()))
    for key in ("frames", "height", "width", "fusion", "name"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.labels:
        overrides["labels"] = [ln.strip() for ln in Path(args.labels).read_text().splitlines() if ln.strip()]
    if args.single_label:
        overrides["multi_label"] = False
    fusion_layer = args.fusion_layer if args.fusion_layer is not None else overrides.pop("fusion_layer", None)
    overrides.pop("fusion_layer", None)
    if fusion_layer is None:
        ap.error("--fusion-layer (or fusion_layer in --config) is required: the weights do not say it")
    params = load_params(args.checkpoint)
    cfg = infer_config(params, fusion_layer=fusion_layer, overrides=overrides)
    model = build_model(params, cfg)
    if args.save_pt:
        import torch

        torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, args.save_pt)

    from .export import export_onnx

    report = export_onnx(model, args.out, write_parity=not args.no_parity)
    report["config"] = cfg.metadata()
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0
