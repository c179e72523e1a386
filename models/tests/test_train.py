"""Training on a fabricated `mbt-edge record` folder: runs, checkpoints, resumes, exports."""

import json

import numpy as np
import pytest

from mbt.train import WindowDataset, mean_average_precision, split_indices, top1

from test_flops import tiny


def make_dataset(root, n_per_label=12, labels=("dog", "doorbell"), seed=0, audio_mean=0.0, audio_std=1.0):
    cfg = tiny(labels=list(labels), audio_mean=audio_mean, audio_std=audio_std)
    root.mkdir(parents=True, exist_ok=True)
    (root / "features.json").write_text(cfg.metadata_json())
    rng = np.random.default_rng(seed)
    lines = []
    for k, lab in enumerate(labels):
        for j in range(n_per_label):
            stem = f"{lab}/{j:05d}"
            (root / lab).mkdir(exist_ok=True)
            sign = 1.0 if k == 0 else -1.0
            video = (rng.standard_normal((4, 3, 32, 32)) * 0.5 + 0.5 * sign).astype(np.float32)
            audio = (rng.standard_normal((32, 32)) * 0.5 - 0.5 * sign).astype(np.float32)
            np.save(root / f"{stem}.video.npy", video)
            np.save(root / f"{stem}.audio.npy", audio)
            lines.append(json.dumps({"file": stem, "label": lab, "source": "porch",
                                     "window_start": f"2026-11-28T12:00:{j:02d}Z"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return cfg


def test_dataset_and_split(tmp_path):
    make_dataset(tmp_path / "d")
    ds = WindowDataset(tmp_path / "d")
    assert len(ds) == 24 and ds.labels() == ["dog", "doorbell"] and not ds.multi_label
    train, val = split_indices(ds, 0.25)
    assert len(val) == 6 and not set(train) & set(val)
    # The last windows of each label are held out (recorded windows overlap in time).
    assert val == [9, 10, 11, 21, 22, 23]


def test_metrics():
    t = np.eye(3, dtype=np.float32)
    assert top1(np.eye(3), t) == 1.0
    assert mean_average_precision(np.eye(3), t) == 1.0
    assert mean_average_precision(-np.eye(3), t) < 1.0


def test_train_resume_export(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from mbt import train
    from mbt.export import read_metadata

    make_dataset(tmp_path / "d", audio_mean=-2.0, audio_std=3.0)
    (tmp_path / "cfg.json").write_text(json.dumps({"hidden": 32, "heads": 2, "mlp": 64, "layers": 2, "fusion_layer": 1}))
    run = tmp_path / "run"
    common = [str(tmp_path / "d"), "--out", str(run), "--config", str(tmp_path / "cfg.json"), "--batch-size", "8",
              "--threads", "1", "--mixup", "0.4", "--modality-mixup", "--specaugment", "--time-masks", "1",
              "--time-mask-width", "4", "--freq-masks", "1", "--freq-mask-width", "4", "--modality-dropout", "0.3",
              "--freq-shift", "3", "--time-stretch", "0.2",
              "--restandardise", "--lr", "3e-3", "--val-fraction", "0.25"]
    assert train.main(common + ["--epochs", "2"]) == 0
    log = [json.loads(s) for s in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for key in ("fused", "audio_head", "video_head", "audio_only", "audio_only_head", "video_only", "video_only_head"):
        assert 0.0 <= log[-1][key] <= 1.0
    assert (run / "last.pt").exists() and (run / "best.pt").exists()

    assert train.main(common + ["--epochs", "4", "--resume", "--export", str(tmp_path / "m.onnx")]) == 0
    log = [json.loads(s) for s in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    md = read_metadata(tmp_path / "m.onnx")
    assert md["labels"] == ["dog", "doorbell"] and md["window_seconds"] == 0.32
    # Re-standardised from the data: raw = x * 3 - 2 has mean about -2 +- 1.5 and std about 3.
    assert md["audio"]["mean"] != -2.0 and 1.5 < md["audio"]["std"] < 5.0
    assert md["fusion"]["hidden"] == 32 and md["fusion"]["layers"] == 2


def test_init_from_weights(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from mbt import train
    from mbt.model import MBT

    make_dataset(tmp_path / "d")
    src = tiny(labels=["dog", "doorbell"], hidden=32, heads=2, mlp=64, layers=2, fusion_layer=1)
    model = MBT(src)
    torch.save({"config": src.to_dict(), "model": model.state_dict()}, tmp_path / "init.pt")
    rc = train.main([str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--init", str(tmp_path / "init.pt"),
                     "--labels", "dog,doorbell,cat", "--epochs", "1", "--threads", "1", "--batch-size", "8"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "re-initialised: ['head.bias', 'head.weight']" in out


def test_warp_audio_shifts_mel_bins_and_stretches_time():
    torch = pytest.importorskip("torch")
    import types

    from mbt.train import Trainer

    tr = Trainer.__new__(Trainer)
    tr.torch, tr.rng = torch, np.random.default_rng(0)
    x = torch.zeros(16, 200, 64)
    x[:, :, 30] = 1.0  # a steady tone in mel bin 30
    x[:, ::20, 50] = 2.0  # a click every 20 frames in mel bin 50
    tr.args = types.SimpleNamespace(freq_shift=4, time_stretch=0.0)
    y = tr.warp_audio(x)
    assert y.shape == x.shape
    bins = {int((y[r] == 1.0).all(0).nonzero()[0]) for r in range(16)}
    assert bins <= set(range(26, 35)) and len(bins) > 1
    tr.args = types.SimpleNamespace(freq_shift=0, time_stretch=0.5)
    y = tr.warp_audio(x)
    assert y.shape == x.shape and torch.equal(y[:, :, 30], x[:, :, 30])
    clicks = {int((y[r, :, 50] > 1.0).sum()) for r in range(16)}
    assert len(clicks) > 1  # the click rate changes with the stretch
