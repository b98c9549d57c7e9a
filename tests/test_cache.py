"""First-block cache (`wan.cache`): parity with diffusers' `FirstBlockCacheConfig` hook, step by step.

Both models get the same tiny fp32 weights and the same denoising-like sequence of inputs (latents moving
from noise towards a clean sample as the timestep falls). Whether a forward skipped its remaining blocks is
observed the same way on both sides, by a forward hook on the last block's feed-forward (it runs only when
the last block computes).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from twins import diffusers_transformer, randomise_dit

from wan.cache import FirstBlockCache, FirstBlockCacheConfig, MagCache, MagCacheConfig, nearest_resample
from wan.model import WanModel
from wan.pipeline import WanPipeline

THRESHOLD = 0.15  # the tiny model's first-block change between steps is ~0.07-0.11 (see `_sequence`)
STEPS = 10


def _tiny_pipe(layers: int) -> WanPipeline:
    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    if layers != pipe.dit.cfg.num_layers:  # a middle block too: rebuild the DiT deeper, random weights
        torch.manual_seed(3)
        pipe.dit = WanModel(dataclasses.replace(pipe.dit.cfg, num_layers=layers))
        randomise_dit(pipe.dit, 4)
    pipe.dit.float().eval()
    return pipe


@pytest.fixture(scope="module", params=[2, 3], ids=["2-blocks", "3-blocks"])
def pair(request):
    """(our WanModel, diffusers' WanTransformer3DModel) with the same weights."""
    pipe = _tiny_pipe(request.param)
    return pipe.dit, diffusers_transformer(pipe)


def _sequence(cfg, batch: int = 2):
    """STEPS (x [batch, 16, 3, 8, 8], t [batch]) pairs along a flow path, and the text context
    [batch, text_len, text_dim] (the two halves of a CFG batch: prompt, negative prompt)."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(1, cfg.in_dim, 3, 8, 8, generator=g)
    noise = torch.randn(1, cfg.in_dim, 3, 8, 8, generator=g)
    context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    context[:, 7:] = 0
    steps = []
    for sigma in torch.linspace(1.0, 0.2, STEPS).tolist():
        x = ((1 - sigma) * clean + sigma * noise).expand(batch, -1, -1, -1, -1).contiguous()
        steps.append((x, torch.full((batch,), sigma * 1000.0)))
    return steps, context


class _LastBlockRuns:
    """Counts the calls of a module (hooked on the last block's feed-forward: it runs iff not skipped)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1

    def ran(self) -> bool:
        """Whether the module ran since the last call of `ran`."""
        ran, self.calls = self.calls > 0, 0
        return ran


def _assert_not_knife_edge(cache: FirstBlockCache) -> None:
    """The compared change is far enough from the threshold that 1e-6 model differences cannot flip it."""
    if cache.last_change is not None:
        assert abs(cache.last_change - cache.config.threshold) > 1e-3, cache.last_change


def test_batched_cfg_decisions_and_outputs_match_diffusers(pair):
    """One call per step with the conditional and unconditional halves in one batch: one decision per
    call over the whole batch, on both sides (diffusers inside one cache context)."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersConfig

    model, ref = pair
    steps, context = _sequence(model.cfg)
    cache = FirstBlockCache(model, FirstBlockCacheConfig(THRESHOLD)).enable()
    ref.enable_cache(DiffusersConfig(threshold=THRESHOLD))
    ours_runs, ref_runs = _LastBlockRuns(model.blocks[-1].ffn), _LastBlockRuns(ref.blocks[-1].ffn)
    try:
        decisions = []
        for x, t in steps:
            with torch.no_grad():
                ours = model(x, t, context)
                with ref.cache_context("cond"):
                    theirs = ref(x, t, context, return_dict=False)[0]
            _assert_not_knife_edge(cache)
            decisions.append(ours_runs.ran())
            assert decisions[-1] == ref_runs.ran(), f"step {len(decisions) - 1}: decisions differ"
            assert (ours - theirs).abs().max().item() <= 1e-5
        assert decisions[0] and not all(decisions), decisions  # both kinds of step happened
        counts = cache.counts()
        assert counts.forwards == STEPS
        assert counts.skipped == decisions.count(False)
        assert cache.counts(None).as_dict() == {"forwards": STEPS, "skipped": decisions.count(False)}
    finally:
        cache.disable()
        ref.disable_cache()
        ours_runs.handle.remove()
        ref_runs.handle.remove()


def test_sequential_cfg_contexts_match_diffusers(pair):
    """The two guidance branches as separate calls, each in its own named context on both sides: each
    branch compares with its own previous residual, as diffusers' Wan pipeline does."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersConfig

    model, ref = pair
    steps, context = _sequence(model.cfg, batch=1)
    uncond = torch.randn(
        1, model.cfg.text_len, model.cfg.text_dim, generator=torch.Generator().manual_seed(9)
    )
    uncond[:, 3:] = 0
    cache = FirstBlockCache(model, FirstBlockCacheConfig(THRESHOLD)).enable()
    ref.enable_cache(DiffusersConfig(threshold=THRESHOLD))
    ours_runs, ref_runs = _LastBlockRuns(model.blocks[-1].ffn), _LastBlockRuns(ref.blocks[-1].ffn)
    try:
        skipped = {"cond": 0, "uncond": 0}
        for x, t in steps:
            for name, ctx in (("cond", context), ("uncond", uncond)):
                with torch.no_grad():
                    with cache.context(name):
                        ours = model(x, t, ctx)
                    with ref.cache_context(name):
                        theirs = ref(x, t, ctx, return_dict=False)[0]
                _assert_not_knife_edge(cache)
                ran = ours_runs.ran()
                assert ran == ref_runs.ran()
                skipped[name] += not ran
                assert (ours - theirs).abs().max().item() <= 1e-5
        assert skipped["cond"] > 0 and skipped["uncond"] > 0
        for name in skipped:
            assert cache.counts(name).as_dict() == {"forwards": STEPS, "skipped": skipped[name]}
        assert cache.counts().skipped == sum(skipped.values())
    finally:
        cache.disable()
        ref.disable_cache()
        ours_runs.handle.remove()
        ref_runs.handle.remove()


def test_off_and_disabled_are_bit_identical(pair):
    model, _ = pair
    steps, context = _sequence(model.cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = [model(x, t, context) for x, t in steps]
        cache = FirstBlockCache(model, FirstBlockCacheConfig(THRESHOLD))  # created, never enabled
        assert not cache.enabled
        assert all(torch.equal(model(x, t, context), p) for (x, t), p in zip(steps, plain, strict=True))
        cache.enable()
        cached = [model(x, t, context) for x, t in steps]
        assert cache.counts().skipped > 0
        assert not all(torch.equal(c, p) for c, p in zip(cached, plain, strict=True))
        cache.disable()
        assert all(torch.equal(model(x, t, context), p) for (x, t), p in zip(steps, plain, strict=True))
        assert all("forward" not in vars(block) for block in model.blocks)
        # enabled but never skipping (a negative change is impossible): the blocks run unchanged
        cache.enable(0.0)
        try:
            for (x, t), p in zip(steps, plain, strict=True):
                assert torch.equal(model(x, t, context), p)
            assert cache.counts().as_dict() == {"forwards": STEPS, "skipped": 0}
        finally:
            cache.disable()
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_reset_starts_a_new_sequence(pair):
    """Repeating the same input skips (change 0 <= threshold 0); after `reset` the first forward computes
    again and the counts start from zero."""
    model, _ = pair
    (x, t), *_ = _sequence(model.cfg)[0]
    context = _sequence(model.cfg)[1]
    runs = _LastBlockRuns(model.blocks[-1].ffn)
    cache = FirstBlockCache(model).enable(0.0)
    try:
        with torch.no_grad():
            first = model(x, t, context)
            assert runs.ran()
            again = model(x, t, context)
            assert not runs.ran()  # skipped: the cached residual is reused
            assert (again - first).abs().max().item() <= 1e-5
            assert cache.counts().as_dict() == {"forwards": 2, "skipped": 1}
            cache.reset()
            assert cache.counts().as_dict() == {"forwards": 0, "skipped": 0}
            assert torch.equal(model(x, t, context), first)
            assert runs.ran()
            assert cache.counts().as_dict() == {"forwards": 1, "skipped": 0}
    finally:
        cache.disable()
        runs.handle.remove()


def test_refusals():
    model = _tiny_pipe(2).dit
    with pytest.raises(ValueError, match=">= 0"):
        FirstBlockCacheConfig(-0.1)
    shallow = WanModel(dataclasses.replace(model.cfg, num_layers=1))
    with pytest.raises(ValueError, match="at least 2 blocks"):
        FirstBlockCache(shallow)
    first = FirstBlockCache(model).enable()
    try:
        with pytest.raises(ValueError, match="already has a step cache"):
            FirstBlockCache(model).enable()
    finally:
        first.disable()


# -- MagCache ----------------------------------------------------------------------------------------------

# A made-up calibration of 7 steps (resampled to the STEPS of a sequence, as diffusers resamples it).
MAG_RATIOS = [1.0, 1.03, 1.01, 1.0, 0.99, 0.98, 0.95]


def _mag_configs(**overrides):
    """(ours, diffusers') MagCache configs with the same settings."""
    from diffusers.hooks import MagCacheConfig as DiffusersMagConfig

    settings = dict(
        threshold=0.06,
        max_skip_steps=2,
        retention_ratio=0.2,
        num_inference_steps=STEPS,
        mag_ratios=MAG_RATIOS,
    )
    settings.update(overrides)
    return MagCacheConfig(**settings), DiffusersMagConfig(**settings)


def test_nearest_resample_matches_diffusers():
    from diffusers.hooks.mag_cache import nearest_interp

    values = torch.tensor([1.0, 1.2, 0.9, 1.1, 0.8, 1.05, 0.97])
    for length in (1, 2, 5, 7, 10, 28, 50):
        assert torch.equal(nearest_resample(values, length), nearest_interp(values, length))


@pytest.mark.parametrize("sequential", [False, True], ids=["batched-cfg", "sequential-cfg"])
def test_mag_cache_decisions_and_outputs_match_diffusers(pair, sequential):
    """Two whole sequences back to back (the state starts over after num_inference_steps forwards of a
    context): the same steps skipped and outputs within 1e-5, with batched CFG (one context) or the two
    branches as separate calls in contexts "cond" and "uncond"."""
    model, ref = pair
    ours_cfg, ref_cfg = _mag_configs()
    steps, context = _sequence(model.cfg, batch=1 if sequential else 2)
    if sequential:
        g = torch.Generator().manual_seed(9)
        uncond = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=g)
        uncond[:, 3:] = 0
        calls = [("cond", context), ("uncond", uncond)]
    else:
        calls = [("cond", context)]
    cache = MagCache(model, ours_cfg).enable()
    ref.enable_cache(ref_cfg)
    ours_runs, ref_runs = _LastBlockRuns(model.blocks[-1].ffn), _LastBlockRuns(ref.blocks[-1].ffn)
    try:
        decisions: dict[str, list[bool]] = {name: [] for name, _ in calls}
        for x, t in steps + steps:
            for name, ctx in calls:
                with torch.no_grad():
                    with cache.context(name):
                        ours = model(x, t, ctx)
                    with ref.cache_context(name):
                        theirs = ref(x, t, ctx, return_dict=False)[0]
                decisions[name].append(ours_runs.ran())
                assert decisions[name][-1] == ref_runs.ran(), (name, decisions[name])
                assert (ours - theirs).abs().max().item() <= 1e-5
        for name, ran in decisions.items():
            assert ran[:STEPS] == ran[STEPS:]  # the second sequence starts over
            assert ran[0] and ran[1] and not all(ran), ran  # retention: round(0.2 * 10) = 2 steps
            assert cache.counts(name).as_dict() == {"forwards": 2 * STEPS, "skipped": ran.count(False)}
    finally:
        cache.disable()
        ref.disable_cache()
        ours_runs.handle.remove()
        ref_runs.handle.remove()


def test_mag_cache_calibration_matches_diffusers(pair, capsys):
    """calibrate=True skips nothing and measures the same ratios diffusers prints."""
    import ast

    model, ref = pair
    ours_cfg, ref_cfg = _mag_configs(calibrate=True, mag_ratios=None)
    steps, context = _sequence(model.cfg)
    cache = MagCache(model, ours_cfg).enable()
    ref.enable_cache(ref_cfg)
    try:
        with torch.no_grad():
            plain_first = None
            for x, t in steps:
                ours = model(x, t, context)
                plain_first = ours if plain_first is None else plain_first
                with ref.cache_context("cond"):
                    ref(x, t, context, return_dict=False)
        printed = capsys.readouterr().out.split("mag_ratios=...):")[1].strip().splitlines()[0]
        theirs = ast.literal_eval(printed)
        assert cache.calibration is not None and len(cache.calibration) == STEPS
        assert cache.calibration[0] == 1.0
        assert cache.calibration == pytest.approx(theirs, rel=1e-5)
        assert cache.counts().as_dict() == {"forwards": STEPS, "skipped": 0}
    finally:
        cache.disable()
        ref.disable_cache()


def test_mag_cache_off_enabled_without_skips_and_reset(pair):
    """Bit-identical to the plain model when disabled, or enabled with a threshold that never skips;
    `reset` starts a new sequence (step 0, no residual, zero counts)."""
    model, _ = pair
    steps, context = _sequence(model.cfg)
    with torch.no_grad():
        plain = [model(x, t, context) for x, t in steps]
        cache = MagCache(model, _mag_configs()[0]).enable()
        half = [model(x, t, context) for x, t in steps[: STEPS // 2]]
        assert cache.counts().skipped > 0
        cache.reset()
        assert cache.counts().as_dict() == {"forwards": 0, "skipped": 0}
        again = [model(x, t, context) for x, t in steps[: STEPS // 2]]
        assert all(torch.equal(a, h) for a, h in zip(again, half, strict=True))  # the same from step 0
        cache.disable()
        assert all(torch.equal(model(x, t, context), p) for (x, t), p in zip(steps, plain, strict=True))
        cache.enable(_mag_configs(max_skip_steps=0)[0])  # never skips: a run of 1 step is too long
        try:
            assert all(torch.equal(model(x, t, context), p) for (x, t), p in zip(steps, plain, strict=True))
            assert cache.counts().as_dict() == {"forwards": STEPS, "skipped": 0}
        finally:
            cache.disable()
    with pytest.raises(ValueError, match="mag_ratios"):
        MagCacheConfig()


def test_refused_on_compiled_blocks():
    model = _tiny_pipe(2).dit
    model.blocks[0].compile()  # lazy: nothing compiles until a forward
    with pytest.raises(ValueError, match="compiled blocks"):
        FirstBlockCache(model).enable()
    with pytest.raises(ValueError, match="compiled blocks"):
        MagCache(model, _mag_configs()[0]).enable()
    assert all("forward" not in vars(block) for block in model.blocks)
