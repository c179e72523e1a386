"""AV-Synth design invariants (torch- and GStreamer-free): classes need both senses, the test
split's nuisance values are unseen in training and lie within its range, clip plans are
reproducible from the seed."""

import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "avsynth"))

from scenes import BACKGROUND, LABELS, PAIRS, SOUNDS, VISUALS, Draw, draw_scene  # noqa: E402


def test_every_visual_and_sound_is_ambiguous_alone():
    for v in VISUALS:
        assert len({s for (vv, s) in PAIRS.values() if vv == v}) >= 2
    for s in SOUNDS:
        assert len({v for (v, ss) in PAIRS.values() if ss == s}) >= 2
    assert len(PAIRS) >= 8 and len(set(PAIRS.values())) == len(PAIRS)
    assert LABELS[0] == BACKGROUND and len(set(LABELS)) == len(LABELS)


def _values(split, draw, n=400):
    rng = random.Random(0)
    return [draw(Draw(rng, split)) for _ in range(n)]


def test_test_split_values_are_unseen_and_inside_the_training_range():
    import math

    for bins, lo, hi, log in ((8, 0.0, 1.0, False), (10, 80.0, 640.0, True), (6, 0.04, 0.36, False)):
        if log:
            draw = lambda d: d.log_uniform(lo, hi, bins=bins)  # noqa: E731
            pos = lambda x: (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))  # noqa: E731
        else:
            draw = lambda d: d.uniform(lo, hi, bins=bins)  # noqa: E731
            pos = lambda x: (x - lo) / (hi - lo)  # noqa: E731
        train, test = _values("train", draw), _values("test", draw)
        assert min(train) < min(test) and max(test) < max(train)
        train_bins = {int(pos(x) * bins) for x in train}
        test_bins = {int(pos(x) * bins) for x in test}
        assert all(b % 2 == 0 for b in train_bins) and all(b % 2 == 1 for b in test_bins)
        assert max(test_bins) < max(train_bins)
    for lo, hi in ((6, 15), (1, 8), (0, 5), (10, 30)):
        train = set(_values("train", lambda d: d.integer(lo, hi)))
        test = set(_values("test", lambda d: d.integer(lo, hi)))
        assert not train & test and min(train) < min(test) and max(test) < max(train)


def test_hue_bins_alternate():
    import colorsys

    def hue_bin(split):
        bins = set()
        for c in _values(split, lambda d: d.colour(value=(0.9, 1.0), saturation=(0.9, 1.0))):
            r, g, b = (int(c[i: i + 2], 16) / 255 for i in (4, 6, 8))
            bins.add(int(colorsys.rgb_to_hsv(r, g, b)[0] * 12 + 1e-6) % 12)
        return bins

    # rounding to 8 bits can move a hue at a bin edge by a hair; allow that, not more
    train, test = hue_bin("train"), hue_bin("test")
    assert {b % 2 for b in train} >= {0} and {b % 2 for b in test} >= {1}
    assert len([b for b in train if b % 2 == 0]) == 6 and len([b for b in test if b % 2 == 1]) == 6


def test_scenes_are_reproducible_and_end_in_an_element():
    for label in LABELS:
        a = draw_scene(random.Random(3), "train", label)
        b = draw_scene(random.Random(3), "train", label)
        assert a.params == b.params and a.video_pipeline == b.video_pipeline
        # the daemon appends " ! <conversion>": each description must end in caps or an element
        for desc in (a.video_pipeline, a.audio_pipeline):
            assert not desc.rstrip().endswith(("!", ".")), desc
            assert "is-live=true" not in desc
        assert re.search(r"videotestsrc", a.video_pipeline) and re.search(r"audiotestsrc", a.audio_pipeline)
