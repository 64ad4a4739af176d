"""Networks: the DDPM U-Net as a noise-level classifier (CDM) and as a denoiser (DDM).

The U-Net follows Ho et al. (2020) as written in openai/improved-diffusion:
ResBlocks with GroupNorm/SiLU, single- or multi-head self-attention at chosen
resolutions, stride-2 conv downsampling, nearest + conv upsampling, skip
connections between encoder and decoder. New models match the official CDM code
(github.com/shaharYadin/CDM, ``models/diffusion.py``, itself the PyTorch port of
the DDPM U-Net) where it and improved-diffusion differ: GroupNorm eps 1e-6 and
downsampling that pads only the right and bottom edges.

* ``UNetClassifier`` is the CDM network of Yadin, Elata & Michaeli (2024): the
  U-Net with its time embedding removed, then GroupNorm → SiLU → 3×3 conv →
  global average pool → Linear to T+2 outputs, then a fixed cumulative sum over
  the class axis. The outputs are the logits ℓ_t(x), t = 0..T+1.
* ``UNetDenoiser`` is the DDM baseline on the same backbone: ε̂(x, t).
* ``MLPClassifier`` / ``MLPDenoiser`` are the same two ideas for vectors (2-D toy data).

The networks know nothing about schedules or losses. Every network can describe
itself as a plain-JSON spec (``model_spec``) and be rebuilt from it
(``build_model``), which is what checkpoints store.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNetConfig",
    "LEGACY_FIELDS",
    "downsampled_size",
    "unet_preset",
    "UNET_PRESETS",
    "UNetBackbone",
    "UNetClassifier",
    "UNetDenoiser",
    "MLPClassifier",
    "MLPDenoiser",
    "timestep_embedding",
    "model_spec",
    "build_model",
    "unwrap_model",
    "count_parameters",
]


# ----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the U-Net backbone (shared by classifier and denoiser).

    ``attn_resolutions`` are feature-map sizes (height) at which self-attention
    is applied; every listed size must occur in the U-Net, so a typo or a preset
    used at the wrong image size fails loudly instead of silently dropping
    attention. ``num_labels`` is None for an unconditional model; otherwise the
    model takes labels 0..num_labels, where ``num_labels`` itself is the null
    label used for classifier-free guidance.

    ``head_channels`` is the width of the CDM classifier's head conv (None: the
    backbone's output width, ``base_channels * channel_mult[0]``); the DDM
    denoiser's head outputs the image channels and ignores it. ``downsample`` is
    ``"official"`` (DDPM and the official CDM code: zero-pad right and bottom by
    one, unpadded stride-2 conv) or ``"symmetric"`` (conv padding 1 on every
    side: the grid the official one samples, shifted by one pixel). ``norm_eps``
    is every GroupNorm's eps. ``min_group_channels`` is the fewest channels a
    GroupNorm group holds (see ``group_norm``): with one channel per group the
    normalization subtracts each channel's own mean and so cancels the label or
    time embedding a ResBlock adds per channel just before it. Specs saved before
    these four fields existed rebuild the network of that time (see ``LEGACY_FIELDS``).
    """

    in_channels: int
    image_size: int
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_labels: int | None = None
    num_heads: int = 1
    head_channels: int | None = None
    downsample: str = "official"
    norm_eps: float = 1e-6
    min_group_channels: int = 2

    def __post_init__(self) -> None:
        # Specs come back from JSON/torch.load as lists; the config is hashable
        # and comparable only with tuples.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.in_channels < 1 or self.image_size < 1 or self.base_channels < 1:
            raise ValueError(f"in_channels, image_size and base_channels must be positive: {self}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels must be None (unconditional) or >= 1, got {self.num_labels}")
        if self.head_channels is not None and self.head_channels < 1:
            raise ValueError(f"head_channels must be None (the backbone's width) or >= 1, got {self.head_channels}")
        if self.downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {', '.join(DOWNSAMPLE_MODES)}, got {self.downsample!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.min_group_channels < 1:
            raise ValueError(f"min_group_channels must be >= 1, got {self.min_group_channels}")
        resolutions = self.resolutions()
        if min(resolutions) < 1:
            raise ValueError(
                f"image_size={self.image_size} is too small for {len(self.channel_mult)} levels with "
                f"{self.downsample} downsampling: the feature maps would be {resolutions}"
            )
        missing = [r for r in self.attn_resolutions if r not in resolutions]
        if missing:
            raise ValueError(
                f"attn_resolutions {missing} do not occur in this U-Net: with image_size="
                f"{self.image_size} and {len(self.channel_mult)} levels the feature maps are "
                f"{resolutions}"
            )
        for level, r in enumerate(resolutions):
            channels = self.base_channels * self.channel_mult[level]
            if r in self.attn_resolutions and channels % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} does not divide {channels} channels at resolution {r}")

    def resolutions(self) -> tuple[int, ...]:
        """Feature-map height at each level (see ``downsampled_size``)."""
        sizes = [self.image_size]
        for _ in self.channel_mult[1:]:
            sizes.append(downsampled_size(sizes[-1], self.downsample))
        return tuple(sizes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """The config of a ``to_dict`` dict; a field the dict lacks takes its ``LEGACY_FIELDS`` value."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**{**LEGACY_FIELDS, **d})


DOWNSAMPLE_MODES = ("official", "symmetric")

# What the fields added after the first checkpoints were written meant before they
# existed: a spec without them is an older network, which must rebuild exactly.
# (min_group_channels 1: a 32-channel GroupNorm had 32 groups, which made the embedding of a ResBlock at that
# width a no-op; only widths below 64 differ, so the paper's presets are the same networks either way.)
LEGACY_FIELDS: dict[str, Any] = {
    "head_channels": None,
    "downsample": "symmetric",
    "norm_eps": 1e-5,
    "min_group_channels": 1,
}


def downsampled_size(n: int, mode: str) -> int:
    """Side of a stride-2 3×3 conv's output: floor((n + total padding − 3) / 2) + 1.

    ``official`` pads by 1 in total (right/bottom), so n -> floor(n/2) (7 -> 3; 0 for
    n = 1); ``symmetric`` pads by 2 in total, so n -> ceil(n/2) (7 -> 4).
    """
    padding = {"official": 1, "symmetric": 2}[mode]
    return (n + padding - 3) // 2 + 1


def _lowest_resolution(image_size: int, num_levels: int) -> int:
    size = image_size
    for _ in range(num_levels - 1):
        size = downsampled_size(size, "official")
    return size


UNET_PRESETS = ("tiny", "mnist", "cifar10", "celeba64")


def unet_preset(name: str, in_channels: int, image_size: int, num_labels: int | None = None) -> UNetConfig:
    """A named U-Net configuration (official downsampling, GroupNorm eps 1e-6).

    ``tiny`` (fast CPU tests) and ``mnist`` adapt their attention resolution to
    ``image_size``; ``cifar10`` and ``celeba64`` are the paper's architectures
    (attention at 16×16) and so expect 32×32 and 64×64 inputs.
    """
    if name == "tiny":
        mult = (1, 2)
        return UNetConfig(
            in_channels, image_size, 32, mult, 1, (_lowest_resolution(image_size, len(mult)),), 0.0, num_labels
        )
    if name == "mnist":
        return UNetConfig(
            in_channels, image_size, 64, (1, 2, 2), 2, (downsampled_size(image_size, "official"),), 0.1, num_labels
        )
    # The paper's models (App. C.1; the official code's ddpm_unet_small / ddpm_unet_large in main.py). The head
    # conv widths are the paper's: "outputs 1024 and 512 channels for CelebA 64×64 and CIFAR-10"; the official
    # code's head conv outputs 2 × 128 = 256 channels for both (models/diffusion.py, conv_out).
    if name == "cifar10":
        return UNetConfig(in_channels, image_size, 128, (1, 2, 2, 2), 2, (16,), 0.1, num_labels, head_channels=512)
    if name == "celeba64":
        return UNetConfig(in_channels, image_size, 128, (1, 2, 2, 2, 4), 2, (16,), 0.1, num_labels, head_channels=1024)
    raise ValueError(f"unknown U-Net preset {name!r}; choose one of {', '.join(UNET_PRESETS)}")


# ----------------------------------------------------------------------------
# Building blocks


def group_norm(channels: int, eps: float = 1e-6, min_group_channels: int = 2) -> nn.GroupNorm:
    """GroupNorm with the most groups (at most 32) that divide ``channels`` into groups of at least
    ``min_group_channels`` channels: 32 for every width of the paper's models (128 and up), as the
    official code's GroupNorm(32, ·); 16 for 32 channels; one group when no count fits."""
    fits = [g for g in range(1, 33) if channels % g == 0 and channels // g >= min_group_channels]
    return nn.GroupNorm(max(fits, default=1), channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity (Ho et al. 2020)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer) time indices, shape (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3x3 → [+ embedding] → GroupNorm → SiLU → dropout → conv3x3, plus skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int | None,
        dropout: float,
        norm_eps: float,
        min_group_channels: int = 2,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_eps, min_group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels) if emb_dim else None
        self.norm2 = group_norm(out_channels, norm_eps, min_group_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions, residual.

    Written with explicit matmuls rather than F.scaled_dot_product_attention:
    the CDM loss differentiates the input gradient again (double backward),
    which the fused flash / memory-efficient kernels do not support.
    """

    def __init__(self, channels: int, num_heads: int, norm_eps: float, min_group_channels: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_eps, min_group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, 3, head_dim, h * w)
        q, k, v = qkv.unbind(1)
        # Scale q and k separately (not the product) to keep half-precision logits in range.
        scale = head_dim**-0.25
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q * scale, k * scale), dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv; ``mode`` as in ``UNetConfig.downsample`` (sizes: ``downsampled_size``).

    ``official`` zero-pads only the right and bottom edges (DDPM: TF's "SAME"
    padding for even sizes), so output pixel i sees input pixels 2i..2i+2;
    ``symmetric`` sees 2i-1..2i+1. Both have the same weights.
    """

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        self.pad_right_bottom = mode == "official"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.pad_right_bottom else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_right_bottom:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the size of the matching skip, then a 3×3 conv.

    Upsampling to an explicit size rather than ×2 makes 7 -> 4 -> 7 round trips work.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class ResAttnBlock(nn.Module):
    """A ResBlock optionally followed by self-attention (one step of the encoder or decoder)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


# ----------------------------------------------------------------------------
# The U-Net


class UNetBackbone(nn.Module):
    """The DDPM U-Net body: input conv, encoder, middle, decoder.

    Returns the decoder's final feature map (``base_channels`` channels, input
    resolution); the heads that turn it into logits or ε̂ live in the model
    classes. With ``emb_dim=None`` no ResBlock has an embedding input at all.
    """

    def __init__(self, config: UNetConfig, emb_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        ch = c.base_channels
        self.input_conv = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        def step(in_ch: int, out_ch: int, resolution: int) -> ResAttnBlock:
            attn = (
                AttentionBlock(out_ch, c.num_heads, c.norm_eps, c.min_group_channels)
                if resolution in c.attn_resolutions
                else None
            )
            return ResAttnBlock(ResBlock(in_ch, out_ch, emb_dim, c.dropout, c.norm_eps, c.min_group_channels), attn)

        resolutions = c.resolutions()
        last = len(c.channel_mult) - 1
        # Every encoder output is kept as a skip for the decoder.
        self.encoder = nn.ModuleList()
        skip_channels = [ch]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.encoder.append(step(ch, c.base_channels * mult, resolutions[level]))
                ch = c.base_channels * mult
                skip_channels.append(ch)
            if level != last:
                self.encoder.append(Downsample(ch, c.downsample))
                skip_channels.append(ch)

        self.middle_res1 = ResBlock(ch, ch, emb_dim, c.dropout, c.norm_eps, c.min_group_channels)
        self.middle_attn = AttentionBlock(ch, c.num_heads, c.norm_eps, c.min_group_channels)
        self.middle_res2 = ResBlock(ch, ch, emb_dim, c.dropout, c.norm_eps, c.min_group_channels)

        self.decoder = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                out_ch = c.base_channels * c.channel_mult[level]
                self.decoder.append(step(ch + skip_channels.pop(), out_ch, resolutions[level]))
                ch = out_ch
            if level != 0:
                self.decoder.append(Upsample(ch))
        assert not skip_channels
        self.out_channels = ch

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.input_conv(x)
        skips = [h]
        for layer in self.encoder:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, emb)
            skips.append(h)
        h = self.middle_res2(self.middle_attn(self.middle_res1(h, emb)), emb)
        for layer in self.decoder:
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])
            else:
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        return h


def _labels_or_null(
    y: torch.Tensor | None, num_labels: int | None, batch: int, device: torch.device
) -> torch.Tensor | None:
    """Labels for a conditional model (None -> the null label); None for an unconditional one."""
    if num_labels is None:
        if y is not None:
            raise ValueError("this model is unconditional (num_labels=None) but labels y were passed")
        return None
    if y is None:
        return torch.full((batch,), num_labels, dtype=torch.long, device=device)
    y = torch.as_tensor(y, device=device).long()
    return y.expand(batch) if y.ndim == 0 else y


class UNetClassifier(nn.Module):
    """CDM network: U-Net without time input → logits over noise levels t = 0..T+1.

    ``forward(x, y=None)`` returns (B, T+2) logits ℓ(x) = cumsum(f_θ(x)). The
    cumulative sum is the paper's parametrisation of the logits; it is fixed,
    not learned. The head (App. C.1) is GroupNorm → SiLU → 3×3 conv to
    ``config.head_channels`` → global average pool → Linear to T+2. Conditional
    models feed a label embedding to every ResBlock where a DDPM feeds its time
    embedding.
    """

    def __init__(self, config: UNetConfig, num_timesteps: int) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.config = config
        self.num_timesteps = num_timesteps
        self.num_labels = config.num_labels
        self.data_shape = (config.in_channels, config.image_size, config.image_size)
        emb_dim = 4 * config.base_channels if config.num_labels is not None else None
        # num_labels + 1 rows: the last one is the null label for classifier-free guidance.
        self.label_embed = nn.Embedding(config.num_labels + 1, emb_dim) if emb_dim else None
        self.backbone = UNetBackbone(config, emb_dim)
        ch = self.backbone.out_channels
        head = config.head_channels or ch
        self.head_norm = group_norm(ch, config.norm_eps, config.min_group_channels)
        self.head_conv = nn.Conv2d(ch, head, 3, padding=1)
        # Outputs f_θ(x), the per-class increments whose cumulative sum is the logits.
        self.logit_increments = nn.Linear(head, num_timesteps + 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        labels = _labels_or_null(y, self.num_labels, x.shape[0], x.device)
        emb = self.label_embed(labels) if labels is not None else None
        h = self.backbone(x, emb)
        h = self.head_conv(F.silu(self.head_norm(h))).mean(dim=(2, 3))
        return torch.cumsum(self.logit_increments(h), dim=1)

    def spec(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "num_timesteps": self.num_timesteps, "config": self.config.to_dict()}


class UNetDenoiser(nn.Module):
    """DDM baseline: the same U-Net with a sinusoidal time embedding → ε̂(x, t).

    ``t`` is the integer noise-level class in 0..T+1 (the same indexing the CDM uses).
    Its head conv outputs the image channels, so ``config.head_channels`` does not apply.
    """

    def __init__(self, config: UNetConfig, num_timesteps: int) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.config = config
        self.num_timesteps = num_timesteps
        self.num_labels = config.num_labels
        self.data_shape = (config.in_channels, config.image_size, config.image_size)
        ch = config.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(config.num_labels + 1, emb_dim) if config.num_labels is not None else None
        self.backbone = UNetBackbone(config, emb_dim)
        out = self.backbone.out_channels
        self.head_norm = group_norm(out, config.norm_eps, config.min_group_channels)
        self.head_conv = zero_init(nn.Conv2d(out, config.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        labels = _labels_or_null(y, self.num_labels, x.shape[0], x.device)
        if labels is not None:
            emb = emb + self.label_embed(labels)
        h = self.backbone(x, emb)
        return self.head_conv(F.silu(self.head_norm(h)))

    def spec(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "num_timesteps": self.num_timesteps, "config": self.config.to_dict()}


# ----------------------------------------------------------------------------
# MLPs for vector data


class MLPClassifier(nn.Module):
    """CDM network for vectors: SiLU MLP → Linear to T+2 → cumsum.

    SiLU rather than ReLU because the CDM denoiser is the input gradient of the
    logits and the loss differentiates it again: a piecewise-linear network has
    a piecewise-constant gradient and a zero second derivative.
    ``depth`` is the number of hidden layers of width ``hidden``.
    """

    def __init__(
        self, dim: int, num_timesteps: int, hidden: int = 256, depth: int = 4, num_labels: int | None = None
    ) -> None:
        super().__init__()
        if dim < 1 or num_timesteps < 1 or hidden < 1 or depth < 1:
            raise ValueError(
                f"dim, num_timesteps, hidden and depth must be positive, got {dim}, {num_timesteps}, {hidden}, {depth}"
            )
        self.dim, self.num_timesteps, self.hidden, self.depth, self.num_labels = (
            dim,
            num_timesteps,
            hidden,
            depth,
            num_labels,
        )
        self.data_shape = (dim,)
        self.input = nn.Linear(dim, hidden)
        self.label_embed = nn.Embedding(num_labels + 1, hidden) if num_labels is not None else None
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.logit_increments = nn.Linear(hidden, num_timesteps + 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.input(x)
        labels = _labels_or_null(y, self.num_labels, x.shape[0], x.device)
        if labels is not None:
            h = h + self.label_embed(labels)
        for layer in self.hidden_layers:
            h = layer(F.silu(h))
        return torch.cumsum(self.logit_increments(F.silu(h)), dim=1)

    def spec(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "dim": self.dim,
            "num_timesteps": self.num_timesteps,
            "hidden": self.hidden,
            "depth": self.depth,
            "num_labels": self.num_labels,
        }


class MLPDenoiser(nn.Module):
    """DDM baseline for vectors: ε̂(x, t) from a SiLU MLP with a sinusoidal time embedding added to its first layer."""

    def __init__(
        self, dim: int, num_timesteps: int, hidden: int = 256, depth: int = 4, num_labels: int | None = None
    ) -> None:
        super().__init__()
        if dim < 1 or num_timesteps < 1 or hidden < 1 or depth < 1:
            raise ValueError(
                f"dim, num_timesteps, hidden and depth must be positive, got {dim}, {num_timesteps}, {hidden}, {depth}"
            )
        self.dim, self.num_timesteps, self.hidden, self.depth, self.num_labels = (
            dim,
            num_timesteps,
            hidden,
            depth,
            num_labels,
        )
        self.data_shape = (dim,)
        self.input = nn.Linear(dim, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_embed = nn.Embedding(num_labels + 1, hidden) if num_labels is not None else None
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.output = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        h = self.input(x) + self.time_mlp(timestep_embedding(t, self.hidden))
        labels = _labels_or_null(y, self.num_labels, x.shape[0], x.device)
        if labels is not None:
            h = h + self.label_embed(labels)
        for layer in self.hidden_layers:
            h = layer(F.silu(h))
        return self.output(F.silu(h))

    def spec(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "dim": self.dim,
            "num_timesteps": self.num_timesteps,
            "hidden": self.hidden,
            "depth": self.depth,
            "num_labels": self.num_labels,
        }


# ----------------------------------------------------------------------------
# Specs, rebuilding, counting

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (UNetClassifier, UNetDenoiser, MLPClassifier, MLPDenoiser)
}
# The exact logits of a Gaussian mixture, stored like a network so the batch stages can be checked end to end.
from cdm_core.analytic import ConditionalGaussianMixtureLogits, GaussianMixtureLogits  # noqa: E402

for _exact in (GaussianMixtureLogits, ConditionalGaussianMixtureLogits):
    _MODEL_CLASSES[_exact.__name__] = _exact


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying network of a DistributedDataParallel / DataParallel / torch.compile wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """A plain-JSON description of the architecture, enough for ``build_model`` to rebuild it."""
    model = unwrap_model(model)
    if type(model).__name__ not in _MODEL_CLASSES or not hasattr(model, "spec"):
        raise TypeError(f"{type(model).__name__} is not a cdm network; known classes: {sorted(_MODEL_CLASSES)}")
    return model.spec()


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a network (fresh weights) from a ``model_spec`` dict."""
    spec = dict(spec)
    name = spec.pop("class", None)
    if name not in _MODEL_CLASSES:
        raise ValueError(f"model spec has class {name!r}; known classes: {sorted(_MODEL_CLASSES)}")
    if "config" in spec:
        spec["config"] = UNetConfig.from_dict(spec["config"])
    return _MODEL_CLASSES[name](**spec)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not)."""
    return sum(p.numel() for p in unwrap_model(model).parameters())
