"""Fast modes through the pipeline: step caches per generation (`cache=` setting) and LoRA sets
(`WanPipeline.use_loras`).

Parity: a whole generation with a step cache equals diffusers' `WanPipeline` with the same cache enabled on
its transformer (`enable_cache`), same weights and noise; diffusers calls the transformer once per guidance
branch in the contexts "cond" and "uncond", so our pipeline runs sequential guidance (`batch_cfg=False`).
"""

from __future__ import annotations

import pytest
import torch
from twins import diffusers_twin

from wan.cache import CacheSetting, mag_ratios_for, nearest_resample
from wan.configs import DEFAULT_NEGATIVE_PROMPT
from wan.lora import LoraSet, lora_from_state_dict, random_lora_state_dict
from wan.pipeline import WanPipeline

STEPS = 10
SMALL = dict(size=(64, 48), frame_num=5, steps=STEPS, shift=5.0, guide_scale=5.0)
PROMPT = "a red fox runs through fresh snow"


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")


def _generate(pipe: WanPipeline, **kwargs) -> torch.Tensor:
    return pipe.generate(PROMPT, seed=11, progress=False, **{**SMALL, **kwargs})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fbcache", CacheSetting("fbcache", 0.05)),
        ("fbcache:0.2", CacheSetting("fbcache", 0.2)),
        ("first-block:0.1", CacheSetting("fbcache", 0.1)),
        ("MagCache", CacheSetting("magcache", 0.12)),
        ("magcache:0.3", CacheSetting("magcache", 0.3)),
        ({"kind": "fbcache", "threshold": 0.07}, CacheSetting("fbcache", 0.07)),
        ({"kind": "magcache"}, CacheSetting("magcache", 0.12)),
        ("off", None),
        ("", None),
        (None, None),
    ],
)
def test_cache_settings_parse(text, expected):
    assert CacheSetting.parse(text) == expected
    if expected is not None:
        assert CacheSetting.parse(str(expected)) == expected
        assert CacheSetting.parse(expected.describe()) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("teacache", "cache kind 'teacache': expected one of fbcache, magcache"),
        ("fbcache:fast", "expected KIND[:THRESHOLD], e.g. fbcache:0.05"),
        ("fbcache:-1", "cache threshold -1.0: expected a number >= 0"),
        ("fbcache:inf", "cache threshold inf: expected a number >= 0"),
        ({"kind": "fbcache", "limit": 1}, "unknown keys: limit"),
        ({"threshold": 0.1}, 'expected {"kind": fbcache | magcache'),
        ({"kind": "fbcache", "threshold": True}, "cache threshold True: expected a number >= 0"),
        (3, "expected KIND[:THRESHOLD]"),
    ],
)
def test_bad_cache_settings_say_what_was_expected(value, message):
    with pytest.raises(ValueError, match="^" + "cache" if isinstance(value, str) else "cache") as info:
        CacheSetting.parse(value)
    assert message in str(info.value)


def test_cache_off_is_todays_output_and_a_never_skipping_cache_too(pipe):
    plain = _generate(pipe)
    assert pipe.last_cache_counts is None
    assert torch.equal(_generate(pipe, cache=None), plain)
    assert torch.equal(_generate(pipe, cache="off"), plain)
    never = _generate(pipe, cache="fbcache:0")  # a change of exactly 0 never happens here
    assert torch.equal(never, plain)
    assert pipe.last_cache_counts.as_dict() == {"forwards": STEPS, "skipped": 0}  # batched CFG: 1 per step
    for block in pipe.dit.blocks:  # the cache is removed after the video
        assert "forward" not in block.__dict__


@pytest.mark.parametrize("batch_cfg", [True, False], ids=["batched-cfg", "sequential-cfg"])
def test_first_block_cache_skips_and_counts_per_video(pipe, batch_cfg):
    first = _generate(pipe, cache="fbcache:0.5", batch_cfg=batch_cfg)
    counts = pipe.last_cache_counts.as_dict()
    assert counts["forwards"] == STEPS * (1 if batch_cfg else 2)
    assert 0 < counts["skipped"] < counts["forwards"]
    again = _generate(pipe, cache="fbcache:0.5", batch_cfg=batch_cfg)  # a fresh sequence per video
    assert torch.equal(first, again)
    assert pipe.last_cache_counts.as_dict() == counts


def _diffusers_video(pipe: WanPipeline, cache_config) -> torch.Tensor:
    width, height = SMALL["size"]
    noise = torch.randn([16, 2, height // 8, width // 8], generator=torch.Generator().manual_seed(11))
    ref = diffusers_twin(pipe, steps=STEPS, shift=SMALL["shift"])
    ref.transformer.enable_cache(cache_config)
    frames = ref(
        prompt=PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, height=height, width=width,
        num_frames=SMALL["frame_num"], num_inference_steps=STEPS, guidance_scale=SMALL["guide_scale"],
        latents=noise[None], output_type="pt",
    ).frames[0]  # fmt: skip
    return frames.permute(1, 0, 2, 3)  # [3, F, H, W] in [0, 1]


class _Counter:
    """Counts the calls of a module that runs only on computed forwards (the last block's FFN)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fbcache", "magcache"])
def test_whole_generation_with_a_cache_matches_diffusers(pipe, kind):
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    from wan.cache import MAG_DEFAULTS

    if kind == "fbcache":
        setting, config = CacheSetting("fbcache", 0.3), FirstBlockCacheConfig(threshold=0.3)
    else:
        ratios = mag_ratios_for(pipe.preset.name)
        assert ratios, "the tiny text-to-video preset borrows the 1.3B model's published ratios"
        setting = CacheSetting("magcache", 0.12)
        config = MagCacheConfig(threshold=0.12, num_inference_steps=STEPS, mag_ratios=list(ratios),
                                **MAG_DEFAULTS)  # fmt: skip
    counter = _Counter(pipe.dit.blocks[-1].ffn)
    try:
        ours = _generate(pipe, cache=str(setting), batch_cfg=False)
    finally:
        counter.handle.remove()
    counts = pipe.last_cache_counts.as_dict()
    assert counts["forwards"] == 2 * STEPS and counts["skipped"] > 0
    assert counter.calls == counts["forwards"] - counts["skipped"]
    theirs = _diffusers_video(pipe, config)
    diff = ((ours + 1) / 2 - theirs).abs().max().item()
    assert diff <= 1e-3, diff


def test_mag_ratios_resample_to_the_run_steps():
    ratios = mag_ratios_for("t2v-1.3B")
    assert ratios is not None and len(ratios) == 50
    assert mag_ratios_for("tiny-t2v") == ratios
    assert len(nearest_resample(torch.tensor(ratios), 4)) == 4


def _lora(pipe: WanPipeline, seed: int, name: str) -> LoraSet:
    sd = random_lora_state_dict(pipe.dit, seed=seed)
    return LoraSet.of((lora_from_state_dict(sd, name=name, sha256=f"{seed:064x}"), 1.0))


def test_lora_sets_switch_without_reloading_and_restore_the_base(pipe):
    plain = _generate(pipe, steps=2)
    merges = pipe.lora_merges
    first, second = _lora(pipe, 1, "a.safetensors"), _lora(pipe, 2, "b.safetensors")
    assert pipe.use_loras(first) is True
    with_first = _generate(pipe, steps=2)
    assert not torch.equal(with_first, plain)
    assert pipe.use_loras(first) is False  # the same set again: nothing to do
    assert pipe.use_loras(second) is True
    assert not torch.equal(_generate(pipe, steps=2), with_first)
    assert pipe.use_loras(first) is True
    assert torch.equal(_generate(pipe, steps=2), with_first)
    assert pipe.use_loras(None) is True
    assert torch.equal(_generate(pipe, steps=2), plain)
    assert pipe.lora_merges - merges == 4
    assert pipe.use_loras(LoraSet()) is False
