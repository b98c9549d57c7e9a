"""Image-to-video generation: parity with diffusers' WanImageToVideoPipeline, sizes that follow the image,
batching, streaming and clear errors."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from twins import diffusers_transformer, diffusers_vae, official_grid_scheduler

from wan.conditioning import image_tensor
from wan.pipeline import WanPipeline, to_uint8_frames

SMALL = dict(size=(64, 48), frame_num=5, sampling_steps=3, shift=3.0, guide_scale=5.0)


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return WanPipeline.from_config("tiny-i2v", seed=0, device="cpu")


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth test picture (gradients and a disc), as a PIL image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (0.25 * min(width, height)) ** 2
    rgb = np.stack([xx / width * 255, yy / height * 255, disc * 255.0], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.slow
def test_matches_diffusers_image_to_video_pipeline(pipe):
    from diffusers import WanImageToVideoPipeline

    class Twin(WanImageToVideoPipeline):
        """diffusers refuses `image` with `image_embeds`; we give both so CLIP preprocessing is shared."""

        def check_inputs(self, *args, **kwargs) -> None:
            bound = inspect.signature(super().check_inputs).bind(*args, **kwargs)
            bound.arguments["image_embeds"] = None
            super().check_inputs(*bound.args, **bound.kwargs)

    image = picture(64, 48)  # already at the video size: neither side resizes it
    prompt = "the disc rolls to the right"
    ours = pipe.generate(prompt, image=image, seed=7, progress=False, **SMALL)
    clip = pipe.image_encoder.encode(image_tensor(image)[None])
    width, height = SMALL["size"]
    noise = torch.randn([16, 2, height // 8, width // 8], generator=torch.Generator().manual_seed(7))
    reference = Twin(
        tokenizer=pipe.text_encoder.tokenizer, text_encoder=pipe.text_encoder.model,
        vae=diffusers_vae(pipe), scheduler=official_grid_scheduler(SMALL["sampling_steps"], SMALL["shift"]),
        transformer=diffusers_transformer(pipe),
    )  # fmt: skip
    theirs = reference(
        image=image, prompt=prompt, negative_prompt=pipe.settings().negative_prompt, height=height,
        width=width, num_frames=SMALL["frame_num"], num_inference_steps=SMALL["sampling_steps"],
        guidance_scale=SMALL["guide_scale"], latents=noise[None], image_embeds=clip, output_type="pt",
    ).frames[0]  # [F, 3, H, W] in [0, 1]  # fmt: skip
    assert ours.shape == (3, 5, height, width)
    diff = ((ours + 1) / 2 - theirs.permute(1, 0, 2, 3)).abs().max().item()
    assert diff <= 1e-3, diff


@pytest.mark.parametrize(
    ("image_size", "video_size"), [((96, 64), (64, 32)), ((64, 48), (64, 48)), ((64, 96), (32, 64))]
)
def test_the_video_takes_the_images_aspect_ratio(pipe, image_size, video_size):
    video = pipe.generate("a fox", image=picture(*image_size), seed=1, progress=False, **SMALL)
    width, height = video_size
    assert video.shape == (3, 5, height, width)


def test_batched_equals_one_at_a_time_and_stream_equals_generate(pipe):
    images = [picture(64, 48, 1), picture(64, 48, 2)]
    prompts, seeds = ["a fox", "an owl"], [3, 4]
    batched = pipe.generate_batch(prompts, seeds, images=images, progress=False, **SMALL)
    for i in range(2):
        single = pipe.generate(
            prompts[i], image=images[i], seed=seeds[i], batch_cfg=False, progress=False, **SMALL
        )
        assert (batched[i] - single).abs().max().item() <= 1e-5
    chunks = list(pipe.generate_stream(prompts[0], image=images[0], seed=seeds[0], progress=False, **SMALL))
    video = pipe.generate(prompts[0], image=images[0], seed=seeds[0], progress=False, **SMALL)
    assert torch.equal(torch.cat(chunks), to_uint8_frames(video))


def test_the_image_conditions_the_video(pipe):
    video = pipe.generate("a fox", image=picture(64, 48, 1), seed=2, progress=False, **SMALL)
    other = pipe.generate("a fox", image=picture(64, 48, 5), seed=2, progress=False, **SMALL)
    assert torch.isfinite(video).all() and not torch.equal(video, other)


def test_errors_name_what_is_missing(pipe):
    with pytest.raises(ValueError, match="image-to-video: pass image="):
        pipe.generate("a fox", progress=False, **SMALL)
    with pytest.raises(ValueError, match="takes no last image"):
        pipe.generate("a fox", image=picture(64, 48), last_image=picture(64, 48), progress=False, **SMALL)
    with pytest.raises(ValueError, match="uint8"):
        pipe.generate("a fox", image=np.zeros((4, 4)), progress=False, **SMALL)
    t2v = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    with pytest.raises(ValueError, match="text-to-video: it takes no image"):
        t2v.generate("a fox", image=picture(64, 48), progress=False, **SMALL)


@pytest.fixture(scope="module")
def flf() -> WanPipeline:
    return WanPipeline.from_config("tiny-flf2v", seed=0, device="cpu")


@pytest.mark.slow
def test_first_last_frame_matches_diffusers(flf):
    from diffusers import WanImageToVideoPipeline

    class Twin(WanImageToVideoPipeline):
        def check_inputs(self, *args, **kwargs) -> None:
            bound = inspect.signature(super().check_inputs).bind(*args, **kwargs)
            bound.arguments["image_embeds"] = None
            super().check_inputs(*bound.args, **bound.kwargs)

    first, last = picture(64, 48, 1), picture(64, 48, 2)
    settings = dict(SMALL, frame_num=9, shift=16.0)
    ours = flf.generate("from dawn to dusk", image=first, last_image=last, seed=5, progress=False, **settings)
    # CLIP features of both frames, [2, Li, C]: diffusers folds them into one 2 x Li token context per video.
    clip = flf.image_encoder.encode(torch.stack([image_tensor(first), image_tensor(last)]))
    width, height = settings["size"]
    noise = torch.randn([16, 3, height // 8, width // 8], generator=torch.Generator().manual_seed(5))
    reference = Twin(
        tokenizer=flf.text_encoder.tokenizer, text_encoder=flf.text_encoder.model, vae=diffusers_vae(flf),
        scheduler=official_grid_scheduler(settings["sampling_steps"], settings["shift"]),
        transformer=diffusers_transformer(flf),
    )  # fmt: skip
    theirs = reference(
        image=first, last_image=last, prompt="from dawn to dusk",
        negative_prompt=flf.settings().negative_prompt, height=height, width=width, num_frames=9,
        num_inference_steps=settings["sampling_steps"],
        guidance_scale=settings["guide_scale"], latents=noise[None], image_embeds=clip, output_type="pt",
    ).frames[0]  # fmt: skip
    assert ours.shape == (3, 9, height, width)
    diff = ((ours + 1) / 2 - theirs.permute(1, 0, 2, 3)).abs().max().item()
    assert diff <= 1e-3, diff


def test_first_last_frame_needs_both_images(flf):
    with pytest.raises(ValueError, match="needs both a first and a last image"):
        flf.generate("x", image=picture(64, 48), progress=False, **SMALL)
    assert flf.settings().shift == 16.0 and flf.settings().negative_prompt.startswith("镜头切换，")
