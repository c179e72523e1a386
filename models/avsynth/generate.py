"""Generate the AV-Synth dataset from a seed by recording scenes through `mbt-edge record`.

    .venv/bin/python avsynth/generate.py --seed 0 --out /work/scratch/avsynth/data

writes two `mbt-edge record` folders, `OUT/train` and `OUT/test` (dataset format:
models/README.md), whose windows are exactly the daemon's model inputs. Each clip is one
scene (scenes.py) with its own random parameters, recorded as a `kind = "pipeline"` source
with `live = false` (generated faster than real time) for `--windows-per-clip` windows at
`--hop`. The test split draws every continuous nuisance parameter from bins the train split
never uses.

Resumable: `OUT/<split>/clips.jsonl` lists the finished clips (label, categories,
parameters); a rerun skips them, and drops the windows of a clip that was cut short before
recording it again. The clip plan depends on the seed only, so a rerun makes the same
dataset. Without `--model`, a random-weight edge-small model with the dataset's labels is
exported to `OUT/bootstrap.onnx` (mean 0 / std 1; models/README.md, "the bootstrap") to
drive `record`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent
sys.path.insert(0, str(HERE))
from scenes import LABELS, draw_scene  # noqa: E402

DEFAULT_BINARY = MODELS.parent / "target" / "release" / "mbt-edge"


def clip_plan(seed: int, split: str, clips_per_label: int) -> list[tuple[str, str, random.Random]]:
    """(clip id, label, rng) for every clip of a split, in recording order (labels interleaved)."""
    order = random.Random(f"avsynth-{seed}-{split}-order")
    labels = [lab for _ in range(clips_per_label) for lab in LABELS]
    order.shuffle(labels)
    return [(f"{split}{i:05d}", lab, random.Random(f"avsynth-{seed}-{split}-{i}")) for i, lab in enumerate(labels)]


def config_text(model: Path, hop: float, clip_id: str, scene) -> str:
    # json.dumps gives valid TOML basic strings for these ASCII descriptions.
    return (
        f"# AV-Synth clip {clip_id}: {scene.label} ({scene.visual} + {scene.sound})\n"
        f"[model]\npath = {json.dumps(str(model))}\nthreads = 1\n\n"
        f"[window]\nhop = {hop}\n\n"
        f"[[source]]\nname = {json.dumps(clip_id)}\nkind = \"pipeline\"\nlive = false\n"
        f"video_pipeline = {json.dumps(scene.video_pipeline)}\n"
        f"audio_pipeline = {json.dumps(scene.audio_pipeline)}\n"
    )


def drop_partial(folder: Path, done: set[str]) -> None:
    """Remove manifest lines (and files) of clips that are not in clips.jsonl."""
    manifest = folder / "manifest.jsonl"
    if not manifest.exists():
        return
    keep, dropped = [], 0
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("source") in done:
            keep.append(line)
        else:
            dropped += 1
            for m in ("video", "audio"):
                (folder / f"{rec['file']}.{m}.npy").unlink(missing_ok=True)
    if dropped:
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(manifest)
        print(f"{folder}: dropped {dropped} window(s) of unfinished clips")


def record_split(args, split: str, clips_per_label: int, model: Path) -> None:
    folder = Path(args.out) / split
    folder.mkdir(parents=True, exist_ok=True)
    configs = Path(args.out) / "configs"
    configs.mkdir(exist_ok=True)
    done_file = folder / "clips.jsonl"
    done = set()
    if done_file.exists():
        done = {json.loads(line)["clip"] for line in done_file.read_text().splitlines() if line.strip()}
    drop_partial(folder, done)
    plan = clip_plan(args.seed, split, clips_per_label)
    todo = [c for c in plan if c[0] not in done]
    print(f"{split}: {len(plan)} clips, {len(plan) - len(todo)} already recorded")
    t0 = time.time()
    with open(done_file, "a") as log:
        for n, (clip_id, label, rng) in enumerate(todo, 1):
            scene = draw_scene(rng, split, label)
            cfg = configs / f"{clip_id}.toml"
            cfg.write_text(config_text(model, args.hop, clip_id, scene))
            cmd = [str(args.binary), "record", "--config", str(cfg), "--source", clip_id, "--label", label,
                   "--out", str(folder), "--windows", str(args.windows_per_clip), "--log-level", "warn"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"{clip_id}: mbt-edge record failed ({res.returncode}):\n{res.stderr}\n"
                                 f"config: {cfg}")
            log.write(json.dumps({"clip": clip_id, "label": label, "visual": scene.visual, "sound": scene.sound,
                                  "params": scene.params}) + "\n")
            log.flush()
            if not args.keep_configs:
                cfg.unlink()
            if n % 100 == 0 or n == len(todo):
                print(f"{split}: {n}/{len(todo)} clips, {time.time() - t0:.0f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="dataset root: OUT/train, OUT/test")
    ap.add_argument("--train-clips", type=int, default=160, help="clips per label in the train split")
    ap.add_argument("--test-clips", type=int, default=40, help="clips per label in the test split")
    ap.add_argument("--windows-per-clip", type=int, default=2)
    ap.add_argument("--hop", type=float, default=1.28, help="seconds between the windows of a clip")
    ap.add_argument("--binary", type=Path, default=DEFAULT_BINARY, help="the mbt-edge binary")
    ap.add_argument("--model", type=Path, help="recording model (default: OUT/bootstrap.onnx, exported if missing)")
    ap.add_argument("--keep-configs", action="store_true", help="keep OUT/configs/<clip>.toml")
    ap.add_argument("--splits", default="train,test", help="which splits to record")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = out / "bootstrap.onnx"
        if not model.exists():
            subprocess.run([sys.executable, "-m", "mbt", "export", "--preset", "edge-small", "--name",
                            "avsynth-bootstrap", "--labels", ",".join(LABELS), "--out", str(model), "--no-parity"],
                           cwd=MODELS, check=True, stdout=subprocess.DEVNULL)
    model = model.resolve()
    (out / "generate.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1) + "\n")
    for split in args.splits.split(","):
        record_split(args, split, {"train": args.train_clips, "test": args.test_clips}[split], model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
