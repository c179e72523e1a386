"""ONNX export round trip: onnxruntime equals PyTorch, metadata and parity fixture."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mbt.config import MBTConfig  # noqa: E402
from mbt.export import export_onnx, parity_dir, parity_inputs, read_metadata, run_onnx, sha256_file  # noqa: E402
from mbt.model import MBT  # noqa: E402

from test_flops import MODES, tiny  # noqa: E402


def assert_rel_close(got, want, rel=1e-5):
    scale = max(float(np.abs(want).max()), 1e-6)
    assert float(np.abs(got - want).max()) <= rel * scale, (float(np.abs(got - want).max()), scale)


@pytest.mark.parametrize(
    "cfg",
    [tiny(fusion=m) for m in MODES] + [tiny(modalities=("audio",)), tiny(video_patch=(2, 16, 16), classifier="gap"),
                                       tiny(fusion="vanilla", classifier="gmp"), tiny(classifier="gsp"),
                                       tiny(extra_bottleneck_token=True)],
    ids=lambda c: f"{c.fusion}-{'+'.join(c.modalities)}-{c.classifier}" + ("-b+1" if c.extra_bottleneck_token else ""),
)
def test_round_trip(tmp_path, cfg):
    torch.manual_seed(0)
    model = MBT(cfg).eval()
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path)
    assert report["max_rel_diff_onnxruntime"] < 1e-4

    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == model.input_names()
    assert [o.name for o in m.graph.output] == model.output_names()
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert all(op.version == 17 for op in m.opset_import if op.domain in ("", "ai.onnx"))
    assert [p.key for p in m.metadata_props] == ["mbt"]
    md = read_metadata(path)
    assert md == cfg.metadata() and MBTConfig.from_metadata(md).metadata() == md
    assert not path.with_suffix(".onnx.data").exists()

    # A batch size other than the one used for export.
    inputs = parity_inputs(cfg, batch=3, seed=5)
    got = run_onnx(path, inputs)
    with torch.no_grad():
        want = model(*(torch.from_numpy(inputs[n]) for n in model.input_names()))
    for name, w in zip(model.output_names(), want):
        assert_rel_close(got[name], w.numpy())

    # The fixture the Rust tests read.
    pdir = parity_dir(path)
    files = sorted(p.name for p in pdir.iterdir())
    assert files == sorted(f"{n}.npy" for n in model.input_names() + model.output_names())
    fx = {p.stem: np.load(p) for p in pdir.iterdir()}
    assert all(a.dtype == np.float32 for a in fx.values())
    got = run_onnx(path, {n: fx[n] for n in model.input_names()})
    for name in model.output_names():
        assert_rel_close(got[name], fx[name])

    line = (tmp_path / "m.onnx.sha256").read_text()
    assert line == f"{sha256_file(path)}  m.onnx\n"


def test_metadata_json_matches_contract():
    md = json.loads(tiny().metadata_json())
    assert set(md) == {"format_version", "name", "labels", "multi_label", "window_seconds", "video", "audio", "fusion"}
    assert set(md["audio"]) == {
        "sample_rate", "n_frames", "n_mels", "win_length", "hop_length", "n_fft", "window", "mel_scale",
        "fmin", "fmax", "power", "log_offset", "mean", "std",
    }
    assert set(md["video"]) == {"frames", "height", "width", "mean", "std"}
    assert md["audio"]["n_frames"] == round(md["window_seconds"] * md["audio"]["sample_rate"] / md["audio"]["hop_length"])
    only_video = json.loads(tiny(modalities=("video",)).metadata_json())
    assert "audio" not in only_video
