"""Ring attention's GPU kernel paths (issue 15, defect 6), proven on the CPU.

`block_attention_kernel` calls PyTorch's fused kernels directly, so it must do what
`F.scaled_dot_product_attention` does around them on CUDA: hand the memory-efficient kernel a bias whose
strides are aligned, and the flash / memory-efficient kernels a head dim that is a multiple of 8. The GPU
kernels are looked up by name in `BLOCK_KERNELS`; here stand-ins under those names enforce the CUDA
kernels' checks (torch 2.x: `check_supported` of the memory-efficient kernel, the flash kernel's head-dim
check) and compute with the fused CPU kernel, so the exact GPU code path runs on the CPU. A third group
counts host synchronisations: padding known on the host must not make any block wait on the device.

The `gpu` tests at the end run the real CUDA kernels (skipped without a GPU).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wan.distributed import ring as ring_module
from wan.distributed.ring import (
    block_attention_kernel,
    block_attention_reference,
    pick_block_kernel,
    ring_attention,
)

aten = torch.ops.aten

# Ops that make the host wait for the device (a value or a data-dependent shape read back).
SYNC_OPS = {
    aten._local_scalar_dense,
    aten.item,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
}


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops in `SYNC_OPS` dispatched inside the ``with`` block (``.count``, names in ``.ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        if func.overloadpacket in SYNC_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# --- stand-ins for the CUDA kernels: their input checks, then the fused CPU kernel -----------------


def _alignment(dtype: torch.dtype) -> int:
    """The memory-efficient kernel's minimum alignment in elements on sm80+ (128 bits, at least 4)."""
    return 8 if dtype in (torch.float16, torch.bfloat16) else 4


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, align: int) -> None:
    """q [B, H, Lq, D], k / v [B, H, Lk, D]: last stride 1, head dim and strides multiples of ``align``
    elements (a dimension of size 1 may have any stride), pointers 16-byte aligned."""
    for t in (q, k, v):
        assert t.dim() == 4 and t.stride(-1) == 1, t.stride()
        assert t.shape[-1] % align == 0, f"head dim {t.shape[-1]} is not a multiple of {align}"
        assert t.stride(2) % align == 0, f"strideM {t.stride(2)}"
        for dim in (0, 1):
            assert t.shape[dim] <= 1 or t.stride(dim) % align == 0, f"stride({dim}) = {t.stride(dim)}"
        assert t.data_ptr() % 16 == 0


Tensor = torch.Tensor


def _cpu_result(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    return out, lse


class CheckingKernels:
    """Stand-ins for `BLOCK_KERNELS["flash"]` and `["efficient"]` recording what each was handed."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def flash(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        """`_scaled_dot_product_flash_attention`'s checks: fp16 / bf16, no bias, head dim % 8 and <= 256."""
        assert q.dtype in (torch.float16, torch.bfloat16) and bias is None
        assert q.shape[-1] <= 256
        _check_inputs(q, k, v, 8)
        self.calls.append({"kernel": "flash", "head_dim": q.shape[-1], "scale": scale})
        return _cpu_result(q, k, v, None, scale)

    def efficient(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        """`_scaled_dot_product_efficient_attention`'s checks (its `check_supported`), bias included; returns
        the log-sum-exp rows padded to a multiple of 32 with NaN, as the kernel pads them."""
        align = _alignment(q.dtype)
        _check_inputs(q, k, v, align)
        call = {"kernel": "efficient", "head_dim": q.shape[-1], "scale": scale, "bias_stride": None}
        if bias is not None:
            b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            assert bias.shape == (b, h, lq, lk) and bias.dtype == q.dtype and bias.stride(-1) == 1
            assert bias.data_ptr() % 16 == 0
            for dim, size in enumerate((b, h, lq)):
                assert size <= 1 or bias.stride(dim) % align == 0, (
                    f"attn_bias is not correctly aligned: stride({dim}) = {bias.stride(dim)}"
                )
            call["bias_stride"] = bias.stride()
        self.calls.append(call)
        out, lse = _cpu_result(q, k, v, bias, scale)
        rows = math.ceil(lse.shape[-1] / 32) * 32
        padded = torch.full((*lse.shape[:-1], rows), float("nan"), dtype=lse.dtype)
        padded[..., : lse.shape[-1]] = lse
        return out, padded


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> CheckingKernels:
    stand_ins = CheckingKernels()
    monkeypatch.setitem(ring_module.BLOCK_KERNELS, "flash", stand_ins.flash)
    monkeypatch.setitem(ring_module.BLOCK_KERNELS, "efficient", stand_ins.efficient)
    return stand_ins


def _qkv(b: int, lq: int, lk: int, h: int, d: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, lq, h, d), (b, lk, h, d), (b, lk, h, d)]
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def _masks(b: int, lk: int) -> dict[str, torch.Tensor]:
    """Arbitrary key masks [B, Lk]: scattered keys, different padding per row, and a row without a key."""
    g = torch.Generator().manual_seed(lk)
    scattered = torch.rand(b, lk, generator=g) < 0.6
    scattered[:, 0] = True
    lengths = torch.arange(b) % lk + 1
    empty_row = torch.ones(b, lk, dtype=torch.bool)
    empty_row[-1] = False
    return {
        "scattered": scattered,
        "padding per row": torch.arange(lk)[None, :] < lengths[:, None],
        "empty row": empty_row,
    }


# --- (a) the bias handed to the memory-efficient kernel ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("b", "lk"), [(2, 6), (3, 13), (2, 16), (4, 17)])
def test_bias_strides_are_aligned_for_any_batch_and_key_count(kernels, dtype, b, lk):
    """B >= 2 and a key count that is not a multiple of 8: the bias's batch stride is still a multiple of
    16 (the kernel refuses `attn_bias is not correctly aligned (strideB)` otherwise), heads and queries are
    broadcast, and the result equals exact attention, a row without any key included."""
    h, lq = 3, 5
    q, k, v = _qkv(b, lq, lk, h, 8, dtype, seed=lk)
    for name, mask in _masks(b, lk).items():
        out, lse = block_attention_kernel(q, k, v, mask, kernel="efficient")
        stride = kernels.calls[-1]["bias_stride"]
        assert stride[0] % 16 == 0 and stride[0] >= lk and stride[1:] == (0, 0, 1), (name, stride)
        ref_out, ref_lse = block_attention_reference(q, k, v, mask)
        torch.testing.assert_close(out, ref_out, atol=_tol(dtype), rtol=0, msg=name)
        torch.testing.assert_close(lse, ref_lse, atol=_tol(dtype), rtol=0, msg=name)
        assert lse.shape == (b, h, lq)  # the kernel's padded log-sum-exp rows are cut


def test_a_mask_goes_to_the_memory_efficient_kernel():
    """The flash kernel takes no bias: with a mask the pick is never "flash" (and on the CPU, "cpu")."""
    q = torch.randn(2, 4, 2, 8, dtype=torch.bfloat16)
    assert pick_block_kernel(q, has_bias=True) == pick_block_kernel(q, has_bias=False) == "cpu"


# --- (b) head dims that are not a multiple of 8 -------------------------------------------------------------


@pytest.mark.parametrize("d", [12, 20, 4, 16])
@pytest.mark.parametrize(
    ("kernel", "dtype"),
    [
        ("flash", torch.bfloat16),
        ("flash", torch.float16),
        ("efficient", torch.bfloat16),
        ("efficient", torch.float32),
    ],
)
def test_head_dims_not_a_multiple_of_8_through_the_gpu_kernel_path(kernels, kernel, dtype, d):
    """The GPU kernels get the head dim zero-padded to a multiple of 8 with the true dim's scale; the output
    equals exact attention at the true head dim."""
    q, k, v = _qkv(2, 7, 9, 3, d, dtype, seed=d)
    out, lse = block_attention_kernel(q, k, v, kernel=kernel)
    call = kernels.calls[-1]
    assert call["kernel"] == kernel and call["head_dim"] % 8 == 0 and call["head_dim"] - d < 8
    assert call["scale"] == pytest.approx(d**-0.5)
    ref_out, ref_lse = block_attention_reference(q, k, v)
    assert out.shape == (2, 7, 3, d)
    torch.testing.assert_close(out, ref_out, atol=_tol(dtype), rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=_tol(dtype), rtol=0)


@pytest.mark.parametrize("d", [12, 20])
def test_ring_attention_with_odd_head_dim_equals_full_attention(kernels, d):
    """One process, padding given as a host int: ring attention through the flash path (head dim 12 or 20)
    equals full attention over the real keys."""
    q, k, v = _qkv(2, 6, 10, 2, d, torch.bfloat16, seed=3)
    flash = functools.partial(block_attention_kernel, kernel="flash")
    out = ring_attention(q, k, v, None, num_keys=7, block_attention=flash)
    expected, _ = block_attention_reference(q, k[:, :7], v[:, :7])
    assert out.dtype == torch.bfloat16 and kernels.calls
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)
    assert torch.equal(ring_attention(q, k, v, None, num_keys=0), torch.zeros_like(q))


# --- (c) host synchronisations --------------------------------------------------------------------------


def count_host_syncs(fn: Callable[[], object]) -> list[str]:
    """The host-syncing ops `fn()` dispatches."""
    with HostSyncCounter() as counter:
        fn()
    return counter.ops


def test_the_counter_sees_host_syncs():
    t = torch.ones(3)
    assert len(count_host_syncs(lambda: (int(t.sum()), bool(t.all()), t.max().item()))) == 3


@pytest.mark.parametrize("kernel", ["cpu", "efficient", "flash"])
def test_block_kernel_makes_no_host_sync(kernels, kernel):
    """Any mask (a row without keys included) and padded head dims: nothing reads a value back."""
    q, k, v = _qkv(2, 5, 6, 2, 12, torch.bfloat16)
    masks = [None] if kernel == "flash" else [None, *_masks(2, 6).values()]
    for mask in masks:
        assert count_host_syncs(lambda m=mask: block_attention_kernel(q, k, v, m, kernel=kernel)) == []


def test_padded_ring_attention_in_one_process_makes_no_host_sync():
    """Prefix padding as a mask or as a host int (one process; the gloo ring is counted in
    tests/test_distributed_ops.py)."""
    q, k, v = _qkv(2, 6, 6, 2, 8, torch.float32)
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    assert count_host_syncs(lambda: ring_attention(q, k, v, None, key_mask=mask)) == []
    assert count_host_syncs(lambda: ring_attention(q, k, v, None, num_keys=4)) == []
    expected = ring_attention(q, k, v, None, key_mask=mask)
    torch.testing.assert_close(ring_attention(q, k, v, None, num_keys=4), expected, atol=1e-6, rtol=0)


def test_num_keys_is_checked():
    q, k, v = _qkv(1, 2, 3, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="num_keys must be in"):
        ring_attention(q, k, v, None, num_keys=4)
    with pytest.raises(ValueError, match="not both"):
        ring_attention(q, k, v, None, num_keys=2, key_mask=torch.ones(1, 3, dtype=torch.bool))


# --- the real CUDA kernels --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [12, 20, 64, 128])
def test_cuda_block_kernels_match_the_reference(dtype, d):
    """The kernels `pick_block_kernel` chooses on this GPU (flash without a mask in half precision,
    memory-efficient otherwise), B = 2, 13 keys, masks of every kind, no host sync (CUDA's sync debug mode
    raises on one)."""
    q, k, v = (t.cuda() for t in _qkv(2, 11, 13, 3, d, dtype, seed=d))
    masks = {"none": None, **{n: m.cuda() for n, m in _masks(2, 13).items()}}
    torch.cuda.synchronize()
    for name, mask in masks.items():
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, lse = block_attention_kernel(q, k, v, mask)
            ring_out = ring_attention(q, k, v, None, num_keys=9)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref_out, ref_lse = block_attention_reference(q, k, v, mask)
        torch.testing.assert_close(out, ref_out, atol=_tol(dtype), rtol=0, msg=name)
        torch.testing.assert_close(lse, ref_lse, atol=_tol(dtype), rtol=0, msg=name)
        expected, _ = block_attention_reference(q, k[:, :9], v[:, :9])
        torch.testing.assert_close(ring_out.float(), expected, atol=_tol(dtype), rtol=0)
