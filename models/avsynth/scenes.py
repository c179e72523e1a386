"""AV-Synth scenes: audio-visual classes that neither sense alone can tell apart.

Four visuals (what videotestsrc draws) and four sounds (what audiotestsrc plays) are paired
on a cycle, so every visual appears in two classes with different sounds and every sound in
two classes with different visuals:

    ball  + tone    ball  + buzz
    bar   + buzz    bar   + beeps
    wheel + beeps   wheel + clicks
    rings + clicks  rings + tone

plus `background` (a plain gradient or solid colour, only noise on the audio). Seeing the
visual leaves two candidate classes, hearing the sound leaves two others; only both senses
together name the class, so a single-sense model reaches about 50 % on the eight pair
classes (and all of background).

Each category has nuisance parameters (colours, speeds, sizes, frequencies, volumes, noise
levels) drawn per clip. Every continuous nuisance range is cut into bins; the `train` split
draws from the even bins and the `test` split from the odd ones between them, so test scenes
use values never seen in training (other hues, frequencies, speeds, volumes, noise levels)
that lie within the training range.

A scene is two gst-launch descriptions (`kind = "pipeline"` source of mbt-edge): the daemon
appends the conversion to the model's format after the last element. Pure functions of a
`random.Random`: no I/O here.
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass, field

VISUALS = ("ball", "bar", "wheel", "rings")
SOUNDS = ("tone", "buzz", "beeps", "clicks")

# label -> (visual, sound); the cycle ball-tone-... described above.
PAIRS: dict[str, tuple[str, str]] = {
    "ball_tone": ("ball", "tone"),
    "ball_buzz": ("ball", "buzz"),
    "bar_buzz": ("bar", "buzz"),
    "bar_beeps": ("bar", "beeps"),
    "wheel_beeps": ("wheel", "beeps"),
    "wheel_clicks": ("wheel", "clicks"),
    "rings_clicks": ("rings", "clicks"),
    "rings_tone": ("rings", "tone"),
}
BACKGROUND = "background"
LABELS: tuple[str, ...] = (BACKGROUND, *PAIRS)

SAMPLE_RATE = 16000  # native audio rate of the scenes (the model's; no resampling cost)
SPLITS = ("train", "test")


class Draw:
    """Random nuisance values for one split: even bins for `train`, odd bins for `test`.

    The test split interpolates, it never extrapolates: its bins lie between training bins,
    so the top bin (odd when `bins` is even) and integers above the largest training value
    are left out of both splits. (Hues are circular: all odd hue bins lie between even ones.)
    """

    def __init__(self, rng: random.Random, split: str):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: allowed {SPLITS}")
        self.rng = rng
        self.parity = SPLITS.index(split)

    def _bin(self, bins: int, circular: bool = False) -> int:
        if self.parity == 1 and not circular:
            return 2 * self.rng.randrange((bins - 1) // 2) + 1  # odd bins below the last even one
        return 2 * self.rng.randrange(bins // 2) + self.parity

    def uniform(self, lo: float, hi: float, bins: int = 8, circular: bool = False) -> float:
        b = self._bin(bins, circular)
        return lo + (hi - lo) * (b + self.rng.random()) / bins

    def log_uniform(self, lo: float, hi: float, bins: int = 8) -> float:
        return math.exp(self.uniform(math.log(lo), math.log(hi), bins))

    def integer(self, lo: int, hi: int) -> int:
        """lo..=hi, train the even offsets, test the odd ones between two training values."""
        train = [v for v in range(lo, hi + 1) if (v - lo) % 2 == 0]
        choices = train if self.parity == 0 else [v for v in range(lo + 1, max(train), 2)]
        return self.rng.choice(choices)

    def choice(self, options):
        return self.rng.choice(list(options))

    def sign(self) -> int:
        return self.rng.choice((-1, 1))

    def colour(self, value: tuple[float, float], saturation: tuple[float, float] = (0.5, 1.0)) -> str:
        """ARGB hex: hue from 12 bins of 30 degrees (train even, test odd)."""
        hue = self.uniform(0.0, 1.0, bins=12, circular=True)
        s = self.rng.uniform(*saturation)
        v = self.rng.uniform(*value)
        r, g, b = (round(255 * c) for c in colorsys.hsv_to_rgb(hue, s, v))
        return f"0xff{r:02x}{g:02x}{b:02x}"


@dataclass
class Scene:
    label: str
    visual: str
    sound: str
    video_pipeline: str
    audio_pipeline: str
    params: dict = field(default_factory=dict)


def _video_frame(d: Draw, p: dict) -> tuple[int, int, int]:
    """Native size and rate: the daemon scales to the model's 64x64, so sizes change scale/aspect."""
    width = 16 * d.integer(6, 15)  # 96 .. 240
    height = 16 * d.integer(5, 12)  # 80 .. 192
    fps = d.integer(10, 30)
    p.update(width=width, height=height, fps=fps)
    return width, height, fps


def visual_head(d: Draw, visual: str, p: dict) -> str:
    """videotestsrc for the visual category, with snow blended over it (camera noise)."""
    width, height, fps = _video_frame(d, p)
    caps = f"video/x-raw,format=I420,width={width},height={height},framerate={fps}/1"
    fg = d.colour(value=(0.7, 1.0))
    bg = d.colour(value=(0.0, 0.45))
    colours = f"foreground-color={fg} background-color={bg}"
    if visual == "ball":
        motion = d.choice(("wavy", "sweep", "hsweep"))
        props = f"pattern=ball motion={motion} {colours}"
        p.update(motion=motion, fg=fg, bg=bg)
    elif visual == "bar":
        speed = d.sign() * d.integer(1, 8)
        props = f"pattern=bar horizontal-speed={speed} {colours}"
        p.update(speed=speed, fg=fg, bg=bg)
    elif visual == "wheel":
        pattern = d.choice(("pinwheel", "spokes"))
        speed = d.sign() * d.integer(0, 5)
        props = f"pattern={pattern} horizontal-speed={speed} {colours}"
        p.update(pattern=pattern, speed=speed, fg=fg, bg=bg)
    elif visual == "rings":
        k2 = round(d.log_uniform(8, 60, bins=6))
        kt = d.sign() * d.integer(2, 9)
        xo, yo = (round(d.rng.uniform(-0.25, 0.25) * n) for n in (width, height))
        props = f"pattern=zone-plate kx2={k2} ky2={k2} kt={kt} xoffset={xo} yoffset={yo}"
        p.update(k2=k2, kt=kt, xoffset=xo, yoffset=yo)
    elif visual == "plain":
        pattern = d.choice(("gradient", "solid-color"))
        props = f"pattern={pattern} {colours}"
        p.update(pattern=pattern, fg=fg, bg=bg)
    else:
        raise ValueError(visual)
    snow = round(d.uniform(0.04, 0.36, bins=6), 3)
    p["snow"] = snow
    layers = [f"videotestsrc is-live=false {props} ! {caps} ! c.sink_0",
              f"videotestsrc is-live=false pattern=snow ! {caps} ! c.sink_1"]
    blend = f"sink_1::alpha={snow}"
    if visual == "rings":  # zone plates are grey: tint them with a random colour
        tint = d.colour(value=(0.6, 1.0))
        alpha = round(d.uniform(0.25, 0.55, bins=4), 3)
        p.update(tint=tint, tint_alpha=alpha)
        layers.append(f"videotestsrc is-live=false pattern=solid-color foreground-color={tint} ! {caps} ! c.sink_2")
        blend += f" sink_2::alpha={alpha}"
        # snow above the tint
        blend = f"sink_1::zorder=2 sink_2::zorder=1 {blend}"
    return "  ".join(layers) + f"  compositor name=c {blend} ! {caps}"


def sound_head(d: Draw, sound: str, p: dict) -> str:
    """audiotestsrc for the sound category, mixed with a noise floor (microphone noise)."""
    caps = f"audio/x-raw,format=F32LE,rate={SAMPLE_RATE},channels=1"
    volume = round(d.log_uniform(0.04, 0.7, bins=8), 4)
    if sound == "tone":
        freq = round(d.log_uniform(220, 3200, bins=10), 1)
        props = f"wave=sine freq={freq}"
        p.update(freq=freq)
    elif sound == "buzz":
        wave = "square"
        freq = round(d.log_uniform(80, 640, bins=10), 1)
        volume = round(volume * 0.5, 4)  # a square is loud for its amplitude
        props = f"wave={wave} freq={freq}"
        p.update(freq=freq)
    elif sound == "beeps":
        freq = round(d.log_uniform(300, 2600, bins=10), 1)
        length = d.uniform(0.07, 0.2, bins=4)
        interval = length + d.uniform(0.12, 0.4, bins=4)
        periods = max(1, round(freq * length))
        props = (f"wave=ticks freq={freq} sine-periods-per-tick={periods} "
                 f"tick-interval={round(interval * 1e9)} apply-tick-ramp=true")
        p.update(freq=freq, beep_seconds=round(periods / freq, 4), interval=round(interval, 4))
    elif sound == "clicks":
        freq = round(d.log_uniform(1500, 6000, bins=8), 1)
        periods = d.integer(3, 12)
        interval = d.uniform(0.05, 0.18, bins=6)
        props = (f"wave=ticks freq={freq} sine-periods-per-tick={periods} "
                 f"tick-interval={round(interval * 1e9)} apply-tick-ramp=false")
        volume = round(min(0.95, volume * 2.0), 4)
        p.update(freq=freq, click_seconds=round(periods / freq, 5), interval=round(interval, 4))
    elif sound == "noise":
        props = None
    else:
        raise ValueError(sound)
    noise_wave = d.choice(("pink-noise", "white-noise", "red-noise"))
    if sound == "noise":
        noise = round(d.log_uniform(0.01, 0.3, bins=6), 4)
    else:  # noise relative to the signal; short clicks carry little energy per frame
        ratio = d.log_uniform(0.02, 0.3, bins=6) * (0.4 if sound == "clicks" else 1.0)
        noise = round(max(0.002, volume * ratio), 4)
    p.update(volume=volume if props else 0.0, noise_wave=noise_wave, noise=noise)
    noise_src = f"audiotestsrc is-live=false wave={noise_wave} volume={noise} ! {caps}"
    if props is None:
        return noise_src
    return (f"audiotestsrc is-live=false {props} volume={volume} ! {caps} ! m.  "
            f"{noise_src} ! m.  audiomixer name=m ! {caps}")


def draw_scene(rng: random.Random, split: str, label: str) -> Scene:
    d = Draw(rng, split)
    p: dict = {}
    if label == BACKGROUND:
        visual, sound = "plain", "noise"
    else:
        visual, sound = PAIRS[label]
    video = visual_head(d, visual, p)
    audio = sound_head(d, sound, p)
    return Scene(label, visual, sound, video, audio, p)


def check_design() -> None:
    """Every visual in >= 2 classes with different sounds and vice versa."""
    for v in VISUALS:
        sounds = {s for (vv, s) in PAIRS.values() if vv == v}
        assert len(sounds) >= 2, v
    for s in SOUNDS:
        visuals = {v for (v, ss) in PAIRS.values() if ss == s}
        assert len(visuals) >= 2, s


check_design()
