"""Look at AV-Synth scenes without mbt-edge: render a few scenes per label with gst-launch
(the daemon's conversion: RGB 64x64, mono F32 16 kHz) into one PNG per split: per scene a row
of the 8 frames of a 2.56 s window and its log-mel (time left to right, low mels at the bottom).

    python avsynth/preview.py --seed 1 --per-label 2 --out /tmp/look
"""
from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mbt.logmel import log_mel  # noqa: E402
from pngsheet import grid, write_png  # noqa: E402
from scenes import LABELS, SAMPLE_RATE, draw_scene  # noqa: E402

WINDOW = 2.56
FRAMES = 8


def render(scene, tmp: Path) -> tuple[list[np.ndarray], np.ndarray]:
    fps = scene.params["fps"]
    nv = math.ceil(WINDOW * fps) + 1
    video = scene.video_pipeline.replace("is-live=false", f"is-live=false num-buffers={nv}")
    vraw = tmp / "v.raw"
    subprocess.run(f"gst-launch-1.0 -q {video} ! videoconvert ! videoscale ! "
                   f"video/x-raw,format=RGB,width=64,height=64 ! filesink location={vraw}", shell=True, check=True)
    frames = np.fromfile(vraw, np.uint8).reshape(-1, 64, 64, 3)
    pick = [min(len(frames) - 1, round((j + 0.5) * WINDOW / FRAMES * fps)) for j in range(FRAMES)]
    na = math.ceil(WINDOW * SAMPLE_RATE / 1024)
    audio = scene.audio_pipeline.replace("is-live=false", f"is-live=false num-buffers={na}")
    araw = tmp / "a.raw"
    subprocess.run(f"gst-launch-1.0 -q {audio} ! audioconvert ! audio/x-raw,format=F32LE,channels=1,rate={SAMPLE_RATE} ! "
                   f"filesink location={araw}", shell=True, check=True)
    samples = np.fromfile(araw, np.float32)[: round(WINDOW * SAMPLE_RATE)]
    return [frames[i] for i in pick], log_mel(samples)


def mel_image(mel: np.ndarray, height: int = 64) -> np.ndarray:
    """[T, M] log-mel -> uint8 [M/2, T/2, 3] image (low mels at the bottom)."""
    x = np.clip((mel - np.log(1e-6) * 0 + 14.0) / 18.0, 0, 1)  # ln power roughly -14 .. 4
    img = (x.T[::-1] * 255).astype(np.uint8)
    img = img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2).mean((1, 3)).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-label", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--labels", default=",".join(LABELS))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rng = random.Random(f"{a.seed}-{split}")
        rows = []
        with tempfile.TemporaryDirectory() as t:
            for label in a.labels.split(","):
                for _ in range(a.per_label):
                    scene = draw_scene(rng, split, label)
                    frames, mel = render(scene, Path(t))
                    rows.append(frames + [mel_image(mel)])
                    print(split, len(rows) - 1, label, scene.params)
        write_png(out / f"{split}.png", grid(rows, scale=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
