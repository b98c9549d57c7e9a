"""Flow-matching sampling: official sigma grids, FlowSampler against diffusers' schedulers, noise, CFG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wan.sampling import (
    SOLVERS,
    FlowSampler,
    dpm_sigmas,
    guide,
    initial_noise,
    latent_shape,
    shift_sigmas,
    unipc_sigmas,
)

GRIDS = [(50, 5.0), (40, 3.0), (8, 8.0), (1, 1.0), (20, 16.0)]
SHAPE = (16, 3, 4, 6)  # [C, T, H, W]


def _official_unipc_grid(steps: int, shift: float) -> np.ndarray:
    """Upstream FlowUniPCMultistepScheduler: σ_max read back from its float32 training sigmas."""
    train = torch.from_numpy(1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()).to(torch.float32)
    sigma = np.linspace(train[0].item(), train[-1].item(), steps + 1)[:-1]
    return shift * sigma / (1 + (shift - 1) * sigma)


def _official_dpm_grid(steps: int, shift: float) -> np.ndarray:
    sigma = np.linspace(1, 0, steps + 1)[:steps]
    return shift * sigma / (1 + (shift - 1) * sigma)


def _run(sampler: FlowSampler, x: torch.Tensor, velocity) -> torch.Tensor:
    for i in range(sampler.steps):
        x = sampler.step(velocity(x, float(sampler.sigmas[i])), i, x)
    return x


def _diffusers_scheduler(solver: str, grid: np.ndarray):
    """diffusers' scheduler configured as the official one for `solver`, on `grid` (float64 [steps],
    already shifted) + a final 0: what FlowSampler wrapped before it solved the steps itself."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if solver == "unipc":
        sched = UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
            solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
            final_sigmas_type="zero",
        )  # fmt: skip
        sched.set_timesteps(sigmas=grid.copy())  # flow_shift 1: unchanged, except a leading σ = 1 (nudged)
    elif solver == "dpm++":
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
            solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
            final_sigmas_type="zero",
        )  # fmt: skip
        sched.set_timesteps(len(grid))  # it takes no custom sigmas: replace them (step() reads only these)
        sched.sigmas = torch.from_numpy(np.append(grid, 0.0).astype(np.float32))
        sched.timesteps = torch.from_numpy(grid * 1000).to(torch.int64)
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sched.set_timesteps(sigmas=grid.tolist())
    sched.set_begin_index(0)
    return sched


def _run_diffusers(sched, x: torch.Tensor, velocity) -> list[torch.Tensor]:
    """Every step's output of a diffusers scheduler (velocity called with the float32 sigma)."""
    out = []
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocity(x, float(sched.sigmas[i])), t, x, return_dict=False)[0]
        out.append(x)
    return out


# ---------------------------------------------------------------------------------------------------
# Grids and timesteps


@pytest.mark.parametrize(("steps", "shift"), GRIDS)
def test_grids_and_timesteps_match_official_formula(steps, shift):
    unipc = _official_unipc_grid(steps, shift)
    assert abs(unipc[0] - shift_sigmas(0.999, shift)) < 1e-7  # linspace(0.999, 0, ...) up to float32
    np.testing.assert_array_equal(unipc_sigmas(steps, shift), unipc)
    np.testing.assert_array_equal(dpm_sigmas(steps, shift), _official_dpm_grid(steps, shift))
    assert dpm_sigmas(steps, shift)[0] == 1.0

    for solver, grid in [("unipc", unipc), ("euler", unipc), ("dpm++", _official_dpm_grid(steps, shift))]:
        sampler = FlowSampler(solver, steps, shift)
        expected = torch.from_numpy(np.append(grid, 0.0).astype(np.float32))
        assert sampler.sigmas.dtype == torch.float32 and sampler.sigmas.shape == (steps + 1,)
        assert torch.equal(sampler.sigmas, expected) and sampler.sigmas[-1] == 0
        assert torch.equal(_diffusers_scheduler(solver, grid).sigmas.to(torch.float32), expected)
        assert sampler.timesteps.dtype == torch.int64 and len(sampler) == sampler.steps == steps
        assert torch.equal(sampler.timesteps, torch.from_numpy((grid * 1000).astype(np.int64)))
    if steps > 1:
        assert FlowSampler("dpm++", steps, shift).timesteps[0] == 1000  # σ = 1 is fed as t = 1000


def test_shift_sigmas():
    s = np.array([1.0, 0.5, 0.0])
    np.testing.assert_allclose(shift_sigmas(s, 5.0), [1.0, 5 * 0.5 / 3, 0.0])
    np.testing.assert_array_equal(shift_sigmas(s, 1.0), s)
    torch.testing.assert_close(shift_sigmas(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))


def test_custom_sigmas_are_used_as_given():
    sigmas = [0.9, 0.6, 0.2]
    sampler = FlowSampler("unipc", 3, shift=5.0, sigmas=sigmas)
    assert torch.equal(sampler.sigmas, torch.tensor([0.9, 0.6, 0.2, 0.0]))
    assert sampler.timesteps.tolist() == [900, 600, 200]
    for bad in ([0.9, 0.6], [0.6, 0.9, 0.2], [1.5, 0.6, 0.2], [0.9, 0.6, 0.0]):
        with pytest.raises(ValueError, match="sigmas"):
            FlowSampler("euler", 3, shift=1.0, sigmas=bad)


def test_bad_solver_and_steps():
    with pytest.raises(ValueError, match=r"unipc, dpm\+\+, euler"):
        FlowSampler("ddim", 10, 5.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        FlowSampler("unipc", 0, 5.0)
    assert SOLVERS == ("unipc", "dpm++", "euler")


# ---------------------------------------------------------------------------------------------------
# Solving


def test_euler_step_is_x_plus_dsigma_v():
    sampler = FlowSampler("euler", 8, 5.0)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for i in range(3):
        expected = x + (sampler.sigmas[i + 1] - sampler.sigmas[i]) * v
        x = sampler.step(v, i, x)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("steps", "shift"), [(50, 5.0), (8, 8.0), (2, 3.0), (1, 1.0)])
def test_exact_velocity_recovers_x0(solver, steps, shift):
    # Straight path x_σ = (1-σ)·x0 + σ·ε with the exact velocity v = ε - x0: every solver lands on x0.
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, *SHAPE, generator=g), torch.randn(2, *SHAPE, generator=g)
    sampler = FlowSampler(solver, steps, shift)
    s0 = float(sampler.sigmas[0])
    x = _run(sampler, (1 - s0) * x0 + s0 * eps, lambda x, s: eps - x0)
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-5)


def test_gaussian_data_multistep_solvers_beat_euler():
    # x0 ~ N(μ, s²) elementwise: the exact velocity is affine in x and the ODE ends at μ + s·z.
    mu, s, steps = 0.5, 1.0, 40

    def velocity(x, sig):  # E[ε - x0 | x_σ] for Gaussian data
        a = 1 - sig
        return (sig - a * s * s) / (a * a * s * s + sig * sig) * (x - a * mu) - mu

    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = {}
    for solver in SOLVERS:
        sampler = FlowSampler(solver, steps, 1.0)
        s0 = float(sampler.sigmas[0])
        x = ((1 - s0) * mu + math.sqrt((1 - s0) ** 2 * s * s + s0 * s0) * z).float()
        errors[solver] = (_run(sampler, x, velocity).double() - (mu + s * z)).abs().max().item()
    assert errors["unipc"] < 1e-2 and errors["dpm++"] < 1e-2
    assert errors["euler"] > 5 * max(errors["unipc"], errors["dpm++"])


@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_items_are_independent(solver):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, *SHAPE, generator=g)
    w = torch.randn(SHAPE, generator=g)

    def velocity(x, sig):  # nonlinear, so multistep history matters
        return torch.tanh(x * w) * (1 + sig) - 0.3 * x

    both = _run(FlowSampler(solver, 6, 5.0), x, velocity)
    for i in range(2):
        one = _run(FlowSampler(solver, 6, 5.0), x[i : i + 1], velocity)
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-6, atol=1e-6)
    unbatched = _run(FlowSampler(solver, 6, 5.0), x[0], velocity)  # [C, T, H, W] works too
    torch.testing.assert_close(unbatched, both[0], rtol=1e-6, atol=1e-6)


# The grids of GRIDS plus short ones and custom grids that start at σ = 1 (λ = -inf: UniPC nudges it to
# 1 - 1e-6, DPM-Solver++ takes an exact first-order step from it).
PARITY_GRIDS = [
    *[(steps, shift, None) for steps, shift in GRIDS],
    (2, 3.0, None),
    (3, 5.0, None),
    (6, 1.0, [1.0, 0.8, 0.55, 0.3, 0.12, 0.03]),
]
# Measured worst case over PARITY_GRIDS (torch 2.13, CPU), with max |x| ≈ 6.8: unipc 4.8e-6, dpm++ 6.2e-6
# (~10 float32 ulps after 50 steps; against a float64 run of the same solver, diffusers' own float32 run is
# off by as much: up to 4.5e-6), euler 0 (bit for bit).
PARITY_ATOL = {"unipc": 1e-5, "dpm++": 1e-5, "euler": 0.0}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("steps", "shift", "sigmas"), PARITY_GRIDS)
def test_matches_diffusers_schedulers(solver, steps, shift, sigmas):
    # FlowSampler solves the steps itself (coefficients in float64 on the host); diffusers' schedulers, as
    # the official code configures them, compute them in float32 on the device, step by step. Every
    # step's output agrees to float32 rounding (bit for bit for Euler).
    sampler = FlowSampler(solver, steps, shift, sigmas=sigmas)
    if sigmas is not None:
        grid = np.asarray(sigmas, dtype=np.float64)
    else:
        grid = dpm_sigmas(steps, shift) if solver == "dpm++" else unipc_sigmas(steps, shift)
    sched = _diffusers_scheduler(solver, grid)
    assert torch.equal(sampler.sigmas, sched.sigmas.to(torch.float32))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, *SHAPE, generator=g)
    w = torch.randn(SHAPE, generator=g)

    def velocity(x, sig):  # nonlinear, so the multistep history and the corrector matter
        return torch.tanh(x * w) * (1 + sig) - 0.3 * x + 0.1 * torch.sin(3 * x)

    reference = _run_diffusers(sched, x, velocity)
    ours = x
    for i in range(steps):
        ours = sampler.step(velocity(ours, float(sampler.sigmas[i])), i, ours)
        torch.testing.assert_close(ours, reference[i], rtol=0, atol=PARITY_ATOL[solver])


def test_dpm_starts_at_sigma_one_without_nan():
    sampler = FlowSampler("dpm++", 10, 5.0)
    assert sampler.sigmas[0] == 1.0
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    first = sampler.step(v, 0, x)
    s1 = sampler.sigmas[1]
    torch.testing.assert_close(first, s1 * x + (1 - s1) * (x - v))  # exact first-order step from σ = 1
    second = sampler.step(torch.randn(SHAPE, generator=g), 1, first)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()


def test_steps_in_order_and_reset():
    sampler = FlowSampler("unipc", 4, 5.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    with pytest.raises(RuntimeError, match="in order"):
        sampler.step(x, 1, x)
    first = _run(sampler, x, lambda x, s: torch.sin(x))
    with pytest.raises(RuntimeError, match="reset"):
        sampler.step(x, 0, x)
    sampler.reset()
    assert torch.equal(_run(sampler, x, lambda x, s: torch.sin(x)), first)
    with pytest.raises(ValueError, match="shape"):
        FlowSampler("unipc", 4, 5.0).step(x[None], 0, x)


# ---------------------------------------------------------------------------------------------------
# Shapes, noise, guidance


def test_latent_shape():
    assert latent_shape(81, 832, 480) == (16, 21, 60, 104)
    assert latent_shape(81, 1280, 720) == (16, 21, 90, 160)
    assert latent_shape(1, 64, 48, z_dim=4) == (4, 1, 6, 8)
    with pytest.raises(ValueError, match="4n\\+1"):
        latent_shape(80, 832, 480)


def test_initial_noise_is_seeded_on_cpu():
    shape = (16, 2, 6, 8)
    a = initial_noise(42, shape)
    expected = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert torch.equal(a, expected) and torch.equal(initial_noise(42, shape), a)
    assert not torch.equal(initial_noise(43, shape), a)
    half = initial_noise(42, shape, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, a.to(torch.bfloat16))


@pytest.mark.gpu  # skipped without CUDA by conftest
def test_initial_noise_is_device_independent():
    shape = (16, 2, 6, 8)
    on_gpu = initial_noise(7, shape, device="cuda")
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), initial_noise(7, shape))


def test_guide():
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guide(cond, uncond, 5.0), torch.tensor([6.0, -9.0]))
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.equal(guide(cond, uncond, 0.0), uncond)
