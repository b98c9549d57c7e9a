"""Flow-matching sampling for Wan 2.1: sigma grids with shift, solvers, CFG and seeded noise.

Rectified flow: `x_σ = (1-σ)·x0 + σ·ε`; the DiT predicts the velocity `v = ε - x0` at timestep
`t = int(σ·1000)`. The solvers are diffusers' schedulers (UniPC, DPM-Solver++, Euler) configured to
reproduce the official `FlowUniPCMultistepScheduler` / `FlowDPMSolverMultistepScheduler`; this module
only builds the official sigma grids, hands them to the scheduler unshifted (the grids are already
shifted) and steps by index.

Shapes: latents are `[C, T, H, W]` (one video) or `[B, C, T, H, W]`; with `z_dim=16` and VAE stride
(4, 8, 8), `C=16, T=(F-1)/4+1, H=height/8, W=width/8`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar, get_args

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "SOLVERS",
    "FlowSampler",
    "Solver",
    "dpm_sigmas",
    "guide",
    "initial_noise",
    "latent_shape",
    "shift_sigmas",
    "unipc_sigmas",
]

Solver = Literal["unipc", "dpm++", "euler"]
SOLVERS: tuple[str, ...] = get_args(Solver)
NUM_TRAIN_TIMESTEPS = 1000
_S = TypeVar("_S", np.ndarray, torch.Tensor, float)
# The official UniPC grid starts at the scheduler's sigma_max, read back from a float32 tensor:
# float32(0.999) = 0.99900001287..., not 0.999. Using it keeps the sigmas bit-identical to upstream.
_UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def shift_sigmas(sigmas: _S, shift: float) -> _S:
    """Timestep shift `σ' = shift·σ / (1 + (shift-1)·σ)` (elementwise; shift=1 is the identity)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unipc_sigmas(steps: int, shift: float) -> np.ndarray:
    """Official UniPC grid, float64 [steps]: `shift(linspace(σ_max, 0, steps+1)[:-1])`.

    σ_max = float32(0.999) as upstream reads it; the final σ = 0 is appended by the sampler.
    """
    _check_steps(steps)
    return shift_sigmas(np.linspace(_UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1], shift)


def dpm_sigmas(steps: int, shift: float) -> np.ndarray:
    """Official DPM++ grid, float64 [steps]: `shift(linspace(1, 0, steps+1)[:steps])`; starts at σ = 1.

    σ = 1 is safe in DPM-Solver++ (checked against the official scheduler, bit for bit): λ(1) = -inf
    makes the first step an exact first-order step and the second step's correction term zero.
    """
    _check_steps(steps)
    return shift_sigmas(np.linspace(1.0, 0.0, steps + 1)[:steps], shift)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


class FlowSampler:
    """One generation's solver state: a diffusers scheduler on a fixed sigma grid, stepped by index.

    `solver`: "unipc" (UniPC-2, bh2, corrector every step, lower order at the end), "dpm++"
    (DPM-Solver++ 2M midpoint, Euler last step) or "euler". Default grids: `unipc_sigmas` for unipc
    and euler, `dpm_sigmas` for dpm++. `sigmas` overrides the grid: `steps` decreasing values in (0, 1],
    used as given (`shift` is not applied to them).

    Attributes: `sigmas` float32 [steps+1] ending in 0; `timesteps` int64 [steps] = int(σ·1000)
    computed in float64 from the grid, the values the official code feeds the DiT; `steps`; `solver`.
    The scheduler keeps multistep history: call `step` for index 0, 1, ..., steps-1 in order, then
    `reset()` (or build a new sampler) for the next generation.
    """

    def __init__(self, solver: Solver, steps: int, shift: float, sigmas: Sequence[float] | None = None):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        _check_steps(steps)
        if sigmas is None:
            grid = dpm_sigmas(steps, shift) if solver == "dpm++" else unipc_sigmas(steps, shift)
        else:
            grid = np.asarray(sigmas, dtype=np.float64)
            if grid.shape != (steps,):
                raise ValueError(f"sigmas must hold {steps} values (one per step), got shape {grid.shape}")
            if not (np.all(grid > 0) and np.all(grid <= 1) and np.all(np.diff(grid) < 0)):
                raise ValueError(f"sigmas must decrease strictly within (0, 1], got {grid.tolist()}")
        self.solver: Solver = solver
        self.steps = steps
        self.shift = shift
        self._grid = grid
        self.timesteps = torch.from_numpy(grid * NUM_TRAIN_TIMESTEPS).to(torch.int64)
        self.reset()
        self.sigmas: torch.Tensor = self.scheduler.sigmas.to(torch.float32)

    def reset(self) -> None:
        """Start over: a fresh scheduler on the same grid (clears the multistep history)."""
        self.scheduler = _make_scheduler(self.solver, self._grid)
        self.scheduler.set_begin_index(0)
        self._next = 0

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """Advance `sample` from σ[index] to σ[index+1] given the model's velocity there.

        velocity, sample: [C, T, H, W] or [B, C, T, H, W] (any leading dims; each batch item is solved
        independently). Returns the new sample, same shape and dtype as `sample`.
        """
        if index != self._next:
            raise RuntimeError(
                f"steps must be taken in order: expected index {self._next}, got {index} "
                "(call reset() or build a new FlowSampler for a new generation)"
            )
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
        # The scheduler steps by its own index counter (begin index 0); the timestep is only bookkeeping.
        t = self.scheduler.timesteps[index]
        if self.scheduler.sigmas.device != sample.device:
            # Its sigmas go to the sample's device once: it would otherwise copy one per step from host
            # memory, and each such copy waits for the GPU to finish the step's forward.
            self.scheduler.sigmas = self.scheduler.sigmas.to(sample.device)
        out = self.scheduler.step(velocity, t, sample, return_dict=False)[0]
        self._next += 1
        return out.to(sample.dtype)

    def __len__(self) -> int:
        return self.steps


def _make_scheduler(solver: Solver, grid: np.ndarray) -> SchedulerMixin:
    """A diffusers scheduler whose `sigmas` are `grid` (float64 [steps]) + final 0, cast to float32."""
    if solver == "unipc":
        sched = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=1.0,  # the grid is already shifted
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            disable_corrector=[],
            final_sigmas_type="zero",
        )
        # With flow_shift=1 the grid passes through unchanged (diffusers only nudges a leading σ=1 by 1e-6).
        sched.set_timesteps(sigmas=grid.copy())
    elif solver == "dpm++":
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=1.0,
            solver_order=2,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        # DPMSolverMultistepScheduler.set_timesteps takes no custom sigmas: set the schedule, then replace
        # its grid with ours (step() reads only `sigmas`, `timesteps` and the step index).
        sched.set_timesteps(len(grid))
        sched.sigmas = torch.from_numpy(np.append(grid, 0.0).astype(np.float32))
        sched.timesteps = torch.from_numpy(grid * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
        sched.set_timesteps(sigmas=grid.tolist())
    return sched


def latent_shape(
    frame_num: int, width: int, height: int, z_dim: int = 16, vae_stride: tuple[int, int, int] = (4, 8, 8)
) -> tuple[int, int, int, int]:
    """Latent shape `(z_dim, (F-1)//st+1, height//sh, width//sw)` for F = frame_num (must be st·n+1)."""
    st, sh, sw = vae_stride
    if frame_num < 1 or (frame_num - 1) % st:
        raise ValueError(f"frame_num must be {st}n+1 (1, {st + 1}, {2 * st + 1}, ...), got {frame_num}")
    if width < sw or height < sh:
        raise ValueError(f"size {width}x{height} is smaller than the VAE stride {sw}x{sh}")
    return (z_dim, (frame_num - 1) // st + 1, height // sh, width // sw)


def initial_noise(
    seed: int,
    shape: Sequence[int],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise [*shape] drawn on a CPU generator seeded with `seed`, then moved.

    The same seed gives the same values on every device (the official code draws on the GPU's
    generator instead, so its videos differ from ours for the same seed).
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: `uncond + scale·(cond - uncond)` (same shape as the inputs)."""
    return uncond + scale * (cond - uncond)
