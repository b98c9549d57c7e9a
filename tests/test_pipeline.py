"""Whole generations: parity with diffusers' WanPipeline, batching, streaming, validation."""

from __future__ import annotations

import re

import pytest
import torch
from twins import diffusers_twin

from wan.configs import DEFAULT_NEGATIVE_PROMPT
from wan.pipeline import WanPipeline, to_uint8_frames

SMALL = dict(size=(64, 48), frame_num=5, sampling_steps=4, shift=5.0, guide_scale=5.0)


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")


@pytest.mark.slow
def test_matches_diffusers_wan_pipeline(pipe):
    ours = pipe.generate("a red fox runs through fresh snow", seed=11, progress=False, **SMALL)
    width, height = SMALL["size"]
    noise = torch.randn([16, 2, height // 8, width // 8], generator=torch.Generator().manual_seed(11))
    ref = diffusers_twin(pipe, steps=SMALL["sampling_steps"], shift=SMALL["shift"])
    theirs = ref(
        prompt="a red fox runs through fresh snow",
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        height=height,
        width=width,
        num_frames=SMALL["frame_num"],
        num_inference_steps=SMALL["sampling_steps"],
        guidance_scale=SMALL["guide_scale"],
        latents=noise[None],
        output_type="pt",
    ).frames[0]  # [F, 3, H, W] in [0, 1]
    assert ours.shape == (3, 5, height, width)
    diff = ((ours + 1) / 2 - theirs.permute(1, 0, 2, 3)).abs().max().item()
    assert diff <= 1e-3, diff


def test_batched_equals_one_at_a_time(pipe):
    prompts, seeds = ["a fox", "an owl at night, snowing"], [3, 4]
    batched = pipe.generate_batch(prompts, seeds, progress=False, **SMALL)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        single = pipe.generate(prompt, seed=seed, progress=False, batch_cfg=False, **SMALL)
        assert (batched[i] - single).abs().max().item() <= 1e-5


def test_stream_matches_generate(pipe):
    video = pipe.generate("a fox", seed=5, progress=False, **SMALL)
    chunks = list(pipe.generate_stream("a fox", seed=5, progress=False, **SMALL))
    assert [c.shape[0] for c in chunks] == [1, 4]
    assert all(c.dtype == torch.uint8 and c.shape[1:] == (48, 64, 3) for c in chunks)
    assert torch.equal(torch.cat(chunks), to_uint8_frames(video))


def test_seed_controls_noise(pipe):
    a = pipe.generate("a fox", seed=1, progress=False, **SMALL)
    b = pipe.generate("a fox", seed=1, progress=False, **SMALL)
    c = pipe.generate("a fox", seed=2, progress=False, **SMALL)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_defaults_come_from_the_preset(pipe):
    s = pipe.settings()
    assert (s.size, s.frame_num, s.solver, s.negative_prompt) == (
        (64, 48),
        9,
        "unipc",
        DEFAULT_NEGATIVE_PROMPT,
    )
    assert pipe.settings(negative_prompt="").negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert pipe.settings(size="96*64").size == (96, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(frame_num=8), "frame_num 8: must be of the form 4n+1"),
        (dict(size=(60, 48)), "size 60*48: width and height must be positive multiples of 16"),
        (dict(size="64x"), "size must look like 'W*H'"),
        (dict(sampling_steps=0), "sampling steps 0"),
        (dict(sample_solver="ddim"), "ddim"),
    ],
)
def test_bad_requests_are_refused_with_the_field(pipe, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pipe.settings(**kwargs)


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 't2v-2B'; expected one of: t2v-1\.3B"):
        WanPipeline.from_config("t2v-2B")


def test_untrained_size_warns(pipe):
    with pytest.warns(UserWarning, match="not one tiny-t2v was trained at"):
        pipe.settings(size=(80, 48))
