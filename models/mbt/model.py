"""MBT (Nagrani et al. 2021) in PyTorch, written to export cleanly to ONNX for tract.

Follows scenic/projects/mbt/model.py: per-modality ViT encoders (patch embedding, CLS,
learned positional embedding over CLS + patches), pre-LN blocks (eps 1e-6, tanh-GELU),
layers 0..Lf-1 unimodal, then bottleneck / vanilla / cross-attention fusion, one encoder
LayerNorm shared by both modalities, one linear head shared by both CLS tokens.
Attention is plain matmul + softmax (no fused kernels) so the ONNX graph is simple.

Module names: `video_*` is scenic's rgb stream (`encoderblock_{i}`), `audio_*` its
spectrogram stream (`encoderblock_{i}_spectrogram`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MBTConfig

LN_EPS = 1e-6


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.query = nn.Linear(hidden, inner)
        self.key = nn.Linear(hidden, inner)
        self.value = nn.Linear(hidden, inner)
        self.out = nn.Linear(inner, hidden)

    def _split(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        return x.reshape(-1, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, tokens: int, context: torch.Tensor | None = None,
                context_tokens: int | None = None) -> torch.Tensor:
        """Queries from `x`, keys/values from `context` (default `x`).

        Token counts are passed as Python ints (they are fixed by the config) so that the
        exported graph reshapes with constant shapes instead of Shape/Gather arithmetic.
        """
        if context is None:
            context, context_tokens = x, tokens
        q = self._split(self.query(x), tokens) * (1.0 / math.sqrt(self.head_dim))
        k = self._split(self.key(context), context_tokens)
        v = self._split(self.value(context), context_tokens)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)
        o = torch.matmul(attn, v).transpose(1, 2)
        return self.out(o.reshape(-1, tokens, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-LN transformer encoder block (scenic EncoderBlock)."""

    def __init__(self, cfg: MBTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=LN_EPS)
        self.attn = Attention(cfg.hidden, cfg.heads, cfg.dim_head)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=LN_EPS)
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.hidden)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    def forward(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        h = self.ln1(x)
        return self.mlp(x + self.attn(h, tokens))

    def forward_with_context(self, x: torch.Tensor, tokens: int, others: torch.Tensor, other_tokens: int) -> torch.Tensor:
        """Scenic's cross-attention layer: self-attention over [others; x], keeping x's
        outputs. Only x's queries, MLP and residuals are computed (same result, cheaper)."""
        h = self.ln1(x)
        ctx = torch.cat([self.ln1(others), h], dim=1)
        return self.mlp(x + self.attn(h, tokens, ctx, tokens + other_tokens))


class VideoEmbed(nn.Module):
    """[N, F, 3, H, W] -> [N, F/pt * H/ph * W/pw, d], tokens time-major (scenic order)."""

    def __init__(self, cfg: MBTConfig):
        super().__init__()
        self.patch = cfg.video_patch
        self.frames, self.height, self.width, self.hidden = cfg.frames, cfg.height, cfg.width, cfg.hidden
        self.grid = cfg.video_grid
        self.proj = nn.Conv3d(3, cfg.hidden, kernel_size=self.patch, stride=self.patch)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        f, d = self.frames, self.hidden
        gt, gh, gw = self.grid
        pt, ph, pw = self.patch
        if pt == 1:
            # Per-frame 2D convolution: the same weights, a plainer graph for runtimes.
            x = video.reshape(-1, 3, self.height, self.width)
            x = F.conv2d(x, self.proj.weight[:, :, 0], self.proj.bias, stride=(ph, pw))
            x = x.reshape(-1, f, d, gh * gw).permute(0, 1, 3, 2)
            return x.reshape(-1, f * gh * gw, d)
        x = self.proj(video.permute(0, 2, 1, 3, 4))  # [N, d, F', H', W']
        return x.reshape(-1, d, gt * gh * gw).transpose(1, 2)


class AudioEmbed(nn.Module):
    """[N, T, M] -> [N, T/16 * M/16, d]: the spectrogram as a 1-channel T x M image."""

    def __init__(self, cfg: MBTConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.hidden, kernel_size=cfg.audio_patch, stride=cfg.audio_patch)
        self.hidden = cfg.hidden
        self.tokens = cfg.audio_grid[0] * cfg.audio_grid[1]

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.proj(audio.unsqueeze(1)).reshape(-1, self.hidden, self.tokens).transpose(1, 2)


class MBT(nn.Module):
    """forward(video, audio) -> (logits, logits_audio, logits_video) for an audio-visual
    model; a one-modality model takes its one input and returns (logits, logits_<m>)."""

    def __init__(self, cfg: MBTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.hidden
        self.modalities = [m for m in ("video", "audio") if m in cfg.modalities]
        two = len(self.modalities) == 2
        for m in self.modalities:
            setattr(self, f"{m}_embed", VideoEmbed(cfg) if m == "video" else AudioEmbed(cfg))
            if cfg.classifier == "token":
                setattr(self, f"{m}_cls", nn.Parameter(torch.zeros(1, 1, d)))
            setattr(self, f"{m}_pos", nn.Parameter(torch.randn(1, cfg.n_tokens(m), d) * 0.02))
            # Vanilla fusion runs the video stream's layers on the concatenation from Lf on,
            # so the audio stream only owns layers 0..Lf-1.
            n_layers = cfg.fusion_layer if (two and cfg.fusion == "vanilla" and m == "audio") else cfg.layers
            setattr(self, f"{m}_blocks", nn.ModuleList(Block(cfg) for _ in range(n_layers)))
        if two and cfg.fusion == "bottleneck":
            self.bottleneck = nn.Parameter(torch.randn(1, cfg.bottleneck_tokens, d) * 0.02)
        self.encoder_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, cfg.classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.normal_(mod.bias, std=1e-6)
        # scenic zero-initialises the head; a small random head keeps parity fixtures
        # of untrained models informative.
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    # ---- pieces ----------------------------------------------------------------------
    def embed(self, m: str, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, f"{m}_embed")(x)
        if self.cfg.classifier == "token":
            x = torch.cat([_batch_like(x, getattr(self, f"{m}_cls")), x], dim=1)
        return x + getattr(self, f"{m}_pos")

    def encode(self, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token dict in, token dict out (after the shared encoder LayerNorm)."""
        cfg = self.cfg
        mods = self.modalities
        xs = dict(xs)
        tok = {m: cfg.n_tokens(m) for m in mods}  # Python ints: constant shapes in ONNX
        bneck = None  # [N, B, d] once the first fusion layer has run
        joint = None  # vanilla: [audio; video] tokens, scenic's concatenation order
        for lyr in range(cfg.layers):
            if len(mods) == 1 or lyr < cfg.fusion_layer:
                for m in mods:
                    xs[m] = getattr(self, f"{m}_blocks")[lyr](xs[m], tok[m])
            elif cfg.fusion == "bottleneck":
                b = cfg.bottleneck_tokens
                outs = []
                for m in mods:
                    shared = _batch_like(xs[m], self.bottleneck) if bneck is None else bneck
                    inp = torch.cat([xs[m], shared], dim=1)
                    out = getattr(self, f"{m}_blocks")[lyr](inp, tok[m] + b)
                    xs[m] = out[:, : tok[m]]
                    outs.append(out[:, tok[m]:])
                bneck = (outs[0] + outs[1]) * 0.5
            elif cfg.fusion == "cross_attention":
                new = {}
                for m in mods:
                    o = "audio" if m == "video" else "video"
                    new[m] = getattr(self, f"{m}_blocks")[lyr].forward_with_context(xs[m], tok[m], xs[o], tok[o])
                xs = new
            else:  # vanilla
                if joint is None:
                    joint = torch.cat([xs["audio"], xs["video"]], dim=1)
                joint = self.video_blocks[lyr](joint, tok["audio"] + tok["video"])
        if joint is not None:
            ta = tok["audio"]
            xs = {"audio": joint[:, :ta], "video": joint[:, ta:]}
        return {m: self.encoder_norm(xs[m]) for m in mods}

    def classify(self, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mods = self.modalities
        if self.cfg.classifier == "token":
            per = {m: self.head(enc[m][:, 0]) for m in mods}
            fused = per[mods[0]] if len(mods) == 1 else (per[mods[0]] + per[mods[1]]) * 0.5
        else:
            # scenic 'gap' / 'gmp' / 'gsp': one mean / max / sum over all tokens of all
            # modalities, then the head; per modality the same over its own tokens.
            pool = {"gap": torch.mean, "gmp": torch.amax, "gsp": torch.sum}[self.cfg.classifier]
            per = {m: self.head(pool(enc[m], dim=1)) for m in mods}
            fused = self.head(pool(torch.cat([enc[m] for m in mods], dim=1), dim=1))
        return fused, per

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.modalities):
            raise TypeError(f"expected inputs {self.input_names()}, got {len(inputs)} tensors")
        xs = {m: self.embed(m, x) for m, x in zip(self.modalities, inputs)}
        fused, per = self.classify(self.encode(xs))
        return (fused,) + tuple(per[m] for m in self.output_modalities())

    # ---- names -----------------------------------------------------------------------
    def input_names(self) -> list[str]:
        return list(self.modalities)

    def output_modalities(self) -> list[str]:
        return [m for m in ("audio", "video") if m in self.modalities]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"logits_{m}" for m in self.output_modalities()]

    def example_inputs(self, batch: int = 1, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        out = []
        for m in self.modalities:
            shape = (batch, cfg.frames, 3, cfg.height, cfg.width) if m == "video" else (batch, cfg.n_frames, cfg.n_mels)
            out.append(torch.randn(*shape, generator=generator))
        return tuple(out)


def _batch_like(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`p` [1, K, d] repeated over x's batch. Written as a broadcast add to a zero slice of
    x (Slice, Mul, Add) rather than expand(N, ...), which exports as Shape/Where/Expand
    arithmetic on the symbolic batch size."""
    return x[:, :1] * 0.0 + p


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
