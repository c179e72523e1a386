"""Analytic FLOPs: the paper's shape (torch-free) and agreement with the traced model."""

import pytest

from mbt import flops
from mbt.config import MBTConfig, vit_base

MODES = ("bottleneck", "vanilla", "cross_attention")


def tiny(**kw) -> MBTConfig:
    base = dict(
        name="tiny", hidden=32, heads=2, mlp=64, layers=3, fusion_layer=1, bottlenecks=3,
        frames=4, height=32, width=32, video_patch=(1, 16, 16),
        window_seconds=0.32, n_frames=32, n_mels=32, audio_patch=(16, 16), labels=["a", "b", "c"],
    )
    base.update(kw)
    return MBTConfig(**base).validate()


def test_paper_setting_token_counts():
    cfg = vit_base()
    assert cfg.n_tokens("video") == 1568 + 1 and cfg.n_tokens("audio") == 400 + 1


def test_paper_shape():
    base = vit_base(labels=[str(i) for i in range(527)])
    g = {m: [flops.gmacs(base.replace(fusion=m, fusion_layer=lf)) for lf in range(0, 13, 2)] for m in MODES}
    # bottleneck is nearly flat in Lf ...
    assert max(g["bottleneck"]) - min(g["bottleneck"]) < 0.01 * min(g["bottleneck"])
    # ... and below both other modes for every Lf < L; all equal at Lf = L (late fusion).
    for i, lf in enumerate(range(0, 13, 2)):
        if lf < 12:
            assert g["bottleneck"][i] < g["vanilla"][i] < g["cross_attention"][i]
        else:
            assert g["bottleneck"][i] == pytest.approx(g["vanilla"][i]) == pytest.approx(g["cross_attention"][i])
    # ViT-Base with ~1970 tokens: about 217 GMACs.
    assert 200 < g["bottleneck"][4] < 230
    # B from 4 to 1024 grows the cost.
    bs = [flops.gmacs(base.replace(bottlenecks=b)) for b in (4, 36, 64, 256, 1024)]
    assert bs == sorted(bs) and bs[0] < bs[-1]


def test_table_prints():
    text = flops.paper_table()
    assert "1 FLOP = 1 multiply-accumulate" in text and "cross_attention" in text


@pytest.mark.parametrize(
    "cfg",
    [tiny(fusion=m) for m in MODES]
    + [
        tiny(fusion="bottleneck", fusion_layer=0),
        tiny(fusion="vanilla", fusion_layer=3),
        tiny(video_patch=(2, 16, 16)),
        tiny(classifier="gap"),
        tiny(modalities=("video",)),
        tiny(modalities=("audio",), head_dim=8),
    ],
    ids=lambda c: f"{c.fusion}-Lf{c.fusion_layer}-{'+'.join(c.modalities)}-{c.classifier}-p{c.video_patch[0]}",
)
def test_analytic_matches_traced(cfg):
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from mbt.model import MBT

    model = MBT(cfg).eval()
    inputs = model.example_inputs(batch=2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    traced = counter.get_total_flops()
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate.
    assert traced == 2 * 2 * flops.macs(cfg)["total"]
