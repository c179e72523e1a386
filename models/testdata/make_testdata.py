"""Regenerate models/testdata: the tiny MBT fixture and the log-mel fixture.

    cd models && .venv/bin/python testdata/make_testdata.py

The ONNX file depends on the torch version (random init, exporter); its sha256 and
parity fixture are rewritten with it. tests/test_testdata.py checks the result.
"""

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mbt import logmel  # noqa: E402
from mbt.config import edge_small  # noqa: E402


def make_logmel_fixture() -> None:
    """2.56 s at 16 kHz (edge-small's recipe, no standardisation): a 100 Hz -> 6 kHz chirp,
    a 1 kHz tone in the second half, a little noise, 20 ms of silence at the start."""
    cfg = edge_small()
    sr = cfg.sample_rate
    n = int(round(cfg.window_seconds * sr))
    t = np.arange(n) / sr
    rng = np.random.default_rng(0)
    x = (0.3 * np.sin(2 * np.pi * (100 * t + (6000 - 100) / (2 * t[-1]) * t**2))
         + 0.2 * np.sin(2 * np.pi * 1000 * t) * (t > t[-1] / 2)
         + 0.01 * rng.standard_normal(n))
    x[: int(0.02 * sr)] = 0
    x = x.astype(np.float32)
    md = cfg.metadata()
    np.save(HERE / "logmel.samples.npy", x)
    np.save(HERE / "logmel.expected.npy", logmel.log_mel(x, **logmel.recipe_from_metadata(md, raw=True)))
    recipe = dict(md["audio"], window_seconds=md["window_seconds"])
    (HERE / "logmel.recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")


def make_model_fixture() -> None:
    from mbt.export import main as export_main

    export_main(["--preset", "tiny", "--seed", "0", "--out", str(HERE / "mbt-tiny.onnx")])


if __name__ == "__main__":
    make_logmel_fixture()
    make_model_fixture()
