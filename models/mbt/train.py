"""Train an MBT on windows written by `mbt-edge record` (dataset format: models/README.md).

The windows are the daemon's own model inputs, so training and serving see identical
preprocessing. Options follow the paper/scenic: mixup or modality mixup, SpecAugment,
plus modality dropout (a sense zeroed per sample) so the model degrades gracefully when
a camera or microphone is lost. Loss: mean of the per-modality losses (scenic).
A checkpoint is written every epoch (RUN/last.pt, RUN/best.pt); --resume continues.
Evaluation reports fused, per-head (audio CLS / video CLS) and one-sense-lost scores
(the other sense zeroed: fused logits, and the surviving sense's head): top-1 accuracy
for single-label models, mAP for multi-label ones.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import MBTConfig, preset

FEATURES_FILE = "features.json"
MANIFEST_FILE = "manifest.jsonl"


# ---- dataset ---------------------------------------------------------------------------

@dataclass
class Window:
    stem: str
    labels: list[str]
    source: str | None


class WindowDataset:
    """A `mbt-edge record` folder: features.json, manifest.jsonl, <stem>.{video,audio}.npy."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / MANIFEST_FILE
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest}: missing (is this an `mbt-edge record` folder?)")
        feats = self.root / FEATURES_FILE
        self.features = json.loads(feats.read_text()) if feats.exists() else None
        self.windows: list[Window] = []
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            label = rec["label"]
            labels = [label] if isinstance(label, str) else list(label)
            if "file" not in rec:
                raise ValueError(f"{manifest}:{n}: no 'file'")
            self.windows.append(Window(rec["file"], labels, rec.get("source")))
        self.multi_label = any(len(w.labels) != 1 for w in self.windows)

    def __len__(self) -> int:
        return len(self.windows)

    def labels(self) -> list[str]:
        return sorted({lab for w in self.windows for lab in w.labels})

    def load(self, i: int, modality: str) -> np.ndarray:
        return np.load(self.root / f"{self.windows[i].stem}.{modality}.npy")


def split_indices(ds: WindowDataset, val_fraction: float) -> tuple[list[int], list[int]]:
    """Per label (first label of a window), the last `val_fraction` of its windows in
    manifest order go to validation: windows recorded one after another overlap, so a
    random split would leak."""
    by_label: dict[str, list[int]] = {}
    for i, w in enumerate(ds.windows):
        by_label.setdefault(w.labels[0], []).append(i)
    train, val = [], []
    for idx in by_label.values():
        k = int(math.ceil(len(idx) * val_fraction)) if val_fraction > 0 and len(idx) > 1 else 0
        train += idx[: len(idx) - k]
        val += idx[len(idx) - k:]
    return sorted(train), sorted(val)


def config_for(ds: WindowDataset, base: MBTConfig, labels: list[str], multi_label: bool) -> MBTConfig:
    """The model config: `base` (preset + --config) with the dataset's preprocessing."""
    changes: dict = {"labels": labels, "multi_label": multi_label}
    md = ds.features
    if md is not None:
        changes["window_seconds"] = md["window_seconds"]
        mods = []
        if "video" in md:
            v = md["video"]
            mods.append("video")
            changes.update(frames=v["frames"], height=v["height"], width=v["width"],
                           video_mean=tuple(v["mean"]), video_std=tuple(v["std"]))
        if "audio" in md:
            a = md["audio"]
            mods.append("audio")
            changes.update(
                sample_rate=a["sample_rate"], n_frames=a["n_frames"], n_mels=a["n_mels"],
                win_length=a["win_length"], hop_length=a["hop_length"], n_fft=a["n_fft"],
                window=a["window"], mel_scale=a["mel_scale"], fmin=a["fmin"], fmax=a["fmax"],
                power=a["power"], log_offset=a["log_offset"], audio_mean=a["mean"], audio_std=a["std"],
            )
        changes["modalities"] = tuple(m for m in base.modalities if m in mods) or tuple(mods)
    return base.replace(**changes).validate()


def audio_statistics(ds: WindowDataset, indices: list[int], mean0: float, std0: float) -> tuple[float, float]:
    """Global mean/std of the raw log-mel (x * std0 + mean0) over `indices`."""
    s = s2 = 0.0
    n = 0
    for i in indices:
        raw = ds.load(i, "audio").astype(np.float64) * std0 + mean0
        s += raw.sum()
        s2 += (raw * raw).sum()
        n += raw.size
    mean = s / n
    return float(mean), float(math.sqrt(max(s2 / n - mean * mean, 1e-12)))


# ---- metrics ----------------------------------------------------------------------------

def top1(logits: np.ndarray, targets: np.ndarray) -> float:
    return float((logits.argmax(1) == targets.argmax(1)).mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    aps = []
    for c in range(targets.shape[1]):
        pos = targets[:, c] > 0.5
        if not pos.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = pos[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float(precision[hits].mean()))
    return float(np.mean(aps)) if aps else float("nan")


# ---- training ---------------------------------------------------------------------------

def _batches(indices: list[int], batch_size: int, rng: np.random.Generator | None):
    order = np.array(indices)
    if rng is not None:
        order = rng.permutation(order)
    for s in range(0, len(order), batch_size):
        yield order[s: s + batch_size].tolist()


class Trainer:
    def __init__(self, args, ds: WindowDataset, cfg: MBTConfig, train_idx, val_ds, val_idx, audio_affine):
        import torch

        from .model import MBT

        self.torch = torch
        self.args = args
        self.ds, self.cfg = ds, cfg
        self.train_idx, self.val_ds, self.val_idx = train_idx, val_ds, val_idx
        self.audio_affine = audio_affine  # (a, b): x -> a * x + b, re-standardisation
        self.label_index = {lab: i for i, lab in enumerate(cfg.labels)}
        self.model = MBT(cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.steps_per_epoch = max(1, math.ceil(len(train_idx) / args.batch_size))
        self.total_steps = self.steps_per_epoch * args.epochs
        self.step = 0
        self.epoch = 0
        self.best = -float("inf")
        self.history: list[dict] = []
        self.rng = np.random.default_rng(args.seed)

    # -- data --
    def batch(self, ds: WindowDataset, idx: list[int]):
        torch = self.torch
        xs = {}
        for m in self.model.modalities:
            arr = np.stack([ds.load(i, m) for i in idx]).astype(np.float32)
            if m == "audio" and self.audio_affine is not None:
                a, b = self.audio_affine
                arr = arr * a + b
            want = (self.cfg.frames, 3, self.cfg.height, self.cfg.width) if m == "video" else (self.cfg.n_frames, self.cfg.n_mels)
            if arr.shape[1:] != want:
                raise ValueError(f"{ds.root}: {m} windows are {arr.shape[1:]}, the model takes {want}")
            xs[m] = torch.from_numpy(arr)
        y = np.zeros((len(idx), self.cfg.classes), np.float32)
        for r, i in enumerate(idx):
            for lab in ds.windows[i].labels:
                if lab in self.label_index:
                    y[r, self.label_index[lab]] = 1.0
        return xs, torch.from_numpy(y)

    # -- augmentation --
    def augment(self, xs, y):
        torch, a, rng = self.torch, self.args, self.rng
        n = y.shape[0]
        if "audio" in xs and a.specaugment:
            x = xs["audio"].clone()
            t_len, f_len = x.shape[1], x.shape[2]
            for r in range(n):
                for _ in range(a.time_masks):
                    w = int(rng.integers(0, a.time_mask_width + 1))
                    s = int(rng.integers(0, max(1, t_len - w)))
                    x[r, s: s + w] = 0.0
                for _ in range(a.freq_masks):
                    w = int(rng.integers(0, a.freq_mask_width + 1))
                    s = int(rng.integers(0, max(1, f_len - w)))
                    x[r, :, s: s + w] = 0.0
            xs["audio"] = x
        if "audio" in xs and (a.freq_shift > 0 or a.time_stretch > 0):
            xs["audio"] = self.warp_audio(xs["audio"])
        if len(xs) == 2 and a.modality_dropout > 0:
            drop = rng.random(n) < a.modality_dropout
            which = rng.random(n) < 0.5  # True: lose video, False: lose audio
            for m, sel in (("video", drop & which), ("audio", drop & ~which)):
                if sel.any():
                    x = xs[m].clone()
                    x[torch.from_numpy(sel)] = 0.0
                    xs[m] = x
        ys = {m: y for m in xs}
        if a.mixup > 0 and n > 1:
            perm = torch.from_numpy(rng.permutation(n))
            lam_shared = float(rng.beta(a.mixup, a.mixup))
            for m in list(xs):
                lam = float(rng.beta(a.mixup, a.mixup)) if a.modality_mixup else lam_shared
                xs[m] = lam * xs[m] + (1 - lam) * xs[m][perm]
                ys[m] = lam * y + (1 - lam) * y[perm]
        return xs, ys

    def warp_audio(self, x):
        """Per window: stretch the log-mel in time by a factor in [1/(1+s), 1+s] (linear
        interpolation; cropped, or padded with its last frame, back to T frames) and shift it
        by up to `--freq-shift` mel bins (exposed bins repeat the edge bin). Shifts and
        stretches fill the gaps between the frequencies, rates and durations seen in training."""
        torch, a, rng = self.torch, self.args, self.rng
        n, t_len, f_len = x.shape
        out = torch.empty_like(x)
        for r in range(n):
            w = x[r]
            if a.time_stretch > 0:
                factor = float(math.exp(rng.uniform(-math.log1p(a.time_stretch), math.log1p(a.time_stretch))))
                new_len = max(2, int(round(t_len * factor)))
                w = torch.nn.functional.interpolate(w.T[None], size=new_len, mode="linear", align_corners=False)[0].T
                if new_len >= t_len:
                    s = int(rng.integers(0, new_len - t_len + 1))
                    w = w[s: s + t_len]
                else:
                    w = torch.cat([w, w[-1:].expand(t_len - new_len, f_len)], dim=0)
            if a.freq_shift > 0:
                k = int(rng.integers(-a.freq_shift, a.freq_shift + 1))
                if k > 0:
                    w = torch.cat([w[:, :1].expand(t_len, k), w[:, :-k]], dim=1)
                elif k < 0:
                    w = torch.cat([w[:, -k:], w[:, -1:].expand(t_len, -k)], dim=1)
            out[r] = w
        return out

    def loss_fn(self, logits, target):
        F = self.torch.nn.functional
        if self.cfg.multi_label:
            return F.binary_cross_entropy_with_logits(logits, target)
        if self.args.label_smoothing > 0:
            k = target.shape[1]
            target = target * (1 - self.args.label_smoothing) + self.args.label_smoothing / k
        return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()

    def lr_at(self, step: int) -> float:
        warm = self.args.warmup_epochs * self.steps_per_epoch
        if step < warm:
            return self.args.lr * (step + 1) / warm
        p = (step - warm) / max(1, self.total_steps - warm)
        return self.args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    def train_epoch(self) -> float:
        torch = self.torch
        self.model.train()
        losses = []
        for idx in _batches(self.train_idx, self.args.batch_size, self.rng):
            xs, y = self.batch(self.ds, idx)
            xs, ys = self.augment(xs, y)
            out = self.model(*(xs[m] for m in self.model.modalities))
            if len(self.model.modalities) == 2 and self.cfg.classifier == "token":
                # scenic: mean of the per-modality losses, each against its own targets.
                loss = (self.loss_fn(out[1], ys["audio"]) + self.loss_fn(out[2], ys["video"])) / 2
            else:
                loss = self.loss_fn(out[0], next(iter(ys.values())))
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
            self.opt.step()
            self.step += 1
            losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")

    # -- evaluation --
    def evaluate(self, ds: WindowDataset, idx: list[int]) -> dict:
        torch = self.torch
        self.model.eval()
        mods = self.model.modalities
        names = ["fused"] + [f"{m}_head" for m in self.model.output_modalities()]
        if len(mods) == 2:
            names += ["audio_only", "audio_only_head", "video_only", "video_only_head"]
        scores = {k: [] for k in names}
        targets = []
        with torch.no_grad():
            for b in _batches(idx, self.args.batch_size, None):
                xs, y = self.batch(ds, b)
                targets.append(y.numpy())
                out = self.model(*(xs[m] for m in mods))
                scores["fused"].append(out[0].numpy())
                for k, o in zip(self.model.output_modalities(), out[1:]):
                    scores[f"{k}_head"].append(o.numpy())
                if len(mods) == 2:
                    zv = torch.zeros_like(xs["video"])
                    za = torch.zeros_like(xs["audio"])
                    fused, head_a, _ = self.model(zv, xs["audio"])
                    scores["audio_only"].append(fused.numpy())
                    scores["audio_only_head"].append(head_a.numpy())
                    fused, _, head_v = self.model(xs["video"], za)
                    scores["video_only"].append(fused.numpy())
                    scores["video_only_head"].append(head_v.numpy())
        if not targets:
            return {}
        t = np.concatenate(targets)
        metric = mean_average_precision if self.cfg.multi_label else top1
        return {k: metric(np.concatenate(v), t) for k, v in scores.items()}

    # -- checkpoints --
    def state(self) -> dict:
        torch = self.torch
        return {
            "config": self.cfg.to_dict(), "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "epoch": self.epoch, "step": self.step, "best": self.best, "history": self.history,
            "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "audio_affine": self.audio_affine,
        }

    def load_state(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.epoch, self.step, self.best = ck["epoch"], ck["step"], ck["best"]
        self.history = ck["history"]
        self.rng.bit_generator.state = ck["numpy_rng"]
        self.torch.set_rng_state(ck["torch_rng"])

    def save(self, path: Path, state: dict) -> None:
        tmp = path.with_suffix(".tmp")
        self.torch.save(state, tmp)
        tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mbt train", description=__doc__.splitlines()[0])
    ap.add_argument("data", help="folder written by `mbt-edge record` (manifest.jsonl, features.json, *.npy)")
    ap.add_argument("--out", required=True, help="run folder: last.pt, best.pt, log.jsonl")
    ap.add_argument("--preset", default="edge-small")
    ap.add_argument("--config", help="JSON file of MBTConfig fields over the preset (hidden, layers, fusion, ...)")
    ap.add_argument("--labels", help="comma-separated labels, in output order (default: sorted labels of the data)")
    ap.add_argument("--multi-label", action="store_true", help="sigmoid outputs (default: from the data)")
    ap.add_argument("--val", help="a separate validation folder (default: split --val-fraction off the data)")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(alpha, alpha); 0 disables")
    ap.add_argument("--modality-mixup", action="store_true", help="one mixing weight per modality (paper's mixmod)")
    ap.add_argument("--specaugment", action="store_true")
    ap.add_argument("--time-masks", type=int, default=2)
    ap.add_argument("--time-mask-width", type=int, default=24)
    ap.add_argument("--freq-masks", type=int, default=2)
    ap.add_argument("--freq-mask-width", type=int, default=16)
    ap.add_argument("--freq-shift", type=int, default=0, help="shift each log-mel by up to this many mel bins")
    ap.add_argument("--time-stretch", type=float, default=0.0,
                    help="stretch each log-mel in time by a factor in [1/(1+S), 1+S]")
    ap.add_argument("--modality-dropout", type=float, default=0.0, help="per-sample probability of zeroing one sense")
    ap.add_argument("--restandardise", action="store_true",
                    help="re-estimate the audio mean/std from the training windows; the model is exported with them")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    ap.add_argument("--init", help="start from these weights (a train checkpoint or convert-scenic --save-pt); "
                                   "its architecture replaces --preset; tensors whose shape changed are re-initialised")
    ap.add_argument("--export", help="after training, export OUT/best.pt to this NAME.onnx")
    ap.add_argument("--name", help="model name in the exported metadata")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = WindowDataset(args.data)
    if len(ds) == 0:
        raise SystemExit(f"{args.data}: no windows")
    if args.resume and (out / "last.pt").exists():
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        cfg = MBTConfig.from_dict(ck["config"])
        audio_affine = ck.get("audio_affine")
    else:
        ck = None
        init = torch.load(args.init, map_location="cpu", weights_only=False) if args.init else None
        base = MBTConfig.from_dict(init["config"]) if init else preset(args.preset)
        if args.config:
            over = json.loads(Path(args.config).read_text())
            base = MBTConfig.from_dict({**base.to_dict(), **over})
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else ds.labels()
        cfg = config_for(ds, base, labels, args.multi_label or ds.multi_label)
        if args.name:
            cfg = cfg.replace(name=args.name)
        audio_affine = None
    val_ds = WindowDataset(args.val) if args.val else ds
    if args.val:
        train_idx, val_idx = list(range(len(ds))), list(range(len(val_ds)))
    else:
        train_idx, val_idx = split_indices(ds, args.val_fraction)
    if ck is None and args.restandardise and cfg.has_audio:
        mean1, std1 = audio_statistics(ds, train_idx, cfg.audio_mean, cfg.audio_std)
        audio_affine = (cfg.audio_std / std1, (cfg.audio_mean - mean1) / std1)
        print(f"audio re-standardised: mean {cfg.audio_mean} -> {mean1:.4f}, std {cfg.audio_std} -> {std1:.4f}")
        cfg = cfg.replace(audio_mean=mean1, audio_std=std1).validate()

    tr = Trainer(args, ds, cfg, train_idx, val_ds, val_idx, audio_affine)
    if ck is None and args.init:
        own = tr.model.state_dict()
        keep = {k: v for k, v in init["model"].items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
        skipped = sorted(set(own) - set(keep))
        tr.model.load_state_dict(keep, strict=False)
        print(f"initialised from {args.init}; re-initialised: {skipped or 'nothing'}")
    if ck is not None:
        tr.load_state(ck)
        print(f"resumed at epoch {tr.epoch}")
    from .model import count_parameters

    print(f"{cfg.name}: {count_parameters(tr.model) / 1e6:.2f} M parameters, {len(train_idx)} train / "
          f"{len(val_idx)} val windows, labels {cfg.labels}")
    log = open(out / "log.jsonl", "a")
    while tr.epoch < args.epochs:
        t0 = time.time()
        loss = tr.train_epoch()
        tr.epoch += 1
        metrics = tr.evaluate(val_ds, val_idx) if val_idx else {}
        rec = {"epoch": tr.epoch, "loss": loss, "seconds": round(time.time() - t0, 1), **metrics}
        tr.history.append(rec)
        print(json.dumps(rec))
        log.write(json.dumps(rec) + "\n")
        log.flush()
        score = metrics.get("fused", -loss)
        improved = score > tr.best
        if improved:
            tr.best = score
        state = tr.state()
        tr.save(out / "last.pt", state)
        if improved:
            tr.save(out / "best.pt", state)
    log.close()
    if args.export:
        from .export import export_onnx, load_checkpoint_model

        model = load_checkpoint_model(out / "best.pt")
        print(json.dumps(export_onnx(model, args.export), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
