"""Step caching for a `WanModel`, applied from outside the model (as context parallelism is): a first-block
cache (`FirstBlockCache`) and MagCache (`MagCache`, see its docstring), each deciding as diffusers' hook of
the same name does, so that the same settings on the same weights skip the same steps.

First-block cache (FBCache, as diffusers' `FirstBlockCacheConfig` hook): on every DiT forward the first
block always runs; its residual r = block_0(x) - x [B, L, C] is compared with the residual of the last
*fully computed* forward, r_prev:

    change = mean(|r - r_prev|) / mean(|r_prev|)      (means over every element: batch, tokens, width)

and when change <= threshold the remaining blocks are skipped: the stream after the last block is taken as
block_0(x) + R, where R = (last block's output - first block's output) [B, L, C] saved at the last fully
computed forward. Otherwise every block runs and r, R are renewed. A skipped forward leaves r_prev and R as
they were (they always come from the last computed forward). The first forward after `enable` or `reset`
always computes.

One decision is made per model call over the whole batch, as diffusers decides per transformer call. With
batched classifier-free guidance (conditional and unconditional samples in one batch of 2B), the means above
run over both halves together, so both are computed or both skipped. Diffusers' own Wan pipeline calls the
transformer once per branch, each inside its `cache_context("cond")` / `cache_context("uncond")`, which keeps
one state per branch; `context(name)` (on either cache) does the same here for sequential guidance (calls made
outside any context use the state named "default").

Both are applied by replacing the blocks' `forward` on the instances (the parameters, their names and the
state dict are untouched); `disable` restores the class's `forward`, so a disabled cache leaves the model
computing bit-identically to one never cached. With caching enabled and nothing skipped, results are
bit-identical too: the blocks run unchanged, the cache only reads their inputs and outputs. Not yet supported
(refused with a ValueError): compiled blocks (`WanModel.compile_blocks`) and context parallelism
(`sequence_sharding`: each rank would compare only its own tokens; the means need an all-reduce over the mesh
first).

Memory: the first-block cache keeps two [B, L, C] float32 tensors per context (the first block's residual
and the remaining blocks' residual), MagCache one (the whole stack's residual).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wan.fast_modes import CACHE_KINDS, DEFAULT_THRESHOLDS, CacheSetting
from wan.model import WanModel

__all__ = [
    "CACHE_KINDS",
    "DEFAULT_THRESHOLDS",
    "MAG_DEFAULTS",
    "MAG_RATIOS",
    "CacheCounts",
    "CacheSetting",
    "FirstBlockCache",
    "FirstBlockCacheConfig",
    "MagCache",
    "MagCacheConfig",
    "apply_first_block_cache",
    "mag_ratios_for",
    "nearest_resample",
    "relative_l1_change",
    "step_cache",
]  # fmt: skip

DEFAULT_CONTEXT = "default"


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """threshold: the largest relative L1 change of the first block's residual (see the module docstring)
    at which the remaining blocks are skipped; diffusers' default is 0.05. Higher: more skips, lower
    quality."""

    threshold: float = 0.05

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"the first-block cache threshold must be >= 0, got {self.threshold}")


@dataclass
class CacheCounts:
    """DiT forwards seen by the cache and how many of them skipped the remaining blocks."""

    forwards: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"forwards": self.forwards, "skipped": self.skipped}


@dataclass
class _State:
    """One denoising sequence's cache (one per context name).

    head_residual: [B, L, C] first block's output minus its input, at the last computed forward;
    head_output: [B, L, C] first block's output at the current computed forward (read by the last block);
    tail_residual: [B, L, C] last block's output minus the first block's output, at the last computed
    forward; compute: whether the current forward runs the remaining blocks.
    """

    head_residual: torch.Tensor | None = None
    head_output: torch.Tensor | None = None
    tail_residual: torch.Tensor | None = None
    compute: bool = True
    counts: CacheCounts = field(default_factory=CacheCounts)


def relative_l1_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """residual, previous: [B, L, C] -> mean(|residual - previous|) / mean(|previous|), as a Python float
    (computed in the tensors' dtype, as diffusers computes it)."""
    return ((residual - previous).abs().mean() / previous.abs().mean()).item()


class _StepCache:
    """What every step cache shares: switching on and off by replacing the blocks' `forward` on the
    instances, named contexts (one state each), counts, reset. Subclasses give the three block forwards
    and their state class."""

    _state_cls: type = object

    def __init__(self, model: WanModel) -> None:
        if len(model.blocks) < 2:
            raise ValueError(f"{type(self).__name__} needs a model with at least 2 blocks")
        self.model = model
        self._states: dict[str, Any] = {}
        self._context = DEFAULT_CONTEXT
        self._enabled = False

    # -- switching -------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _attach(self) -> None:
        """Replace the blocks' forwards (once) and start a fresh sequence."""
        if getattr(self.model, "_step_cache", None) not in (None, self):
            raise ValueError("this model already has a step cache enabled: disable it first")
        if self.model.compiled_blocks:
            raise ValueError("step caches are not yet supported on compiled blocks (compile_blocks)")
        if not self._enabled:
            blocks = list(self.model.blocks)
            self._override(blocks[0], self._head_forward)
            for block in blocks[1:-1]:
                self._override(block, self._middle_forward)
            self._override(blocks[-1], self._tail_forward)
            self.model._step_cache = self  # type: ignore[assignment]
            self._enabled = True
        self.reset()

    def disable(self) -> Any:
        """Stop caching: the blocks get their class's `forward` back and the cached tensors are dropped
        (the counts stay readable until `reset`). Returns self."""
        if self._enabled:
            for block in self.model.blocks:
                block.__dict__.pop("forward", None)
            self.model._step_cache = None  # type: ignore[assignment]
            self._enabled = False
        for name, state in self._states.items():
            counts = state.counts
            self._states[name] = self._state_cls()
            self._states[name].counts = counts
        return self

    def reset(self) -> None:
        """Start a new denoising sequence (a new video): every context's cached tensors and counts go."""
        self._states.clear()
        self._context = DEFAULT_CONTEXT

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """Calls inside use (and keep) the state named `name` (e.g. "cond", "uncond" when the two guidance
        passes are separate calls), as diffusers' `cache_context`."""
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    # -- counts ----------------------------------------------------------------------------------------

    def counts(self, name: str | None = None) -> CacheCounts:
        """Forwards and skipped forwards since the last `reset`: of context `name`, or of all (None)."""
        if name is not None:
            state = self._states.get(name)
            return CacheCounts(**state.counts.as_dict()) if state else CacheCounts()
        total = CacheCounts()
        for state in self._states.values():
            total.forwards += state.counts.forwards
            total.skipped += state.counts.skipped
        return total

    # -- plumbing --------------------------------------------------------------------------------------

    @staticmethod
    def _override(block: nn.Module, fn: Any) -> None:
        if "forward" in block.__dict__:
            raise ValueError("a block's forward is already replaced (another hook): cannot cache it")
        block.__dict__["forward"] = lambda *args, **kwargs: fn(block, *args, **kwargs)

    def _state(self) -> Any:
        return self._states.setdefault(self._context, self._state_cls())

    def _check_unsharded(self) -> None:
        if self.model.sequence_sharding is not None:
            raise ValueError(
                "step caches do not support context parallelism yet: ranks would compare different "
                "token shards and could decide differently"
            )

    def _head_forward(self, block: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _middle_forward(self, block: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: [B, L, C] -> [B, L, C]; passes x through unchanged when the forward is skipped."""
        if not self._state().compute:
            return x
        return type(block).forward(block, x, *args, **kwargs)

    def _tail_forward(self, block: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


class FirstBlockCache(_StepCache):
    """A first-block cache on one `WanModel` (see the module docstring). Off until `enable`.

    Usage::

        cache = FirstBlockCache(model)
        cache.enable(0.05)
        for video in videos:
            cache.reset()            # a new denoising sequence
            ... sample ...            # (sequential CFG: each branch's call inside `cache.context(name)`)
            cache.counts().skipped   # DiT forwards that skipped all but the first block
        cache.disable()              # the model as it was
    """

    _state_cls = _State

    def __init__(self, model: WanModel, config: FirstBlockCacheConfig | None = None) -> None:
        super().__init__(model)
        self.config = config or FirstBlockCacheConfig()
        self.last_change: float | None = None  # the last compared change (None: nothing to compare)

    def enable(self, threshold: float | None = None) -> FirstBlockCache:
        """Start caching (a new threshold if given); starts a fresh sequence (`reset`). Returns self."""
        if threshold is not None:
            self.config = FirstBlockCacheConfig(threshold)
        self._attach()
        return self

    def reset(self) -> None:
        super().reset()
        self.last_change = None

    # -- the block forwards ----------------------------------------------------------------------------

    @torch.compiler.disable
    def _decide(self, state: _State, residual: torch.Tensor) -> bool:
        """residual: [B, L, C] first block's residual -> whether to run the remaining blocks."""
        self._check_unsharded()
        previous = state.head_residual
        if previous is None or previous.shape != residual.shape or state.tail_residual is None:
            self.last_change = None
            return True
        self.last_change = relative_l1_change(residual, previous)
        return self.last_change > self.config.threshold

    def _head_forward(self, block: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: [B, L, C] the stream entering the first block -> [B, L, C] its output, or, when skipping,
        the cached estimate of the last block's output."""
        out = type(block).forward(block, x, *args, **kwargs)
        residual = out - x
        state = self._state()
        state.compute = self._decide(state, residual)
        state.counts.forwards += 1
        if not state.compute:
            state.counts.skipped += 1
            assert state.tail_residual is not None
            return state.tail_residual + out
        state.head_output = out
        state.head_residual = residual
        return out

    def _tail_forward(self, block: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: [B, L, C] -> [B, L, C]; on a computed forward also keeps its residual over the first block."""
        state = self._state()
        if not state.compute:
            return x
        out = type(block).forward(block, x, *args, **kwargs)
        assert state.head_output is not None
        state.tail_residual = out - state.head_output
        state.head_output = None
        return out


@dataclass(frozen=True)
class MagCacheConfig:
    """MagCache settings, with diffusers' `MagCacheConfig` defaults and meaning.

    threshold: the largest accumulated error at which a step is skipped; max_skip_steps: at most this many
    steps skipped in a row; retention_ratio: the first round(retention_ratio * num_inference_steps) steps
    always compute; num_inference_steps: the steps of one denoising sequence (after as many forwards of a
    context its state starts over); mag_ratios: the model's calibrated magnitude ratios, one per step
    (resampled to num_inference_steps by `nearest_resample` when their length differs); calibrate: skip
    nothing and measure the ratios instead (`MagCache.calibration`).
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 28
    mag_ratios: tuple[float, ...] | None = None
    calibrate: bool = False

    def __post_init__(self) -> None:
        if self.mag_ratios is None and not self.calibrate:
            raise ValueError("MagCache needs the model's mag_ratios (or calibrate=True to measure them)")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.mag_ratios is not None:
            object.__setattr__(self, "mag_ratios", tuple(float(r) for r in self.mag_ratios))

    def step_ratios(self) -> torch.Tensor:
        """The ratios per step, float32 [num_inference_steps] (empty when calibrating without ratios)."""
        if self.mag_ratios is None:
            return torch.empty(0)
        ratios = torch.tensor(self.mag_ratios, dtype=torch.float32)
        if len(ratios) == self.num_inference_steps:
            return ratios
        return nearest_resample(ratios, self.num_inference_steps)


def nearest_resample(values: torch.Tensor, length: int) -> torch.Tensor:
    """values: [n] -> [length], nearest neighbour on evenly spread positions (index round(i * (n-1) /
    (length-1)), rounding half to even as `torch.round`); length 1 keeps the last value."""
    if length == 1:
        return values[-1:]
    step = (len(values) - 1) / (length - 1)
    index = torch.round(torch.arange(length, dtype=torch.float32) * step).long()
    return values[index]


@dataclass
class _MagState:
    """One denoising sequence's MagCache state (one per context name).

    head_input: [B, L, C] the stream entering the first block at the current forward; residual: [B, L, C]
    the last block's output minus the first block's input at the last computed forward. The accumulators
    are float32 0-dim tensors, as diffusers' (its ratios are a float32 tensor), so decisions agree exactly.
    """

    head_input: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    compute: bool = True
    ratio: torch.Tensor | float = 1.0
    error: torch.Tensor | float = 0.0
    skipped_run: int = 0  # steps accumulated since the last computed one
    step: int = 0
    calibration: list[float] = field(default_factory=list)
    counts: CacheCounts = field(default_factory=CacheCounts)

    def restart(self) -> None:
        """A finished sequence: back to step 0 with nothing cached (the counts stay)."""
        self.step, self.residual = 0, None
        self.ratio, self.error, self.skipped_run = 1.0, 0.0, 0
        self.calibration = []


class MagCache(_StepCache):
    """MagCache (Ma et al. 2025) on one `WanModel`, as diffusers' `MagCacheConfig` hook. Off until `enable`.

    Per forward (step s of num_inference_steps, counted per context), before any block runs: from step
    round(retention_ratio * steps) on, ratio *= mag_ratios[s], error += |1 - ratio| and run += 1; when a
    residual is cached, error <= threshold and run <= max_skip_steps, *every* block is skipped and the
    stream leaving the last block is x + R (x: the stream entering the first block [B, L, C]; R: last
    block's output minus first block's input at the last computed step); otherwise all blocks run, R is
    renewed and ratio, error, run start over. After num_inference_steps forwards a context starts over.
    With `calibrate`, nothing is skipped and `calibration` holds, after a whole sequence, each step's
    mean over samples and tokens of |R_s| / (|R_s-1| + 1e-8) (norms over the width; step 0: 1.0).
    """

    _state_cls = _MagState

    def __init__(self, model: WanModel, config: MagCacheConfig) -> None:
        super().__init__(model)
        self.config = config
        self._ratios = config.step_ratios()
        self.calibration: list[float] | None = None  # the last completed calibration

    def enable(self, config: MagCacheConfig | None = None) -> MagCache:
        """Start caching (with a new config if given); starts a fresh sequence (`reset`). Returns self."""
        if config is not None:
            self.config, self._ratios = config, config.step_ratios()
        self._attach()
        return self

    def _decide(self, state: _MagState, x: torch.Tensor) -> bool:
        """x: [B, L, C] the stream entering the first block -> whether this forward runs the blocks (updates
        the accumulators as diffusers does; a cached residual of another shape, e.g. another video size
        without `reset`, counts as none)."""
        cfg = self.config
        if cfg.calibrate:
            return True
        scale = self._ratios[state.step] if state.step < len(self._ratios) else 1.0
        if state.step < int(cfg.retention_ratio * cfg.num_inference_steps + 0.5):
            return True
        state.ratio = state.ratio * scale
        state.skipped_run += 1
        state.error = state.error + abs(1.0 - state.ratio)
        cached = state.residual is not None and state.residual.shape == x.shape
        if cached and state.error <= cfg.threshold and state.skipped_run <= cfg.max_skip_steps:
            return False
        state.ratio, state.error, state.skipped_run = 1.0, 0.0, 0
        return True

    def _advance(self, state: _MagState) -> None:
        state.step += 1
        if state.step >= self.config.num_inference_steps:
            if self.config.calibrate:
                self.calibration = list(state.calibration)
            state.restart()

    def _head_forward(self, block: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: [B, L, C] -> [B, L, C]: the first block's output, or x + R when the step is skipped."""
        self._check_unsharded()
        state = self._state()
        state.head_input = x
        state.compute = self._decide(state, x)
        state.counts.forwards += 1
        if state.compute:
            return type(block).forward(block, x, *args, **kwargs)
        state.counts.skipped += 1
        assert state.residual is not None
        return x + state.residual

    def _tail_forward(self, block: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: [B, L, C] -> [B, L, C]; on a computed step also keeps R and, calibrating, the step's ratio."""
        state = self._state()
        if not state.compute:
            self._advance(state)
            return x
        out = type(block).forward(block, x, *args, **kwargs)
        assert state.head_input is not None
        residual = out - state.head_input
        if self.config.calibrate:
            if state.residual is None:
                state.calibration.append(1.0)
            else:
                now = torch.linalg.norm(residual.float(), dim=-1)
                before = torch.linalg.norm(state.residual.float(), dim=-1)
                state.calibration.append((now / (before + 1e-8)).mean().item())
        state.residual = residual
        state.head_input = None
        self._advance(state)
        return out


def apply_first_block_cache(model: WanModel, threshold: float = 0.05) -> FirstBlockCache:
    """Enable a first-block cache on `model` with `threshold`; returns it (`disable()` undoes it)."""
    return FirstBlockCache(model, FirstBlockCacheConfig(threshold)).enable()


# ------------------------------------------------------------------------------------------ settings

# MagCache's other settings: the defaults of its Wan 2.1 script (`magcache_K` 2, `retention_ratio` 0.2; the
# threshold, `magcache_thresh` 0.12, is `DEFAULT_THRESHOLDS["magcache"]`). Its README runs the 14B models
# faster with threshold 0.24 and K 6; K stays 2 here.
MAG_DEFAULTS: dict[str, Any] = {"max_skip_steps": 2, "retention_ratio": 0.2}
# MagCache's published Wan 2.1 calibrations (Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py,
# measured with SDPA attention): the conditional branch's magnitude ratio per step, of 50-step text-to-video
# and 40-step image-to-video runs (the published lists interleave cond and uncond, from a padded first
# step of 1.0; this is their cond half, the one diffusers' MagCache docs say to use). `MagCacheConfig`
# resamples them to a run's steps (nearest). The tiny presets stand in for the big ones and borrow theirs.
MAG_RATIOS: dict[str, tuple[float, ...]] = {
    "t2v-1.3B": (  # 50 steps
        1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957, 0.99511, 0.99535,
        0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415, 0.99419, 0.99396, 0.99388,
        0.99349, 0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068, 0.99005, 0.98944, 0.98849, 0.98758,
        0.98644, 0.98504, 0.9836, 0.98202, 0.97977, 0.97717, 0.9741, 0.97003, 0.96538, 0.9593, 0.95086,
        0.94013,
        0.92402, 0.90241, 0.86821, 0.81838,
    ),
    "t2v-14B": (  # 50 steps
        1.0, 1.02504, 1.00025, 0.9985, 0.99779, 0.9966, 0.99482, 0.99467, 0.99664, 0.99434, 0.99533, 0.99468,
        0.99438, 0.99516, 0.99384, 0.99404, 0.99517, 0.99409, 0.99428, 0.99347, 0.99418, 0.99271, 0.99313,
        0.99215, 0.99218, 0.99216, 0.99163, 0.99138, 0.98982, 0.98996, 0.9887, 0.98772, 0.98767, 0.98573,
        0.98501, 0.9838, 0.98177, 0.98037, 0.97678, 0.97546, 0.97184, 0.96711, 0.96349, 0.95629, 0.94926,
        0.93964, 0.92511, 0.90693, 0.8796, 0.86111,
    ),
    "i2v-14B-480P": (  # 40 steps
        1.0, 0.98783, 0.97559, 0.98311, 0.98202, 0.9888, 0.98762, 0.98957, 0.99052, 0.99383, 0.98857, 0.99065,
        0.98845, 0.99057, 0.98957, 0.98601, 0.98823, 0.98756, 0.98808, 0.98721, 0.98571, 0.98543, 0.98157,
        0.98411, 0.97952, 0.98149, 0.9774, 0.97825, 0.97355, 0.97085, 0.97056, 0.96588, 0.96113, 0.9567,
        0.94961, 0.93973, 0.93217, 0.91878, 0.90955, 0.92617,
    ),
    "i2v-14B-720P": (  # 40 steps
        1.0, 0.99428, 0.98588, 0.98273, 0.99018, 0.98911, 0.98646, 0.99454, 0.9891, 0.99124, 0.99102, 0.99215,
        0.99515, 0.99576, 0.99068, 0.99097, 0.99166, 0.99041, 0.99201, 0.99101, 0.98599, 0.98845, 0.98848,
        0.98862, 0.98718, 0.98497, 0.98264, 0.98389, 0.97938, 0.97535, 0.97498, 0.973, 0.96827, 0.96261,
        0.95335, 0.94649, 0.93397, 0.91636, 0.89088, 0.8679,
    ),
}
_MAG_BORROWED = {"tiny-t2v": "t2v-1.3B", "tiny-i2v": "i2v-14B-480P", "tiny-flf2v": "i2v-14B-720P",
                 "flf2v-14B": "i2v-14B-720P"}  # fmt: skip


def mag_ratios_for(preset: str) -> tuple[float, ...] | None:
    """The published MagCache ratios for a preset (None when it has none)."""
    return MAG_RATIOS.get(preset) or MAG_RATIOS.get(_MAG_BORROWED.get(preset, ""))


@contextlib.contextmanager
def step_cache(
    model: WanModel, setting: CacheSetting | None, steps: int, mag_ratios: tuple[float, ...] | None = None
) -> Iterator[FirstBlockCache | MagCache | None]:
    """A step cache on `model` for one denoising sequence of `steps` forwards per context, removed on
    exit (also on error); yields None, changing nothing, when `setting` is None. MagCache needs the
    model's calibrated `mag_ratios` (resampled to `steps`)."""
    if setting is None:
        yield None
        return
    cache: FirstBlockCache | MagCache
    if setting.kind == "fbcache":
        cache = FirstBlockCache(model, FirstBlockCacheConfig(setting.threshold))
    else:
        if mag_ratios is None:
            raise ValueError("MagCache needs the model's calibrated magnitude ratios; this model has none")
        config = MagCacheConfig(threshold=setting.threshold, num_inference_steps=steps, mag_ratios=mag_ratios,
                                **MAG_DEFAULTS)  # fmt: skip
        cache = MagCache(model, config)
    cache.enable()
    try:
        yield cache
    finally:
        cache.disable()
