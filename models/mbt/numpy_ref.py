"""A direct NumPy (float64) evaluation of scenic's MBT on a scenic/Flax parameter tree.

Written from scenic/projects/mbt/model.py, independently of our PyTorch model and of the
name mapping in convert_scenic.py, so that the converter test compares two separate
readings of the same checkpoint. Eval mode (no dropout), torch-free.

Inputs use our layout: video [N, F, 3, H, W] (already normalised), audio [N, T, M]
(standardised log-mel). Internally they become scenic's rgb [N, F, H, W, 3] and
spectrogram [N, T, M, C], the 1-channel spectrogram tiled to C channels as scenic's
dataset does when the embedding kernel has C = 3.
"""

from __future__ import annotations

import math

import numpy as np


def layer_norm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def dense(x, p):
    return x @ p["kernel"] + p["bias"]


def mha(x, p):
    """flax.linen.MultiHeadDotProductAttention, self-attention, DenseGeneral kernels."""
    q = np.einsum("ntd,dhk->nthk", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("ntd,dhk->nthk", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("ntd,dhk->nthk", x, p["value"]["kernel"]) + p["value"]["bias"]
    q = q / math.sqrt(q.shape[-1])
    logits = np.einsum("nqhk,nshk->nhqs", q, k)
    logits = logits - logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("nhqs,nshk->nqhk", w, v)
    return np.einsum("nqhk,hkd->nqd", o, p["out"]["kernel"]) + p["out"]["bias"]


def encoder_block(x, p):
    y = mha(layer_norm(x, p["LayerNorm_0"]), p["MultiHeadDotProductAttention_0"])
    x = x + y
    y = layer_norm(x, p["LayerNorm_1"])
    y = dense(gelu_tanh(dense(y, p["MlpBlock_0"]["Dense_0"])), p["MlpBlock_0"]["Dense_1"])
    return x + y


def conv_patches(x, kernel, bias):
    """VALID conv with stride = kernel size, channels-last: x [N, *S, C], kernel [*K, C, D]
    -> [N, prod(S/K), D], tokens in row-major order of the output grid."""
    ks = kernel.shape[:-2]
    n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
    grid = [s // k for s, k in zip(spatial, ks)]
    x = x[(slice(None),) + tuple(slice(0, g * k) for g, k in zip(grid, ks))]
    shape = [n]
    for g, k in zip(grid, ks):
        shape += [g, k]
    x = x.reshape(shape + [c])
    nd = len(ks)
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd]
    x = x.transpose(perm).reshape(n, int(np.prod(grid)), int(np.prod(ks)) * c)
    return x @ kernel.reshape(-1, kernel.shape[-1]) + bias


def mbt_forward(params, video=None, audio=None, *, fusion_layer, use_bottleneck=True,
                test_with_bottlenecks=True, share_encoder=False, classifier="token"):
    """scenic MBT.__call__(train=False). Returns (logits, {modality: logits}).

    With classifier 'token' the per-modality logits are scenic's (each CLS through the
    head, averaged into `logits`). scenic's pooling classifiers ('gap', 'gmp', 'gsp': mean,
    max, sum over all tokens of all modalities) have no per-modality logits; the dict then
    holds our model's addition, the same pooling over one modality's tokens only.
    `test_with_bottlenecks=False` with `use_bottleneck`: every layer unimodal at eval."""
    if classifier not in ("token", "gap", "gmp", "gsp"):
        raise ValueError(f"classifier {classifier!r}")
    if use_bottleneck and classifier != "token":
        # scenic sets n and c (the bottleneck's shape) only in the 'token' branch.
        raise ValueError("scenic's MBT cannot build use_bottleneck with a pooling classifier")
    p = {k: v for k, v in params.items()}
    tr = p["Transformer"]
    x = {}
    if audio is not None:
        spec = np.asarray(audio, np.float64)[..., None]
        c = p["embedding_spectrogram"]["kernel"].shape[-2]
        x["spectrogram"] = conv_patches(np.tile(spec, [1, 1, 1, c]), p["embedding_spectrogram"]["kernel"],
                                        p["embedding_spectrogram"]["bias"])
    if video is not None:
        rgb = np.asarray(video, np.float64).transpose(0, 1, 3, 4, 2)  # N F H W 3
        k = p["embedding"]["kernel"]
        if k.ndim == 4:  # 2D patches per frame: scenic stacks frames vertically
            n, f, h, w, c = rgb.shape
            rgb = rgb.reshape(n, f * h, w, c)
        x["rgb"] = conv_patches(rgb, k, p["embedding"]["bias"])
    mods = [m for m in ("spectrogram", "rgb") if m in x]  # scenic config order
    n = next(iter(x.values())).shape[0]
    temporal = {}
    for m in mods:
        temporal[m] = x[m].shape[1]
        if classifier == "token":
            name = "cls" if (m == "rgb" or len(mods) == 1) else "cls" + m
            x[m] = np.concatenate([np.tile(p[name], [n, 1, 1]), x[m]], axis=1)
    bottleneck = np.tile(p["bottleneck"], [n, 1, 1]) if use_bottleneck else None
    for m in mods:
        x[m] = x[m] + tr["posembed_input" + ("" if m == "rgb" else "_" + m)]["pos_embedding"]
    num_layers = max(
        len([k for k in tr if k.startswith("encoderblock_") and k[len("encoderblock_"):].isdigit()]),
        len([k for k in tr if k.startswith("encoderblock_") and k.endswith("_spectrogram")]),
    )
    x_combined = None
    for lyr in range(num_layers):
        enc = {}
        for m in mods:
            if m == "rgb" or share_encoder:
                enc[m] = tr[f"encoderblock_{lyr}"]
            else:
                enc[m] = tr[f"encoderblock_{lyr}_{m}"]
        if lyr < fusion_layer or len(mods) == 1 or (use_bottleneck and not test_with_bottlenecks):
            for m in mods:
                x[m] = encoder_block(x[m], enc[m])
        elif use_bottleneck:
            bottle = []
            for m in mods:
                t = x[m].shape[1]
                out = encoder_block(np.concatenate([x[m], bottleneck], axis=1), enc[m])
                x[m] = out[:, :t]
                bottle.append(out[:, t:])
            bottleneck = np.mean(np.stack(bottle, axis=-1), axis=-1)
        elif not share_encoder:
            new = {}
            for m in mods:
                others = [x[o] for o in mods if o != m]
                t = x[m].shape[1]
                comb = encoder_block(np.concatenate(others + [x[m]], axis=1), enc[m])
                new[m] = comb[:, -t:]
            x = new
        else:
            if x_combined is None:
                x_combined = np.concatenate([x[m] for m in mods], axis=1)
            x_combined = encoder_block(x_combined, tr[f"encoderblock_{lyr}"])
    x_out = x_combined if x_combined is not None else np.concatenate([x[m] for m in mods], axis=1)
    encoded = layer_norm(x_out, tr["encoder_norm"])
    if classifier == "token":
        per, counter = {}, 0
        for m in mods:
            per[m] = dense(encoded[:, counter], p["output_projection"])
            counter += temporal[m] + 1
        fused = sum(per.values()) / len(per)
        return fused, {("audio" if m == "spectrogram" else "video"): v for m, v in per.items()}
    pool = {"gap": np.mean, "gmp": np.max, "gsp": np.sum}[classifier]
    fused = dense(pool(encoded, axis=1), p["output_projection"])
    per, counter = {}, 0
    for m in mods:  # x_out / x_combined hold the modalities in this order
        t = temporal[m]
        per["audio" if m == "spectrogram" else "video"] = dense(pool(encoded[:, counter:counter + t], axis=1),
                                                                p["output_projection"])
        counter += t
    return fused, per
