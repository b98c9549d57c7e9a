"""Issue 15, defects 2, 4 and 5, checked on the CPU: what the DiT keeps in float32 (as the official code),
the text encoder never in float16, one DiT block compiled whole by inductor with its attention kernel chosen
outside the compiled region, compile refused under context parallelism, and the attention kernel choice
(FlashAttention-3, SDPA's cuDNN / flash priority, flash-attn 2, SDPA) with the kernel named in each sidecar.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import types

import pytest
import torch
from twins import randomise_dit

import wan.attention
import wan.model
from wan.attention import (
    KERNELS,
    attention,
    attention_kernel,
    available_kernels,
    choose_kernel,
    get_kernel,
    kernel_name,
    reset_attention_cache,
    resolve_attention,
    sdpa,
)
from wan.configs import get_preset
from wan.model import AttentionBlock, WanModel
from wan.pipeline import WanPipeline
from wan.rope import rope_frequencies
from wan.text_encoder import WanTextEncoder, build_tiny_tokenizer, text_encoder_dtype, tiny_t5_config

# -------------------------------------------------------------------------------------------------------
# Defect 2: float32 where the official code computes in float32


def official_fp32(name: str) -> bool:
    """The parameters the official code uses in float32 under its bf16 autocast (all its weights are float32;
    autocast rounds only what enters a linear layer, a convolution or attention outside its float32 regions):
    the time embedding and projection, the whole head, every modulation table, every norm's weight and bias,
    and FLF2V's image position embedding."""
    top = name.split(".")[0]
    norms = ("norm3.weight", "norm3.bias", "norm_q.weight", "norm_k.weight", "norm_k_img.weight")
    image_norms = ("img_emb.proj.0.", "img_emb.proj.4.")  # the two LayerNorms of MLPProj
    return (
        top in ("time_embedding", "time_projection", "head")
        or name.endswith(("modulation", "emb_pos", *norms))
        or name.startswith(image_norms)
    )


def tiny_model(preset: str = "tiny-t2v", seed: int = 1) -> WanModel:
    torch.manual_seed(0)
    model = WanModel(get_preset(preset).dit).eval().requires_grad_(False)
    randomise_dit(model, seed)
    return model


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v", "tiny-flf2v"])
def test_cast_keeps_float32_exactly_what_the_official_code_keeps(preset):
    model = tiny_model(preset).cast(torch.bfloat16)
    kept = {name for name, p in model.named_parameters() if p.dtype == torch.float32}
    expected = {name for name, _ in model.named_parameters() if official_fp32(name)}
    assert {"head.head.weight", "head.head.bias", "blocks.0.norm3.weight", "blocks.1.self_attn.norm_q.weight",
            "blocks.0.cross_attn.norm_k.weight"} <= kept  # fmt: skip
    assert kept == expected, (sorted(kept - expected), sorted(expected - kept))
    assert all(model.keeps_fp32(name) == (name in expected) for name, _ in model.named_parameters())
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    # every kind of model still runs mixed
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    clip = None
    if cfg.image_dim is not None:
        clip = torch.randn(1, cfg.image_tokens or 5, cfg.image_dim, generator=g).half()  # CLIP's fp16
    out = model(x, torch.tensor([500.0]), text.bfloat16(), clip)
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_a_bf16_model_runs_its_head_in_float32():
    """The head's norm, modulation and output projection are float32: on the same float32 tokens the bf16
    model's head gives the float32 model's output, not a bf16-rounded one."""
    model = tiny_model()
    reference = copy.deepcopy(model.head)
    low = model.cast(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    tokens, e = torch.randn(2, 24, model.cfg.dim, generator=g), torch.randn(2, model.cfg.dim, generator=g)
    out = low.head(tokens, e)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(tokens, e), atol=1e-6, rtol=1e-6)


def test_a_bf16_models_output_is_closer_to_float32_than_rounding_head_and_norms_gives():
    """Against the float32 model: the bf16 model (float32 head and norms) is closer than the same model with
    the head's and the norms' weights rounded to bf16 (what `cast` did before); its output is not rounded to
    bf16 at all."""
    torch.manual_seed(0)
    model = tiny_model(seed=5)
    g = torch.Generator().manual_seed(6)
    cfg = model.cfg
    x = torch.randn(2, cfg.in_dim, 3, 6, 8, generator=g)
    t = torch.tensor([999.0, 250.0])
    text = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    expected = model(x, t, text)
    low = copy.deepcopy(model).cast(torch.bfloat16)
    rounded = copy.deepcopy(low)
    for name, p in rounded.named_parameters():
        if name.split(".")[0] == "head" or "norm" in name:
            p.data = p.data.bfloat16()
    out, out_rounded = low(x, t, text.bfloat16()), rounded(x, t, text.bfloat16())
    error = (out - expected).abs().mean().item()
    error_rounded = (out_rounded - expected).abs().mean().item()
    print(f"mean |bf16 - fp32|: {error:.3e} (head and norms float32), {error_rounded:.3e} (rounded to bf16)")
    assert error < 0.9 * error_rounded
    exact_in_bf16 = (out == out.bfloat16().float()).float().mean().item()
    assert exact_in_bf16 < 0.2, f"{exact_in_bf16:.0%} of the outputs are bf16 values: the head rounded them"


def test_a_float16_pipeline_keeps_the_text_encoder_in_bfloat16(tmp_path):
    """umT5 overflows in float16: whatever the DiT's dtype, the text encoder runs in bf16 (or float32)."""
    from twins import write_diffusers

    assert text_encoder_dtype(torch.float16) == torch.bfloat16
    assert text_encoder_dtype(torch.bfloat16) == torch.bfloat16
    assert text_encoder_dtype(torch.float32) == torch.float32
    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu", dtype=torch.float16)
    assert pipe.dtype == torch.float16 and pipe.dit.blocks[0].ffn[0].weight.dtype == torch.float16
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert WanPipeline.from_config("tiny-t2v", seed=0, device="cpu").text_encoder.dtype == torch.float32
    # handed over in float16: brought to bf16
    t5 = get_preset("tiny-t2v").text_encoder
    config = tiny_t5_config(vocab_size=t5.vocab_size, d_model=t5.d_model, num_layers=t5.num_layers,
                            num_heads=t5.num_heads, d_ff=t5.d_ff)  # fmt: skip
    encoder = WanTextEncoder.from_config(config, build_tiny_tokenizer(t5.vocab_size), dtype=torch.float16)
    mixed = WanPipeline(pipe.preset, pipe.dit, pipe.vae, encoder, device="cpu", dtype=torch.float16)
    assert mixed.text_encoder.dtype == torch.bfloat16
    # loaded from a checkpoint with torch_dtype=float16
    root = write_diffusers(WanPipeline.from_config("tiny-t2v", seed=0, device="cpu"), tmp_path / "ckpt")
    loaded = WanPipeline.from_pretrained(root, device="cpu", torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16 and loaded.text_encoder.dtype == torch.bfloat16


# -------------------------------------------------------------------------------------------------------
# Defect 4: torch.compile under inductor


def _block_inputs(cfg, grid=(2, 3, 4), batch=2, context=7):
    g = torch.Generator().manual_seed(7)
    tokens = grid[0] * grid[1] * grid[2]
    x = torch.randn(batch, tokens, cfg.dim, generator=g)  # float32 residual stream
    e0 = torch.randn(batch, 6, cfg.dim, generator=g) * 0.1
    ctx = torch.randn(batch, context, cfg.dim, generator=g)
    rope = torch.view_as_real(rope_frequencies(grid, cfg.head_dim))  # [L, D/2, 2] as the model passes it
    return x, e0, ctx, rope


def _refuse_choosing(monkeypatch):
    """Any kernel choice from here on fails: the compiled block must use the kernel it is given."""

    def refuse(*args, **kwargs):
        raise AssertionError("the attention kernel was chosen inside the compiled region")

    for module, name in ((wan.model, "attention"), (wan.model, "resolve_attention"),
                         (wan.attention, "resolve_attention"), (wan.attention, "kernel_name")):  # fmt: skip
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor on the CPU generates C++ and needs a C++ compiler (no g++ / c++ on PATH)",
)
def test_one_block_compiles_to_one_graph_under_inductor(monkeypatch):
    """fullgraph=True: no graph break. Tolerance 1e-5 (float32; inductor fuses and reorders reductions)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cfg = get_preset("tiny-t2v").dit
    torch.manual_seed(0)
    block = AttentionBlock(cfg).eval().requires_grad_(False)
    randomise_dit(block, 2)
    x, e0, ctx, rope = _block_inputs(cfg)
    kernel = resolve_attention("cpu", torch.float32, cfg.head_dim)
    with torch.no_grad():
        expected = block(x, e0, ctx, rope, None, kernel)
        _refuse_choosing(monkeypatch)
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(block, backend=counter, fullgraph=True)
        out = compiled(x, e0, ctx, rope, None, kernel)
        again = compiled(x * 0.5, e0, ctx, rope, None, kernel)  # same shapes: no recompilation
    assert counter.frame_count == 1 and counter.op_count > 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert again.shape == out.shape


def test_every_kernel_traces_whole_and_the_model_hands_blocks_their_kernel(monkeypatch):
    """Dynamo (the part that breaks graphs) takes a block whole with each kernel this CPU can call, SDPA's
    cuDNN / flash priority included; a model with compiled blocks never chooses inside them."""
    torch._dynamo.reset()
    cfg = get_preset("tiny-t2v").dit
    torch.manual_seed(0)
    block = AttentionBlock(cfg).eval().requires_grad_(False)
    randomise_dit(block, 2)
    x, e0, ctx, rope = _block_inputs(cfg)
    model = tiny_model()
    g = torch.Generator().manual_seed(8)
    latents = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        expected_block = block(x, e0, ctx, rope, None, sdpa)
        expected_model = model(latents, torch.tensor([300.0]), text)
        kernels = {
            name: get_kernel(name) for name in ("sdpa", "sdpa-cudnn/flash") if name in available_kernels()
        }
        assert "sdpa-cudnn/flash" in kernels, "torch >= 2.6 takes sdpa_kernel(..., set_priority=True)"
        _refuse_choosing(monkeypatch)
        for name, kernel in kernels.items():
            compiled = torch.compile(block, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled(x, e0, ctx, rope, None, kernel), expected_block, msg=name)
        monkeypatch.setattr(wan.model, "resolve_attention", lambda *a: sdpa)  # outside the blocks: allowed
        out = model.compile_blocks(backend="eager", fullgraph=True)(latents, torch.tensor([300.0]), text)
    torch.testing.assert_close(out, expected_model, atol=1e-6, rtol=0)


class _Sharding:
    def shard(self, tokens, rope):
        return tokens, rope, attention

    def gather(self, tokens, length):
        return tokens


def test_compile_is_refused_under_context_parallelism():
    compiled = tiny_model().compile_blocks(backend="eager")
    with pytest.raises(ValueError, match=r"torch\.compile cannot be combined with context parallelism"):
        compiled.sequence_sharding = _Sharding()
    assert compiled.sequence_sharding is None
    sharded = tiny_model()
    sharded.sequence_sharding = _Sharding()
    with pytest.raises(ValueError, match="context parallelism"):
        sharded.compile_blocks(backend="eager")
    sharded.blocks[0].compile(backend="eager")  # compiled behind the model's back: refused at the forward
    cfg = sharded.cfg
    with pytest.raises(ValueError, match="context parallelism"):
        sharded(torch.zeros(1, cfg.in_dim, 1, 2, 2), torch.tensor([1.0]), torch.zeros(1, 4, cfg.text_dim))
    sharded.sequence_sharding = None  # leaving context parallelism is always allowed


# -------------------------------------------------------------------------------------------------------
# Defect 5: the kernel choice


@pytest.fixture
def fake_flash_packages(monkeypatch):
    """Importable `flash_attn_interface` (FlashAttention-3: returns (out, lse), as its early releases) and
    `flash_attn` (FlashAttention-2) modules that compute with SDPA and record their calls."""
    calls: list[str] = []

    def fa3(q, k, v, softmax_scale=None, causal=False):
        calls.append("fa3")
        return sdpa(q, k, v), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    def fa2(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append("flash_attn")
        return sdpa(q, k, v)

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=fa3))
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fa2))
    monkeypatch.delenv("WAN_ATTENTION", raising=False)
    reset_attention_cache()
    yield calls
    reset_attention_cache()


def test_the_cpu_always_takes_sdpa_even_with_flash_attention_installed(fake_flash_packages):
    assert {"fa3", "flash_attn", "sdpa"} <= available_kernels()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 16, generator=g) for _ in range(3))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert attention_kernel(q.to(dtype)) == "sdpa"
        assert kernel_name("cpu", dtype, 128) == "sdpa"
    reference = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 16**0.5, -1)
    torch.testing.assert_close(attention(q, k, v), torch.einsum("bhqk,bkhd->bqhd", reference, v))
    assert fake_flash_packages == []  # results unchanged: the flash packages were never called
    # the wrappers take our [B, L, N, D] layout and FlashAttention-3's (out, lse) return
    torch.testing.assert_close(get_kernel("fa3")(q, k, v), sdpa(q, k, v))
    torch.testing.assert_close(get_kernel("flash_attn")(q, k, v), sdpa(q, k, v))
    assert fake_flash_packages == ["fa3", "flash_attn"]


def test_the_kernel_choice_prefers_the_fastest_hopper_kernels(fake_flash_packages):
    everything = available_kernels()
    assert choose_kernel((9, 0), torch.bfloat16, 128, everything) == "fa3"
    assert choose_kernel((9, 0), torch.float16, 128, everything) == "fa3"
    assert (
        choose_kernel((9, 0), torch.bfloat16, 128, {"sdpa-cudnn/flash", "flash_attn"}) == "sdpa-cudnn/flash"
    )
    assert choose_kernel((9, 0), torch.bfloat16, 128, {"flash_attn"}) == "flash_attn"
    assert choose_kernel((9, 0), torch.bfloat16, 100, everything) == "sdpa-cudnn/flash"  # FA3: multiples of 8
    assert choose_kernel((9, 0), torch.float32, 128, everything) == "sdpa"  # flash kernels: fp16 / bf16 only
    assert choose_kernel((9, 0), torch.bfloat16, 512, everything) == "sdpa"  # head width over 256
    assert choose_kernel((8, 0), torch.bfloat16, 128, everything) == "flash_attn"  # Ampere: no FA3
    assert choose_kernel((8, 6), torch.bfloat16, 128, {"fa3", "sdpa-cudnn/flash"}) == "sdpa"
    assert choose_kernel((7, 5), torch.float16, 64, everything) == "sdpa"  # Turing: no flash-attn 2
    assert choose_kernel(None, torch.bfloat16, 128, everything) == "sdpa"  # not CUDA
    # WAN_ATTENTION's request, where the tensors allow it
    assert choose_kernel((9, 0), torch.bfloat16, 128, everything, requested="sdpa") == "sdpa"
    assert choose_kernel((9, 0), torch.bfloat16, 128, everything, requested="flash_attn") == "flash_attn"
    assert choose_kernel((8, 0), torch.bfloat16, 128, everything, requested="fa3") == "flash_attn"
    assert choose_kernel(None, torch.bfloat16, 128, everything, requested="fa3") == "sdpa"
    assert set(KERNELS) == {"fa3", "sdpa-cudnn/flash", "flash_attn", "sdpa"}


def test_wan_attention_asks_for_a_kernel(fake_flash_packages, monkeypatch):
    monkeypatch.setenv("WAN_ATTENTION", "fa3")
    reset_attention_cache()
    assert kernel_name("cpu", torch.bfloat16, 128) == "sdpa"  # not usable on the CPU: the automatic choice
    monkeypatch.setenv("WAN_ATTENTION", "flash-attn-4")
    reset_attention_cache()
    with pytest.raises(ValueError, match="WAN_ATTENTION='flash-attn-4': expected auto or one of fa3"):
        kernel_name("cpu", torch.bfloat16, 128)


def test_the_sidecar_names_the_attention_kernel(tmp_path):
    import fsspec

    import flows.shard
    from flows.models import model_source
    from flows.shard import JobContext, run_job
    from storage.catalog import Catalog, JobSpec
    from storage.layout import OutputLayout

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.upgrade()
    source = model_source("tiny-t2v")
    run = catalog.create_run("r", "m.jsonl", "0" * 64, {})
    params = {"prompt": "a fox", "size": "64*48", "frame_num": 5, "steps": 2}
    catalog.plan_jobs(run.id, [JobSpec("fox", 1, "tiny-t2v", source.fingerprint, params)])
    (job,) = catalog.jobs(run.id)
    ctx = JobContext(
        catalog=catalog, run_id=run.id, run_name="r", source=source,
        pipeline=flows.shard.load_pipeline(source), layout=OutputLayout(str(tmp_path / "out")),
        storage_options={}, worker="w",
    )  # fmt: skip
    assert run_job(ctx, job.id)["status"] == "succeeded"
    (output,) = catalog.outputs(run.id)
    with fsspec.open(output.sidecar_uri) as f:
        sidecar = json.load(f)
    catalog.close()
    assert sidecar["attention"] == "sdpa" and sidecar["device"] == "cpu"
