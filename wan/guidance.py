"""Classifier-free guidance as a strategy chosen once per generation, so the sampling loop reads

    for each step: v = guided(x, t); x = solver.step(v, i, x)

whatever way the two passes run:

- `Unguided` (guide_scale 1): one DiT pass on the prompt;
- `BatchedGuidance`: the conditional and unconditional passes in one forward of twice the batch;
- `SequentialGuidance`: the two passes one after the other (half the activation memory);
- `SplitGuidance` (CFG parallelism): this rank runs one branch and swaps velocities with the rank that runs
  the other (`wan.distributed.parallel.CfgSplit`).

All give the same velocity, `uncond + scale·(cond - uncond)` (`wan.sampling.guide`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from wan.sampling import guide

__all__ = [
    "BatchedGuidance", "Denoiser", "Guidance", "SequentialGuidance", "SplitGuidance", "Unguided",
    "choose_guidance",
]  # fmt: skip


@dataclass
class Denoiser:
    """The DiT with one request's image conditioning (None for text-to-video).

    y: [B, 4 + z, T, h, w] mask and condition latents; clip: [B, Li, image_dim] CLIP features.
    `branch_state`: given a guidance branch's name ("cond", "uncond"), a context manager inside which the
    DiT keeps that branch's own step-cache state (`wan.cache` `context`); None without a step cache.
    """

    dit: torch.nn.Module
    y: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    branch_state: Callable[[str], AbstractContextManager[None]] | None = None

    def __call__(
        self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, copies: int = 1,
        branch: str | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """latents: [copies·B, z, T, h, w]; t: [copies·B]; context: [copies·B, L, C] -> velocity, latents'
        shape. `copies`: how many times the batch is repeated (the conditioning is repeated to match).
        `branch`: which guidance branch this call is, when the branches are separate calls."""
        scope = self.branch_state(branch) if branch and self.branch_state else contextlib.nullcontext()
        with scope:
            if self.y is None:
                return self.dit(latents, t, context)
            inputs = torch.cat([latents, self.y.repeat(copies, 1, 1, 1, 1)], dim=1)
            assert self.clip is not None
            return self.dit(inputs, t, context, clip_features=self.clip.repeat(copies, 1, 1))


class Guidance(Protocol):
    """x: [B, z, T, h, w] latents, t: [B] timesteps -> the guided velocity, x's shape."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class VelocityExchange(Protocol):
    """Swaps this rank's branch velocity for both branches' (`CfgSplit`)."""

    branch: int

    def exchange(self, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Unguided:
    denoise: Denoiser
    context: torch.Tensor  # [B, L, C]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, t, self.context)


@dataclass
class BatchedGuidance:
    denoise: Denoiser
    context: torch.Tensor  # [B, L, C] the prompts
    uncond: torch.Tensor  # [B, L, C] the negative prompt
    scale: float

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = self.denoise(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.context, self.uncond]), copies=2
        )
        cond, uncond = both.chunk(2)
        return guide(cond, uncond, self.scale)


@dataclass
class SequentialGuidance:
    denoise: Denoiser
    context: torch.Tensor
    uncond: torch.Tensor
    scale: float

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self.denoise(x, t, self.context, branch="cond")
        return guide(cond, self.denoise(x, t, self.uncond, branch="uncond"), self.scale)


@dataclass
class SplitGuidance:
    denoise: Denoiser
    branch_context: torch.Tensor  # this rank's branch: the prompts (branch 0) or the negative prompt
    split: VelocityExchange
    scale: float

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        branch = "cond" if self.split.branch == 0 else "uncond"
        cond, uncond = self.split.exchange(self.denoise(x, t, self.branch_context, branch=branch))
        return guide(cond, uncond, self.scale)


def choose_guidance(
    denoise: Denoiser, context: torch.Tensor, uncond: torch.Tensor | None, scale: float, *,
    split: VelocityExchange | None = None, batched: bool = True,
) -> Guidance:  # fmt: skip
    """The strategy for one generation: none when `scale` is 1 (`uncond` may then be None), split across
    ranks when this rank holds a CFG branch (`split`), else batched or sequential."""
    if scale == 1.0:
        return Unguided(denoise, context)
    assert uncond is not None
    if split is not None:
        return SplitGuidance(denoise, context if split.branch == 0 else uncond, split, scale)
    if batched:
        return BatchedGuidance(denoise, context, uncond, scale)
    return SequentialGuidance(denoise, context, uncond, scale)
