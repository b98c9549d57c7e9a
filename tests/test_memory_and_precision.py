"""GPU memory options and mixed precision, checked on the CPU: bf16 against fp32 within stated bounds,
`offload_model` / `t5_cpu` giving the same video, tiled VAE decode close to the whole-frame one, and the
options reaching `wan.generate`, the flows and the catalog's record of a run."""

from __future__ import annotations

import json

import pytest
import torch
from twins import randomise_dit

from flows.models import memory_options
from wan.configs import get_preset
from wan.generate import main
from wan.model import WanModel
from wan.pipeline import MemoryOptions, WanPipeline, parse_vae_tiling
from wan.vae import VAETiling, WanVAE

SMALL = dict(size=(64, 48), frame_num=5, sampling_steps=4, guide_scale=5.0)

# Stated bounds, measured on these inputs (see each test).
BF16_DIT_REL = 0.02  # bf16 DiT output vs fp32: max |diff| / max |fp32| (measured 0.005)
BF16_VIDEO_MEAN = 1.0  # whole tiny video, bf16 DiT vs fp32: mean |pixel diff| in uint8 steps (measured 0.23)
# Tiled vs whole-frame decode of a smooth 128x160 video through the full-size VAE with random weights:
# mean |diff| in [-1, 1] and PSNR over that range (measured 0.019 and 37.0 dB with 2 x 2 tiles of 14 latent
# cells overlapping by 8). Random weights spread each pixel's dependence much wider than trained ones.
TILED_MEAN = 0.025
TILED_PSNR_DB = 35.0


def test_bf16_dit_keeps_its_time_path_in_fp32_and_stays_close():
    torch.manual_seed(0)
    model = WanModel(get_preset("tiny-t2v").dit).eval()
    with torch.no_grad():
        randomise_dit(model, 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 3, 6, 8, generator=g)
    t = torch.tensor([999.0, 250.0])
    context = torch.randn(2, model.cfg.text_len, model.cfg.text_dim, generator=g)
    with torch.no_grad():
        expected = model(x, t, context)
        low = model.cast(torch.bfloat16)
        assert low.blocks[0].modulation.dtype == torch.float32
        assert next(low.time_embedding.parameters()).dtype == torch.float32
        assert low.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
        out = low(x.bfloat16(), t, context.bfloat16()).float()
    rel = ((out - expected).abs().max() / expected.abs().max()).item()
    print(f"bf16 DiT: max |diff| / max |fp32| = {rel:.4f}")
    assert rel < BF16_DIT_REL


@pytest.mark.slow
def test_bf16_generation_stays_close_to_fp32():
    reference = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    low = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu", dtype=torch.bfloat16)
    a = torch.cat(list(reference.generate_stream("a fox", seed=4, progress=False, **SMALL))).float()
    b = torch.cat(list(low.generate_stream("a fox", seed=4, progress=False, **SMALL))).float()
    mean = (a - b).abs().mean().item()
    print(f"bf16 vs fp32 video: mean |pixel diff| {mean:.3f}, max {(a - b).abs().max().item():.0f}")
    assert mean < BF16_VIDEO_MEAN


def test_offload_and_t5_cpu_give_the_same_video():
    """On the CPU the models never move, but the options take every code path that moves them."""
    plain = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    lean = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu", memory=MemoryOptions(True, True))
    a = torch.cat(list(plain.generate_stream("a fox", seed=4, progress=False, **SMALL)))
    b = torch.cat(list(lean.generate_stream("a fox", seed=4, progress=False, **SMALL)))
    assert torch.equal(a, b)
    assert lean.text_encoder.device.type == "cpu" and next(lean.dit.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_on_a_gpu_moves_models_only_while_they_run():
    options = MemoryOptions(offload_model=True, t5_cpu=True)
    lean = WanPipeline.from_config("tiny-t2v", seed=0, device="cuda", memory=options)
    plain = WanPipeline.from_config("tiny-t2v", seed=0, device="cuda")
    assert next(lean.dit.parameters()).device.type == "cpu"
    a = torch.cat(list(plain.generate_stream("a fox", seed=4, progress=False, **SMALL)))
    b = torch.cat(list(lean.generate_stream("a fox", seed=4, progress=False, **SMALL)))
    assert (a.int() - b.int()).abs().max() <= 1
    assert next(lean.dit.parameters()).device.type == "cpu" and lean.text_encoder.device.type == "cpu"


def smooth_video(frames: int = 5, height: int = 96, width: int = 128) -> torch.Tensor:
    """A smooth moving pattern [1, 3, F, H, W] in [-0.8, 0.8]."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    channels = [torch.sin(2 * x + 3 * t + 0 * y), torch.cos(3 * y - 2 * t + 0 * x), torch.sin(2 * x * y + t)]
    return 0.8 * torch.stack(channels)[None]


@pytest.mark.slow
def test_tiled_decode_is_close_to_the_whole_frame_decode():
    torch.manual_seed(0)
    vae = WanVAE().eval()  # the full-size architecture, random weights
    with torch.no_grad():
        latents = vae.encode(smooth_video(height=128, width=160))  # [1, 16, 2, 16, 20]
        whole = vae.decode(latents)
        tiling = VAETiling(tile=14, overlap=8)  # 2 x 2 tiles on this 16 x 20 latent grid
        assert tiling.starts(16) == [0, 2] and tiling.starts(20) == [0, 6]
        tiled = vae.decode(latents, tiling)
        streamed = torch.cat(list(vae.decode_stream(latents, tiling)), 2)
        untouched = vae.decode(latents, VAETiling(tile=20, overlap=4))  # one tile: the exact path
    assert tiled.shape == whole.shape and torch.equal(tiled, streamed) and torch.equal(untouched, whole)
    diff = tiled - whole
    mean = diff.abs().mean().item()
    psnr = (10 * torch.log10(4 / diff.pow(2).mean())).item()
    print(f"tiled decode: mean |diff| {mean:.4f}, max {diff.abs().max().item():.3f}, PSNR {psnr:.1f} dB")
    assert mean < TILED_MEAN and psnr > TILED_PSNR_DB


def test_tiling_blend_weights_cover_every_pixel():
    tiling = VAETiling(tile=4, overlap=2)
    assert tiling.starts(4) == [0] and tiling.starts(9) == [0, 2, 4, 5]
    ramp = VAETiling.ramp(16, 32, 64, 16, torch.device("cpu"))
    assert ramp[0] > 0 and ramp[15] < 1 and torch.all(ramp[16:16] == 1)
    left, right = VAETiling.ramp(0, 32, 48, 16, "cpu"), VAETiling.ramp(16, 32, 48, 16, "cpu")
    torch.testing.assert_close(left[16:] + right[:16], torch.ones(16))  # weights sum to 1 across a seam
    with pytest.raises(ValueError, match="0 < overlap < tile"):
        VAETiling(tile=8, overlap=8)


def test_memory_option_parsing():
    assert parse_vae_tiling(None) is None and parse_vae_tiling("off") is None
    assert parse_vae_tiling("on") == VAETiling() and parse_vae_tiling("24:6") == VAETiling(24, 6)
    assert parse_vae_tiling("40") == VAETiling(40, 8)
    with pytest.raises(ValueError, match="vae_tiling 'big': expected TILE"):
        parse_vae_tiling("big")
    assert memory_options({"offload_model": True, "vae_tiling": "on"}) == {
        "offload_model": True, "t5_cpu": False, "vae_tiling": "32:8",
    }  # fmt: skip
    assert memory_options({"vae_tiling": "on"}, partial=True) == {"vae_tiling": "32:8"}
    with pytest.raises(ValueError, match=r"memory: unknown option 'offload'"):
        memory_options({"offload": True})
    with pytest.raises(ValueError, match=r"memory.t5_cpu: expected true or false, got 'yes'"):
        memory_options({"t5_cpu": "yes"})


def test_generate_flags(tmp_path, capsys):
    out = tmp_path / "fox.mp4"
    argv = ["--task", "tiny-t2v", "--size", "64*48", "--frame_num", "5", "--sample_steps", "2", "--prompt",
            "a fox", "--base_seed", "3", "--save_file", str(out)]  # fmt: skip
    assert main([*argv, "--offload_model", "True", "--t5_cpu", "--vae_tiling", "4:2"]) == 0
    assert out.exists()
    with pytest.raises(SystemExit):
        main([*argv, "--offload_model", "maybe"])
    assert "expected True or False, got 'maybe'" in capsys.readouterr().err
    assert main([*argv, "--vae_tiling", "3:3"]) == 2
    assert "0 < overlap < tile" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_records_its_memory_options(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.batch import generate_batch
    from storage.catalog import Catalog

    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"item_id": "fox", "prompt": "a fox", "size": "64*48", "frame_num": 5,
                                    "steps": 2}) + "\n")  # fmt: skip
    memory = {"offload_model": True, "vae_tiling": "4:2"}  # the run's overrides
    monkeypatch.setenv("WANFLOW_T5_CPU", "true")  # the worker's own setting for the rest
    with prefect_test_harness(server_startup_timeout=90):
        summary = generate_batch(str(manifest), model="tiny-t2v", out=str(tmp_path / "out"),
                                 catalog_url=catalog_url, memory=memory)  # fmt: skip
    assert summary["status"] == "succeeded"
    with Catalog(catalog_url) as catalog:
        run = catalog.get_run(summary["run_id"])
        assert run.settings["memory"] == {**memory, "others": "the workers' WANFLOW_* settings"}
        (output,) = catalog.outputs(summary["run_id"])
    import fsspec

    with fsspec.open(output.sidecar_uri) as f:
        sidecar = json.load(f)
    assert sidecar["memory"] == {"offload_model": True, "t5_cpu": True, "vae_tiling": "4:2"}


def test_compiled_blocks_give_the_same_output():
    """`compile_blocks` keeps the state dict's names and the outputs (the eager backend here: the wiring,
    not inductor's code generation, which the GPU benchmark exercises with `--compile`)."""
    torch.manual_seed(0)
    model = WanModel(get_preset("tiny-t2v").dit).eval()
    keys = list(model.state_dict())
    x = torch.randn(1, 16, 2, 4, 6)
    t = torch.tensor([500.0])
    context = torch.randn(1, model.cfg.text_len, model.cfg.text_dim)
    with torch.no_grad():
        expected = model(x, t, context)
        out = model.compile_blocks(backend="eager")(x, t, context)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_attention_backend_on_the_cpu():
    from wan.attention import attention, attention_backend

    q = torch.randn(1, 5, 2, 8)
    assert attention_backend(q) == "sdpa" and attention_backend(q.bfloat16()) == "sdpa"
    reference = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, q) / 8**0.5, -1)
    torch.testing.assert_close(attention(q, q, q), torch.einsum("bhqk,bkhd->bqhd", reference, q))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_sampling_loop_does_not_wait_for_the_gpu():
    """No host-device synchronisation per sampling step: runs of 2 and 8 steps synchronise equally often
    (text encoding, noise and the set-up do it a fixed number of times)."""
    import warnings

    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cuda")

    def syncs(steps: int) -> list[str]:
        settings = pipe.settings(size=(64, 48), frame_num=5, sampling_steps=steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pipe.sample_latents(["a fox"], [1], settings, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]

    syncs(2)  # warm-up
    short, long = syncs(2), syncs(8)
    print(f"{len(short)} synchronisations with 2 steps, {len(long)} with 8", *long[:8], sep="\n")
    assert len(long) == len(short)


def test_casting_twice_keeps_the_float32_parts_exact():
    torch.manual_seed(0)
    model = WanModel(get_preset("tiny-t2v").dit)
    with torch.no_grad():
        randomise_dit(model, 2)
    modulation = model.blocks[0].modulation.detach().clone()
    once = model.cast(torch.bfloat16)
    twice = once.cast(torch.bfloat16)
    assert torch.equal(twice.blocks[0].modulation, modulation)
    assert twice.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu", dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == torch.bfloat16  # as from_pretrained loads it


def test_worker_group_layouts_are_checked_before_starting(tmp_path):
    from flows.models import check_group_layout, model_source

    source = model_source("tiny-t2v")  # 4 heads
    check_group_layout(source, 4, {"ulysses_size": 2}, {})
    with pytest.raises(ValueError, match="must equal the world size 4"):
        check_group_layout(source, 4, {"ulysses_size": 3}, {})
    with pytest.raises(ValueError, match="4 attention heads are not divisible by ulysses_size 8"):
        check_group_layout(source, 8, {"ulysses_size": 8}, {})
    with pytest.raises(ValueError, match="WANFLOW_OFFLOAD_MODEL cannot be combined with ZeRO-3"):
        check_group_layout(source, 2, {"dit_zero3": True}, {"offload_model": True})
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(ValueError, match=r"'zero_optimization\.stage' must be 3"):
        check_group_layout(source, 2, {"dit_zero3": True, "deepspeed_config": str(bad)}, {})
