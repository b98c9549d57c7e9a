"""3-D rotary position embedding over the latent patch grid (frames, rows, columns).

A head of width d is split into three parts, d - 4*(d//6) channels for time and 2*(d//6) each for
height and width (44/42/42 for d = 128). Channels rotate in adjacent pairs (GPT-J style), with
frequencies theta^(-2j/part) per part. Angles are computed in float64; the rotations are stored as
complex64 unit numbers. They are applied in real arithmetic, `(a cos - b sin, a sin + b cos)` per pair in
float32, from the table's (cos, sin) view, so `torch.compile` can generate code for it (it has no
complex code generation).
"""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "rope_frequencies", "rope_split"]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels given to (time, height, width): (44, 42, 42) for head_dim 128."""
    part = 2 * (head_dim // 6)
    return head_dim - 2 * part, part, part


def _axis_angles(positions: torch.Tensor, channels: int, theta: float) -> torch.Tensor:
    """positions: [n] -> angles [n, channels // 2] in float64."""
    inv_freq = theta ** (-torch.arange(0, channels, 2, dtype=torch.float64) / channels)
    return torch.outer(positions.to(torch.float64), inv_freq)


def rope_frequencies(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Unit rotations for every token of an (f, h, w) grid in raster order.

    Returns complex64 [f*h*w, head_dim // 2]: one row per token, one column per channel pair.
    """
    f, h, w = grid
    ct, ch, cw = rope_split(head_dim)
    at = _axis_angles(torch.arange(f), ct, theta)[:, None, None, :].expand(f, h, w, -1)
    ah = _axis_angles(torch.arange(h), ch, theta)[None, :, None, :].expand(f, h, w, -1)
    aw = _axis_angles(torch.arange(w), cw, theta)[None, None, :, :].expand(f, h, w, -1)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(f * h * w, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(device)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs. x: [B, L, N, D]; freqs: complex [L, D/2], or its real view
    [L, D/2, 2] of (cos, sin) -> [B, L, N, D] in x's dtype."""
    if freqs.is_complex():
        freqs = torch.view_as_real(freqs)
    cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]  # [L, 1, D/2]: broadcast over heads
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)
