"""Issue 15, defects 1 and 3, proved on the CPU (with CUDA twins marked `gpu`).

1. The VAE's mid-block attention reaches a fused SDPA kernel: at a 720P latent (90 x 160 = 14,400 positions
   per frame, 384 channels) its peak memory is a small fraction of the 14,400² float32 score matrix that the
   3-D (math-kernel) formulation allocates.
2. The sampling loop never waits for the device: a `TorchDispatchMode` counts the operations that read a
   device value back to the host (`.item()`, `float(t)`, `bool(t)`, data-dependent shapes, linalg error
   checks, copies to the CPU) inside each solver step, and inside the pipeline's loop.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from wan.sampling import SOLVERS, FlowSampler
from wan.vae import AttentionBlock

SHAPE = (2, 16, 3, 4, 6)  # [B, C, T, H, W]

# --------------------------------------------------------------------------------------------------------
# Host-sync counting

aten = torch.ops.aten
# Ops that read a device value on the host (on CUDA each blocks until the stream has caught up): scalar
# reads, data-dependent output shapes, comparisons returning a Python bool, linalg's error-flag checks.
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._linalg_check_errors.default,
    aten.allclose.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}


class HostSyncCounter(TorchDispatchMode):
    """Records every dispatched op that makes the host wait for the device.

    Counted: the ops in `_SYNC_OPS`; any op called with `check_errors=True` (`linalg_*_ex`); a copy of a
    non-CPU tensor to the CPU. `syncs` lists the op names in order; `mark()` starts a new group, so that a
    loop can attribute them to its iterations (`groups[i]`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[list[str]] = [[]]

    @property
    def syncs(self) -> list[str]:
        return [name for group in self.groups for name in group]

    def mark(self) -> None:
        self.groups.append([])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SYNC_OPS or kwargs.get("check_errors") is True or _copies_to_host(func, args, kwargs):
            self.groups[-1].append(str(func))
        return out


def _copies_to_host(func, args, kwargs) -> bool:
    if func not in (aten._to_copy.default, aten.copy_.default):
        return False
    source = args[1] if func is aten.copy_.default else args[0]
    target = args[0].device if func is aten.copy_.default else kwargs.get("device") or source.device
    return (
        isinstance(source, torch.Tensor)
        and source.device.type != "cpu"
        and torch.device(target).type == "cpu"
    )


def _velocity_fn(w: torch.Tensor):
    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:  # nonlinear: the history matters
        return torch.tanh(x * w) * (1 + sigma) - 0.3 * x

    return velocity


def test_sync_counter_sees_host_syncs():
    t = torch.tensor([0.25, 0.5])
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    with HostSyncCounter() as counter:
        t.sum().item()
        float(t[0])
        bool(t[0] > 0)
        t.nonzero()
        torch.linalg.solve(a, t)
        torch.linalg.inv(a)
        t.add(1.0).mul(t)  # no sync
    assert counter.syncs.count("aten._local_scalar_dense.default") == 3
    assert "aten.nonzero.default" in counter.syncs
    assert counter.syncs.count("aten._linalg_check_errors.default") == 2
    assert len(counter.syncs) == 6


def test_diffusers_unipc_syncs_every_corrected_step():
    # What FlowSampler wrapped before: diffusers' UniPC solves its corrector's 2x2 system with
    # torch.linalg.solve on the sample's device at every step from the third on, and checks its error flag.
    from diffusers import UniPCMultistepScheduler

    from wan.sampling import unipc_sigmas

    steps = 6
    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    sched.set_timesteps(sigmas=unipc_sigmas(steps, 5.0).copy())
    sched.set_begin_index(0)
    g = torch.Generator().manual_seed(1)
    x, velocity = torch.randn(SHAPE, generator=g), _velocity_fn(torch.randn(SHAPE[1:], generator=g))
    counter = HostSyncCounter()
    for i, t in enumerate(sched.timesteps):
        v = velocity(x, float(sched.sigmas[i]))
        with counter:
            x = sched.step(v, t, x, return_dict=False)[0]
        counter.mark()
    per_step = [len(group) for group in counter.groups[:steps]]
    assert per_step[:2] == [0, 0] and all(n >= 1 for n in per_step[2:]), per_step


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps", [1, 2, 8, 50])
def test_solver_steps_never_sync(solver, steps):
    g = torch.Generator().manual_seed(2)
    x, velocity = torch.randn(SHAPE, generator=g), _velocity_fn(torch.randn(SHAPE[1:], generator=g))
    sampler = FlowSampler(solver, steps, 5.0)  # set-up may sync: it is outside the counter
    sigmas = sampler.sigmas.tolist()
    counter = HostSyncCounter()
    for i in range(steps):
        v = velocity(x, sigmas[i])
        with counter:
            x = sampler.step(v, i, x)
        counter.mark()
    assert counter.syncs == [], [(i, group) for i, group in enumerate(counter.groups) if group]
    assert torch.isfinite(x).all()


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
def test_pipeline_sampling_loop_never_syncs(solver):
    # WanPipeline.sample_latents: prompts are encoded and the sampler built before the first DiT forward (and
    # may sync); from that forward on, every step (CFG forward of the DiT, guidance, solver step) must not.
    from wan.pipeline import WanPipeline

    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    settings = pipe.settings(size=(64, 48), frame_num=5, steps=4, shift=5.0, guide_scale=5.0, solver=solver)
    counter = HostSyncCounter()
    in_loop: list[bool] = []

    def mark(module, args):  # a DiT forward begins: a new step (the first one ends the set-up)
        counter.mark()
        in_loop.append(True)

    handle = pipe.dit.register_forward_pre_hook(mark)
    try:
        with counter:
            pipe.sample_latents(["a fox"], [3], settings, progress=False)
    finally:
        handle.remove()
    assert len(in_loop) == 4  # one batched CFG forward per step
    loop = counter.groups[1:]
    assert all(group == [] for group in loop), [(i, group) for i, group in enumerate(loop) if group]


@pytest.mark.gpu  # skipped without CUDA by conftest
@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_steps_never_sync_on_cuda(solver):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g).cuda()
    velocity = _velocity_fn(torch.randn(SHAPE[1:], generator=g).cuda())
    sampler = FlowSampler(solver, 50, 5.0)
    sigmas = sampler.sigmas.tolist()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(sampler.steps):
            x = sampler.step(velocity(x, sigmas[i]), i, x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x).all()


@pytest.mark.gpu  # skipped without CUDA by conftest
@pytest.mark.parametrize("solver", SOLVERS)
def test_pipeline_sampling_loop_never_syncs_on_cuda(solver):
    # CUDA's own sync detector, from the first DiT forward to the end of the loop: it also sees what the
    # dispatch-mode count cannot (copies from pageable host memory, cudaStreamSynchronize in kernels).
    from wan.pipeline import WanPipeline

    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cuda")
    settings = pipe.settings(size=(64, 48), frame_num=5, steps=4, shift=5.0, guide_scale=5.0, solver=solver)
    handle = pipe.dit.register_forward_pre_hook(lambda module, args: torch.cuda.set_sync_debug_mode("error"))
    try:
        latents = pipe.sample_latents(["a fox"], [3], settings, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        handle.remove()
    assert torch.isfinite(latents).all()


# --------------------------------------------------------------------------------------------------------
# VAE attention memory

LATENT_720P = (90, 160)  # 1280 x 720 / 8
MID_DIM = 384  # the real VAE's mid-block width: dim 96 x dim_mult[-1] 4


def _cpu_memory(fn) -> tuple[int, int, set[str]]:
    """Run `fn` under the profiler: (peak bytes allocated on top of what existed before, largest single
    allocation, names of the ops that ran). The peak is the running sum of every allocation and free the
    CPU allocator reported during the call (kernel-internal buffers included), in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    allocations = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = largest = 0
    for e in allocations:
        current += e.nbytes()
        peak, largest = max(peak, current), max(largest, e.nbytes())
    return peak, largest, {e.name() for e in events if e.name() != "[memory]"}


def _attention_block(dim: int, seed: int = 0) -> AttentionBlock:
    torch.manual_seed(seed)
    block = AttentionBlock(dim).eval()
    with torch.no_grad():
        block.norm.gamma.uniform_(0.8, 1.2)
        block.proj.weight.normal_(std=0.05)
    return block


def _explicit_attention_block(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The block written out, with the [HW, HW] softmax in float64. x: [B, C, T, H, W] -> same shape."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    qkv = block.to_qkv(block.norm(frames)).double().flatten(2)  # [bt, 3c, hw]
    q, k, v = qkv.chunk(3, dim=1)  # each [bt, c, hw]
    scores = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # [bt, hw, hw]
    y = (v @ scores.transpose(1, 2)).float().view(b * t, c, h, w)
    return block.proj(y).view(b, t, c, h, w).transpose(1, 2) + x


def test_vae_attention_matches_explicit_softmax():
    block = _attention_block(32)
    x = torch.randn(2, 32, 3, 6, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(block(x), _explicit_attention_block(block, x), rtol=1e-5, atol=1e-5)


def test_memory_meter_sees_the_score_matrix():
    # The meter is sound: the 3-D formulation the VAE used (math kernel) allocates the [L, L] scores.
    length = 32 * 48
    q, k, v = torch.randn(3, 1, length, MID_DIM, generator=torch.Generator().manual_seed(5)).unbind(0)
    peak_3d, largest_3d, ops_3d = _cpu_memory(lambda: F.scaled_dot_product_attention(q, k, v))
    assert largest_3d >= length * length * 4 and peak_3d >= 2 * length * length * 4
    assert "aten::_softmax" in ops_3d
    _, largest_4d, ops_4d = _cpu_memory(
        lambda: F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])
    )
    assert largest_4d < length * length * 4 and "aten::_softmax" not in ops_4d


@pytest.mark.slow
def test_vae_attention_peak_memory_at_720p():
    h, w = LATENT_720P
    length = h * w  # 14,400 positions per latent frame
    scores = length * length * 4  # one float32 [L, L] matrix: 829 MB
    block = _attention_block(MID_DIM)
    x = torch.randn(1, MID_DIM, 1, h, w, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        peak, largest, ops = _cpu_memory(lambda: block(x))
    # Measured on torch 2.13 (CPU flash kernel): peak 155 MB, largest allocation 66 MB (the q/k/v
    # projection). The 3-D formulation (math kernel) peaked at 1,977 MB, its largest allocation the 829 MB
    # score matrix.
    assert peak < scores / 4, (peak, scores)
    assert largest < scores / 8, largest
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops and "aten::_softmax" not in ops


@pytest.mark.gpu  # skipped without CUDA by conftest
def test_vae_attention_peak_memory_at_720p_on_cuda():
    h, w = LATENT_720P
    scores = (h * w) ** 2 * 4
    block = _attention_block(MID_DIM).cuda()
    x = torch.randn(1, MID_DIM, 1, h, w, device="cuda")
    with torch.no_grad():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = block(x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        torch.testing.assert_close(y, _explicit_attention_block(block, x), rtol=1e-4, atol=1e-4)
    assert peak < scores / 4, (peak, scores)
