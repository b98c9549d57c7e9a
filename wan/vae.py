"""The Wan 2.1 3-D causal VAE (`Wan2.1_VAE.pth`), fp32, with chunked encode and streaming decode.

Every temporal convolution is causal: it only looks at the current frame and the two before it. A
video is therefore processed in chunks (encode: frame 0 alone, then 4 frames at a time; decode: one
latent frame at a time) and each causal op keeps the last `CACHE_T` frames of its input in a
`FeatureCache` slot, so the result equals a single pass over the whole video while the activations
held at any moment do not grow with its length.

Module and parameter names reproduce the official state dict exactly (`encoder.downsamples.3.shortcut`,
`decoder.upsamples.7.time_conv`, `conv1`, ...); `vae_state_dict_from_diffusers` converts the layout
of diffusers' `AutoencoderKLWan`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wan.configs import VAEConfig
from wan.weights import CheckpointError, load_strict

__all__ = [
    "CACHE_T",
    "OFFICIAL_LATENTS_MEAN",
    "OFFICIAL_LATENTS_STD",
    "FeatureCache",
    "VAETiling",
    "WanVAE",
    "diffusers_vae_config",
    "vae_config_from_state_dict",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_to_diffusers",
]

CACHE_T = 2  # frames of past input every causal op keeps between chunks

# Per-channel statistics of the posterior mean; latents handed to / taken from the DiT are normalised.
OFFICIAL_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
OFFICIAL_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


class FeatureCache:
    """Causal context carried from one chunk to the next.

    Each causal op owns one slot, found by call order: `peek()` reads the current slot (None on the
    first chunk) and `push()` replaces it and moves on; `rewind()` starts the next chunk. A slot holds
    the op's last input frames `[B, C, <=CACHE_T, H, W]`; a 0-frame tensor means "no past yet, use
    zeros" (what an `upsample3d` leaves after the first decoded chunk, which it does not upsample).
    """

    def __init__(self) -> None:
        self.slots: list[Tensor | None] = []
        self.pos = 0

    def rewind(self) -> None:
        self.pos = 0

    def peek(self) -> Tensor | None:
        return self.slots[self.pos] if self.pos < len(self.slots) else None

    def push(self, value: Tensor) -> None:
        if self.pos == len(self.slots):
            self.slots.append(value)
        else:
            self.slots[self.pos] = value
        self.pos += 1


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding (`2 * padding[0]` frames) lies entirely in the past.

    With a cache, the past frames come from the previous chunk (zeros for what is missing) and the
    last `CACHE_T` input frames are stored for the next one. `x: [B, C, T, H, W]`.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt
        self.last_tap_only = self.stride[0] == 1 and self.time_pad == self.kernel_size[0] - 1

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.time_pad:
            past = None
            if cache is not None:
                past = cache.peek()
                keep = x[:, :, -CACHE_T:]
                if keep.shape[2] < CACHE_T and past is not None:
                    keep = torch.cat([past[:, :, -1:], keep], 2)
                else:
                    keep = keep.clone()
                cache.push(keep)
            have = 0 if past is None else past.shape[2]
            if not have and x.shape[2] == 1 and self.last_tap_only:
                # One frame after zeros (a first chunk): only the last temporal tap sees data; 1/3 the work.
                w = self.weight[:, :, -1]
                return F.conv2d(x[:, :, 0], w, self.bias, self.stride[1:], self.padding[1:]).unsqueeze(2)
            parts = [x] if not have else [past, x]
            if have < self.time_pad:
                b, c, _, h, w = x.shape
                parts.insert(0, x.new_zeros(b, c, self.time_pad - have, h, w))
            x = torch.cat(parts, 2)
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / RMS over channels (dim 1) * gamma; gamma is `[C, 1, 1, 1]` for video, `[C, 1, 1]` for images."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.scale = dim**0.5

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * (self.gamma * self.scale)


class ResidualBlock(nn.Module):
    """`residual = [norm, SiLU, conv3, norm, SiLU, dropout, conv3]` plus a 1x1x1 `shortcut` if C changes.

    `x: [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]`.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        norm1, _, conv1, norm2, _, dropout, conv2 = self.residual
        y = conv1(F.silu(norm1(x), inplace=True), cache)
        y = conv2(dropout(F.silu(norm2(y), inplace=True)), cache)
        return y.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, residual. `x: [B, C, T, H, W]`.

    q, k and v go to `scaled_dot_product_attention` as `[B*T, 1, H*W, C]`: one explicit head, last
    dimension contiguous. Only that layout reaches the fused kernels (CUDA memory-efficient / flash, the
    CPU flash kernel), which never hold the `[H*W, H*W]` score matrix; 3-D inputs fall back to the math
    kernel, which builds it (14,400² floats, twice, per frame at 720P).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.to_qkv(self.norm(x.transpose(1, 2).reshape(b * t, c, h, w)))  # [bt, 3c, h, w]
        # -> [bt, 3, hw, c], made contiguous so that each of q, k, v has unit stride in c.
        qkv = y.view(b * t, 3, c, h * w).transpose(2, 3).contiguous()
        del y
        q, k, v = qkv.unsqueeze(2).unbind(1)  # each [bt, 1, hw, c]
        del qkv
        y = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c]
        del q, k, v
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return self.proj(y).view(b, t, c, h, w).transpose(1, 2) + x


class Resample(nn.Module):
    """Halve or double H and W (per frame), optionally T too (causally, with a cache slot).

    `downsample2d/3d`: `[B, C, T, H, W] -> [B, C, T', H/2, W/2]` (right/bottom zero pad, stride-2 conv);
    3d folds frame pairs with `time_conv` (k=3, stride 2) from the second chunk on, so a first chunk
    of 1 frame stays 1 frame. `upsample2d/3d`: `-> [B, C/2, T', 2H, 2W]` (nearest-exact + conv);
    3d first makes each frame two with `time_conv` (C -> 2C, then interleaved), except on the first
    chunk, which keeps its single frame, and the second, which sees zeros rather than the first.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and cache is not None:
            if cache.peek() is None:
                cache.push(x[:, :, :0])  # first chunk: no temporal upsampling, and no past for the next
            else:
                x = self.time_conv(x, cache).view(b, 2, c, t, h, w)
                t *= 2
                x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, t, h, w)  # frame 2i, 2i+1 <- halves at i
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = y.view(b, t, *y.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d" and cache is not None:
            past = cache.peek()
            cache.push(x[:, :, -1:].clone())
            if past is not None:
                x = self.time_conv(torch.cat([past, x], 2))
        return x


class Encoder3d(nn.Module):
    """`[B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8]` for one chunk (mean and log-variance)."""

    def __init__(
        self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int, temporal: Sequence[bool]
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                layers.append(Resample(cout, "downsample3d" if temporal[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, z_dim * 2, 3, padding=1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head[2](F.silu(self.head[0](x), inplace=True), cache)


class Decoder3d(nn.Module):
    """`[B, z_dim, T, h, w] -> [B, 3, T', 8h, 8w]` for one chunk (see `Resample` for T')."""

    def __init__(
        self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int, temporal: Sequence[bool]
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            cin = cin // 2 if i > 0 else cin  # every upsample halves the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                layers.append(Resample(cout, "upsample3d" if temporal[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head[2](F.silu(self.head[0](x), inplace=True), cache)


class WanVAE(nn.Module):
    """The Wan 2.1 video VAE: 4x temporal, 8x spatial compression to `z_dim` channels.

    Latents outside this class are normalised per channel: `(mu - latents_mean) / latents_std`.
    """

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: Sequence[bool] = (False, True, True),
        latents_mean: Sequence[float] = OFFICIAL_LATENTS_MEAN,
        latents_std: Sequence[float] = OFFICIAL_LATENTS_STD,
    ) -> None:
        super().__init__()
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs one entry per stage boundary ({len(dim_mult) - 1})")
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean/latents_std need {z_dim} values each")
        self.z_dim = z_dim
        scale = 2 ** (len(dim_mult) - 1)
        self.stride = (2 ** sum(map(bool, temporal_downsample)), scale, scale)
        self.encoder = Encoder3d(dim, z_dim, dim_mult, num_res_blocks, temporal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, temporal_downsample[::-1])
        self.register_buffer("latents_mean", torch.tensor(latents_mean, dtype=torch.float), persistent=False)
        self.register_buffer("latents_std", torch.tensor(latents_std, dtype=torch.float), persistent=False)

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> WanVAE:
        """A freshly initialised VAE of `cfg`'s architecture (`wan.configs.VAEConfig`)."""
        return cls(dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=cfg.dim_mult, num_res_blocks=cfg.num_res_blocks,
                   temporal_downsample=cfg.temporal_downsample)  # fmt: skip

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], source: str = "VAE state dict") -> WanVAE:
        """Build a VAE sized to fit `state_dict` (official or diffusers layout) and load it strictly."""
        if "quant_conv.weight" in state_dict:
            state_dict = vae_state_dict_from_diffusers(state_dict)
        with torch.device("meta"):
            vae = cls(**vae_config_from_state_dict(state_dict))
        load_strict(vae, state_dict, source)
        vae.latents_mean = torch.tensor(OFFICIAL_LATENTS_MEAN)  # buffers were built on meta
        vae.latents_std = torch.tensor(OFFICIAL_LATENTS_STD)
        return vae.eval()

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Latent mean and std as `[1, z, 1, 1, 1]` on `like`'s device."""
        shape = (1, self.z_dim, 1, 1, 1)
        return self.latents_mean.to(like).view(shape), self.latents_std.to(like).view(shape)

    def encode(self, video: Tensor) -> Tensor:
        """`video: [B, 3, F, H, W]` in [-1, 1] -> normalised latents `[B, z, (F-1)//4 + 1, H/8, W/8]`.

        Frame 0 is encoded alone (like a still image), then 4 frames per latent frame; trailing frames
        that do not fill a chunk are ignored, as in the official code. Computes in fp32.
        """
        if video.ndim != 5 or video.shape[1] != 3 or video.shape[2] < 1:
            raise ValueError(f"expected a video [B, 3, F>=1, H, W], got shape {tuple(video.shape)}")
        st, sh, sw = self.stride
        if video.shape[3] % sh or video.shape[4] % sw:
            raise ValueError(f"height and width must be multiples of {sh}, got {tuple(video.shape[3:])}")
        x = video.float()
        cache = FeatureCache()
        chunks = [x[:, :, :1]] + [x[:, :, i : i + st] for i in range(1, x.shape[2] - st + 1, st)]
        mus = []
        with _no_autocast(x):
            for chunk in chunks:
                cache.rewind()
                mus.append(self.conv1(self.encoder(chunk, cache))[:, : self.z_dim])
        mean, std = self._stats(x)
        return (torch.cat(mus, 2) - mean) * std.reciprocal()  # the official arithmetic, bit for bit

    def decode_stream(self, latents: Tensor, tiling: VAETiling | None = None) -> Iterator[Tensor]:
        """`latents: [B, z, T, h, w]` (normalised) -> yields `[B, 3, n, 8h, 8w]` in [-1, 1], fp32.

        n = 1 for the first latent frame, 4 for each later one; only the causal cache is kept between
        chunks, so memory does not grow with T. Bad input raises here, not at the first `next()`.
        `tiling`: decode in overlapping spatial tiles with blended seams (see `VAETiling`); None (the
        default) decodes whole frames, exactly.
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents [B, {self.z_dim}, T>=1, h, w], got {tuple(latents.shape)}")
        z = latents.float()
        mean, std = self._stats(z)
        with _no_autocast(z):
            z = self.conv2(z / std.reciprocal() + mean)
        if tiling is not None and tiling.splits(z.shape[-2:]):
            return self._decode_tiled(z, tiling)
        return self._decode_chunks(z)

    def _decode_chunks(self, z: Tensor) -> Iterator[Tensor]:
        cache = FeatureCache()
        for i in range(z.shape[2]):
            cache.rewind()
            with _no_autocast(z):  # entered per chunk: the caller's code between chunks keeps its own
                chunk = self.decoder(z[:, :, i : i + 1], cache).clamp_(-1.0, 1.0)
            yield chunk

    def _decode_tiled(self, z: Tensor, tiling: VAETiling) -> Iterator[Tensor]:
        """Tile by tile, each through every latent frame with its own causal cache, so the device holds
        one tile's activations and cache at a time; the weighted tiles add up in a float32 canvas of the
        whole video in host memory, which is then yielded chunk by chunk (1 frame, then `st` per latent
        frame) on `z`'s device. z: [B, z, T, h, w] after `conv2`."""
        st, sh, sw = self.stride
        b, _, t, h, w = z.shape
        height, width, frames = h * sh, w * sw, 1 + st * (t - 1)
        canvas = torch.zeros(b, 3, frames, height, width)
        total = torch.zeros(height, width)
        for r in tiling.starts(h):
            for c in tiling.starts(w):
                th, tw = min(tiling.tile, h - r), min(tiling.tile, w - c)
                wy = tiling.ramp(r * sh, th * sh, height, tiling.overlap * sh, "cpu")
                wx = tiling.ramp(c * sw, tw * sw, width, tiling.overlap * sw, "cpu")
                weight = wy[:, None] * wx[None, :]  # [th*8, tw*8]
                ys, xs = slice(r * sh, (r + th) * sh), slice(c * sw, (c + tw) * sw)
                total[ys, xs] += weight
                cache, start = FeatureCache(), 0
                for i in range(t):
                    cache.rewind()
                    with _no_autocast(z):
                        piece = self.decoder(z[:, :, i : i + 1, r : r + th, c : c + tw], cache).clamp_(
                            -1.0, 1.0
                        )
                    n = piece.shape[2]
                    canvas[:, :, start : start + n, ys, xs] += piece.cpu() * weight
                    start += n
        canvas /= total
        bounds = [0, 1, *range(1 + st, frames + 1, st)]
        for lo, hi in itertools.pairwise(bounds):
            yield canvas[:, :, lo:hi].to(z.device)

    def decode(self, latents: Tensor, tiling: VAETiling | None = None) -> Tensor:
        """`latents: [B, z, T, h, w]` (normalised) -> video `[B, 3, 1 + 4(T-1), 8h, 8w]` in [-1, 1]."""
        return torch.cat(list(self.decode_stream(latents, tiling)), 2)


@dataclass(frozen=True)
class VAETiling:
    """Spatial tiling of the decoder for high resolutions: square tiles of `tile` latent cells (8 pixels
    each) overlapping by `overlap` cells, blended with linear ramps across each overlap.

    The device holds one tile's activations and causal cache at a time, whatever the frame size; the
    decoded video gathers in host memory (float32, 0.9 GB for 81 frames at 1280x720) and is yielded once
    every tile is done, so a tiled decode does not stream. The frame's mid-block attention and the
    convolutions near tile edges see only their tile: a tiled decode is close to, not equal to, the
    whole-frame one (measured in the tests on a smooth video). Frames no larger than one tile are decoded
    whole, exactly.
    """

    tile: int = 32
    overlap: int = 8

    def __post_init__(self) -> None:
        if self.tile < 2 or not 0 < self.overlap < self.tile:
            raise ValueError(
                f"VAE tiling needs tile >= 2 and 0 < overlap < tile (latent cells), got tile {self.tile}, "
                f"overlap {self.overlap}"
            )

    def splits(self, size: Sequence[int]) -> bool:
        """Whether a latent frame of `size` (h, w) needs more than one tile."""
        return any(s > self.tile for s in size)

    def starts(self, size: int) -> list[int]:
        """Tile starts along one latent axis of `size` cells: every `tile - overlap`, the last flush."""
        if size <= self.tile:
            return [0]
        starts = list(range(0, size - self.tile, self.tile - self.overlap))
        return [*starts, size - self.tile]

    @staticmethod
    def ramp(start: int, length: int, total: int, overlap: int, device: torch.device) -> Tensor:
        """Blend weights [length] of a tile covering pixels [start, start + length) of `total`: rising over
        the first `overlap` pixels and falling over the last ones, except at the frame's own edges."""
        weight = torch.ones(length, device=device)
        edge = (torch.arange(overlap, device=device) + 0.5) / overlap  # (0, 1), never exactly 0
        if start > 0:
            weight[:overlap] = edge
        if start + length < total:
            weight[-overlap:] = torch.minimum(weight[-overlap:], edge.flip(0))
        return weight


def _no_autocast(x: Tensor) -> torch.autocast:
    """The VAE runs in fp32 even inside a caller's autocast region."""
    return torch.autocast(x.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------
# Checkpoint layouts

# Inside a residual block: official sub-key prefix <-> diffusers sub-key prefix.
_RESIDUAL_KEYS = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
# Outside the numbered blocks: official prefix <-> diffusers prefix (longest first within a side).
_FIXED_KEYS = (
    ("encoder.conv1.", "encoder.conv_in."),
    ("decoder.conv1.", "decoder.conv_in."),
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("encoder.head.0.", "encoder.norm_out."),
    ("encoder.head.2.", "encoder.conv_out."),
    ("decoder.head.0.", "decoder.norm_out."),
    ("decoder.head.2.", "decoder.conv_out."),
    ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
    ("decoder.middle.1.", "decoder.mid_block.attentions.0."),
)
_OFFICIAL_BLOCK = re.compile(r"(encoder\.downsamples|decoder\.upsamples|(?:en|de)coder\.middle)\.(\d+)\.")
_DIFFUSERS_BLOCK = re.compile(
    r"(encoder\.down_blocks|encoder\.mid_block\.resnets|decoder\.mid_block\.resnets"
    r"|decoder\.up_blocks\.(\d+)\.(resnets|upsamplers))\.(\d+)\."
)


def _swap_prefix(key: str, pairs: Sequence[tuple[str, str]], forward: bool) -> str:
    for official, diffusers in pairs:
        src, dst = (official, diffusers) if forward else (diffusers, official)
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def _decoder_stage_len(keys: Sequence[str], diffusers: bool) -> int:
    """Entries per decoder stage (`num_res_blocks + 1` residual blocks and one upsample), from the keys."""
    if diffusers:
        resnets = {m.group(1) for k in keys if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
        return len(resnets) + 1
    firsts = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))]
    return min(firsts) + 1 if firsts else 1 << 30  # no upsample at all: a single stage


def diffusers_vae_config(cfg: Any) -> dict[str, Any]:
    """Constructor arguments of diffusers' `AutoencoderKLWan` for a `wan.configs.VAEConfig` (its spelling of
    the temporal flags included)."""
    return {
        "base_dim": cfg.dim,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "temperal_downsample": list(cfg.temporal_downsample),
    }


def vae_state_dict_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official / our VAE keys -> diffusers `AutoencoderKLWan` keys (tensors shared, not copied)."""
    stage_len = _decoder_stage_len(list(sd), diffusers=False)
    out = {}
    for key, value in sd.items():
        m = _OFFICIAL_BLOCK.match(key)
        if m is None or (m.group(1).endswith("middle") and m.group(2) == "1"):  # attention: a fixed key
            out[_swap_prefix(key, _FIXED_KEYS, True)] = value
            continue
        group, idx, sub = m.group(1), int(m.group(2)), key[m.end() :]
        if group == "encoder.downsamples":
            prefix = f"encoder.down_blocks.{idx}."
        elif group == "decoder.upsamples":
            stage, j = divmod(idx, stage_len)
            inner = "upsamplers.0" if j == stage_len - 1 else f"resnets.{j}"
            prefix = f"decoder.up_blocks.{stage}.{inner}."
        else:  # middle.0 / middle.2 (middle.1, the attention, is a fixed key)
            prefix = f"{group.split('.')[0]}.mid_block.resnets.{idx // 2}."
        out[prefix + _swap_prefix(sub, _RESIDUAL_KEYS, True)] = value
    return out


def vae_state_dict_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLWan` keys -> official / our VAE keys (tensors shared, not copied)."""
    stage_len = _decoder_stage_len(list(sd), diffusers=True)
    out = {}
    for key, value in sd.items():
        m = _DIFFUSERS_BLOCK.match(key)
        if m is None:
            out[_swap_prefix(key, _FIXED_KEYS, False)] = value
            continue
        head, stage, kind, idx, sub = m.group(1), m.group(2), m.group(3), int(m.group(4)), key[m.end() :]
        if head == "encoder.down_blocks":
            prefix = f"encoder.downsamples.{idx}."
        elif stage is not None:
            j = stage_len - 1 if kind == "upsamplers" else idx
            prefix = f"decoder.upsamples.{int(stage) * stage_len + j}."
        else:
            prefix = f"{head.split('.')[0]}.middle.{2 * idx}."
        out[prefix + _swap_prefix(sub, _RESIDUAL_KEYS, False)] = value
    return out


def vae_config_from_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Infer `WanVAE` constructor arguments (dim, z_dim, dim_mult, num_res_blocks, temporal_downsample).

    Reads the encoder's layout: residual blocks give the stage widths, `resample` entries the stage
    boundaries, and `time_conv` which of them also halve time. Diffusers-layout dicts are accepted.
    """
    if "quant_conv.weight" in sd:
        sd = vae_state_dict_from_diffusers(sd)
    try:
        dim = sd["encoder.conv1.weight"].shape[0]
        z_dim = sd["conv2.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a Wan VAE state dict: no {exc.args[0]!r}") from exc
    n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k)))
    stages: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i in range(n):
        if f"encoder.downsamples.{i}.resample.1.weight" in sd:
            temporal.append(f"encoder.downsamples.{i}.time_conv.weight" in sd)
            stages.append([])
        else:
            stages[-1].append(sd[f"encoder.downsamples.{i}.residual.2.weight"].shape[0])
    return {
        "dim": dim,
        "z_dim": z_dim,
        "dim_mult": tuple(s[-1] // dim for s in stages),
        "num_res_blocks": len(stages[0]),
        "temporal_downsample": tuple(temporal),
    }
