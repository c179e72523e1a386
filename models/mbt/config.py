"""MBT configuration, named presets, and the `mbt` metadata JSON (models/METADATA.md).

Torch-free on purpose: the FLOPs report, the log-mel reference and the checks of committed
model files run where only numpy/onnx are installed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FUSION_MODES = ("bottleneck", "vanilla", "cross_attention")
MODALITIES = ("video", "audio")
CLASSIFIERS = ("token", "gap", "gmp", "gsp")
SPAN_POSITIONS = ("centre", "start", "end")
METADATA_KEY = "mbt"
FORMAT_VERSION = 1


@dataclass
class MBTConfig:
    """Everything that fixes an MBT model's shape and its preprocessing.

    Token counts: video F/pt * H/ph * W/pw (+1 CLS), audio T/16 * M/16 (+1 CLS). Every
    patch size must divide its input size exactly: no silent cropping.
    """

    name: str = "mbt"
    # Transformer.
    hidden: int = 768
    heads: int = 12
    head_dim: int | None = None  # None: hidden // heads (scenic/ViT)
    mlp: int = 3072
    layers: int = 12
    fusion: str = "bottleneck"
    fusion_layer: int = 8  # Lf: 0 early fusion, == layers late fusion
    bottlenecks: int = 4  # B, scenic's n_bottlenecks
    # scenic's classifier 'token' makes B+1 bottleneck tokens (n_bottlenecks += 1); our own
    # models use B. The tokens the layers see: `bottleneck_tokens`.
    extra_bottleneck_token: bool = False
    modalities: tuple[str, ...] = ("video", "audio")
    # 'token' (CLS per modality); scenic's pooling heads over all tokens: 'gap' (mean),
    # 'gmp' (max), 'gsp' (sum).
    classifier: str = "token"
    # Head.
    labels: list[str] = field(default_factory=lambda: ["class_0", "class_1"])
    multi_label: bool = False
    # Window.
    window_seconds: float = 8.0
    # Video.
    frames: int = 8
    height: int = 224
    width: int = 224
    video_patch: tuple[int, int, int] = (1, 16, 16)  # (t, h, w)
    video_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    video_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # The F frames span this many seconds of the window (None: the whole window), placed
    # at its centre, start or end (METADATA.md, "Pixels").
    video_span_seconds: float | None = None
    video_span_position: str = "centre"
    # Audio: log-mel recipe of METADATA.md.
    n_frames: int = 800
    n_mels: int = 128
    audio_patch: tuple[int, int] = (16, 16)  # (time, mel)
    sample_rate: int = 16000
    win_length: int = 400
    hop_length: int = 160
    n_fft: int = 512
    window: str = "hann"
    mel_scale: str = "htk"
    fmin: float = 0.0
    fmax: float = 8000.0
    power: float = 2.0
    log_offset: float = 1e-6
    audio_mean: float = 0.0
    audio_std: float = 1.0

    # ---- derived -------------------------------------------------------------------
    @property
    def classes(self) -> int:
        return len(self.labels)

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def has_video(self) -> bool:
        return "video" in self.modalities

    @property
    def has_audio(self) -> bool:
        return "audio" in self.modalities

    @property
    def video_grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.video_patch
        return (self.frames // pt, self.height // ph, self.width // pw)

    @property
    def audio_grid(self) -> tuple[int, int]:
        pt, pm = self.audio_patch
        return (self.n_frames // pt, self.n_mels // pm)

    @property
    def bottleneck_tokens(self) -> int:
        return self.bottlenecks + (1 if self.extra_bottleneck_token else 0)

    def n_tokens(self, modality: str) -> int:
        """Tokens entering the transformer for one modality, CLS included."""
        if modality == "video":
            t, h, w = self.video_grid
            n = t * h * w
        else:
            t, m = self.audio_grid
            n = t * m
        return n + (1 if self.classifier == "token" else 0)

    def validate(self) -> "MBTConfig":
        errors = []
        if self.fusion not in FUSION_MODES:
            errors.append(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        if self.classifier not in CLASSIFIERS:
            errors.append(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        if not self.modalities or any(m not in MODALITIES for m in self.modalities):
            errors.append(f"modalities must be a non-empty subset of {MODALITIES}")
        if len(set(self.modalities)) != len(self.modalities):
            errors.append("modalities repeated")
        if not 0 <= self.fusion_layer <= self.layers:
            errors.append(f"fusion_layer must be in 0..={self.layers}")
        if self.head_dim is None and self.hidden % self.heads:
            errors.append("hidden must be divisible by heads (or set head_dim)")
        if self.video_span_position not in SPAN_POSITIONS:
            errors.append(f"video_span_position must be one of {SPAN_POSITIONS}, got {self.video_span_position!r}")
        if self.video_span_seconds is not None and not 0 < self.video_span_seconds <= self.window_seconds:
            errors.append(f"video_span_seconds must be in (0, window_seconds = {self.window_seconds}]")
        if self.fusion == "bottleneck" and self.bottlenecks < 1:
            errors.append("bottleneck fusion needs bottlenecks >= 1")
        if not self.labels:
            errors.append("labels must not be empty")
        if len(set(self.labels)) != len(self.labels):
            errors.append("labels must be unique")
        if self.has_video:
            for size, p, what in zip(
                (self.frames, self.height, self.width), self.video_patch, ("frames", "height", "width")
            ):
                if p < 1 or size % p:
                    errors.append(f"video patch {p} does not divide {what} {size}")
        if self.has_audio:
            for size, p, what in zip((self.n_frames, self.n_mels), self.audio_patch, ("n_frames", "n_mels")):
                if p < 1 or size % p:
                    errors.append(f"audio patch {p} does not divide {what} {size}")
            samples = self.window_seconds * self.sample_rate
            if abs(samples - round(samples)) > 1e-6:
                errors.append("window_seconds * sample_rate must be a whole number of samples")
            frames = samples / self.hop_length
            if abs(frames - round(frames)) > 1e-6 or round(frames) != self.n_frames:
                errors.append(
                    f"n_frames ({self.n_frames}) must equal window_seconds * sample_rate / hop_length "
                    f"({frames:g})"
                )
            if self.win_length > self.n_fft:
                errors.append("win_length must be <= n_fft")
            if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
                errors.append("need 0 <= fmin < fmax <= sample_rate / 2")
            if self.audio_std <= 0:
                errors.append("audio_std must be > 0")
        if errors:
            raise ValueError(f"invalid MBT config {self.name!r}: " + "; ".join(errors))
        return self

    def replace(self, **changes: Any) -> "MBTConfig":
        return dataclasses.replace(self, **changes)

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MBTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        kwargs = dict(d)
        for k in ("modalities", "video_patch", "video_mean", "video_std", "audio_patch"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        if "labels" in kwargs:
            kwargs["labels"] = list(kwargs["labels"])
        return cls(**kwargs)

    def metadata(self) -> dict[str, Any]:
        """The `mbt` metadata JSON object of models/METADATA.md."""
        md: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "labels": list(self.labels),
            "multi_label": self.multi_label,
            "window_seconds": self.window_seconds,
        }
        if self.has_video:
            md["video"] = {
                "frames": self.frames,
                "height": self.height,
                "width": self.width,
                "mean": list(self.video_mean),
                "std": list(self.video_std),
            }
            if self.video_span_seconds is not None and self.video_span_seconds != self.window_seconds:
                md["video"]["span_seconds"] = self.video_span_seconds
                md["video"]["span_position"] = self.video_span_position
        if self.has_audio:
            md["audio"] = {
                "sample_rate": self.sample_rate,
                "n_frames": self.n_frames,
                "n_mels": self.n_mels,
                "win_length": self.win_length,
                "hop_length": self.hop_length,
                "n_fft": self.n_fft,
                "window": self.window,
                "mel_scale": self.mel_scale,
                "fmin": self.fmin,
                "fmax": self.fmax,
                "power": self.power,
                "log_offset": self.log_offset,
                "mean": self.audio_mean,
                "std": self.audio_std,
            }
        md["fusion"] = {
            "mode": self.fusion,
            "layers": self.layers,
            "fusion_layer": self.fusion_layer,
            "bottlenecks": self.bottlenecks,
            **({"bottleneck_tokens": self.bottleneck_tokens} if self.extra_bottleneck_token else {}),
            "hidden": self.hidden,
            "heads": self.heads,
            "head_dim": self.dim_head,
            "mlp": self.mlp,
            "classifier": self.classifier,
            "video_patch": list(self.video_patch) if self.has_video else None,
            "audio_patch": list(self.audio_patch) if self.has_audio else None,
        }
        return md

    def metadata_json(self) -> str:
        return json.dumps(self.metadata(), separators=(",", ":"))

    @classmethod
    def from_metadata(cls, md: dict[str, Any] | str) -> "MBTConfig":
        if isinstance(md, str):
            md = json.loads(md)
        if md.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported mbt metadata format_version {md.get('format_version')!r}")
        fu = md["fusion"]
        kw: dict[str, Any] = dict(
            name=md["name"],
            labels=list(md["labels"]),
            multi_label=bool(md["multi_label"]),
            window_seconds=float(md["window_seconds"]),
            fusion=fu["mode"],
            layers=fu["layers"],
            fusion_layer=fu["fusion_layer"],
            bottlenecks=fu["bottlenecks"],
            extra_bottleneck_token=fu.get("bottleneck_tokens", fu["bottlenecks"]) == fu["bottlenecks"] + 1,
            hidden=fu["hidden"],
            heads=fu["heads"],
            head_dim=None if fu.get("head_dim") in (None, fu["hidden"] // fu["heads"]) else fu["head_dim"],
            mlp=fu["mlp"],
            classifier=fu.get("classifier", "token"),
        )
        mods = []
        if "video" in md:
            v = md["video"]
            mods.append("video")
            kw.update(
                frames=v["frames"], height=v["height"], width=v["width"],
                video_mean=tuple(v["mean"]), video_std=tuple(v["std"]),
                video_patch=tuple(fu["video_patch"]),
                video_span_seconds=v.get("span_seconds"), video_span_position=v.get("span_position", "centre"),
            )
        if "audio" in md:
            a = md["audio"]
            mods.append("audio")
            kw.update(
                sample_rate=a["sample_rate"], n_frames=a["n_frames"], n_mels=a["n_mels"],
                win_length=a["win_length"], hop_length=a["hop_length"], n_fft=a["n_fft"],
                window=a["window"], mel_scale=a["mel_scale"], fmin=a["fmin"], fmax=a["fmax"],
                power=a["power"], log_offset=a["log_offset"], audio_mean=a["mean"], audio_std=a["std"],
                audio_patch=tuple(fu["audio_patch"]),
            )
        kw["modalities"] = tuple(mods)
        return cls(**kw).validate()


# ---- presets --------------------------------------------------------------------------

def vit_base(**changes: Any) -> MBTConfig:
    """The paper's setting: ViT-Base per modality, Lf = 8, B = 4, 8 frames of 224x224 with
    16x16 patches (1568 tokens), 8 s of audio = 800 x 128 log-mel, 16x16 patches (400 tokens).
    """
    cfg = MBTConfig(
        name="mbt-vit-base",
        hidden=768, heads=12, mlp=3072, layers=12, fusion_layer=8, bottlenecks=4,
        frames=8, height=224, width=224, video_patch=(1, 16, 16),
        window_seconds=8.0, n_frames=800, n_mels=128, audio_patch=(16, 16),
        # scenic's AudioSet statistics; our log-mel recipe differs, re-estimate for real use.
        audio_mean=1.102, audio_std=2.762,
    )
    return cfg.replace(**changes).validate()


def edge_small(**changes: Any) -> MBTConfig:
    """A small edge MBT: d=128, 4 heads, MLP 512, L=4, Lf=2, B=4.

    Video: 8 frames of 64x64, 16x16 patches = 128 tokens. Audio: 2.56 s = 256 x 128 log-mel,
    16x16 patches = 128 tokens (2.56 s rather than 2 s so that 16-frame patches tile the
    window exactly). About 0.2 GMAC per window: a few ms in tract, and trains on thousands
    of windows in minutes per epoch on 2 CPU cores.
    """
    cfg = MBTConfig(
        name="mbt-edge-small",
        hidden=128, heads=4, mlp=512, layers=4, fusion_layer=2, bottlenecks=4,
        frames=8, height=64, width=64, video_patch=(1, 16, 16),
        window_seconds=2.56, n_frames=256, n_mels=128, audio_patch=(16, 16),
    )
    return cfg.replace(**changes).validate()


def tiny(**changes: Any) -> MBTConfig:
    """A toy MBT for fixtures and the Rust tests (models/testdata): d=32, L=2, Lf=1, B=4,
    4 frames of 32x32, 0.64 s of audio = 64 x 128 (edge-small's log-mel recipe); about
    70 k parameters, a 0.3 MB ONNX file."""
    cfg = MBTConfig(
        name="mbt-tiny",
        hidden=32, heads=2, mlp=64, layers=2, fusion_layer=1, bottlenecks=4,
        labels=["background", "doorbell", "dog_bark"],
        frames=4, height=32, width=32, video_patch=(1, 16, 16),
        window_seconds=0.64, n_frames=64, n_mels=128, audio_patch=(16, 16),
    )
    return cfg.replace(**changes).validate()


PRESETS = {"vit-base": vit_base, "edge-small": edge_small, "tiny": tiny}


def preset(name: str, **changes: Any) -> MBTConfig:
    try:
        return PRESETS[name](**changes)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
