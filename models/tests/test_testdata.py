"""The committed fixtures under models/testdata (what the Rust tests read) are consistent:
sha256, metadata, I/O shapes, onnxruntime reproduces the parity outputs, the log-mel
fixture matches the reference. Torch-free: runs in CI."""

import json
from pathlib import Path

import numpy as np
import pytest

from mbt import logmel
from mbt.config import MBTConfig

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
MODELS = sorted(TESTDATA.glob("*.onnx"))


def test_there_is_a_fixture_model():
    assert MODELS, "models/testdata/*.onnx missing"


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_model_fixture(path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from mbt.export import parity_dir, read_metadata, run_onnx, sha256_file

    digest, name = path.with_name(path.name + ".sha256").read_text().split()
    assert name == path.name and digest == sha256_file(path)

    md = read_metadata(path)
    cfg = MBTConfig.from_metadata(md)
    m = onnx.load(str(path))
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(m.graph.input) + list(m.graph.output)
    }
    want = {}
    if cfg.has_video:
        want["video"] = ["batch", cfg.frames, 3, cfg.height, cfg.width]
    if cfg.has_audio:
        want["audio"] = ["batch", cfg.n_frames, cfg.n_mels]
    outs = ["logits"] + [f"logits_{m}" for m in ("audio", "video") if m in cfg.modalities]
    for o in outs:
        want[o] = ["batch", cfg.classes]
    assert dims == want

    pdir = parity_dir(path)
    fx = {p.stem: np.load(p) for p in pdir.glob("*.npy")}
    got = run_onnx(path, {k: fx[k] for k in ("video", "audio") if k in fx})
    for o in outs:
        scale = max(float(np.abs(fx[o]).max()), 1e-6)
        assert float(np.abs(got[o] - fx[o]).max()) <= 1e-5 * scale


def test_logmel_fixture():
    recipe = json.loads((TESTDATA / "logmel.recipe.json").read_text())
    x = np.load(TESTDATA / "logmel.samples.npy")
    assert x.dtype == np.float32 and x.shape == (round(recipe.pop("window_seconds") * recipe["sample_rate"]),)
    want = np.load(TESTDATA / "logmel.expected.npy")
    assert want.shape == (recipe["n_frames"], recipe["n_mels"])
    np.testing.assert_allclose(logmel.log_mel(x, **recipe), want, rtol=1e-6, atol=1e-5)
