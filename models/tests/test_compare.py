"""`python -m mbt compare`: its pure parts (statistics, peak, table, bench config) and the
onnxruntime engine on the tiny fixture model; the tract engine only where the release binary
exists (skipped otherwise), the torch engine only with torch installed."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mbt import compare as cmp

TINY = Path(__file__).resolve().parents[1] / "testdata" / "mbt-tiny.onnx"


def test_pick_and_round_stats_follow_bench():
    # bench: sorted samples, index round((n-1) q)
    assert cmp.pick([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert cmp.pick([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == 5.0
    assert cmp.round_stats([3.0, 1.0, 2.0]) == {"runs": 3, "median_ms": 2.0, "p90_ms": 3.0, "min_ms": 1.0}


def test_summarize_takes_median_of_round_medians():
    rounds = [
        {"runs": 5, "median_ms": 10.0, "p90_ms": 12.0, "min_ms": 9.0},
        {"runs": 5, "median_ms": 11.0, "p90_ms": 30.0, "min_ms": 9.5},
        {"runs": 5, "median_ms": 50.0, "p90_ms": 60.0, "min_ms": 8.0},  # a noisy round
    ]
    assert cmp.summarize(rounds) == {"median_ms": 11.0, "p90_ms": 30.0, "min_ms": 8.0, "runs": 15, "rounds": 3}


def test_peak_formula(tmp_path):
    peak = cmp.Peak(threads=1, clock_ghz=2.1, fma_units=2, lanes=16)
    assert peak.gflops == pytest.approx(134.4)
    assert "134.4 GFLOP/s" in peak.formula()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 3000.000\n"
                       "flags\t\t: fpu sse avx2 fma avx512f\n\nprocessor\t: 1\ncpu MHz\t\t: 1000.0\n")
    info = cmp.cpu_info(str(cpuinfo))
    assert info["model"] == "Test CPU" and info["mhz"] == 3000.0 and "avx512f" in info["flags"]
    assert cmp.peak_for(2, info).gflops == pytest.approx(2 * 3.0 * 2 * 16 * 2)
    info["flags"] = {"avx2", "fma"}
    assert cmp.peak_for(1, info, clock_ghz=2.0).gflops == pytest.approx(2.0 * 2 * 8 * 2)
    assert cmp.cpu_info(str(tmp_path / "missing"))["mhz"] is None


def test_table_ratios_and_rates():
    peak = cmp.Peak(1, 2.0, 2, 16)  # 128 GFLOP/s
    rows = [
        cmp.Row("ort", "m.onnx", {"median_ms": 10.0, "p90_ms": 11.0, "min_ms": 9.0, "runs": 30}),
        cmp.Row("tract", "m.onnx", {"median_ms": 20.0, "p90_ms": 21.0, "min_ms": 19.0, "runs": 30}),
    ]
    table = cmp.format_table(rows, gmacs=0.32, peak=peak).splitlines()
    ort, tract = table[2].split(), table[3].split()
    assert ort[:3] == ["ort", "m.onnx", "10.00"] and ort[5] == "1.00"
    # 0.32 GMAC in 10 ms = 32 GMAC/s = 64 GFLOP/s = 50 % of 128
    assert ort[6:9] == ["32.0", "64.0", "50.0%"]
    assert tract[5] == "2.00" and tract[6] == "16.0" and tract[8] == "25.0%"


def test_bench_config_is_minimal_and_absolute(tmp_path):
    config = cmp.write_bench_config(tmp_path, TINY, threads=2)
    text = config.read_text()
    assert f'path = "{TINY.resolve()}"' in text and "threads = 2" in text and 'runtime = "cpu"' in text


def test_ort_engine_times_and_checks_parity_without_the_binary(tmp_path):
    pytest.importorskip("onnxruntime")
    result = cmp.compare(str(TINY), [], threads=1, runs=2, per_round=1, engines=["ort", "tract"],
                         mbt_edge=tmp_path / "no-such-binary", checkpoint=None, log=lambda _: None)
    assert [(r.engine, r.model, r.summary["runs"], r.summary["rounds"]) for r in result.rows] == [
        ("ort", "mbt-tiny.onnx", 2, 2)]
    assert any("tract: skipped" in note for note in result.notes)
    (fixture,) = [p for p in result.parity if p.startswith("ort mbt-tiny.onnx vs fixture")]
    assert float(fixture.split("max |diff| ")[1].split()[0]) < 1e-4


def test_variant_parity_against_the_model(tmp_path):
    pytest.importorskip("onnxruntime")
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(TINY.read_bytes())
    result = cmp.compare(str(TINY), [str(copy)], threads=1, runs=1, per_round=1, engines=["ort"],
                         mbt_edge=tmp_path / "none", checkpoint=None, log=lambda _: None)
    assert [r.model for r in result.rows] == ["mbt-tiny.onnx", "copy.onnx"]
    (line,) = [p for p in result.parity if p.startswith("ort copy.onnx")]
    assert float(line.split("max |diff| ")[1].split()[0]) == 0.0


def test_max_abs_diff_needs_common_outputs():
    a = {"logits": np.array([1.0, 2.0]), "logits_audio": np.array([0.0])}
    b = {"logits": np.array([1.5, -3.0]), "other": np.array([9.0])}
    assert cmp.max_abs_diff(a, b) == (5.0, 3.0)
    with pytest.raises(ValueError):
        cmp.max_abs_diff({"x": np.zeros(1)}, {"y": np.zeros(1)})


def test_torch_model_rebuilt_from_onnx_initializers():
    pytest.importorskip("torch")
    gmacs, cfg = cmp.model_gmacs(TINY)
    ins, expected, _ = cmp.inputs_for(TINY, cfg)
    model = cmp.torch_model_from_onnx(TINY, cfg)
    got = cmp.TorchEngine.__new__(cmp.TorchEngine)
    import torch

    got.model, got.names, got.input_names, got._torch = model, model.output_names(), model.input_names(), torch
    worst, _ = cmp.max_abs_diff(got.run(ins), expected)
    assert worst < 1e-5


@pytest.mark.skipif(not (cmp.DEFAULT_MBT_EDGE.is_file() and os.access(cmp.DEFAULT_MBT_EDGE, os.X_OK)),
                    reason="no target/release/mbt-edge (cargo build --release)")
def test_tract_engine_through_the_binary(tmp_path):
    config = cmp.write_bench_config(tmp_path, TINY, threads=1)
    (timing,) = cmp.bench_round(cmp.DEFAULT_MBT_EDGE, config, runs=2, also=[])
    assert timing["runs"] == 2 and timing["median_ms"] > 0
    out = tmp_path / "r.json"
    assert cmp.main(["--model", str(TINY), "--runs", "2", "--per-round", "1", "--engines", "tract,ort",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["engine"] for r in rows) == ["ort", "tract"]
    assert np.isfinite([r["median_ms"] for r in rows]).all()
