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

What the parameters tell: d, heads, MLP, L, patch sizes, classes, B, whether the
classifier is 'token' (a `cls` exists), use_bottleneck (a `bottleneck` exists) and
share_encoder (no `_spectrogram` blocks: every layer of the spectrogram stream runs the rgb
blocks, so they are copied to our audio stream). What they cannot tell (flags, --config
JSON or --scenic-preset): fusion_layer, test_with_bottlenecks, which pooling classifier
('gap', 'gmp', 'gsp') a model without `cls` used, frames/height/width (the token count
must match the positional embedding), zero_centering, the video span, labels,
multi_label, the log-mel recipe and its mean/std. What scenic itself cannot build or we
do not serve is refused with the setting named (see models/README.md).
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

POOLING_CLASSIFIERS = ("gap", "gmp", "gsp")

# scenic configs the converter knows (--scenic-preset): MBTConfig fields plus the scenic
# settings the weights cannot tell. `classifier` applies to checkpoints without `cls`.
SCENIC_PRESETS: dict[str, dict[str, Any]] = {
    # scenic/projects/mbt/configs/audioset/balanced_audioset_base.py, the config of every
    # checkpoint in scenic's MBT model zoo (AS-mini, AS-500K; spec, rgb, rgb+spec):
    # 32 frames at stride 2 from 25 fps video (2.56 s) and 8 s of audio (8 x 100 frames of
    # 128 mels), 224 x 224 crops, zero_centering=True (pixels in [-1, 1]), spectrogram
    # mean 1.102 / std 2.762, fusion_layer 8, test_with_bottlenecks=True, multi-label.
    # At test time (num_test_clips = 1) dmvr takes each modality's clip from the middle of
    # the video: the 2.56 s of frames sit at the centre of the 8 s of audio.
    "audioset": dict(
        fields=dict(frames=32, height=224, width=224, n_mels=128,
                    audio_mean=1.102, audio_std=2.762, video_mean=(0.5, 0.5, 0.5), video_std=(0.5, 0.5, 0.5),
                    video_span_seconds=32 * 2 / 25, video_span_position="centre", multi_label=True),
        fusion_layer=8, classifier="gap", test_with_bottlenecks=True,
    ),
}


class ConversionError(ValueError):
    """A checkpoint (or flag combination) the converter refuses; the message names the setting."""


def _block_names(tr: dict) -> tuple[list[str], list[str]]:
    rgb = sorted((k for k in tr if k.startswith("encoderblock_") and k[len("encoderblock_"):].isdigit()),
                 key=lambda k: int(k[len("encoderblock_"):]))
    spec = [k for k in tr if k.startswith("encoderblock_") and k.endswith("_spectrogram")]
    return rgb, spec


def infer_config(params: dict, *, fusion_layer: int | None, overrides: dict | None = None,
                 classifier: str | None = None, eval_without_bottlenecks: bool = False):
    """An MBTConfig for `params`; `overrides` are MBTConfig fields (frames, labels, ...).

    `classifier`: scenic's model.classifier, needed when the checkpoint has no `cls`
    ('gap', 'gmp' or 'gsp' leave the same parameters). `eval_without_bottlenecks`:
    scenic's test_with_bottlenecks=False, every layer unimodal at eval (then fusion_layer
    is not needed)."""
    from .config import vit_base

    overrides = dict(overrides or {})
    tr = params["Transformer"]
    has_v, has_a = "embedding" in params, "embedding_spectrogram" in params
    if not (has_v or has_a):
        raise ConversionError("no `embedding` or `embedding_spectrogram`: not an MBT checkpoint")
    if "pre_logits" in params:
        raise ConversionError("model.representation_size is set (a `pre_logits` layer): not supported")
    mods = tuple(m for m, ok in (("video", has_v), ("audio", has_a)) if ok)
    two = has_v and has_a
    rgb_blocks, spec_blocks = _block_names(tr)
    share_encoder = has_a and not spec_blocks
    blk = tr[rgb_blocks[0]] if rgb_blocks else tr["encoderblock_0_spectrogram"]
    q = blk["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    hidden, heads, head_dim = q.shape
    mlp = blk["MlpBlock_0"]["Dense_0"]["kernel"].shape[1]
    layers = max(len(rgb_blocks), len(spec_blocks))
    if two and not share_encoder and len(rgb_blocks) != len(spec_blocks):
        raise ConversionError(f"{len(rgb_blocks)} rgb blocks but {len(spec_blocks)} spectrogram blocks")

    has_cls = "cls" in params or "clsspectrogram" in params
    if has_cls:
        if classifier not in (None, "token"):
            raise ConversionError(
                f"--classifier {classifier}: the checkpoint has `cls` tokens, which scenic makes only for "
                "model.classifier 'token'")
        classifier = "token"
    elif classifier is None:
        raise ConversionError(
            "the checkpoint has no `cls` token: scenic's model.classifier was 'gap', 'gmp' or 'gsp' (mean, max "
            "or sum pooling) and the weights do not say which; pass --classifier")
    elif classifier not in POOLING_CLASSIFIERS:
        raise ConversionError(f"--classifier {classifier}: the checkpoint has no `cls`, so it is one of "
                              f"{POOLING_CLASSIFIERS}")

    classes = params["output_projection"]["kernel"].shape[1]
    bottlenecks, extra = 4, False
    if two and "bottleneck" in params:
        fusion = "bottleneck"
        if classifier != "token":
            raise ConversionError(
                "a `bottleneck` without `cls`: scenic's MBT builds use_bottleneck only with model.classifier "
                "'token' (it takes the bottleneck's shape from the CLS branch); not a checkpoint scenic makes")
        n_tokens = int(params["bottleneck"].shape[1])
        bottlenecks, extra = n_tokens - 1, True  # scenic: n_bottlenecks + 1 with 'token'
        if bottlenecks < 1:
            raise ConversionError(f"`bottleneck` has {n_tokens} token(s): need n_bottlenecks >= 1 plus one")
    elif two and share_encoder:
        fusion = "vanilla"
    else:
        fusion = "cross_attention"  # one modality: no fusion at all
    wanted_fusion = overrides.pop("fusion", None)
    if wanted_fusion is not None and two and wanted_fusion != fusion:
        raise ConversionError(
            f"--fusion {wanted_fusion}: the checkpoint is {fusion} fusion (scenic: use_bottleneck "
            f"{'bottleneck' in params}, share_encoder {share_encoder}); scenic's settings fix the mode")
    if eval_without_bottlenecks:
        if fusion != "bottleneck":
            raise ConversionError(
                "--eval-without-bottlenecks (test_with_bottlenecks=False) only changes an audio-visual "
                "use_bottleneck model; this checkpoint has no `bottleneck` or one modality")
        fusion_layer = layers  # scenic at eval: every layer unimodal, no bottleneck
    if fusion_layer is None:
        raise ConversionError("--fusion-layer (scenic's model.fusion_layer) is required: the weights do not say it")
    base = vit_base()
    kw: dict[str, Any] = dict(
        name="mbt-scenic", hidden=hidden, heads=heads, head_dim=head_dim if head_dim * heads != hidden else None,
        mlp=mlp, layers=layers, fusion=fusion, fusion_layer=fusion_layer, bottlenecks=bottlenecks,
        extra_bottleneck_token=extra, modalities=mods, classifier=classifier,
        labels=[f"class_{i}" for i in range(classes)], multi_label=True,
    )
    n_cls = 1 if classifier == "token" else 0
    if has_v:
        k = params["embedding"]["kernel"]
        patch = tuple(k.shape[:3]) if k.ndim == 5 else (1,) + tuple(k.shape[:2])
        kw["video_patch"] = patch
        if k.ndim == 5 and "frames" not in overrides:
            kw["frames"] = 32  # scenic AudioSet config: 32 frames, 2x16x16 tubelets
        n_tok = tr["posembed_input"]["pos_embedding"].shape[1] - n_cls
        frames = overrides.get("frames", kw.get("frames", base.frames))
        h = overrides.get("height", base.height)
        w = overrides.get("width", base.width)
        want = (frames // patch[0]) * (h // patch[1]) * (w // patch[2])
        if want != n_tok:
            raise ConversionError(
                f"video: {frames}x{h}x{w} with patch {patch} gives {want} tokens, the checkpoint's "
                f"positional embedding has {n_tok}; pass --frames/--height/--width"
            )
    if has_a:
        k = params["embedding_spectrogram"]["kernel"]
        kw["audio_patch"] = tuple(k.shape[:2])
        n_tok = tr["posembed_input_spectrogram"]["pos_embedding"].shape[1] - n_cls
        n_mels = overrides.get("n_mels", base.n_mels)
        per_row = n_mels // k.shape[1]
        if n_tok % per_row:
            raise ConversionError(f"audio: {n_tok} tokens is not a multiple of {per_row} (n_mels {n_mels})")
        n_frames = n_tok // per_row * k.shape[0]
        if overrides.get("n_frames", n_frames) != n_frames:
            raise ConversionError(f"audio: n_frames {overrides['n_frames']} gives another token count than the "
                                  f"checkpoint's {n_tok} (n_frames {n_frames})")
        kw["n_frames"] = n_frames
        kw["window_seconds"] = n_frames * base.hop_length / base.sample_rate
        overrides.pop("window_seconds", None)  # fixed by the audio token count
    else:
        # Video only: the window is the frames' span.
        span = overrides.pop("video_span_seconds", None)
        if span is not None:
            overrides.setdefault("window_seconds", span)
    kw.update(overrides)
    changes = {k: (tuple(v) if isinstance(v, list) and k != "labels" else v) for k, v in kw.items()}
    try:
        return base.replace(**changes).validate()
    except (TypeError, ValueError) as err:
        raise ConversionError(str(err)) from None


def read_labels(path: str | Path) -> list[str]:
    """One label per line, or AudioSet's class_labels_indices.csv (`index,mid,display_name`
    with a header; display names quoted when they hold commas), in class-index order."""
    import csv

    text = Path(path).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and [c.strip().lower() for c in next(csv.reader([lines[0]]))] == ["index", "mid", "display_name"]:
        rows = list(csv.reader(lines[1:]))
        by_index = {}
        for row in rows:
            if len(row) != 3 or not row[0].strip().isdigit():
                raise ConversionError(f"{path}: bad row {row!r} (want index,mid,display_name)")
            by_index[int(row[0])] = row[2].strip()
        if sorted(by_index) != list(range(len(by_index))):
            raise ConversionError(f"{path}: indices are not 0..{len(by_index) - 1}")
        return [by_index[i] for i in range(len(by_index))]
    return [ln.strip() for ln in lines]


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
            if name not in tr:
                name = f"encoderblock_{i}"  # share_encoder: the rgb blocks in every layer
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

    ap = argparse.ArgumentParser(prog="python -m mbt convert-scenic",
                                 description="Convert an official scenic MBT checkpoint (Flax msgpack TrainState) to ONNX.")
    ap.add_argument("checkpoint", help="scenic checkpoint file (msgpack TrainState, e.g. checkpoint_NNNN)")
    ap.add_argument("--out", required=True, help="output NAME.onnx")
    ap.add_argument("--scenic-preset", choices=sorted(SCENIC_PRESETS),
                    help="the scenic config the checkpoint was trained with (audioset: balanced_audioset_base.py, "
                         "every checkpoint of scenic's MBT model zoo); flags and --config override it")
    ap.add_argument("--config", help="JSON file of MBTConfig fields to set (labels, frames, audio_mean, ...)")
    ap.add_argument("--fusion-layer", type=int, help="Lf of the checkpoint (scenic config model.fusion_layer)")
    ap.add_argument("--fusion", choices=["bottleneck", "vanilla", "cross_attention"],
                    help="check the fusion mode read from the parameter names (refused if it differs)")
    ap.add_argument("--classifier", choices=["token", *POOLING_CLASSIFIERS],
                    help="scenic's model.classifier; required for a checkpoint without `cls` "
                         "(gap = mean, gmp = max, gsp = sum pooling leave the same weights)")
    ap.add_argument("--eval-without-bottlenecks", action="store_true",
                    help="scenic's model.test_with_bottlenecks=False: at eval every layer runs unimodally "
                         "(converted as late fusion, fusion_layer = L)")
    ap.add_argument("--no-zero-centering", action="store_true",
                    help="scenic's dataset_configs.zero_centering=False: pixels in [0, 1] (mean 0, std 1)")
    ap.add_argument("--video-span-seconds", type=float,
                    help="the F frames cover this many seconds of the window (default: the whole window)")
    ap.add_argument("--video-span-position", choices=["centre", "start", "end"],
                    help="where that span sits in the window (default centre)")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--labels", help="text file, one label per line in class-index order, or AudioSet's "
                                     "class_labels_indices.csv (index,mid,display_name)")
    ap.add_argument("--single-label", action="store_true", help="softmax classes (VGGSound); default multi-label")
    ap.add_argument("--name")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--save-pt", help="also save the PyTorch weights here (train --init / export --checkpoint format)")
    args = ap.parse_args(argv)

    overrides: dict[str, Any] = {}
    fusion_layer, classifier, eval_without = None, None, False
    if args.scenic_preset:
        preset = SCENIC_PRESETS[args.scenic_preset]
        overrides.update(preset["fields"])
        fusion_layer = preset["fusion_layer"]
        eval_without = not preset["test_with_bottlenecks"]
    params = load_params(args.checkpoint)
    has_cls = "cls" in params or "clsspectrogram" in params
    if args.scenic_preset and not has_cls:
        classifier = SCENIC_PRESETS[args.scenic_preset]["classifier"]
    if args.config:
        overrides.update(json.loads(Path(args.config).read_text()))
    for key in ("frames", "height", "width", "fusion", "name"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.labels:
        try:
            overrides["labels"] = read_labels(args.labels)
        except ConversionError as err:
            ap.error(str(err))
    if args.single_label:
        overrides["multi_label"] = False
    if args.no_zero_centering:
        overrides["video_mean"], overrides["video_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if args.video_span_seconds is not None:
        overrides["video_span_seconds"] = args.video_span_seconds
    if args.video_span_position is not None:
        overrides["video_span_position"] = args.video_span_position
    fusion_layer = overrides.pop("fusion_layer", fusion_layer)
    if args.fusion_layer is not None:
        fusion_layer = args.fusion_layer
    classifier = overrides.pop("classifier", classifier)
    if args.classifier is not None:
        classifier = args.classifier
    eval_without = eval_without or args.eval_without_bottlenecks
    try:
        cfg = infer_config(params, fusion_layer=fusion_layer, overrides=overrides, classifier=classifier,
                           eval_without_bottlenecks=eval_without)
    except ConversionError as err:
        print(f"convert-scenic: refused: {err}", file=sys.stderr)
        return 2
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
