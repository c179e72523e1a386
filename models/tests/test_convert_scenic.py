"""scenic checkpoint conversion, on checkpoint-shaped trees fabricated here (no download):
the converted ONNX model (onnxruntime) equals a direct NumPy evaluation of the same
parameters with scenic's semantics (mbt/numpy_ref.py)."""

import json
import zlib

import numpy as np
import pytest

from mbt import numpy_ref
from mbt.config import MBTConfig
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
                       n_bottlenecks=None, share_encoder=False, audio_tokens=4, frames=4):
    """Parameters named and shaped as scenic's MBT: 4 frames of 32x32 (tubelets 2x16x16 or
    16x16 patches), a 32x32 spectrogram with 16x16 patches (`audio_tokens` 16x16 patches).
    share_encoder: no `_spectrogram` blocks (scenic reuses the rgb blocks)."""
    def n(*shape, s=0.1):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    p, tr = {}, {}
    extra = 1 if classifier == "token" else 0
    two = rgb and spec
    if rgb:
        k = n(2, 16, 16, 3, D, s=0.05) if tubelet else n(16, 16, 3, D, s=0.05)
        p["embedding"] = {"kernel": k, "bias": n(D)}
        tokens = (frames // 2 if tubelet else frames) * 2 * 2
        tr["posembed_input"] = {"pos_embedding": n(1, tokens + extra, D)}
        if extra:
            p["cls"] = n(1, 1, D, s=0.5)
    if spec:
        p["embedding_spectrogram"] = {"kernel": n(16, 16, spec_channels, D, s=0.05), "bias": n(D)}
        tr["posembed_input_spectrogram"] = {"pos_embedding": n(1, audio_tokens + extra, D)}
        if extra:
            p["clsspectrogram" if two else "cls"] = n(1, 1, D, s=0.5)
    for i in range(LAYERS):
        if rgb or share_encoder:  # scenic names the shared blocks as the rgb ones
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
    # share_encoder=True with bottlenecks: every spectrogram layer runs the rgb blocks.
    "bottleneck-shared-encoder": dict(kw=dict(n_bottlenecks=4, share_encoder=True, tubelet=False), fusion_layer=1,
                                      ref=dict(use_bottleneck=True, share_encoder=True)),
    # test_with_bottlenecks=False: trained with Lf = 1, every layer unimodal at eval.
    "bottleneck-eval-without-bottlenecks": dict(kw=dict(n_bottlenecks=4), fusion_layer=1,
                                                args=["--eval-without-bottlenecks"],
                                                ref=dict(use_bottleneck=True, test_with_bottlenecks=False)),
    "cross-attention-2d": dict(kw=dict(tubelet=False), fusion_layer=1, ref=dict(use_bottleneck=False)),
    "cross-attention-gmp": dict(kw=dict(classifier="gmp"), fusion_layer=1, args=["--classifier", "gmp"],
                                ref=dict(use_bottleneck=False, classifier="gmp")),
    "vanilla-shared-gap": dict(kw=dict(share_encoder=True, classifier="gap", spec_channels=1), fusion_layer=2,
                               args=["--classifier", "gap"],
                               ref=dict(use_bottleneck=False, share_encoder=True, classifier="gap")),
    "vanilla-shared-gsp": dict(kw=dict(share_encoder=True, classifier="gsp"), fusion_layer=1,
                               args=["--classifier", "gsp"],
                               ref=dict(use_bottleneck=False, share_encoder=True, classifier="gsp")),
    "spectrogram-only": dict(kw=dict(rgb=False), fusion_layer=LAYERS, ref=dict(use_bottleneck=False)),
    "spectrogram-only-shared-gmp": dict(kw=dict(rgb=False, share_encoder=True, classifier="gmp"),
                                        fusion_layer=LAYERS, args=["--classifier", "gmp"],
                                        ref=dict(use_bottleneck=False, share_encoder=True, classifier="gmp")),
    "rgb-only-gap": dict(kw=dict(spec=False, classifier="gap"), fusion_layer=LAYERS, args=["--classifier", "gap"],
                         ref=dict(use_bottleneck=False, classifier="gap")),
}


def _write_checkpoint(tmp_path, params):
    ckpt = tmp_path / "checkpoint_1234"
    ckpt.write_bytes(msgpack_serialize(train_state(params)))
    (tmp_path / "cfg.json").write_text(json.dumps({"n_mels": 32, "audio_mean": 1.0, "audio_std": 2.0}))
    (tmp_path / "labels.txt").write_text("\n".join(f"label {i}" for i in range(CLASSES)) + "\n")
    return ckpt


def _convert(tmp_path, ckpt, *args):
    from mbt import convert_scenic

    out = tmp_path / "scenic.onnx"
    rc = convert_scenic.main([
        str(ckpt), "--out", str(out), "--frames", "4", "--height", "32", "--width", "32",
        "--config", str(tmp_path / "cfg.json"), "--labels", str(tmp_path / "labels.txt"), *args,
    ])
    return rc, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_onnx_equals_numpy_scenic(tmp_path, case):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from mbt.export import read_metadata, run_onnx

    spec = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    params = make_scenic_params(rng, **spec["kw"])
    ckpt = _write_checkpoint(tmp_path, params)
    rc, out = _convert(tmp_path, ckpt, "--fusion-layer", str(spec["fusion_layer"]), *spec.get("args", []))
    assert rc == 0
    md = read_metadata(out)
    assert md["labels"][4] == "label 4" and md["multi_label"] is True
    if "audio" in md:
        assert md["audio"]["n_frames"] == 32 and md["audio"]["mean"] == 1.0 and md["window_seconds"] == 0.32
    ref = dict(spec["ref"])
    assert md["fusion"]["classifier"] == ref.get("classifier", "token")
    if "video" in md and "audio" in md and ref["use_bottleneck"]:
        # B, not the B+1 tokens scenic's 'token' classifier makes.
        assert md["fusion"]["bottlenecks"] == 4 and md["fusion"]["bottleneck_tokens"] == 5
        want_lf = LAYERS if ref.get("test_with_bottlenecks") is False else spec["fusion_layer"]
        assert md["fusion"]["fusion_layer"] == want_lf
    if "video" in md:
        assert md["video"]["mean"] == [0.5] * 3 and "span_seconds" not in md["video"]

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
        load_params(ckpt), inputs.get("video"), inputs.get("audio"), fusion_layer=spec["fusion_layer"], **ref
    )
    scale = np.abs(want).max()
    assert scale > 0.1, "the fabricated model should give non-trivial logits"
    np.testing.assert_allclose(got["logits"], want, rtol=0, atol=2e-5 * max(scale, 1.0))
    assert set(per) == {k[len("logits_"):] for k in got if k != "logits"}
    for m, w in per.items():
        np.testing.assert_allclose(got[f"logits_{m}"], w, rtol=0, atol=2e-5 * max(scale, 1.0))


def test_eval_without_bottlenecks_differs_from_fused_eval():
    """The reference itself: test_with_bottlenecks=False really changes the logits (so the
    flag matters), and equals late fusion."""
    params = make_scenic_params(np.random.default_rng(3), n_bottlenecks=4)
    x = np.random.default_rng(4)
    video = x.uniform(-1, 1, (1, 4, 3, 32, 32))
    audio = x.standard_normal((1, 32, 32))
    fused, _ = numpy_ref.mbt_forward(params, video, audio, fusion_layer=1)
    unimodal, _ = numpy_ref.mbt_forward(params, video, audio, fusion_layer=1, test_with_bottlenecks=False)
    late, _ = numpy_ref.mbt_forward(params, video, audio, fusion_layer=LAYERS)
    assert np.abs(fused - unimodal).max() > 1e-3
    np.testing.assert_allclose(unimodal, late, rtol=0, atol=1e-12)


REFUSALS = {
    "pooling-without-classifier": (dict(classifier="gap"), [], "pass --classifier"),
    "token-with-pooling-classifier": (dict(), ["--classifier", "gap"], "only for model.classifier 'token'"),
    "bottleneck-without-cls": (dict(classifier="gap", n_bottlenecks=4), ["--classifier", "gap"],
                               "use_bottleneck only with model.classifier 'token'"),
    "eval-without-bottlenecks-no-bottleneck": (dict(), ["--eval-without-bottlenecks"], "test_with_bottlenecks"),
    "fusion-mismatch": (dict(n_bottlenecks=4), ["--fusion", "vanilla"], "the checkpoint is bottleneck fusion"),
    "pre-logits": (dict(pre_logits=True), [], "representation_size"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_with_the_setting_named(tmp_path, capsys, case):
    kw, args, message = REFUSALS[case]
    pre_logits = kw.pop("pre_logits", False)
    params = make_scenic_params(np.random.default_rng(1), **kw)
    if pre_logits:
        params["pre_logits"] = {"kernel": np.zeros((D, D), np.float32), "bias": np.zeros(D, np.float32)}
    ckpt = _write_checkpoint(tmp_path, params)
    rc, out = _convert(tmp_path, ckpt, "--fusion-layer", "1", *args)
    assert rc == 2 and not out.exists()
    assert message in capsys.readouterr().err


def test_fusion_layer_is_required(tmp_path, capsys):
    ckpt = _write_checkpoint(tmp_path, make_scenic_params(np.random.default_rng(1), n_bottlenecks=4))
    rc, _ = _convert(tmp_path, ckpt)
    assert rc == 2 and "--fusion-layer" in capsys.readouterr().err


def test_audioset_preset_no_zero_centering_and_labels_csv(tmp_path):
    """--scenic-preset audioset: 8 s of audio, 32 frames over the middle 2.56 s, Lf 8 and
    AudioSet's statistics; --no-zero-centering: pixels in [0, 1]; labels from AudioSet's
    class_labels_indices.csv."""
    pytest.importorskip("torch")
    from mbt.export import read_metadata

    rng = np.random.default_rng(5)
    params = make_scenic_params(rng, n_bottlenecks=4, audio_tokens=400, frames=32)
    for i in range(LAYERS, 9):  # Lf = 8 needs at least 8 layers
        params["Transformer"][f"encoderblock_{i}"] = _block(rng)
        params["Transformer"][f"encoderblock_{i}_spectrogram"] = _block(rng)
    ckpt = tmp_path / "checkpoint_1"
    ckpt.write_bytes(msgpack_serialize(train_state(params)))
    csv = tmp_path / "class_labels_indices.csv"
    rows = ['index,mid,display_name'] + [f'{i},/m/0{i}x,"Sound {i}, loud"' for i in (1, 0, 3, 2, 4)]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "as.onnx"
    from mbt import convert_scenic

    rc = convert_scenic.main([str(ckpt), "--out", str(out), "--scenic-preset", "audioset", "--height", "32",
                              "--width", "32", "--no-zero-centering", "--labels", str(csv), "--no-parity"])
    assert rc == 0
    md = read_metadata(out)
    assert md["labels"] == [f"Sound {i}, loud" for i in range(5)]
    assert md["window_seconds"] == 8.0 and md["audio"]["n_frames"] == 800
    assert md["audio"]["mean"] == 1.102 and md["audio"]["std"] == 2.762 and md["multi_label"] is True
    assert md["video"]["frames"] == 32 and md["video"]["span_seconds"] == 2.56
    assert md["video"]["span_position"] == "centre"
    assert md["video"]["mean"] == [0.0] * 3 and md["video"]["std"] == [1.0] * 3
    assert md["fusion"]["fusion_layer"] == 8 and md["fusion"]["layers"] == 9


def test_video_span_flags(tmp_path):
    pytest.importorskip("torch")
    from mbt.export import read_metadata

    ckpt = _write_checkpoint(tmp_path, make_scenic_params(np.random.default_rng(2), n_bottlenecks=4))
    rc, out = _convert(tmp_path, ckpt, "--fusion-layer", "1", "--video-span-seconds", "0.16",
                       "--video-span-position", "end", "--no-parity")
    assert rc == 0
    md = read_metadata(out)
    assert md["video"]["span_seconds"] == 0.16 and md["video"]["span_position"] == "end"
    # train reads a recorded folder's features.json back into the same span.
    cfg = MBTConfig.from_metadata(md)
    assert (cfg.video_span_seconds, cfg.video_span_position) == (0.16, "end")
    assert cfg.metadata() == md


def test_labels_one_per_line(tmp_path):
    from mbt.convert_scenic import read_labels

    (tmp_path / "l.txt").write_text("dog\n\ncat, big\n")
    assert read_labels(tmp_path / "l.txt") == ["dog", "cat, big"]
