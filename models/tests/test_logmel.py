"""The NumPy log-mel reference follows METADATA.md (torch-free)."""

import math

import numpy as np

from mbt import logmel
from mbt.config import edge_small

SR = 16000


def test_shape_and_silence():
    x = np.zeros(int(2.56 * SR), np.float32)
    out = logmel.log_mel(x, log_offset=1e-6)
    assert out.shape == (256, 128) and out.dtype == np.float32
    np.testing.assert_allclose(out, math.log(1e-6), rtol=1e-6)
    std = logmel.log_mel(x, log_offset=1e-6, mean=-5.0, std=2.0)
    np.testing.assert_allclose(std, (math.log(1e-6) + 5.0) / 2.0, rtol=1e-6)


def test_sine_peaks_in_its_mel_bin():
    t = np.arange(2 * SR) / SR
    for freq in (250.0, 1000.0, 3000.0):
        x = 0.5 * np.sin(2 * np.pi * freq * t)
        out = logmel.log_mel(x)
        centres = logmel.mel_to_hz(np.linspace(logmel.hz_to_mel(0.0), logmel.hz_to_mel(8000.0), 130))[1:-1]
        want = int(np.argmin(np.abs(centres - freq)))
        got = np.argmax(out[5:-5].mean(axis=0))  # frames fully inside the signal
        assert got == want, (freq, got, want)


def test_framing_is_not_centred():
    # An impulse at sample p lands in frames i with i*hop <= p < i*hop + win, and no other.
    x = np.zeros(SR, np.float64)
    p = 1000
    x[p] = 1.0
    out = logmel.log_mel(x, hop_length=160, win_length=400)
    hit = np.where(out.max(axis=1) > math.log(1e-6) + 1e-3)[0]
    expect = [i for i in range(out.shape[0]) if i * 160 <= p < i * 160 + 400]
    # The periodic Hann window is exactly 0 at n = 0, so a frame starting at p sees nothing.
    expect = [i for i in expect if p - i * 160 != 0]
    assert list(hit) == expect


def test_frames_past_the_end_see_zeros():
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, SR)  # 1 s: 100 frames, the last 2 run past the end
    out = logmel.log_mel(x)
    assert out.shape[0] == 100
    padded = np.concatenate([x, np.zeros(SR)])
    np.testing.assert_allclose(out, logmel.log_mel(padded)[:100], rtol=1e-6)
    reflected = np.concatenate([x, x[::-1]])
    assert not np.allclose(out[98:], logmel.log_mel(reflected)[98:100])


def test_filterbank_triangles():
    fb = logmel.mel_filterbank(SR, 512, 128, 0.0, 8000.0)
    assert fb.shape == (257, 128)
    assert fb.min() >= 0.0 and fb.max() <= 1.0
    # With 128 mels over 0-8 kHz and 31.25 Hz FFT bins, filter 0 (0-28 Hz) falls between
    # bins 0 and 1 and is empty (torchaudio warns about the same): mel channel 0 is always
    # ln(log_offset). Every other filter covers at least one bin.
    sums = fb.sum(axis=0)
    assert sums[0] == 0.0 and (sums[1:] > 0).all()
    # The rising edge of filter m meets the falling edge of filter m - 1 (HTK triangles).
    np.testing.assert_allclose(fb[:, 1:-1].sum(axis=1)[20:200], 1.0, atol=1e-9)


def test_cli_uses_the_model_recipe(tmp_path):
    md = edge_small(audio_mean=-3.0, audio_std=4.0).metadata()
    (tmp_path / "m.json").write_text(__import__("json").dumps(md))
    x = (np.random.default_rng(0).standard_normal(int(2.56 * SR)) * 0.1).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    assert logmel.main([str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--metadata", str(tmp_path / "m.json")]) == 0
    out = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(out, (logmel.log_mel(x) + 3.0) / 4.0, rtol=1e-5, atol=1e-5)
