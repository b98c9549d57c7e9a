"""A whole text-to-video generation: our `WanPipeline` against diffusers' `WanPipeline`, one process.

    python benchmarks/gpu_generate.py --offload_model --t5_cpu               # GPU: t2v-1.3B 480P, 50 steps
    python benchmarks/gpu_generate.py --device cpu --offload_model --t5_cpu  # CPU: tiny-t2v 64x48x9, 4 steps

Both pipelines hold the same random weights (`WanPipeline.from_config`; diffusers' transformer and VAE
are built from them with `wan.dit_keys` / `wan.vae` key conversion, the text encoder and tokenizer are
the same objects) and make the same video: same prompt and negative prompt, size, frames, steps, CFG
scale, sigma grid (diffusers' UniPC is handed the official grid, `unipc_sigmas`) and initial noise. Our
DiT runs as the pipeline casts it (bf16, time path and modulation in float32); diffusers' transformer in
bf16 with its `_keep_in_fp32_modules` in float32, as its `from_pretrained(torch_dtype=bfloat16)` loads
it; both VAEs in float32. The text encoder is cast to the pipeline dtype, as `from_pretrained` loads
it (`--t5-fp32` keeps the float32 that `from_config` builds). `--narrow-text-encoder` builds the pipeline
from parts instead (`random_pipeline`): the DiT straight on the device (`gpu_step.build_random`), the VAE
as `from_config` draws it, and a narrow random umT5 (`narrow_text_config`: the real width, 2 layers, the
tiny tokenizer's vocabulary; about 0.4B parameters instead of 5.7B), which both pipelines share, so it
weighs the same in both peaks and in neither with `--t5_cpu`.

Each generation is timed end to end (prompt encoding, sampling, VAE decode) between CUDA syncs. A short
warm-up generation of each (`--warmup-steps`) comes first; with `--repeats` > 1 the two alternate (ours,
theirs, ours, theirs, ...) and the medians are reported. While one pipeline runs, the other one's DiT and
VAE wait on the CPU, so each peak (`torch.cuda.max_memory_allocated`) is what that pipeline would hold
alone: its own DiT and VAE, the shared text encoder, and its activations.

`--offload_model` / `--t5_cpu` add a third run: ours again with those `MemoryOptions` (DiT and VAE on the
GPU only while they run; the text encoder on the CPU), reporting its peak GPU memory (issue target:
8.19 GB). Targets from the issue: time ours/diffusers <= 0.77 (1.3x faster), peak memory no higher.

On the CPU the figures only show that the script works: the tiny preset, and peaks are process RSS.
Prints a summary, then one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from typing import Any

import torch
from common import emit, measure
from gpu_step import build_random

from wan.configs import DEFAULT_NEGATIVE_PROMPT, TextEncoderConfig, get_preset, parse_size
from wan.dit_keys import diffusers_transformer_config, dit_state_dict_to_diffusers
from wan.pipeline import MemoryOptions, WanPipeline, default_dtype
from wan.sampling import initial_noise, latent_shape, unipc_sigmas
from wan.text_encoder import WanTextEncoder, text_encoder_dtype
from wan.vae import WanVAE, diffusers_vae_config, vae_state_dict_to_diffusers

PROMPT = "A red fox trots through fresh snow in a birch forest at sunrise, soft light, slow camera pan"
OFFLOAD_TARGET_BYTES = 8.19e9  # the official t2v-1.3B figure with --offload_model --t5_cpu (8.19 GB)
TIME_RATIO_TARGET = 0.77  # ours / diffusers: at least 1.3x faster

# (GPU default, CPU default) for each setting.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "preset": ("t2v-1.3B", "tiny-t2v"),
    "size": ("832*480", "64*48"),
    "frame_num": (81, 9),
    "steps": (50, 4),
}


def official_grid_unipc(shift: float) -> Any:
    """diffusers' `UniPCMultistepScheduler` (flow prediction, defaults otherwise: order 2, bh2, corrector on,
    lower order at the end) whose `set_timesteps(n)` takes the official grid `unipc_sigmas(n, shift)`, as our
    `FlowSampler` does; `flow_shift` 1 since that grid is already shifted."""
    from diffusers import UniPCMultistepScheduler

    class OfficialGridUniPC(UniPCMultistepScheduler):
        def set_timesteps(
            self,
            num_inference_steps: int | None = None,
            device: str | torch.device | None = None,
            sigmas: Any = None,
            mu: Any = None,
        ) -> None:
            grid = unipc_sigmas(int(num_inference_steps), shift).copy()
            super().set_timesteps(sigmas=grid, device=device)

    return OfficialGridUniPC(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0
    )


def cast_keeping_fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters to `dtype` except those under a module named in `model._keep_in_fp32_modules` (a
    dotted-name component match, as diffusers' loader does); buffers (the RoPE tables) stay float32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    return model


def diffusers_twin(pipe: WanPipeline, shift: float) -> Any:
    """diffusers' `WanPipeline` holding `pipe`'s weights: transformer and VAE built on `pipe.device`, loaded
    from the converted state dicts; text encoder and tokenizer shared (the same objects)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers import WanPipeline as DiffusersWanPipeline

    with torch.device(pipe.device):  # random init on the device: seconds, not minutes, at full size
        transformer = WanTransformer3DModel(**diffusers_transformer_config(pipe.dit.cfg))
        vae = AutoencoderKLWan(**diffusers_vae_config(pipe.preset.vae))
    transformer.load_state_dict(dit_state_dict_to_diffusers(pipe.dit.state_dict()), strict=True)
    cast_keeping_fp32_modules(transformer, pipe.dtype).eval().requires_grad_(False)
    vae.load_state_dict(vae_state_dict_to_diffusers(pipe.vae.state_dict()), strict=True)
    vae.float().eval().requires_grad_(False)
    twin = DiffusersWanPipeline(
        tokenizer=pipe.text_encoder.tokenizer,
        text_encoder=pipe.text_encoder.model,
        transformer=transformer,
        vae=vae,
        scheduler=official_grid_unipc(shift),
    )
    twin.set_progress_bar_config(disable=True)
    return twin


NARROW_VOCAB = 256  # the tiny tokenizer's vocabulary (`build_tiny_tokenizer`)
NARROW_LAYERS = 2


def narrow_text_config(preset_name: str) -> TextEncoderConfig:
    """A narrow stand-in for the preset's umT5: its width (`d_model` = the DiT's `text_dim`), heads and FFN
    width, but `NARROW_LAYERS` layers and the tiny tokenizer's vocabulary (t2v-1.3B: 0.39B parameters; the
    real umT5-XXL has 24 layers, 256,384 tokens, 5.7B parameters)."""
    preset = get_preset(preset_name)
    t5 = preset.text_encoder
    return dataclasses.replace(
        t5, vocab_size=NARROW_VOCAB, d_model=preset.dit.text_dim, num_layers=min(NARROW_LAYERS, t5.num_layers)
    )


def random_pipeline(
    preset_name: str,
    device: torch.device,
    *,
    seed: int = 0,
    memory: MemoryOptions | None = None,
    dtype: torch.dtype | None = None,
) -> WanPipeline:
    """A random-weight pipeline with a narrow text encoder (`narrow_text_config`), quick to build at full
    size: the DiT materialised on `device` and filled there (`gpu_step.build_random`: normal(0, 0.02), norms
    1 / 0), the VAE as `WanPipeline.from_config` draws it, the text encoder in the pipeline's text dtype.
    `memory` as the pipeline takes it (under `offload_model` the DiT then waits on the CPU)."""
    preset = get_preset(preset_name)
    dtype = dtype or default_dtype(device)
    dit = build_random(preset.dit, device, dtype, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = WanVAE.from_config(preset.vae)
    text_encoder = WanTextEncoder.random(narrow_text_config(preset_name), seed=seed,
                                         dtype=text_encoder_dtype(dtype))  # fmt: skip
    return WanPipeline(
        preset, dit, vae, text_encoder, device=device, dtype=dtype, memory=memory,
        source=f"{preset_name} (random weights, narrow text encoder)",
    )  # fmt: skip


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (`argv`: its command line, default `sys.argv[1:]`); prints, and returns the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="default: t2v-1.3B on a GPU, tiny-t2v on the CPU")
    p.add_argument("--size", default=None, help="W*H (default: 832*480 on a GPU, 64*48 on the CPU)")
    p.add_argument("--frame_num", type=int, default=None, help="frames (default: 81 on a GPU, 9 on the CPU)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50 GPU, 4 CPU)")
    p.add_argument("--guide-scale", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=None, help="default: the preset's (5.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs of each, alternating (default 1 GPU, 3 CPU)"
    )
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up (0: none)")
    p.add_argument("--offload_model", action="store_true", help="third run: ours with offload_model")
    p.add_argument("--t5_cpu", action="store_true", help="third run: ours with t5_cpu")
    p.add_argument("--t5-fp32", action="store_true", help="keep the text encoder in float32 (from_config's)")
    p.add_argument(
        "--narrow-text-encoder",
        action="store_true",
        help="a narrow random umT5 (2 layers, tiny vocabulary), the DiT built on the device: quick to build",
    )
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    pick = {k: v[0] if gpu else v[1] for k, v in DEFAULTS.items()}
    preset_name = args.preset or pick["preset"]
    width, height = parse_size(args.size or pick["size"])
    frame_num = args.frame_num or pick["frame_num"]
    steps = args.steps or pick["steps"]
    args.repeats = args.repeats or (1 if gpu else 3)
    device_name = torch.cuda.get_device_name(device) if gpu else "cpu"

    start = time.perf_counter()
    if args.narrow_text_encoder:
        pipe = random_pipeline(preset_name, device, seed=0)
    else:
        pipe = WanPipeline.from_config(preset_name, seed=0, device=device)
    if not args.t5_fp32 and pipe.text_encoder.dtype != pipe.dtype:
        pipe.text_encoder.to(dtype=pipe.dtype)  # what from_pretrained loads (text_dtype=dtype)
    shift = args.shift if args.shift is not None else pipe.preset.sampling.shift
    ref = diffusers_twin(pipe, shift)
    build_s = time.perf_counter() - start
    t5 = pipe.text_encoder.model
    t5_params = sum(p.numel() for p in t5.parameters())
    dit_params = sum(p.numel() for p in pipe.dit.parameters())
    print(
        f"{preset_name} {width}x{height}x{frame_num}, {steps} steps, CFG {args.guide_scale}, shift {shift}, "
        f"on {device_name} ({str(pipe.dtype).removeprefix('torch.')}); built in {build_s:.1f} s: DiT "
        f"{_count(dit_params)} params, text encoder {_count(t5_params)} params ({t5.dtype})"
    )

    noise = initial_noise(
        args.seed, latent_shape(frame_num, width, height, pipe.vae.z_dim, pipe.vae.stride), device=device
    )  # [16, T, h, w]: the noise `generate` draws for this seed, handed to diffusers as `latents`

    def ours(n_steps: int = steps, runner: WanPipeline = pipe) -> torch.Tensor:
        """[3, F, H, W] in [-1, 1]."""
        return runner.generate(
            args.prompt, seed=args.seed, size=(width, height), frame_num=frame_num, steps=n_steps,
            guide_scale=args.guide_scale, shift=shift, progress=False,
        )  # fmt: skip

    def theirs(n_steps: int = steps) -> torch.Tensor:
        """[3, F, H, W] in [-1, 1], from diffusers' [F, 3, H, W] in [0, 1]."""
        frames = ref(
            prompt=args.prompt, negative_prompt=DEFAULT_NEGATIVE_PROMPT, height=height, width=width,
            num_frames=frame_num, num_inference_steps=n_steps, guidance_scale=args.guide_scale,
            latents=noise[None], output_type="pt",
        ).frames[0]  # fmt: skip
        return frames.permute(1, 0, 2, 3) * 2 - 1

    # Only the running pipeline's DiT and VAE on the GPU (the text encoder is shared and stays).
    homes = {"ours": (pipe.dit, pipe.vae), "diffusers": (ref.transformer, ref.vae)}

    def place(active: str | None) -> None:
        if not gpu:
            return
        for name, modules in homes.items():
            for module in modules:
                module.to(device if name == active else "cpu")
        gc.collect()
        torch.cuda.empty_cache()

    runs = {"ours": ours, "diffusers": theirs}
    if args.warmup_steps > 0:  # kernels chosen, allocator grown, RoPE tables made: at the real shapes
        start = time.perf_counter()
        for name, fn in runs.items():
            place(name)
            with torch.no_grad():
                fn(args.warmup_steps)
        print(f"warm-up ({args.warmup_steps} steps each): {time.perf_counter() - start:.1f} s")

    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            place(name)
            with torch.no_grad():
                samples[name].append(measure(fn, device))
    videos = {name: rows[0].pop("video") for name, rows in samples.items()}
    for rows in samples.values():
        for row in rows:
            row.pop("video", None)
            row["seconds"] = round(row["seconds"], 4)
    # In pixel units of [0, 1], as diffusers returns them (the parity test's measure).
    diff = ((videos["ours"] - videos["diffusers"]).abs().max() / 2).item()
    seconds = {name: statistics.median(r["seconds"] for r in rows) for name, rows in samples.items()}
    peak = {name: max(r["peak"] for r in rows) for name, rows in samples.items()}
    above = {name: max(r["above_start"] for r in rows) for name, rows in samples.items()}
    ratio = seconds["ours"] / seconds["diffusers"]
    mem = "GPU peak" if gpu else "peak RSS"
    print(
        f"ours {seconds['ours']:.2f} s, diffusers {seconds['diffusers']:.2f} s (median of {args.repeats}): "
        f"ratio {ratio:.3f} (target <= {TIME_RATIO_TARGET}), {seconds['diffusers'] / seconds['ours']:.2f}x; "
        f"{mem} ours {peak['ours'] / 1e9:.2f} GB, diffusers {peak['diffusers'] / 1e9:.2f} GB; "
        f"max |ours - diffusers| {diff:.2e} (pixels in [0, 1])"
    )

    result: dict[str, Any] = {
        "benchmark": "gpu_generate",
        "device": str(device),
        "device_name": device_name,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "preset": preset_name,
        "size": [width, height],
        "frame_num": frame_num,
        "steps": steps,
        "guide_scale": args.guide_scale,
        "shift": shift,
        "repeats": args.repeats,
        "warmup_steps": args.warmup_steps,
        "seconds_ours": round(seconds["ours"], 3),
        "seconds_diffusers": round(seconds["diffusers"], 3),
        "time_ratio": round(ratio, 4),
        "speedup": round(seconds["diffusers"] / seconds["ours"], 3),
        "time_ratio_target": TIME_RATIO_TARGET,
        "meets_time_target": ratio <= TIME_RATIO_TARGET if gpu else None,
        "peak_bytes_ours": peak["ours"],
        "peak_bytes_diffusers": peak["diffusers"],
        "peak_ratio": round(peak["ours"] / peak["diffusers"], 4),
        "meets_memory_target": peak["ours"] <= peak["diffusers"] if gpu else None,
        "peak_above_start_bytes_ours": above["ours"],
        "peak_above_start_bytes_diffusers": above["diffusers"],
        "samples": samples,
        "max_abs_diff": diff,
        "dit_params": dit_params,
        "text_encoder_params": t5_params,
        "text_encoder_dtype": str(t5.dtype).removeprefix("torch."),
        "text_encoder": (
            "umT5-XXL-sized random encoder from from_config, shared by both pipelines: in both peaks"
            if t5_params > 5e9
            else f"{'narrow' if args.narrow_text_encoder else 'small'} random umT5 ({_count(t5_params)} "
            "params, shared by both pipelines; the real umT5-XXL has 5.7B params, 11.4 GB in bf16): the "
            "peaks exclude the real text encoder's size"
        ),
        "narrow_text_encoder": args.narrow_text_encoder,
        "build_s": round(build_s, 1),
        "torch": torch.__version__,
    }
    if not gpu:
        result["note"] = "CPU run on the tiny preset: peaks are process RSS; not a GPU figure"

    if args.offload_model or args.t5_cpu:
        place(None)  # diffusers' models and ours wait on the CPU; the offloading pipeline moves ours in
        memory = MemoryOptions(offload_model=args.offload_model, t5_cpu=args.t5_cpu)
        # The same modules (re-casting the DiT leaves its float32 parts exact).
        offload = WanPipeline(
            pipe.preset, pipe.dit, pipe.vae, pipe.text_encoder, device=device, dtype=pipe.dtype, memory=memory
        )
        with torch.no_grad():
            row = measure(lambda: ours(runner=offload), device)
        off_diff = ((row.pop("video") - videos["ours"]).abs().max() / 2).item()
        result["offload"] = {
            "options": memory.describe(),
            "seconds": round(row["seconds"], 3),
            "peak_bytes": row["peak"],
            "peak_reserved_bytes": row.get("reserved"),
            "target_bytes": OFFLOAD_TARGET_BYTES,
            "meets_target": row["peak"] <= OFFLOAD_TARGET_BYTES if gpu else None,
            "max_abs_diff_vs_ours": off_diff,
        }
        reserved = f", reserved {row['reserved'] / 1e9:.2f} GB" if gpu else ""
        print(
            f"ours with {memory.describe()}: {row['seconds']:.2f} s, {mem} {row['peak'] / 1e9:.2f} GB"
            f"{reserved} (target {OFFLOAD_TARGET_BYTES / 1e9} GB); max |offload - ours| {off_diff:.2e}"
        )
    emit(result)
    return result


if __name__ == "__main__":
    main()
