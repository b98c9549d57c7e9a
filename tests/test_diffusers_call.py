"""WanPipeline called the way diffusers' pipelines are: `pipe(prompt=..., num_inference_steps=...,
generator=..., output_type=...)` -> `.frames`, `pipe.to(...)`, `from_pretrained(torch_dtype=...)`.

The parity test makes the same call on our pipeline and on diffusers' `WanPipeline` holding the same tiny
random weights (`twins.diffusers_twin`) and compares the frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from twins import diffusers_twin, write_diffusers

from wan.configs import DEFAULT_NEGATIVE_PROMPT
from wan.pipeline import WanPipeline
from wan.video_output import VideoPipelineOutput

HEIGHT, WIDTH, FRAMES, STEPS = 48, 64, 5, 4
CALL = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.slow
@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_same_call_as_diffusers_gives_the_same_frames(pipe, output_type):
    """Tolerance 1e-4 on frames in [0, 1] (measured: 3e-6): the two differ in float32 summation order only."""
    shift = pipe.settings(size=(WIDTH, HEIGHT)).shift  # diffusers keeps the shift in its scheduler
    call = dict(
        prompt=["a red fox runs through fresh snow", "an owl at night"],
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        num_videos_per_prompt=2,
        output_type=output_type,
        **CALL,
    )
    ours = pipe(**call, generator=seeded(11), progress=False)
    theirs = diffusers_twin(pipe, steps=STEPS, shift=shift)(**call, generator=seeded(11))
    assert isinstance(ours, VideoPipelineOutput)
    assert type(ours.frames) is type(theirs.frames)
    assert tuple(ours.frames.shape) == tuple(theirs.frames.shape)
    expected = (4, FRAMES, HEIGHT, WIDTH, 3) if output_type == "np" else (4, FRAMES, 3, HEIGHT, WIDTH)
    assert tuple(ours.frames.shape) == expected
    diff = np.abs(np.asarray(ours.frames, dtype=np.float64) - np.asarray(theirs.frames, dtype=np.float64))
    assert diff.max() <= 1e-4, diff.max()


def test_a_cpu_generator_seeded_s_makes_the_video_seed_s_makes(pipe):
    """One generator per video, or one for all (drawn in one go, as diffusers does); videos come prompt by
    prompt, num_videos_per_prompt each."""
    per_video = pipe(["a fox", "an owl"], generator=[seeded(3), seeded(4)], output_type="pt", progress=False,
                     **CALL).frames  # fmt: skip
    for i, (prompt, seed) in enumerate([("a fox", 3), ("an owl", 4)]):
        video = pipe.generate(prompt, seed=seed, progress=False, size=(WIDTH, HEIGHT), frame_num=FRAMES,
                              steps=STEPS, guide_scale=5.0, batch_cfg=False)  # fmt: skip
        assert (per_video[i] - (video.permute(1, 0, 2, 3) / 2 + 0.5).clamp(0, 1)).abs().max() <= 1e-5
    one = pipe("a fox", num_videos_per_prompt=2, generator=seeded(3), output_type="latent", progress=False,
               **CALL).frames  # fmt: skip
    again = pipe("a fox", num_videos_per_prompt=2, generator=seeded(3), output_type="latent", progress=False,
                 **CALL).frames  # fmt: skip
    assert one.shape == (2, 16, 2, HEIGHT // 8, WIDTH // 8) and torch.equal(one, again)
    assert not torch.equal(one[0], one[1])  # the second video continues the generator's stream


def test_output_types_and_return_dict(pipe):
    latents = torch.randn(1, 16, 2, HEIGHT // 8, WIDTH // 8, generator=seeded(0))
    common = dict(prompt="a fox", latents=latents, progress=False, **CALL)
    pt = pipe(**common, output_type="pt").frames
    assert pt.shape == (1, FRAMES, 3, HEIGHT, WIDTH) and pt.min() >= 0 and pt.max() <= 1
    array = pipe(**common).frames  # "np" is the default, as in diffusers
    assert array.dtype == np.float32 and array.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(array[0], pt[0].permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = pipe(**common, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == FRAMES and all(isinstance(f, Image.Image) for f in pil[0])
    assert pil[0][0].size == (WIDTH, HEIGHT) and pil[0][0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[0][2]), (array[0, 2] * 255).round().astype(np.uint8))
    (frames,) = pipe(**common, output_type="pt", return_dict=False)
    assert torch.equal(frames, pt)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(output_type="mp4"), "output_type 'mp4': expected one of 'np', 'pt', 'pil', 'latent'"),
        (dict(num_inference_steps=4, steps=5), "num_inference_steps=4 contradicts steps=5"),
        (dict(generator=[seeded(0)], num_videos_per_prompt=2), "generator: got 1 for 2 videos"),
        (dict(latents=torch.zeros(1, 16, 2, 3, 3)), r"latents: expected shape \(1, 16, 2, 6, 8\)"),
        (dict(negative_prompt=["blurry", "dark"]), "negative_prompt: one text for the whole call"),
        (dict(image=Image.new("RGB", (64, 48))), "tiny-t2v is text-to-video: it takes no image"),
        (dict(num_frames=6), "frame"),
    ],
)
def test_bad_calls_are_refused_with_the_argument(pipe, kwargs, message):
    call = {**CALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe("a fox", progress=False, **call)


def test_image_to_video_call_matches_generate():
    pipe = WanPipeline.from_config("tiny-i2v", seed=0, device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    frames = pipe("a fox", image=image, generator=seeded(5), output_type="pt", progress=False, **CALL).frames
    video = pipe.generate("a fox", image=image, seed=5, progress=False, size=(WIDTH, HEIGHT),
                          frame_num=FRAMES, steps=STEPS, guide_scale=5.0)  # fmt: skip
    assert (frames[0] - (video.permute(1, 0, 2, 3) / 2 + 0.5).clamp(0, 1)).abs().max() <= 1e-5


def test_to_moves_and_casts_in_place():
    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
    pipe.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.dit.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    kept = [name for name, p in pipe.dit.named_parameters() if pipe.dit.keeps_fp32(name)]
    assert kept and all(dict(pipe.dit.named_parameters())[n].dtype == torch.float32 for n in kept)
    assert next(pipe.vae.parameters()).dtype == torch.float32  # the VAE stays float32
    pipe.to("cpu", torch.float32)
    assert all(p.dtype == torch.float32 for p in pipe.dit.parameters())
    with pytest.raises(TypeError, match="one dtype"):
        pipe.to(torch.float32, torch.bfloat16)


def test_from_pretrained_takes_torch_dtype(tmp_path):
    source = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    root = write_diffusers(source, tmp_path / "Wan2.1-T2V-tiny-Diffusers")
    pipe = WanPipeline.from_pretrained(root, device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.dit.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype=torch\.float32 contradicts torch_dtype=torch\.bfloat16"):
        WanPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, torch_dtype=torch.bfloat16)
