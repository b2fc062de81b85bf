"""arcface_torch Vision Transformers (``vit_t/s/b/l/h``) in insightface's published layout (RGB input).

112x112 RGB -> ``patch_embed.proj`` (Conv 9x9, stride 9) -> 12x12 = 144 tokens of width D, plus a
learned ``pos_embed`` (no class token) -> ``blocks`` (pre-norm: LayerNorm -> attention with 8 heads,
qkv without bias -> drop path; LayerNorm -> Linear(D, 4D) -> ReLU6 -> Linear(4D, D) -> drop path)
-> ``norm`` LayerNorm -> all 144 tokens flattened -> ``feature``: Linear(144*D -> D, no bias),
BN1d(eps 2e-5), Linear(D -> E, no bias), BN1d(eps 2e-5).

Training only: a share ``mask_ratio`` of the tokens of every image is dropped at random before the
blocks (``int(144 * (1 - mask_ratio))`` kept) and their places are filled with the learned
``mask_token`` after the final norm. Drop path (stochastic depth) rises linearly from 0 in the first
block to ``drop_path`` in the last. Eval mode is deterministic. ``activation_checkpointing``
recomputes each block in the backward pass (less memory, ~1/3 more compute); arcface_torch turns it on
for vit_b and larger.

Variants, as arcface_torch ``get_model`` builds them (D, depth, drop path, mask ratio):
vit_t 256/12/0.1/0.1, vit_s 512/12/0.1/0.1, vit_b 512/24/0.1/0.1, and the WebFace42M recipes
vit_t_dp005_mask0 256/12/0.05/0, vit_s_dp005_mask_0 512/12/0.05/0, vit_b_dp005_mask_005
512/24/0.05/0.05, vit_l_dp005_mask_005 768/24/0.05/0.05, vit_h 1024/48/0.1/0 (vit_h: the later
get_model of insightface forks and LVFace). arcface_torch has no plain ``vit_l``: ours is its only
published L recipe (``vit_l_dp005_mask_005``) under the short name. Published cost: ViT-T 1.5G,
ViT-B 11G (multiply-accumulates, attention matmuls included).

``vit_mini`` (ours, no published weights) is the vit_t recipe at CPU size: D 128, 4 blocks.

Our dropout (default 0, not in arcface_torch) sits before ``feature`` and owns no state; so does the
drop path. With ``mask_ratio == 0`` the ``mask_token`` is kept (strict loading) but frozen, since
nothing uses it (an unused trainable parameter would stop DDP).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import FaceBackbone, fp32, register_backbone

PATCH = 9
HEADS = 8
MLP_RATIO = 4


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the residual branch of a whole sample with probability
    ``p`` and scale the kept ones by 1/(1-p); identity in eval mode or when ``p`` is 0."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class Attention(nn.Module):
    """Multi-head self-attention; keys ``qkv`` (no bias, as published) and ``proj``."""

    def __init__(self, dim: int, num_heads: int = HEADS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))

    def extra_macs(self, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """Multiply-accumulates of the two attention matmuls (q k^T and attn v) for one sample: 2 N^2 C
        (what arcface_torch adds as ``extra_gflops``); the Linear layers are counted on their own."""
        n, c = output.shape[-2:]
        return 2 * n * n * c


class Mlp(nn.Module):
    """Linear(D, 4D) -> ReLU6 -> Linear(4D, D); keys ``fc1``, ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; keys ``norm1``, ``attn``, ``norm2``, ``mlp``."""

    def __init__(self, dim: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping 9x9 patches -> (B, 144, D); key ``proj``."""

    def __init__(self, dim: int, img_size: int = 112, patch: int = PATCH) -> None:
        super().__init__()
        self.grid = img_size // patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(float(value)) and 0.0 <= value < 1.0):
        raise ValueError(f"vit {name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


class VisionTransformer(FaceBackbone):
    """arcface_torch ``VisionTransformer`` (norm_layer 'ln', patch 9, 112x112): RGB -> (B, E)."""

    def __init__(self, embed_dim: int = 256, depth: int = 12, num_heads: int = HEADS, drop_path: float = 0.1,
                 mask_ratio: float = 0.1, activation_checkpointing: bool = False, embedding_size: int = 512,
                 dropout: float = 0.0, channel_order: str = "rgb"):
        super().__init__(embedding_size, channel_order, dropout)
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= 4096:
                raise ValueError(f"vit {name} must be an integer in [1, 4096], got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"vit embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        drop_path = _check_fraction("drop_path", drop_path)
        self.mask_ratio = _check_fraction("mask_ratio", mask_ratio)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(embed_dim, self.input_size[0])
        self.num_patches = self.patch_embed.grid ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path, depth, dtype=torch.float64, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token.requires_grad = self.mask_ratio > 0
        # arcface_torch's init: truncated normal (std 0.02, cut at +-2) for Linear weights and pos_embed,
        # normal(0.02) for the mask token, zero biases, LayerNorm 1/0; conv and BN keep PyTorch's defaults
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def random_masking(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keep ``int(L * (1 - mask_ratio))`` tokens per sample, chosen by sorting uniform noise.
        Returns the kept tokens (B, keep, D) and the shuffle order (B, L): its first ``keep``
        entries are the positions kept."""
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        order = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, d))
        return kept, order

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> (B, 144 * D): normed tokens, masked places holding ``mask_token``."""
        if tuple(x.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise ValueError(f"vit expects {h}x{w} images, got shape {tuple(x.shape)}")
        b = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        masked = self.training and self.mask_ratio > 0
        if masked:
            x, order = self.random_masking(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        if masked:
            n, d = self.num_patches, self.embed_dim
            filled = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - x.shape[1], d)], dim=1)
            x = torch.empty_like(filled).scatter_(1, order[:, :, None].expand(-1, -1, d), filled)  # unshuffle
        return x.reshape(b, self.num_patches * self.embed_dim)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return fp32(self.feature, self.dropout(x))


class Variant(NamedTuple):
    embed_dim: int
    depth: int
    drop_path: float
    mask_ratio: float
    activation_checkpointing: bool


VARIANTS: Dict[str, Variant] = {
    "vit_t": Variant(256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": Variant(256, 12, 0.05, 0.0, False),
    "vit_s": Variant(512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": Variant(512, 12, 0.05, 0.0, False),
    "vit_b": Variant(512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": Variant(512, 24, 0.05, 0.05, True),
    "vit_l": Variant(768, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": Variant(768, 24, 0.05, 0.05, True),
    "vit_h": Variant(1024, 48, 0.1, 0.0, True),
}
# Ours, no published weights: the vit_t recipe at CPU size (D 128, 4 blocks; ~0.12 GMACs, below MobileFaceNet's
# 0.22), for recipes and tests that must train on a CPU in minutes.
SMALL_VARIANTS: Dict[str, Variant] = {"vit_mini": Variant(128, 4, 0.1, 0.1, False)}


def _register(name: str, variant: Variant, published: bool = True) -> None:
    def builder(embedding_size: int = 512, dropout: float = 0.0, channel_order: str = "rgb",
                **overrides: Any) -> VisionTransformer:
        """``overrides``: any of embed_dim, depth, drop_path, mask_ratio, activation_checkpointing."""
        unknown = set(overrides) - set(Variant._fields)
        if unknown:
            raise TypeError(f"{name}: unknown option(s) {sorted(unknown)}; options: {list(Variant._fields)}")
        args = variant._replace(**overrides)._asdict()
        return VisionTransformer(**args, embedding_size=embedding_size, dropout=dropout, channel_order=channel_order)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"{'arcface_torch' if published else 'CPU-sized'} {name}: D={variant.embed_dim}, depth "
                       f"{variant.depth}, drop path {variant.drop_path:g}, mask ratio {variant.mask_ratio:g}.")
    layout = None
    if published:
        layout = "arcface_torch/vit_l_dp005_mask_005" if name == "vit_l" else f"arcface_torch/{name}"
    register_backbone(name, family="vit", layout=layout, trained_channel_order="rgb")(builder)


for _name, _variant in VARIANTS.items():
    _register(_name, _variant)
for _name, _variant in SMALL_VARIANTS.items():
    _register(_name, _variant, published=False)
