"""NumPy reference of the log-mel recipe in models/METADATA.md (non-streaming).

For parity tests against the Rust implementation (src/features) only; the daemon never
runs Python. Imports nothing but numpy.

CLI: python -m mbt.logmel IN.npy OUT.npy [--model M.onnx | --metadata M.json] [--raw]
  IN.npy: f32/f64 mono samples in [-1, 1], exactly window_seconds * sample_rate of them
  (shorter is zero-padded, longer is an error). OUT.npy: f32 [T, M]. --raw skips the
  (x - mean) / std step. Recipe parameters come from the model's `mbt` metadata, or the
  edge-small preset's defaults when neither option is given.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """[n_fft/2 + 1, n_mels] HTK triangles, no area normalisation (torchaudio
    melscale_fbanks(norm=None, mel_scale='htk'))."""
    n_freqs = n_fft // 2 + 1
    all_freqs = np.arange(n_freqs, dtype=np.float64) * sample_rate / n_fft
    m_pts = np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2)
    f_pts = mel_to_hz(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]  # [n_mels + 1]
    slopes = f_pts[None, :] - all_freqs[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up))


def hann_periodic(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n, dtype=np.float64) / n)


def log_mel(
    samples: np.ndarray,
    *,
    sample_rate: int = 16000,
    n_frames: int | None = None,
    win_length: int = 400,
    hop_length: int = 160,
    n_fft: int = 512,
    n_mels: int = 128,
    fmin: float = 0.0,
    fmax: float = 8000.0,
    power: float = 2.0,
    log_offset: float = 1e-6,
    mean: float = 0.0,
    std: float = 1.0,
    window: str = "hann",
    mel_scale: str = "htk",
) -> np.ndarray:
    """Samples [S] -> f32 [T, n_mels]. T defaults to S / hop_length (the window's frame
    count, METADATA.md); frames reaching past the end see zeros. Computed in float64."""
    if window != "hann" or mel_scale != "htk":
        raise ValueError("only window='hann' and mel_scale='htk' are defined")
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    if n_frames is None:
        n_frames = int(round(x.shape[0] / hop_length))
    need = (n_frames - 1) * hop_length + win_length
    padded = np.zeros(max(need, x.shape[0]), dtype=np.float64)
    padded[: x.shape[0]] = x
    idx = np.arange(n_frames)[:, None] * hop_length + np.arange(win_length)[None, :]
    frames = padded[idx] * hann_periodic(win_length)[None, :]
    spec = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** power  # [T, n_fft/2 + 1]
    mel = spec @ mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
    out = (np.log(mel + log_offset) - mean) / std
    return out.astype(np.float32)


def recipe_from_metadata(md: dict, raw: bool = False) -> dict:
    a = md["audio"]
    kw = {k: a[k] for k in ("sample_rate", "n_frames", "win_length", "hop_length", "n_fft", "n_mels",
                            "fmin", "fmax", "power", "log_offset", "window", "mel_scale")}
    kw["mean"], kw["std"] = (0.0, 1.0) if raw else (a["mean"], a["std"])
    return kw


def _metadata_from_onnx(path: str) -> dict:
    import onnx

    model = onnx.load(path, load_external_data=False)
    for p in model.metadata_props:
        if p.key == "mbt":
            return json.loads(p.value)
    raise SystemExit(f"{path}: no 'mbt' metadata property")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mbt.logmel", description="log-mel reference (METADATA.md)")
    ap.add_argument("input")
    ap.add_argument("output")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="read the recipe from this ONNX file's mbt metadata")
    src.add_argument("--metadata", help="read the recipe from this mbt metadata JSON file")
    ap.add_argument("--raw", action="store_true", help="skip (x - mean) / std")
    args = ap.parse_args(argv)
    if args.model:
        md = _metadata_from_onnx(args.model)
    elif args.metadata:
        with open(args.metadata) as f:
            md = json.load(f)
    else:
        from .config import edge_small

        md = edge_small().metadata()
    kw = recipe_from_metadata(md, raw=args.raw)
    x = np.load(args.input)
    want = int(round(md["window_seconds"] * kw["sample_rate"]))
    if x.reshape(-1).shape[0] > want:
        raise SystemExit(f"{args.input}: {x.size} samples, the window holds {want}")
    np.save(args.output, log_mel(x, **kw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
