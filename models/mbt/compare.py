"""`python -m mbt compare`: one ONNX model, the same inputs, timed in the daemon's runtime
(tract, through `mbt-edge bench`), in onnxruntime and, where it can be built, in PyTorch;
runs alternate engine by engine in rounds so that a busy neighbour on a shared machine
affects each alike. Prints medians, p90, ratios against onnxruntime, the analytic MAC rate
(mbt/flops.py, from the model's `mbt` metadata) against this CPU's peak, and output parity.

    python -m mbt compare --model avsynth-edge.onnx --threads 1 --runs 30
    python -m mbt compare --model a.onnx --variant b.onnx      # b timed beside a, parity b vs a

Engines:
- `tract`: `mbt-edge bench --config C --json --runs P [--also VARIANT ...]` with a temporary
  config (`[model] path, runtime = "cpu", threads`): the daemon's own loading (decluttered,
  batch symbol set to 1, tract's CPU runtime). bench feeds its own synthetic windows through
  the daemon's featurizer; only timing comes back, never logits.
- `ort`: onnxruntime CPU EP, intra-op threads = --threads, inter-op 1, sequential.
- `torch`: `mbt.model.MBT` with the weights of --checkpoint, or rebuilt from the ONNX file's
  initializers (they keep the PyTorch parameter names; weight matmuls are transposed), needs
  torch; skipped when torch is missing or the graph does not map onto MBT.
- `tract-py` (off unless named in --engines): the `tract` Python bindings, when installed.

Statistics: every engine is timed in rounds of --per-round runs (tract's bench adds two
untimed warm-up runs per round); a round gives a median, a p90 and a min (bench's
definition: sorted samples, index round((n-1)q)); the table shows the median over rounds
of the round medians, the median of the round p90s and the min of the round mins: the
same estimator for every engine.

Parity (same invocation): onnxruntime against the model's parity fixture (`NAME.parity/`,
the PyTorch outputs written at export) when there is one; variants against the model in
onnxruntime; torch and tract-py against the same. The daemon's tract is checked against the
fixture by `cargo test --release --test model` (tests/model.rs): bench cannot return logits.

Peak: threads x clock x FMA units x f32 lanes x 2 FLOP, clock from /proc/cpuinfo (`cpu MHz`,
the nominal clock on a VM; --clock-ghz overrides), lanes 16 with avx512f, 8 with avx2/fma,
2 FMA units (--fma-units). MACs follow mbt/flops.py (1 MAC = 1 FLOP, as the paper counts);
the table prints GMAC/s and GFLOP/s = 2 x GMAC/s against the peak in FLOP/s.

Torch-free except for the torch engine; needs numpy, onnx, onnxruntime.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MBT_EDGE = REPO / "target" / "release" / "mbt-edge"
ENGINES = ("tract", "ort", "torch", "tract-py")
OUTPUTS = ("logits", "logits_audio", "logits_video")


# ---- statistics and the table (pure) --------------------------------------------------

def pick(sorted_samples: list[float], q: float) -> float:
    """The sample at index round((n-1) q) of sorted samples (`mbt-edge bench`'s rule)."""
    return sorted_samples[int(round((len(sorted_samples) - 1) * q))]


def round_stats(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    return {"runs": len(s), "median_ms": pick(s, 0.5), "p90_ms": pick(s, 0.9), "min_ms": s[0]}


def summarize(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Rounds (each median/p90/min/runs) to one row: median of medians, median of p90s,
    min of mins, total runs."""
    return {
        "median_ms": statistics.median(r["median_ms"] for r in rounds),
        "p90_ms": statistics.median(r["p90_ms"] for r in rounds),
        "min_ms": min(r["min_ms"] for r in rounds),
        "runs": int(sum(r["runs"] for r in rounds)),
        "rounds": len(rounds),
    }


@dataclass
class Peak:
    threads: int
    clock_ghz: float
    fma_units: int
    lanes: int
    clock_source: str = ""

    @property
    def gflops(self) -> float:
        """Peak f32 FLOP/s in G: threads x clock x FMA units x lanes x 2 (an FMA is 2 FLOP)."""
        return self.threads * self.clock_ghz * self.fma_units * self.lanes * 2

    def formula(self) -> str:
        return (f"{self.threads} thread(s) x {self.clock_ghz:.2f} GHz x {self.fma_units} FMA units x "
                f"{self.lanes} f32 lanes x 2 FLOP = {self.gflops:.1f} GFLOP/s")


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, object]:
    """Model name, clock (MHz, first `cpu MHz`), flags of the first processor."""
    info: dict[str, object] = {"model": "unknown", "mhz": None, "flags": set()}
    try:
        text = Path(path).read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name" and info["model"] == "unknown":
            info["model"] = val
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(val)
        elif key == "flags" and not info["flags"]:
            info["flags"] = set(val.split())
    return info


def peak_for(threads: int, info: dict[str, object], clock_ghz: float | None = None,
             fma_units: int = 2) -> Peak:
    flags = info.get("flags") or set()
    lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "fma" in flags) else 4
    if clock_ghz is not None:
        return Peak(threads, clock_ghz, fma_units, lanes, "--clock-ghz")
    mhz = info.get("mhz")
    if mhz:
        return Peak(threads, float(mhz) / 1e3, fma_units, lanes, "/proc/cpuinfo cpu MHz")
    return Peak(threads, 2.0, fma_units, lanes, "assumed 2.0 GHz")


@dataclass
class Row:
    engine: str
    model: str
    summary: dict[str, float]
    note: str = ""


def format_table(rows: list[Row], gmacs: float, peak: Peak, reference: str = "ort") -> str:
    """One line per (engine, model): median, p90, min, ratio of medians to the reference
    engine on the first model, GMAC/s and GFLOP/s (2 FLOP per MAC) and % of peak FLOP/s."""
    ref = next((r for r in rows if r.engine == reference), None)
    ref_ms = ref.summary["median_ms"] if ref else None
    head = (f"{'engine':<9} {'model':<28} {'median ms':>10} {'p90 ms':>9} {'min ms':>9} "
            f"{'x ' + reference:>7} {'GMAC/s':>8} {'GFLOP/s':>8} {'% peak':>7}  runs")
    lines = [head, "-" * len(head)]
    for r in rows:
        med = r.summary["median_ms"]
        ratio = f"{med / ref_ms:.2f}" if ref_ms else "-"
        rate = gmacs / (med / 1e3)
        lines.append(
            f"{r.engine:<9} {r.model[:28]:<28} {med:>10.2f} {r.summary['p90_ms']:>9.2f} "
            f"{r.summary['min_ms']:>9.2f} {ratio:>7} {rate:>8.1f} {2 * rate:>8.1f} "
            f"{100 * 2 * rate / peak.gflops:>6.1f}%  {r.summary['runs']}"
            + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float]:
    """Worst |a - b| over the outputs both have, and the largest |b| (for a relative figure)."""
    common = [name for name in OUTPUTS if name in a and name in b]
    if not common:
        raise ValueError(f"no common outputs: {sorted(a)} vs {sorted(b)}")
    worst = max(float(np.max(np.abs(a[n] - b[n]))) for n in common)
    scale = max(float(np.max(np.abs(b[n]))) for n in common)
    return worst, scale


# ---- engines ------------------------------------------------------------------------

def model_gmacs(path: str | os.PathLike) -> tuple[float, object]:
    from .config import MBTConfig
    from .export import read_metadata
    from .flops import macs

    cfg = MBTConfig.from_metadata(read_metadata(path))
    return macs(cfg)["total"] / 1e9, cfg


def inputs_for(path: str | os.PathLike, cfg, batch: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Inputs (and expected outputs, if any) from the model's parity fixture, else seeded
    random ones as export.py makes them. `batch` None keeps the fixture's batch."""
    from .export import parity_dir, parity_inputs

    pdir = parity_dir(path)
    names = [m for m in ("video", "audio") if m in cfg.modalities]
    if pdir.is_dir() and all((pdir / f"{n}.npy").exists() for n in names):
        ins = {n: np.load(pdir / f"{n}.npy") for n in names}
        outs = {n: np.load(pdir / f"{n}.npy") for n in OUTPUTS if (pdir / f"{n}.npy").exists()}
        if batch is not None:
            ins = {k: v[:batch] for k, v in ins.items()}
            outs = {k: v[:batch] for k, v in outs.items()}
        return ins, outs, f"fixture {pdir.name}"
    return parity_inputs(cfg, batch or 2, 0), {}, "seeded random (no fixture)"


class OrtEngine:
    def __init__(self, path: str | os.PathLike, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        self.version = ort.__version__

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.sess.run(self.names, inputs)))


class TractPyEngine:
    """The `tract` Python bindings, loaded as src/model/runtime.rs loads a model."""

    def __init__(self, path: str | os.PathLike, batch: int = 1):
        import tract
        from tract.transform import SetSymbols

        import onnx

        # tract names outputs after their nodes; their order is the graph's.
        graph = onnx.load(str(path), load_external_data=False).graph
        self.names = [o.name for o in graph.output]
        model = tract.onnx().load(str(path)).into_model()
        model.transform(SetSymbols({"batch": batch}))
        if model.output_count() != len(self.names):
            raise ValueError(f"tract sees {model.output_count()} outputs, the graph has {len(self.names)}")
        self.input_names = [model.input_name(i) for i in range(model.input_count())]
        self.runnable = model.into_runnable()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.runnable.run([inputs[n] for n in self.input_names])
        return {n: o.to_numpy() for n, o in zip(self.names, outs)}


def torch_model_from_onnx(path: str | os.PathLike, cfg):
    """An `mbt.model.MBT` with the weights of an ONNX file that export.py wrote: initializers
    named after PyTorch parameters are taken as they are; a weight matmul `/<module>/MatMul`
    (or a `Gemm`/`Conv` of a module) gives `<module>.weight` (matmuls transposed back,
    the per-frame 2D video convolution unsqueezed back to 3D). Strict: raises when the graph
    does not map onto MBT."""
    import onnx
    import torch
    from onnx import numpy_helper

    from .model import MBT

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    # The exporter keeps one of several equal initializers and names the others with
    # Identity nodes (e.g. LayerNorm ones at random init).
    for node in m.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    model = MBT(cfg)
    want = model.state_dict()
    state = {k: torch.from_numpy(np.array(v)) for k, v in inits.items() if k in want}
    # Weights the graph renamed (transposed matmul weights, the 2D video kernel) are found
    # through the node that uses them.
    for node in m.graph.node:
        module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        module = module.replace("video_embed", "video_embed.proj") if module == "video_embed" else module
        for slot, suffix in ((1, "weight"), (2, "bias")):
            key = f"{module}.{suffix}"
            if key not in want or key in state or len(node.input) <= slot or node.input[slot] not in inits:
                continue
            w = np.array(inits[node.input[slot]])
            if suffix == "weight" and node.op_type == "MatMul":
                w = w.T
            elif suffix == "weight" and node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                w = w if trans_b else w.T
            state[key] = torch.from_numpy(np.ascontiguousarray(w.reshape(want[key].shape)))
    model.load_state_dict(state, strict=True)
    return model.eval()


class TorchEngine:
    def __init__(self, path: str | os.PathLike, cfg, threads: int, checkpoint: str | None = None):
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        if checkpoint:
            from .export import load_checkpoint_model

            self.model = load_checkpoint_model(checkpoint).eval()
            self.source = f"checkpoint {Path(checkpoint).name}"
        else:
            self.model = torch_model_from_onnx(path, cfg)
            self.source = "weights from the ONNX initializers"
        self.names = self.model.output_names()
        self.input_names = self.model.input_names()
        self.version = torch.__version__
        self._torch = torch

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            outs = self.model(*(self._torch.from_numpy(inputs[n]) for n in self.input_names))
        return {n: o.numpy() for n, o in zip(self.names, outs)}


def time_runs(fn: Callable[[], object], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


def write_bench_config(directory: Path, model: str | os.PathLike, threads: int) -> Path:
    """The smallest config `mbt-edge bench` accepts: a [model] table (no source needed)."""
    path = directory / "config.toml"
    model_path = str(Path(model).resolve()).replace("\\", "\\\\").replace('"', '\\"')
    path.write_text(f'[model]\npath = "{model_path}"\nruntime = "cpu"\nthreads = {threads}\n')
    return path


def bench_round(exe: str | os.PathLike, config: Path, runs: int, also: list[str]) -> list[dict]:
    """One `mbt-edge bench --json` call; per model (config's first, then --also) its batch-1
    timing dict (runs, median_ms, p90_ms, min_ms)."""
    cmd = [str(exe), "bench", "--config", str(config), "--json", "--runs", str(runs)]
    for path in also:
        cmd += ["--also", str(Path(path).resolve())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    report = json.loads(proc.stdout)
    return [m["batches"][0]["timing"] for m in report["models"]]


# ---- the command ----------------------------------------------------------------------

@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    parity: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compare(model: str, variants: list[str], threads: int, runs: int, per_round: int,
            engines: list[str], mbt_edge: str | os.PathLike, checkpoint: str | None,
            log: Callable[[str], None] = print, warmup: int = 3) -> Comparison:
    result = Comparison()
    models = [model] + list(variants)
    label = {p: Path(p).name for p in models}
    if len(set(label.values())) < len(models):
        label = {p: str(p) for p in models}
    gmacs, cfg = model_gmacs(model)
    feed, expected, feed_source = inputs_for(model, cfg, batch=1)
    parity_in, parity_expected, _ = inputs_for(model, cfg)
    result.notes.append(f"timing inputs: batch 1 from {feed_source} (tract: bench's synthetic windows)")

    timed: dict[tuple[str, str], tuple[Callable[[], object], list[dict]]] = {}
    outputs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    if "ort" in engines:
        for p in models:
            eng = OrtEngine(p, threads)
            outputs[("ort", p)] = eng.run(parity_in)
            timed[("ort", p)] = (lambda e=eng: e.run(feed), [])
        result.notes.append(f"ort: onnxruntime {eng.version}, CPU EP, intra {threads}, inter 1, sequential")
    if "torch" in engines:
        try:
            eng = TorchEngine(model, cfg, threads, checkpoint)
        except Exception as err:  # noqa: BLE001 - any failure means: no PyTorch row
            result.notes.append(f"torch: skipped ({type(err).__name__}: {str(err)[:200]})")
        else:
            outputs[("torch", model)] = eng.run(parity_in)
            timed[("torch", model)] = (lambda e=eng: e.run(feed), [])
            result.notes.append(f"torch: {eng.version}, mbt.model.MBT, {eng.source}, {threads} thread(s)")
    if "tract-py" in engines:
        try:
            import tract  # noqa: F401
        except ImportError:
            result.notes.append("tract-py: skipped (the `tract` Python package is not installed)")
        else:
            for p in models:
                outputs[("tract-py", p)] = TractPyEngine(p, batch=len(next(iter(parity_in.values())))).run(parity_in)
                eng = TractPyEngine(p, batch=1)
                timed[("tract-py", p)] = (lambda e=eng: e.run(feed), [])
            result.notes.append("tract-py: tract Python bindings (1 thread whatever --threads says)")
    for fn, _ in timed.values():
        for _ in range(warmup):
            fn()

    bench_rounds: list[list[dict]] | None = None
    tmp = None
    if "tract" in engines:
        exe = Path(mbt_edge)
        if not exe.is_file() or not os.access(exe, os.X_OK):
            result.notes.append(f"tract: skipped (no executable {exe}; build it or pass --mbt-edge)")
        else:
            tmp = tempfile.TemporaryDirectory(prefix="mbt-compare-")
            config = write_bench_config(Path(tmp.name), model, threads)
            bench_rounds = []
            result.notes.append(f"tract: {exe} bench (the daemon's runtime), threads = {threads}, "
                                f"2 warm-up runs per round")

    n_rounds = max(1, math.ceil(runs / per_round))
    try:
        for k in range(n_rounds):
            if bench_rounds is not None:
                bench_rounds.append(bench_round(mbt_edge, config, per_round, variants))
            for fn, rounds in timed.values():
                rounds.append(round_stats(time_runs(fn, per_round)))
            log(f"round {k + 1}/{n_rounds} done, load average {os.getloadavg()[0]:.2f}")
    finally:
        if tmp is not None:
            tmp.cleanup()

    order = ["tract", "ort", "torch", "tract-py"]
    for engine in order:
        for p in models:
            if engine == "tract" and bench_rounds:
                idx = models.index(p)
                result.rows.append(Row("tract", label[p], summarize([r[idx] for r in bench_rounds])))
            elif (engine, p) in timed:
                result.rows.append(Row(engine, label[p], summarize(timed[(engine, p)][1])))
    result.rows.sort(key=lambda r: (r.engine != "ort", order.index(r.engine), models.index(
        next(p for p in models if label[p] == r.model))))

    # Parity on the fixture batch.
    base = outputs.get(("ort", model))
    if base is not None and parity_expected:
        worst, scale = max_abs_diff(base, parity_expected)
        result.parity.append(f"ort {label[model]} vs fixture (PyTorch at export): max |diff| {worst:.2e} "
                             f"(largest |logit| {scale:.2f})")
    for (engine, p), outs in outputs.items():
        if (engine, p) == ("ort", model):
            continue
        ref, ref_name = (base, f"ort {label[model]}") if base is not None else (parity_expected, "fixture")
        if ref:
            worst, scale = max_abs_diff(outs, ref)
            result.parity.append(f"{engine} {label[p]} vs {ref_name}: max |diff| {worst:.2e} "
                                 f"(largest |logit| {scale:.2f})")
    if "tract" in engines:
        result.parity.append("tract (the daemon's): `cargo test --release --test model` compares it "
                             "with the fixture (bench returns timings only)")
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mbt compare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the ONNX model (with `mbt` metadata)")
    ap.add_argument("--variant", action="append", default=[],
                    help="another ONNX file of the same model, timed beside it (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per engine and model")
    ap.add_argument("--per-round", type=int, default=5, help="runs per engine in one round")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed runs per in-process engine before the rounds (default 3)")
    ap.add_argument("--engines", default="tract,ort,torch",
                    help=f"comma-separated, of {','.join(ENGINES)} (default tract,ort,torch)")
    ap.add_argument("--mbt-edge", default=str(DEFAULT_MBT_EDGE),
                    help="the mbt-edge binary (default: target/release/mbt-edge of this repository)")
    ap.add_argument("--checkpoint", help="a train.py checkpoint for the torch engine")
    ap.add_argument("--clock-ghz", type=float, help="clock for the peak (default: /proc/cpuinfo)")
    ap.add_argument("--fma-units", type=int, default=2, help="FMA units per core for the peak (default 2)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}")
    per_round = max(1, min(args.per_round, args.runs))

    info = cpu_info()
    peak = peak_for(args.threads, info, args.clock_ghz, args.fma_units)
    load_before = os.getloadavg()
    gmacs, _ = model_gmacs(args.model)
    print(f"model {args.model}: {gmacs:.3f} GMAC per window (mbt/flops.py)")
    print(f"cpu: {info['model']}, {os.cpu_count()} logical; peak f32 {peak.formula()} "
          f"(clock: {peak.clock_source})")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    result = compare(args.model, args.variant, args.threads, args.runs, per_round, engines,
                     args.mbt_edge, args.checkpoint, log=lambda s: print(s, file=sys.stderr),
                     warmup=args.warmup)
    load_after = os.getloadavg()
    print()
    print(format_table(result.rows, gmacs, peak))
    print()
    print("\n".join(result.notes))
    print("statistics: median of per-round medians, median of per-round p90s, min of mins; "
          f"{per_round} runs per round")
    print("parity:")
    print("\n".join("  " + p for p in result.parity) or "  (none)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "variants": args.variant, "threads": args.threads, "gmacs": gmacs,
            "peak_gflops": peak.gflops, "peak_formula": peak.formula(), "cpu": info["model"],
            "load_before": load_before, "load_after": load_after,
            "rows": [{"engine": r.engine, "model": r.model, **r.summary} for r in result.rows],
            "parity": result.parity, "notes": result.notes,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
