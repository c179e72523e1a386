"""The PyTorch MBT: shapes, fusion semantics."""

import pytest

torch = pytest.importorskip("torch")

from mbt.model import MBT  # noqa: E402

from test_flops import MODES, tiny  # noqa: E402


@pytest.mark.parametrize("mode", MODES)
def test_shapes(mode):
    model = MBT(tiny(fusion=mode)).eval()
    out = model(*model.example_inputs(batch=3))
    assert model.output_names() == ["logits", "logits_audio", "logits_video"]
    assert [tuple(o.shape) for o in out] == [(3, 3)] * 3
    torch.testing.assert_close(out[0], (out[1] + out[2]) / 2)


@pytest.mark.parametrize("mods", [("video",), ("audio",)])
def test_single_modality(mods):
    model = MBT(tiny(modalities=mods)).eval()
    assert model.input_names() == list(mods)
    assert model.output_names() == ["logits", f"logits_{mods[0]}"]
    out = model(*model.example_inputs(batch=2))
    assert len(out) == 2 and tuple(out[0].shape) == (2, 3)
    torch.testing.assert_close(out[0], out[1])


def test_tubelets_and_gap():
    model = MBT(tiny(video_patch=(2, 16, 16), classifier="gap")).eval()
    out = model(*model.example_inputs(batch=1))
    assert tuple(out[0].shape) == (1, 3)


@pytest.mark.parametrize("mode", MODES)
def test_late_fusion_has_no_exchange(mode):
    cfg = tiny(fusion=mode, fusion_layer=3)  # Lf = L
    model = MBT(cfg).eval()
    video, audio = model.example_inputs(batch=2)
    with torch.no_grad():
        _, la1, lv1 = model(video, audio)
        _, la2, lv2 = model(video, torch.randn_like(audio))
        _, la3, _ = model(torch.randn_like(video), audio)
    torch.testing.assert_close(lv1, lv2, rtol=0, atol=0)
    torch.testing.assert_close(la1, la3, rtol=0, atol=0)
    assert not torch.allclose(la1, la2)


@pytest.mark.parametrize("mode", MODES)
def test_fusion_exchanges(mode):
    model = MBT(tiny(fusion=mode, fusion_layer=1)).eval()
    video, audio = model.example_inputs(batch=2)
    with torch.no_grad():
        _, _, lv1 = model(video, audio)
        _, _, lv2 = model(video, torch.randn_like(audio))
    assert not torch.allclose(lv1, lv2)


def test_late_fusion_equals_unimodal_models():
    """Bottleneck MBT with Lf = L: each modality's logits are those of a one-modality
    model holding the same weights."""
    model = MBT(tiny(fusion="bottleneck", fusion_layer=3)).eval()
    video, audio = model.example_inputs(batch=2)
    state = model.state_dict()
    with torch.no_grad():
        _, la, lv = model(video, audio)
        for m, x, want in (("video", video, lv), ("audio", audio, la)):
            uni = MBT(tiny(modalities=(m,), fusion_layer=3)).eval()
            uni.load_state_dict({k: v for k, v in state.items() if k in uni.state_dict()})
            torch.testing.assert_close(uni(x)[0], want, rtol=1e-6, atol=1e-6)


def test_bottleneck_tokens_are_shared():
    """With Lf < L, the video stream sees audio only through the B bottleneck tokens:
    zero bottlenecks would be impossible, but B = 1 still exchanges."""
    model = MBT(tiny(fusion="bottleneck", bottlenecks=1, fusion_layer=1)).eval()
    assert tuple(model.bottleneck.shape) == (1, 1, 32)
    video, audio = model.example_inputs(batch=1)
    with torch.no_grad():
        a = model(video, audio)[2]
        b = model(video, audio * 2)[2]
    assert not torch.allclose(a, b)
