"""Write image grids as PNG with NumPy and zlib only (no PIL here): for looking at scenes.

`python pngsheet.py OUT.png RAW WIDTH HEIGHT [--frames N]` turns a raw RGB file into a row of frames;
`python pngsheet.py OUT.png --windows DIR [--per-label K]` shows recorded windows (each row: the 8 frames
of one window and its log-mel).
"""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """rgb: uint8 [H, W, 3]."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def grid(rows: list[list[np.ndarray]], pad: int = 2, scale: int = 2) -> np.ndarray:
    """rows of uint8 [H, W, 3] tiles -> one image, tiles upscaled by `scale`."""
    tiles = [[t.repeat(scale, 0).repeat(scale, 1) for t in r] for r in rows]
    th = max(t.shape[0] for r in tiles for t in r)
    tw = max(t.shape[1] for r in tiles for t in r)
    ncol = max(len(r) for r in tiles)
    out = np.full((len(tiles) * (th + pad) + pad, ncol * (tw + pad) + pad, 3), 128, np.uint8)
    for i, r in enumerate(tiles):
        for j, t in enumerate(r):
            y, x = pad + i * (th + pad), pad + j * (tw + pad)
            out[y: y + t.shape[0], x: x + t.shape[1]] = t
    return out


def window_frames(video: np.ndarray, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> list[np.ndarray]:
    """[F, 3, H, W] normalised -> F uint8 [H, W, 3]."""
    m = np.asarray(mean, np.float32)[None, :, None, None]
    s = np.asarray(std, np.float32)[None, :, None, None]
    x = np.clip((video * s + m) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return [f.transpose(1, 2, 0) for f in x]


def mel_tile(mel: np.ndarray, size: int = 64) -> np.ndarray:
    """[T, M] standardised log-mel -> uint8 [size, size, 3] grey image, time left to right,
    low mel bins at the bottom, contrast stretched per window (1st..99th percentile)."""
    lo, hi = np.percentile(mel[:, 1:], [1, 99])
    x = np.clip((mel - lo) / max(hi - lo, 1e-6), 0, 1).T[::-1]
    t, f = x.shape[1] // size, x.shape[0] // size
    x = x[: size * f, : size * t].reshape(size, f, size, t).mean((1, 3))
    return np.repeat((x * 255).astype(np.uint8)[:, :, None], 3, 2)


def main(argv: list[str]) -> int:
    out = argv[0]
    if argv[1] == "--windows":
        root = Path(argv[2])
        k = int(argv[argv.index("--per-label") + 1]) if "--per-label" in argv else 2
        feats = json.loads((root / "features.json").read_text())
        v = feats["video"]
        seen: dict[str, int] = {}
        rows = []
        for line in (root / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if seen.get(rec["label"], 0) >= k:
                continue
            seen[rec["label"]] = seen.get(rec["label"], 0) + 1
            row = window_frames(np.load(root / f"{rec['file']}.video.npy"), v["mean"], v["std"])
            audio = root / f"{rec['file']}.audio.npy"
            if audio.exists():
                row.append(mel_tile(np.load(audio)))
            rows.append(row)
            print(len(rows) - 1, rec["label"], rec["file"])
        write_png(out, grid(rows))
    else:
        raw, w, h = argv[1], int(argv[2]), int(argv[3])
        n = int(argv[argv.index("--frames") + 1]) if "--frames" in argv else 8
        data = np.fromfile(raw, np.uint8)
        frames = data[: (data.size // (w * h * 3)) * w * h * 3].reshape(-1, h, w, 3)
        step = max(1, len(frames) // n)
        write_png(out, grid([list(frames[::step][:n])]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
