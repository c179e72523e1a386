"""Analytic multiply-accumulate (MAC) count of an MBT config, and the paper's FLOPs table.

Convention: 1 MAC = 1 FLOP, as in the MBT paper and most vision papers (fvcore style).
Counted: every matrix product and convolution (patch embeddings, Q/K/V/out projections,
Q.K^T and attention.V, MLP, head). Not counted: LayerNorm, softmax, GELU, additions,
means. These are exactly the ops torch.utils.flop_counter.FlopCounterMode counts (at
2 FLOPs per MAC), which the tests use to check this count against the traced model.

Torch-free.
"""

from __future__ import annotations

from .config import MBTConfig, vit_base


def _block_macs(cfg: MBTConfig, tokens: int, context: int | None = None) -> int:
    """One pre-LN block: `tokens` queries attending over `context` keys/values."""
    c = tokens if context is None else context
    d, inner, mlp = cfg.hidden, cfg.heads * cfg.dim_head, cfg.mlp
    proj = tokens * d * inner + 2 * c * d * inner + tokens * inner * d
    attn = 2 * tokens * c * inner  # Q.K^T and A.V
    ff = 2 * tokens * d * mlp
    return proj + attn + ff


def _embed_macs(cfg: MBTConfig, m: str) -> int:
    if m == "video":
        pt, ph, pw = cfg.video_patch
        t, h, w = cfg.video_grid
        return t * h * w * (3 * pt * ph * pw) * cfg.hidden
    pt, pm = cfg.audio_patch
    t, f = cfg.audio_grid
    return t * f * (pt * pm) * cfg.hidden


def macs(cfg: MBTConfig, scenic_cross_attention: bool = False) -> dict[str, int]:
    """MACs for one example, by part: embed, encoder, head, total.

    Cross-attention is counted as our model runs it: each modality's queries (and MLP)
    over [other; own] keys/values. scenic runs each modality's layer on the whole
    concatenation and drops the other modality's outputs: same result, more work;
    `scenic_cross_attention=True` counts that instead.
    """
    mods = [m for m in ("video", "audio") if m in cfg.modalities]
    tok = {m: cfg.n_tokens(m) for m in mods}
    embed = sum(_embed_macs(cfg, m) for m in mods)
    enc = 0
    for lyr in range(cfg.layers):
        if len(mods) == 1 or lyr < cfg.fusion_layer:
            enc += sum(_block_macs(cfg, tok[m]) for m in mods)
        elif cfg.fusion == "bottleneck":
            enc += sum(_block_macs(cfg, tok[m] + cfg.bottleneck_tokens) for m in mods)
        elif cfg.fusion == "cross_attention":
            total = sum(tok.values())
            if scenic_cross_attention:
                enc += len(mods) * _block_macs(cfg, total)
            else:
                enc += sum(_block_macs(cfg, tok[m], total) for m in mods)
        else:  # vanilla
            enc += _block_macs(cfg, sum(tok.values()))
    n_heads = len(mods) + (1 if cfg.classifier == "gap" and len(mods) == 2 else 0)
    head = n_heads * cfg.hidden * cfg.classes
    return {"embed": embed, "encoder": enc, "head": head, "total": embed + enc + head}


def gmacs(cfg: MBTConfig, scenic_cross_attention: bool = False) -> float:
    return macs(cfg, scenic_cross_attention)["total"] / 1e9


def paper_table(base: MBTConfig | None = None) -> str:
    """The comparison of the paper (Fig. 'compute'): GFLOPs vs Lf per fusion mode, and
    bottleneck GFLOPs vs B, in the paper's setting."""
    base = base or vit_base(labels=[f"c{i}" for i in range(527)])
    lines = []
    vt, at = base.n_tokens("video") - 1, base.n_tokens("audio") - 1
    lines.append(
        f"MBT FLOPs, {base.name}: d={base.hidden}, L={base.layers}, {base.heads} heads, MLP {base.mlp}; "
        f"video {base.frames}x{base.height}x{base.width}, patch {'x'.join(map(str, base.video_patch))} "
        f"= {vt} tokens; audio {base.n_frames}x{base.n_mels}, patch {'x'.join(map(str, base.audio_patch))} "
        f"= {at} tokens; +1 CLS each; {base.classes} classes"
    )
    lines.append("GFLOPs per example, 1 FLOP = 1 multiply-accumulate (as the paper counts)")
    lines.append("")
    prec = 1 if gmacs(base) >= 10 else 3
    lines.append(
        f"{'Lf':>4} {'bottleneck(B=' + str(base.bottlenecks) + ')':>16} {'vanilla':>10} {'cross_attention':>16}"
        f" {'(as scenic runs it)':>20}"
    )
    for lf in range(0, base.layers + 1, 2):
        row = [gmacs(base.replace(fusion=mode, fusion_layer=lf)) for mode in ("bottleneck", "vanilla", "cross_attention")]
        lit = gmacs(base.replace(fusion="cross_attention", fusion_layer=lf), scenic_cross_attention=True)
        lines.append(f"{lf:>4} {row[0]:>16.{prec}f} {row[1]:>10.{prec}f} {row[2]:>16.{prec}f} {lit:>20.{prec}f}")
    lines.append("")
    lf = base.fusion_layer
    lines.append(f"bottleneck fusion, Lf={lf}")
    lines.append(f"{'B':>6} {'GFLOPs':>8}")
    for b in (4, 36, 64, 256, 1024):
        lines.append(f"{b:>6} {gmacs(base.replace(fusion='bottleneck', bottlenecks=b)):>8.{prec}f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .config import preset

    ap = argparse.ArgumentParser(prog="python -m mbt flops", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vit-base", help="vit-base (the paper's setting) or edge-small")
    args = ap.parse_args(argv)
    # vit-base: AudioSet's 527 classes (the head is a negligible part of the count).
    cfg = preset(args.preset, labels=[f"c{i}" for i in range(527)]) if args.preset == "vit-base" else preset(args.preset)
    print(paper_table(cfg))
    return 0
