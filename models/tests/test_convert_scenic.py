"""scenic checkpoint conversion, on checkpoint-shaped trees fabricated here (no download):
the converted ONNX model (onnxruntime) equals a direct NumPy evaluation of the same
parameters with scenic's semantics (mbt/numpy_ref.py)."""

import json

import numpy as np
import pytest

from mbt import numpy_ref
from mbt.convert_scenic import find_params, load_params, msgpack_restore, msgpack_serialize

D, HEADS, MLP, LAYERS, CLASSES = 32, 2, 48, 3, 5


def _block(rng):
    hd = D // HEADS

    def n(*shape, s=0.15):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def ln():
        return {"scale": 1.0 + n(D, s=0.1), "bias": n(D, s=0.1)}

    att = {k: {"kernel": n(D, HEADS, hd), "bias": n(HEADS, hd, s=0.05)} for k in ("query", "key", "value")}
    att["out"] = {"kernel": n(HEADS, hd, D), "bias": n(D, s=0.05)}
    return {
        "LayerNorm_0": ln(), "LayerNorm_1": ln(), "MultiHeadDotProductAttention_0": att,
        "MlpBlock_0": {"Dense_0": {"kernel": n(D, MLP), "bias": n(MLP, s=0.05)},
                       "Dense_1": {"kernel": n(MLP, D), "bias": n(D, s=0.05)}},
    }


def make_scenic_params(rng, *, rgb=True, spec=True, tubelet=True, spec_channels=3, classifier="token",
                       n_bottlenecks=None, share_encoder=False):
    """Parameters named and shaped as scenic's MBT: 4 frames of 32x32 (tubelets 2x16x16 or
    16x16 patches), a 32x32 spectrogram with 16x16 patches."""
    def n(*shape, s=0.1):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    p, tr = {}, {}
    extra = 1 if classifier == "token" else 0
    two = rgb and spec
    if rgb:
        k = n(2, 16, 16, 3, D, s=0.05) if tubelet else n(16, 16, 3, D, s=0.05)
        p["embedding"] = {"kernel": k, "bias": n(D)}
        tokens = (2 if tubelet else 4) * 2 * 2
        tr["posembed_input"] = {"pos_embedding": n(1, tokens + extra, D)}
        if extra:
            p["cls"] = n(1, 1, D, s=0.5)
    if spec:
        p["embedding_spectrogram"] = {"kernel": n(16, 16, spec_channels, D, s=0.05), "bias": n(D)}
        tr["posembed_input_spectrogram"] = {"pos_embedding": n(1, 4 + extra, D)}
        if extra:
            p["clsspectrogram" if two else "cls"] = n(1, 1, D, s=0.5)
    for i in range(LAYERS):
        if rgb:
            tr[f"encoderblock_{i}"] = _block(rng)
        if spec and not share_encoder:
            tr[f"encoderblock_{i}_spectrogram"] = _block(rng)
    if n_bottlenecks:
        p["bottleneck"] = n(1, n_bottlenecks + extra, D, s=0.5)
    tr["encoder_norm"] = {"scale": 1.0 + n(D), "bias": n(D)}
    p["Transformer"] = tr
    p["output_projection"] = {"kernel": n(D, CLASSES, s=0.3), "bias": n(CLASSES)}
    return p


def train_state(params):
    """A flax.optim-era scenic TrainState as a state dict."""
    return {
        "global_step": np.int64(1234),
        "optimizer": {"target": params, "state": {"step": np.int64(1234), "param_states": {}}},
        "model_state": {},
        "rng": np.array([0, 42], dtype=np.uint32),
        "accum_train_time": 1.5,
    }


def test_msgpack_round_trip():
    params = make_scenic_params(np.random.default_rng(0), n_bottlenecks=4)
    back = find_params(msgpack_restore(msgpack_serialize(train_state(params))))
    assert back["Transformer"]["encoderblock_2"]["MlpBlock_0"]["Dense_1"]["kernel"].shape == (MLP, D)
    np.testing.assert_array_equal(back["bottleneck"], params["bottleneck"])
    # optax-era states keep parameters at `params`.
    assert find_params({"params": params, "opt_state": {}}) is not None


def test_chunked_arrays_are_joined():
    a = np.arange(10, dtype=np.float32).reshape(2, 5)
    tree = {"__msgpack_chunked_array__": True, "shape": [2, 5],
            "chunks": {"0": a.reshape(-1)[:6], "1": a.reshape(-1)[6:]}}
    got = msgpack_restore(msgpack_serialize({"x": tree}))["x"]
    np.testing.assert_array_equal(got, a)


CASES = {
    "bottleneck-token-tubelet": dict(kw=dict(n_bottlenecks=4), fusion_layer=1, ref=dict(use_bottleneck=True)),
    "bottleneck-late": dict(kw=dict(n_bottlenecks=4), fusion_layer=LAYERS, ref=dict(use_bottleneck=True)),
    "cross-attention-2d": dict(kw=dict(tubelet=False), fusion_layer=1, ref=dict(use_bottleneck=False)),
    "vanilla-shared-gap": dict(kw=dict(share_encoder=True, classifier="gap", spec_channels=1), fusion_layer=2,
                               ref=dict(use_bottleneck=False, share_encoder=True, classifier="gap")),
    "spectrogram-only": dict(kw=dict(rgb=False), fusion_layer=LAYERS, ref=dict(use_bottleneck=False)),
    "rgb-only-gap": dict(kw=dict(spec=False, classifier="gap"), fusion_layer=LAYERS,
                         ref=dict(use_bottleneck=False, classifier="gap")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_onnx_equals_numpy_scenic(tmp_path, case):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from mbt import convert_scenic
    from mbt.export import read_metadata, run_onnx

    spec = CASES[case]
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    params = make_scenic_params(rng, **spec["kw"])
    ckpt = tmp_path / "checkpoint_1234"
    ckpt.write_bytes(msgpack_serialize(train_state(params)))
    (tmp_path / "cfg.json").write_text(json.dumps({"n_mels": 32, "audio_mean": 1.0, "audio_std": 2.0}))
    (tmp_path / "labels.txt").write_text("\n".join(f"label {i}" for i in range(CLASSES)) + "\n")
    out = tmp_path / "scenic.onnx"
    rc = convert_scenic.main([
        str(ckpt), "--out", str(out), "--fusion-layer", str(spec["fusion_layer"]),
        "--frames", "4", "--height", "32", "--width", "32",
        "--config", str(tmp_path / "cfg.json"), "--labels", str(tmp_path / "labels.txt"),
    ])
    assert rc == 0
    md = read_metadata(out)
    assert md["labels"][4] == "label 4" and md["multi_label"] is True
    if "audio" in md:
        assert md["audio"]["n_frames"] == 32 and md["audio"]["mean"] == 1.0 and md["window_seconds"] == 0.32

    x = np.random.default_rng(7)
    video = x.uniform(-1, 1, (1, 4, 3, 32, 32)).astype(np.float32)
    audio = x.standard_normal((1, 32, 32)).astype(np.float32)
    inputs = {}
    if "video" in md:
        inputs["video"] = video
    if "audio" in md:
        inputs["audio"] = audio
    got = run_onnx(out, inputs)
    want, per = numpy_ref.mbt_forward(
        load_params(ckpt), inputs.get("video"), inputs.get("audio"), fusion_layer=spec["fusion_layer"], **spec["ref"]
    )
    scale = np.abs(want).max()
    assert scale > 0.1, "the fabricated model should give non-trivial logits"
    np.testing.assert_allclose(got["logits"], want, rtol=0, atol=2e-5 * max(scale, 1.0))
    for m, w in per.items():
        np.testing.assert_allclose(got[f"logits_{m}"], w, rtol=0, atol=2e-5 * max(scale, 1.0))
