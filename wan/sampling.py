"""Flow-matching sampling for Wan 2.1: sigma grids with shift, solvers, CFG and seeded noise.

Rectified flow: `x_σ = (1-σ)·x0 + σ·ε`; the DiT predicts the velocity `v = ε - x0` at timestep
`t = int(σ·1000)`. The solvers (UniPC, DPM-Solver++, Euler) reproduce the official
`FlowUniPCMultistepScheduler` / `FlowDPMSolverMultistepScheduler`, i.e. diffusers' `UniPCMultistepScheduler`
/ `DPMSolverMultistepScheduler` with flow sigmas (and `FlowMatchEulerDiscreteScheduler`), on the official
sigma grids; tests/test_sampling.py checks them against those schedulers. Each step's coefficients are
computed on the host (float64) when the sampler is built, so a step never waits for the device: diffusers'
schedulers solve UniPC's small linear system on the device at every step, whose error check makes the host
wait, which is why the steps are written here and the schedulers serve as the reference.

Shapes: latents are `[C, T, H, W]` (one video) or `[B, C, T, H, W]`; with `z_dim=16` and VAE stride
(4, 8, 8), `C=16, T=(F-1)/4+1, H=height/8, W=width/8`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import numpy as np
import torch

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
    """One generation's solver state on a fixed sigma grid, stepped by index.

    `solver`: "unipc" (UniPC-2, bh2, corrector every step, lower order at the end), "dpm++"
    (DPM-Solver++ 2M midpoint, Euler last step) or "euler". Default grids: `unipc_sigmas` for unipc
    and euler, `dpm_sigmas` for dpm++. `sigmas` overrides the grid: `steps` decreasing values in (0, 1],
    used as given (`shift` is not applied to them).

    Attributes: `sigmas` float32 [steps+1] ending in 0; `timesteps` int64 [steps] = int(σ·1000)
    computed in float64 from the grid, the values the official code feeds the DiT; `steps`; `solver`.
    The solver keeps multistep history: call `step` for index 0, 1, ..., steps-1 in order, then
    `reset()` (or build a new sampler) for the next generation.

    Everything that depends only on the grid (the log-SNRs, φ-functions and UniPC's small linear
    systems) is solved once here, on the host in float64, from the float32 sigmas the steps use. A
    step is then a fixed linear combination of the sample, the velocity and the stored history with
    Python-float coefficients: it launches a few elementwise kernels and never reads a device value
    back (no `.item()`, no `linalg.solve` error check), so on a GPU the host runs ahead of the device.
    The results match diffusers' schedulers configured as the official ones to float32 rounding
    (tests/test_sampling.py).
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
        self.timesteps = torch.from_numpy(grid * NUM_TRAIN_TIMESTEPS).to(torch.int64)
        solved = grid.copy()
        if solver == "unipc" and abs(solved[0] - 1.0) < _UNIPC_SIGMA_ONE_NUDGE:
            # UniPC's corrector needs a finite log-SNR at the first point: σ = 1 (α = 0) is moved to
            # 1 - 1e-6, as diffusers' UniPCMultistepScheduler does with flow sigmas.
            solved[0] -= _UNIPC_SIGMA_ONE_NUDGE
        self.sigmas: torch.Tensor = torch.from_numpy(np.append(solved, 0.0).astype(np.float32))
        self._plan: list[_Step] = _PLANNERS[solver](self.sigmas.double().numpy())
        self.reset()

    def reset(self) -> None:
        """Start over on the same grid (clears the multistep history)."""
        self._next = 0
        self._history: list[torch.Tensor] = []  # data predictions x0 of the last steps, oldest first
        self._last: torch.Tensor | None = None  # UniPC: the (corrected) sample of the previous step

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """Advance `sample` from σ[index] to σ[index+1] given the model's velocity there.

        velocity, sample: [C, T, H, W] or [B, C, T, H, W] (any leading dims; each batch item is solved
        independently). Returns the new sample, same shape and dtype as `sample`. The arithmetic runs in
        float32 (or wider, if the inputs are) on the inputs' device; no device value is read back.
        """
        if index != self._next:
            raise RuntimeError(
                f"steps must be taken in order: expected index {self._next}, got {index} "
                "(call reset() or build a new FlowSampler for a new generation)"
            )
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
        plan = self._plan[index]
        dtype = torch.promote_types(torch.promote_types(sample.dtype, velocity.dtype), torch.float32)
        x, v = sample.to(dtype), velocity.to(dtype)
        if plan.predictor is None:  # Euler: x + (σ[i+1] - σ[i])·v
            out = x + plan.dt * v
        else:
            x0 = x - plan.sigma * v  # the data prediction (v = ε - x0 at x = (1-σ)·x0 + σ·ε)
            history = [*self._history, x0]  # x0 of the last steps, this one's last
            if plan.corrector is not None:
                assert self._last is not None
                x = _combine(plan.corrector, self._last, history)
            out = _combine(plan.predictor, x, history)
            self._history = history[-_MAX_HISTORY:] if index + 1 < self.steps else []
            self._last = x if plan.keep_sample and index + 1 < self.steps else None
        self._next += 1
        return out.to(sample.dtype)

    def __len__(self) -> int:
        return self.steps


# --------------------------------------------------------------------------------------------------
# Step plans: per-step coefficients computed on the host in float64 from the float32 grid.

_UNIPC_SIGMA_ONE_NUDGE = 1e-6
_MAX_HISTORY = 2  # data predictions kept between steps: x0 of the two previous steps (order 2)


@dataclass(frozen=True)
class _Linear:
    """`sample_coef·sample + Σ_k x0_coefs[k]·x0[index-k]` (x0[index] is this step's data prediction)."""

    sample_coef: float
    x0_coefs: tuple[float, ...]


@dataclass(frozen=True)
class _Step:
    """One step's arithmetic. Euler (`predictor` None): `x + dt·v`. UniPC / DPM++: the data prediction
    `x0 = x - sigma·v`, then (UniPC, index >= 1) `corrector` applied to the previous step's sample,
    then `predictor` applied to the (corrected) sample. `keep_sample`: the next step's corrector
    needs this step's (corrected) sample."""

    sigma: float
    predictor: _Linear | None = None
    corrector: _Linear | None = None
    dt: float = 0.0
    keep_sample: bool = False


def _combine(lin: _Linear, sample: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Evaluate `lin` (Python-float coefficients, zero terms skipped): tensors of one shape -> that shape.

    history: the data predictions of the last steps, oldest first (history[-1] is this step's)."""
    terms = [(c, history[-1 - k]) for k, c in enumerate(lin.x0_coefs) if c != 0.0]
    if lin.sample_coef != 0.0:
        terms.insert(0, (lin.sample_coef, sample))
    coef, first = terms[0]
    out = first * coef
    for coef, t in terms[1:]:
        out.add_(t, alpha=coef)
    return out


def _log_snr(sigmas: np.ndarray) -> np.ndarray:
    """λ = log(α/σ) with α = 1 - σ, float64 [n]: -inf at σ = 1, +inf at σ = 0."""
    with np.errstate(divide="ignore"):
        return np.log(1.0 - sigmas) - np.log(sigmas)


def _euler_plan(sig: np.ndarray) -> list[_Step]:
    """Euler on the flow ODE: `x' = x + (σ[i+1] - σ[i])·v`. sig: float64 [steps+1] of float32 values."""
    # The difference of two float32 values is exact in float64, so the step rounds dt exactly as a
    # float32 subtraction would.
    return [_Step(sigma=float(sig[i]), dt=float(sig[i + 1] - sig[i])) for i in range(len(sig) - 1)]


def _dpm_plan(sig: np.ndarray) -> list[_Step]:
    """DPM-Solver++ 2M (midpoint) on data predictions, first order at the first and last steps.

    With h = λ[i+1] - λ[i], r = (λ[i] - λ[i-1]) / h and E = expm1(-h):
    `x' = σ[i+1]/σ[i]·x - α[i+1]·E·x0[i] - ½·α[i+1]·E·(x0[i] - x0[i-1]) / r` (no last term at order 1).
    σ[0] = 1 gives λ = -inf and 1/r = 0 at step 1: that step is exactly first order, as upstream.
    """
    lam, alpha, n = _log_snr(sig), 1.0 - sig, len(sig) - 1
    steps = []
    for i in range(n):
        h = lam[i + 1] - lam[i]
        e = np.expm1(-h)
        a = sig[i + 1] / sig[i]
        c0, c1 = -alpha[i + 1] * e, 0.0
        if 0 < i < n - 1:  # second order: lower order at the first step and (final σ = 0) the last
            inv_r = h / (lam[i] - lam[i - 1])
            c0 -= 0.5 * alpha[i + 1] * e * inv_r
            c1 = 0.5 * alpha[i + 1] * e * inv_r
        steps.append(_Step(sigma=float(sig[i]), predictor=_Linear(float(a), (float(c0), float(c1)))))
    return steps


def _unipc_update(sig: np.ndarray, lam: np.ndarray, s0: int, order: int, corrector: bool) -> _Linear:
    """UniPC (B(h) = expm1(-h), data prediction) from grid point s0 to s0+1 using x0 at s0, s0-1, ...,
    s0-order+1 (the predictor, UniP), or, for the corrector (UniC), also x0 at s0+1.

    `x_t = σ_t/σ_s0·x - α_t·φ1·x0[s0] - α_t·B·Σ_k ρ_k·D_k`, with h = λ_t - λ_s0, z = -h,
    φ1 = B = expm1(z), r_k = (λ[s0-k] - λ_s0)/h, D_k = (x0[s0-k] - x0[s0])/r_k (k = 1..order-1) and,
    for the corrector, a last D = x0[s0+1] - x0[s0] (r = 1). ρ solves the order conditions `R ρ = g`
    (the predictor: the leading order-1 rows and columns), R[j][k] = r_k^j, g_j = j!·z·φ_{j+1}(z)/B
    for j = 1..order, φ_k(z) = (e^z - Σ_{m<k} z^m/m!)/z^k; UniPC uses ρ = ½ instead for the predictor
    of order 2 and the corrector of order 1. Returned as coefficients relative to the step that
    evaluates the update: the predictor runs at step s0 (its own x0 is x0[s0], offset 0), the
    corrector at step s0+1 (its own x0 is x0[s0+1]).
    """
    t = s0 + 1
    h = lam[t] - lam[s0]
    hh = -h
    phi1 = np.expm1(hh)
    b_h = phi1  # bh2
    alpha_t = 1.0 - sig[t]
    rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [1.0]
    coef: dict[int, float] = {s0: -alpha_t * phi1}  # grid index -> coefficient of x0 there
    n_rho = order if corrector else order - 1
    if n_rho:
        if (order == 2 and not corrector) or (order == 1 and corrector):
            rho = np.array([0.5])
        else:
            rmat = np.array([[rk**j for rk in rks] for j in range(order)])
            g, factorial, z_phi = [], 1, phi1 / hh - 1.0  # z·φ_2(z), then z·φ_3(z), ...
            for j in range(1, order + 1):
                g.append(z_phi * factorial / b_h)
                factorial *= j + 1
                z_phi = z_phi / hh - 1.0 / factorial
            rho = np.linalg.solve(rmat[:n_rho, :n_rho], np.array(g[:n_rho]))
        for k in range(n_rho):
            # D_k = (x0[s0-k-1] - x0[s0]) / r_k for k < order-1; the corrector's last D = x0[t] - x0[s0]
            other = t if (corrector and k == order - 1) else s0 - (k + 1)
            w = alpha_t * b_h * rho[k] / rks[k]
            coef[other] = coef.get(other, 0.0) - w
            coef[s0] += w
    here = t if corrector else s0  # the step evaluating this update
    x0_coefs = [0.0] * (max(here - j for j in coef) + 1)
    for j, c in coef.items():
        x0_coefs[here - j] = float(c)
    return _Linear(float(sig[t] / sig[s0]), tuple(x0_coefs))


def _unipc_plan(sig: np.ndarray, max_order: int = 2) -> list[_Step]:
    """UniPC-2 (bh2, data prediction, `lower_order_final`): step i predicts with order
    min(2, steps - i, i + 1) and, from step 1 on, first corrects its sample with the order the previous
    prediction used (the corrector uses this step's x0, computed from the uncorrected sample)."""
    lam, n = _log_snr(sig), len(sig) - 1
    orders = [min(max_order, n - i, i + 1) for i in range(n)]
    return [
        _Step(
            sigma=float(sig[i]),
            predictor=_unipc_update(sig, lam, i, orders[i], corrector=False),
            corrector=_unipc_update(sig, lam, i - 1, orders[i - 1], corrector=True) if i else None,
            keep_sample=True,
        )
        for i in range(n)
    ]


_PLANNERS = {"unipc": _unipc_plan, "dpm++": _dpm_plan, "euler": _euler_plan}


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
