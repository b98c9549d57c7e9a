"""LoRA files (wan/lora.py): the diffusers/PEFT, ComfyUI and Kohya/musubi layouts on the tiny DiTs.

Parity: our DiT with a LoRA merged equals diffusers' `WanTransformer3DModel` with the same file loaded by
diffusers' own `load_lora_weights` (PEFT, applied at run time) and `set_adapters` for stacks, in float32.
Also: strength 0 is the base exactly, removal and switching sets restore the base weights bit-exactly,
and each malformed file gets its own message naming the file. The full-delta keys of community files
(`.diff`, `.diff_b`, `.diff_m`) match diffusers where diffusers reads them (`.diff_b` and `head.head.diff`)
and are checked by hand elsewhere (norm weights, modulations).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from twins import diffusers_twin

from wan.dit_keys import dit_state_dict_to_diffusers
from wan.lora import (
    LoraDiff,
    LoraSet,
    applied_loras,
    apply_loras,
    detect_layout,
    lora_from_state_dict,
    read_lora,
    remove_loras,
)
from wan.pipeline import WanPipeline

TOL = 1e-5  # max abs difference against diffusers in float32
RANK = 4
ALPHA = 2.0  # scale alpha / rank = 0.5 in the layouts that carry an alpha
CLIP_TOKENS = 257

_PIPES: dict[str, WanPipeline] = {}


def _pipe(preset: str) -> WanPipeline:
    """The tiny pipeline (seed 0), built once per preset; tests must leave its DiT at base weights."""
    if preset not in _PIPES:
        _PIPES[preset] = WanPipeline.from_config(preset, seed=0, device="cpu")
    return _PIPES[preset]


def _targets(pipe: WanPipeline, extras: bool) -> dict[str, tuple[int, int]]:
    """Our module names a test LoRA covers -> weight shape [out, in]: per block the attention q/k/v/o (self
    and cross, plus k_img/v_img for image-to-video) and the FFN; with `extras` also the text, time, head
    and (image-to-video) image embedding linears."""
    names = []
    for i in range(pipe.dit.cfg.num_layers):
        names += [f"blocks.{i}.self_attn.{p}" for p in "qkvo"]
        names += [f"blocks.{i}.cross_attn.{p}" for p in "qkvo"]
        if pipe.dit.cfg.image_dim:
            names += [f"blocks.{i}.cross_attn.k_img", f"blocks.{i}.cross_attn.v_img"]
        names += [f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.2"]
    if extras:
        names += ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2"]
        names += ["time_projection.1", "head.head"]
        if pipe.dit.cfg.image_dim:
            names += ["img_emb.proj.1", "img_emb.proj.3"]
    modules = dict(pipe.dit.named_modules())
    return {n: tuple(modules[n].weight.shape) for n in names}


def _random_lora(
    targets: dict[str, tuple[int, int]], seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (down [r, in], up [out, r])} with entries large enough to move the output visibly."""
    g = torch.Generator().manual_seed(seed)
    return {
        m: (0.05 * torch.randn(RANK, i, generator=g), 0.05 * torch.randn(o, RANK, generator=g))
        for m, (o, i) in targets.items()
    }


def _diffusers_name(module: str) -> str:
    (key,) = dit_state_dict_to_diffusers({f"{module}.weight": torch.empty(0)})
    return key.removesuffix(".weight")


def _is_block(module: str) -> bool:
    return module.startswith("blocks.")


def _layout_sd(lora, layout: str, prefix: bool = True, a_b: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of `lora` in `layout`. ComfyUI: lora_down/lora_up (lora_A/lora_B with `a_b`) and an
    alpha on the block modules (diffusers' converter reads alphas only there); Kohya: an alpha on every
    module; diffusers: no alpha (PEFT's default alpha = rank, scale 1)."""
    sd = {}
    for module, (down, up) in lora.items():
        if layout == "diffusers":
            stem = ("transformer." if prefix else "") + _diffusers_name(module)
            sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = down, up
        elif layout == "comfyui":
            stem = "diffusion_model." + module
            d, u = ("lora_A", "lora_B") if a_b else ("lora_down", "lora_up")
            sd[f"{stem}.{d}.weight"], sd[f"{stem}.{u}.weight"] = down, up
            if _is_block(module):
                sd[f"{stem}.alpha"] = torch.tensor(ALPHA)
        else:
            stem = "lora_unet_" + module.replace(".", "_")
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
            sd[f"{stem}.alpha"] = torch.tensor(ALPHA)
    return {k: v.contiguous() for k, v in sd.items()}


def _scale(layout: str, module: str) -> float:
    if layout == "kohya" or (layout == "comfyui" and _is_block(module)):
        return ALPHA / RANK
    return 1.0


def _write(tmp_path: Path, pipe: WanPipeline, layout: str, seed: int, **kwargs) -> tuple[Path, dict]:
    """A tiny rank-4 LoRA file in `layout` (Kohya: block modules only, as diffusers' musubi converter
    reads nothing else); returns its path and {module: (down, up)}."""
    lora = _random_lora(_targets(pipe, extras=layout != "kohya"), seed)
    path = tmp_path / f"{layout}-{seed}.safetensors"
    save_file(_layout_sd(lora, layout, **kwargs), str(path))
    return path, lora


def _inputs(pipe: WanPipeline, seed: int):
    cfg = pipe.dit.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 3, 4, 6, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    text[:, 9:] = 0
    clip = torch.randn(1, CLIP_TOKENS, cfg.image_dim, generator=g) if cfg.image_dim else None
    return x, torch.tensor([640.0]), text, clip


def _ours(pipe: WanPipeline, inputs) -> torch.Tensor:
    x, t, text, clip = inputs
    with torch.no_grad():
        return pipe.dit(x, t, text, clip)


def _theirs(twin, inputs) -> torch.Tensor:
    x, t, text, clip = inputs
    with torch.no_grad():
        return twin.transformer(x, t, text, encoder_hidden_states_image=clip, return_dict=False)[0]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(params=["tiny-t2v", "tiny-i2v"])
def pipe(request):
    pipe = _pipe(request.param)
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    yield pipe
    remove_loras(pipe.dit)
    assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "kohya"])
def test_each_layout_matches_diffusers(pipe, layout, tmp_path):
    path, lora = _write(tmp_path, pipe, layout, seed=1)
    loaded = read_lora(path)
    assert loaded.layout == layout and set(loaded.modules) == set(lora)
    for module, entry in loaded.modules.items():
        assert entry.scale == _scale(layout, module)
    inputs = _inputs(pipe, 2)
    base = _ours(pipe, inputs)

    twin = diffusers_twin(pipe)
    assert _max_diff(base, _theirs(twin, inputs)) <= TOL  # the same base model
    twin.load_lora_weights(str(path), adapter_name="a")
    adapted = [n for n, m in twin.transformer.named_modules() if "a" in getattr(m, "lora_A", {})]
    assert len(adapted) == len(lora)  # diffusers took every module of the file
    theirs = _theirs(twin, inputs)

    apply_loras(pipe.dit, [(loaded, 1.0)])
    ours = _ours(pipe, inputs)
    diff = _max_diff(ours, theirs)
    print(f"{pipe.preset.name} {layout}: max abs diff {diff:.3e}, LoRA effect {_max_diff(ours, base):.3e}")
    assert _max_diff(ours, base) > 1e-2  # the LoRA does something
    assert diff <= TOL


def test_stack_matches_diffusers_set_adapters(pipe, tmp_path):
    first, _ = _write(tmp_path, pipe, "comfyui", seed=3)
    second, _ = _write(tmp_path, pipe, "kohya", seed=4)
    inputs = _inputs(pipe, 5)
    twin = diffusers_twin(pipe)
    twin.load_lora_weights(str(first), adapter_name="first")
    twin.load_lora_weights(str(second), adapter_name="second")
    twin.set_adapters(["first", "second"], adapter_weights=[0.7, 0.4])
    theirs = _theirs(twin, inputs)

    stack = LoraSet.of((read_lora(first), 0.7), (read_lora(second), 0.4))
    apply_loras(pipe.dit, stack)
    diff = _max_diff(_ours(pipe, inputs), theirs)
    print(f"{pipe.preset.name} stack 0.7 + 0.4: max abs diff {diff:.3e}")
    assert diff <= TOL


def test_merge_is_the_hand_computed_sum(tmp_path):
    """W = W0 + sum(strength * alpha / r * up @ down), computed here independently of wan.lora."""
    pipe = _pipe("tiny-i2v")
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    a_path, a = _write(tmp_path, pipe, "kohya", seed=6)
    b_path, b = _write(tmp_path, pipe, "diffusers", seed=7)
    try:
        apply_loras(pipe.dit, [(read_lora(a_path), 0.7), (read_lora(b_path), -0.4)])
        merged = pipe.dit.state_dict()
        for module in set(a) | set(b):
            expected = base[f"{module}.weight"].clone()
            if module in a:
                expected += 0.7 * (ALPHA / RANK) * (a[module][1] @ a[module][0])
            if module in b:
                expected += -0.4 * (b[module][1] @ b[module][0])
            assert torch.allclose(merged[f"{module}.weight"], expected, atol=1e-6, rtol=0)
        untouched = {k for k in base if k.removesuffix(".weight") not in set(a) | set(b)}
        assert all(torch.equal(merged[k], base[k]) for k in untouched)
    finally:
        remove_loras(pipe.dit)


def test_layout_variants_read_the_same(tmp_path):
    """diffusers keys without `transformer.`, ComfyUI with lora_A/lora_B: same modules and matrices."""
    pipe = _pipe("tiny-i2v")
    lora = _random_lora(_targets(pipe, extras=True), 8)
    plain = lora_from_state_dict(_layout_sd(lora, "diffusers"))
    bare = lora_from_state_dict(_layout_sd(lora, "diffusers", prefix=False))
    comfy = lora_from_state_dict(_layout_sd(lora, "comfyui"))
    comfy_ab = lora_from_state_dict(_layout_sd(lora, "comfyui", a_b=True))
    assert bare.layout == "diffusers" and comfy_ab.layout == "comfyui"
    for x, y in ((plain, bare), (comfy, comfy_ab)):
        assert set(x.modules) == set(y.modules) == set(lora)
        for m in x.modules:
            assert torch.equal(x.modules[m].down, y.modules[m].down)
            assert torch.equal(x.modules[m].up, y.modules[m].up)
            assert x.modules[m].scale == y.modules[m].scale
    # ComfyUI's own names without the prefix are the official names: also read as ComfyUI
    official = {k.removeprefix("diffusion_model."): v for k, v in _layout_sd(lora, "comfyui").items()}
    assert detect_layout(official) == "comfyui"


def test_strength_zero_is_the_base_exactly(pipe, tmp_path):
    path, _ = _write(tmp_path, pipe, "comfyui", seed=9)
    inputs = _inputs(pipe, 10)
    base_out = _ours(pipe, inputs)
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    apply_loras(pipe.dit, [(read_lora(path), 0.0)])
    assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())
    assert torch.equal(_ours(pipe, inputs), base_out)


def test_remove_and_switch_restore_bit_exactly(tmp_path):
    pipe = _pipe("tiny-t2v")
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    a = read_lora(_write(tmp_path, pipe, "comfyui", seed=11)[0])
    b = read_lora(_write(tmp_path, pipe, "diffusers", seed=12)[0])
    try:
        first = LoraSet.of((a, 0.7), (b, 0.4))
        apply_loras(pipe.dit, first)
        merged = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
        assert not all(torch.equal(merged[k], base[k]) for k in base)
        apply_loras(pipe.dit, LoraSet.of((a, 0.7), (b, 0.4)))  # the same set again: nothing changes
        assert all(torch.equal(v, merged[k]) for k, v in pipe.dit.state_dict().items())
        assert applied_loras(pipe.dit) == first

        apply_loras(pipe.dit, [(b, 1.0)])  # another set: merged onto the restored base
        switched = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
        remove_loras(pipe.dit)
        assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())
        apply_loras(pipe.dit, [(b, 1.0)])  # from a clean base: the same weights as after switching
        assert all(torch.equal(v, switched[k]) for k, v in pipe.dit.state_dict().items())

        remove_loras(pipe.dit)
        remove_loras(pipe.dit)  # nothing merged: a no-op
        assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())
        assert applied_loras(pipe.dit) == LoraSet()
    finally:
        remove_loras(pipe.dit)


def test_bf16_weights_restore_bit_exactly(tmp_path):
    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    pipe.dit.cast(torch.bfloat16)
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    apply_loras(pipe.dit, [(read_lora(_write(tmp_path, pipe, "kohya", seed=13)[0]), 0.5)])
    changed = [k for k, v in pipe.dit.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(pipe.dit.state_dict()[k].dtype == base[k].dtype for k in changed)
    remove_loras(pipe.dit)
    assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())


# --- full deltas: .diff / .diff_b / .diff_m --------------------------------------------------------------

_DIFF_SUFFIX = {"weight": "diff", "bias": "diff_b", "modulation": "diff_m"}


def _diff_key(param: str, layout: str = "comfyui") -> str:
    """Our parameter name -> its diff key: 'blocks.0.self_attn.q.bias' -> ComfyUI
    'diffusion_model.blocks.0.self_attn.q.diff_b' or Kohya 'lora_unet_blocks_0_self_attn_q.diff_b';
    'blocks.0.modulation' -> 'diffusion_model.blocks.0.diff_m' / 'lora_unet_blocks_0.diff_m'."""
    module, _, kind = param.rpartition(".")
    if layout == "kohya":
        return f"lora_unet_{module.replace('.', '_')}.{_DIFF_SUFFIX[kind]}"
    return f"diffusion_model.{module}.{_DIFF_SUFFIX[kind]}"


def _random_diffs(pipe: WanPipeline, params: list[str], seed: int) -> dict[str, torch.Tensor]:
    """{parameter name: delta of its shape ~ N(0, 0.05^2)} (float32)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in pipe.dit.named_parameters()}
    return {n: 0.05 * torch.randn(shapes[n], generator=g) for n in params}


def _bias_diff_params(pipe: WanPipeline) -> list[str]:
    """Biases of linears a test file also adapts with down/up: some per block, embeddings and the head."""
    params = []
    for i in range(pipe.dit.cfg.num_layers):
        params += [f"blocks.{i}.self_attn.q.bias", f"blocks.{i}.cross_attn.o.bias", f"blocks.{i}.ffn.0.bias"]
        if pipe.dit.cfg.image_dim:
            params += [f"blocks.{i}.cross_attn.k_img.bias"]
    params += ["text_embedding.0.bias", "time_projection.1.bias"]
    if pipe.dit.cfg.image_dim:
        params += ["img_emb.proj.1.bias"]
    return params


def test_diffs_match_diffusers(pipe, tmp_path):
    """A ComfyUI file with lora_down/lora_up + alpha, `.diff_b` on some of those linears and the head as
    `head.head.diff` + `head.head.diff_b` (no down/up): diffusers reads all of it (diff_b as PEFT's
    lora_B.bias, head.head.diff as a full-rank lora_A); strength 0.7 through `set_adapters`."""
    targets = _targets(pipe, extras=True)
    del targets["head.head"]
    lora = _random_lora(targets, 20)
    diffs = _random_diffs(pipe, [*_bias_diff_params(pipe), "head.head.weight", "head.head.bias"], 21)
    sd = _layout_sd(lora, "comfyui") | {_diff_key(p): d for p, d in diffs.items()}
    path = tmp_path / "diffs.safetensors"
    save_file(sd, str(path))
    loaded = read_lora(path)
    assert loaded.layout == "comfyui" and set(loaded.modules) == set(lora) and set(loaded.diffs) == set(diffs)
    assert all(torch.equal(loaded.diffs[p].delta, d) for p, d in diffs.items())
    inputs = _inputs(pipe, 22)
    base = _ours(pipe, inputs)

    twin = diffusers_twin(pipe)
    # PEFT gives every adapted linear a lora_B bias once one has it; on the meta device (diffusers' default
    # low_cpu_mem_usage) the ones the file lacks stay unset, so they are made (as zeros) on the CPU here
    twin.load_lora_weights(str(path), adapter_name="a", low_cpu_mem_usage=False)
    twin.set_adapters(["a"], adapter_weights=[0.7])
    adapted = [n for n, m in twin.transformer.named_modules() if "a" in getattr(m, "lora_A", {})]
    assert len(adapted) == len(lora) + 1  # every linear of the file, and the head
    theirs = _theirs(twin, inputs)

    apply_loras(pipe.dit, [(loaded, 0.7)])
    ours = _ours(pipe, inputs)
    diff = _max_diff(ours, theirs)
    print(f"{pipe.preset.name} diffs: max abs diff {diff:.3e}, LoRA effect {_max_diff(ours, base):.3e}")
    assert diff <= TOL

    # the diffs alone move the output too: without them, we are far from diffusers
    remove_loras(pipe.dit)
    apply_loras(pipe.dit, [(lora_from_state_dict(_layout_sd(lora, "comfyui")), 0.7)])
    assert _max_diff(_ours(pipe, inputs), theirs) > 1e-3


def _hand_files(pipe: WanPipeline) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two diff sets on the image-to-video DiT: norm weights (q/k norms, norm3, the image embedding's
    LayerNorm), modulations (blocks and head), biases (norm3's, linears') and a linear's weight; the second
    overlaps the first."""
    a = _random_diffs(
        pipe,
        [
            "blocks.0.self_attn.norm_q.weight",
            "blocks.1.norm3.weight",
            "blocks.0.cross_attn.norm_k_img.weight",
            "img_emb.proj.0.weight",
            "blocks.0.modulation",
            "blocks.1.modulation",
            "head.modulation",
            "blocks.0.self_attn.q.bias",
            "blocks.0.cross_attn.k_img.bias",
            "head.head.bias",
            "head.head.weight",
        ],
        30,
    )
    b = _random_diffs(
        pipe,
        [
            "blocks.0.self_attn.norm_q.weight",
            "blocks.1.cross_attn.norm_k.weight",
            "blocks.1.norm3.bias",
            "blocks.0.modulation",
            "blocks.0.self_attn.q.bias",
            "blocks.1.ffn.2.weight",
        ],
        31,
    )
    return a, b


def test_diffs_are_the_hand_computed_sum():
    """param = base + 0.7 * diff_a + 0.4 * diff_b in float32 for norms, modulations and biases (ComfyUI and
    Kohya files stacked); a linear with a down/up pair and a bias diff gets both."""
    pipe = _pipe("tiny-i2v")
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    a, b = _hand_files(pipe)
    down, up = _down_up(64, 64)
    kohya = {_diff_key(p, "kohya"): d for p, d in b.items()}
    kohya["lora_unet_blocks_0_self_attn_q.lora_down.weight"] = down
    kohya["lora_unet_blocks_0_self_attn_q.lora_up.weight"] = 0.01 * up
    kohya["lora_unet_blocks_0_self_attn_q.alpha"] = torch.tensor(ALPHA)
    first = lora_from_state_dict({_diff_key(p): d for p, d in a.items()}, name="a")
    second = lora_from_state_dict(kohya, name="b")
    assert first.layout == "comfyui" and second.layout == "kohya"
    assert set(first.diffs) == set(a) and set(second.diffs) == set(b) and not first.modules
    modulation = second.diffs["blocks.0.modulation"]
    assert isinstance(modulation, LoraDiff) and modulation.key == "lora_unet_blocks_0.diff_m"
    assert torch.equal(modulation.delta, b["blocks.0.modulation"])
    try:
        apply_loras(pipe.dit, LoraSet.of((first, 0.7), (second, 0.4)))
        merged = pipe.dit.state_dict()
        for param in set(a) | set(b):
            expected = base[param].clone()
            if param in a:
                expected = expected + 0.7 * a[param]
            if param in b:
                expected = expected + 0.4 * b[param]
            assert merged[param].dtype == torch.float32
            assert torch.equal(merged[param], expected), param
        lora_q = base["blocks.0.self_attn.q.weight"] + 0.4 * (ALPHA / RANK) * (0.01 * up @ down)
        assert torch.allclose(merged["blocks.0.self_attn.q.weight"], lora_q, atol=1e-6, rtol=0)
        touched = set(a) | set(b) | {"blocks.0.self_attn.q.weight"}
        assert all(torch.equal(merged[k], base[k]) for k in base if k not in touched)
    finally:
        remove_loras(pipe.dit)
    assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())


def test_diff_keys_in_every_layout_read_the_same():
    """ComfyUI with and without `diffusion_model.` and Kohya: the same parameters and deltas."""
    pipe = _pipe("tiny-i2v")
    a, _ = _hand_files(pipe)
    comfy = lora_from_state_dict({_diff_key(p): d for p, d in a.items()})
    bare = lora_from_state_dict({_diff_key(p).removeprefix("diffusion_model."): d for p, d in a.items()})
    kohya = lora_from_state_dict({_diff_key(p, "kohya"): d for p, d in a.items()})
    assert (comfy.layout, bare.layout, kohya.layout) == ("comfyui", "comfyui", "kohya")
    for lora in (comfy, bare, kohya):
        assert set(lora.diffs) == set(a) and not lora.modules
        assert all(torch.equal(lora.diffs[p].delta, d) for p, d in a.items())
        assert set(lora.parameters) == set(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffs_restore_bit_exactly(dtype):
    """Every parameter a stack with diffs touches (linear weights and biases, norm weights and biases,
    modulations) is restored bit-exactly by `remove_loras` and when switching sets; strength 0 is the base."""
    pipe = WanPipeline.from_config("tiny-i2v", seed=0, device="cpu")
    pipe.dit.cast(dtype)
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    a, b = _hand_files(pipe)
    low_rank = _layout_sd(_random_lora(_targets(pipe, extras=False), 32), "comfyui")
    first = lora_from_state_dict(low_rank | {_diff_key(p): d for p, d in a.items()}, name="a")
    second = lora_from_state_dict({_diff_key(p, "kohya"): d for p, d in b.items()}, name="b")
    touched = set(first.parameters) | set(second.parameters)

    def now() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in pipe.dit.state_dict().items()}

    try:
        apply_loras(pipe.dit, LoraSet.of((first, 0.0), (second, 0.0)))
        assert all(torch.equal(v, base[k]) for k, v in now().items())
        apply_loras(pipe.dit, LoraSet.of((first, 0.7), (second, 0.4)))
        merged = now()
        changed = {k for k in base if not torch.equal(merged[k], base[k])}
        assert changed == touched  # nothing else, and every diff moved its parameter
        assert any(base[k].dtype == dtype for k in changed if k.endswith(".bias"))
        assert all(merged[k].dtype == base[k].dtype for k in base)
        apply_loras(pipe.dit, [(second, 1.0)])  # switching: merged onto the restored base
        switched = now()
        remove_loras(pipe.dit)
        assert all(torch.equal(v, base[k]) for k, v in now().items())
        apply_loras(pipe.dit, [(second, 1.0)])
        assert all(torch.equal(v, switched[k]) for k, v in now().items())
        apply_loras(pipe.dit, LoraSet.of((first, 0.7), (second, 0.4)))
        assert all(torch.equal(v, merged[k]) for k, v in now().items())
        remove_loras(pipe.dit)
        assert all(torch.equal(v, base[k]) for k, v in now().items())
    finally:
        remove_loras(pipe.dit)


# --- bad files -------------------------------------------------------------------------------------------


def _bad(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "bad.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _down_up(i: int, o: int, r: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, i), torch.randn(o, r)


def _apply_file(pipe: WanPipeline, path: Path) -> None:
    apply_loras(pipe.dit, [(read_lora(path), 1.0)])


def test_keys_that_match_no_module_are_listed(tmp_path):
    pipe = _pipe("tiny-t2v")
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    sd = {}
    for stem in ["blocks.0.self_attn.q", "blocks.7.self_attn.q", "blocks.0.cross_attn.k_img", "blocks.0.mlp"]:
        d, u = _down_up(64, 64)
        sd[f"diffusion_model.{stem}.lora_down.weight"], sd[f"diffusion_model.{stem}.lora_up.weight"] = d, u
    path = _bad(tmp_path, sd)
    with pytest.raises(ValueError, match="match no module") as error:
        _apply_file(pipe, path)
    message = str(error.value)
    assert str(path) in message
    for stem in ["blocks.7.self_attn.q", "blocks.0.cross_attn.k_img", "blocks.0.mlp"]:
        assert stem in message
    assert "blocks.0.self_attn.q," not in message
    assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())  # nothing was changed

    d, u = _down_up(64, 64)
    kohya = _bad(
        tmp_path,
        {"lora_unet_blocks_0_mlp_fc.lora_down.weight": d, "lora_unet_blocks_0_mlp_fc.lora_up.weight": u},
    )
    with pytest.raises(ValueError, match=r"match no module.*blocks_0_mlp_fc"):
        read_lora(kohya)


def test_many_unmatched_keys_are_cut_short(tmp_path):
    sd = {}
    for i in range(15):
        d, u = _down_up(64, 64)
        sd[f"lora_unet_foo_{i}.lora_down.weight"], sd[f"lora_unet_foo_{i}.lora_up.weight"] = d, u
    with pytest.raises(ValueError, match=r"\(5 more\)"):
        read_lora(_bad(tmp_path, sd))


def test_shape_that_does_not_fit(tmp_path):
    pipe = _pipe("tiny-t2v")
    d, u = _down_up(64, 64)  # ffn.0 is [128, 64]
    path = _bad(
        tmp_path,
        {
            "diffusion_model.blocks.1.ffn.0.lora_A.weight": d,
            "diffusion_model.blocks.1.ffn.0.lora_B.weight": u,
        },
    )
    with pytest.raises(ValueError) as error:
        _apply_file(pipe, path)
    message = str(error.value)
    assert str(path) in message and "blocks.1.ffn.0" in message
    assert "expected [out, in] = [128, 64]" in message and "[64, 64]" in message


def test_rank_that_does_not_fit(tmp_path):
    down, up = torch.randn(4, 64), torch.randn(64, 8)
    path = _bad(
        tmp_path,
        {
            "lora_unet_blocks_0_self_attn_q.lora_down.weight": down,
            "lora_unet_blocks_0_self_attn_q.lora_up.weight": up,
        },
    )
    with pytest.raises(ValueError, match=r"rank does not fit") as error:
        read_lora(path)
    assert str(path) in str(error.value) and "lora_unet_blocks_0_self_attn_q" in str(error.value)


def test_lora_for_another_width(tmp_path):
    pipe = _pipe("tiny-t2v")
    sd = {}
    for p in "qkvo":
        d, u = _down_up(128, 128)
        sd[f"transformer.blocks.0.attn1.to_{p}.lora_A.weight"] = d
        sd[f"transformer.blocks.0.attn1.to_{p}.lora_B.weight"] = u
    path = _bad(tmp_path, sd)
    with pytest.raises(ValueError, match=r"width 128.*this model is 64 wide") as error:
        _apply_file(pipe, path)
    assert str(path) in str(error.value)


def test_unknown_layout_and_unreadable_file(tmp_path):
    path = _bad(tmp_path, {"model.layers.0.mlp.weight": torch.randn(4, 4)})
    with pytest.raises(ValueError, match="unknown LoRA layout") as error:
        read_lora(path)
    assert str(path) in str(error.value)
    mixed = _bad(
        tmp_path,
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 64),
            "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(64, 4),
        },
        "mixed.safetensors",
    )
    with pytest.raises(ValueError, match="unknown LoRA layout"):
        read_lora(mixed)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file") as error:
        read_lora(garbage)
    assert str(garbage) in str(error.value)


def test_missing_matrix_and_unknown_suffix(tmp_path):
    lonely = _bad(tmp_path, {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 64)})
    with pytest.raises(ValueError, match=r"lora_unet_blocks_0_self_attn_q has no up matrix"):
        read_lora(lonely)
    dora = _bad(
        tmp_path,
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 64),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 4),
            "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.randn(64, 1),
        },
        "dora.safetensors",
    )
    with pytest.raises(ValueError, match=r"keys of no LoRA role.*dora_scale"):
        read_lora(dora)


def test_diff_shape_that_does_not_fit(tmp_path):
    pipe = _pipe("tiny-t2v")
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    path = _bad(tmp_path, {"diffusion_model.blocks.1.norm3.diff": torch.randn(32)})
    with pytest.raises(ValueError) as error:
        _apply_file(pipe, path)
    message = str(error.value)
    assert str(path) in message and "diffusion_model.blocks.1.norm3.diff" in message
    assert "blocks.1.norm3.weight" in message and "expected [64], found [32]" in message
    modulation = _bad(tmp_path, {"diffusion_model.blocks.0.diff_m": torch.randn(6, 64)}, "m.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.0\.diff_m\): expected \[1, 6, 64\], found \[6, 64\]"):
        _apply_file(pipe, modulation)
    bias = _bad(tmp_path, {"lora_unet_blocks_0_ffn_0.diff_b": torch.randn(64)}, "b.safetensors")
    with pytest.raises(ValueError, match=r"ffn_0\.diff_b\): expected \[128\], found \[64\]"):
        _apply_file(pipe, bias)
    wide = _bad(tmp_path, {"diffusion_model.blocks.0.diff_m": torch.randn(1, 6, 128)}, "w.safetensors")
    with pytest.raises(ValueError, match=r"width 128.*this model is 64 wide"):
        _apply_file(pipe, wide)
    assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())  # nothing was changed


def test_diff_for_a_parameter_the_model_lacks(tmp_path):
    """Parameter-free norms (norm1, norm2, the head's norm), image layers on a text-to-video DiT and a block
    it does not have: listed with their parameter names, nothing changed."""
    pipe = _pipe("tiny-t2v")
    base = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    sd = {
        "diffusion_model.blocks.0.self_attn.norm_q.diff": torch.randn(64),  # fits
        "diffusion_model.blocks.0.norm1.diff": torch.randn(64),
        "diffusion_model.blocks.1.norm2.diff_b": torch.randn(64),
        "diffusion_model.head.norm.diff": torch.randn(64),
        "diffusion_model.blocks.0.cross_attn.norm_k_img.diff": torch.randn(64),
        "diffusion_model.blocks.7.diff_m": torch.randn(1, 6, 64),
    }
    path = _bad(tmp_path, sd)
    with pytest.raises(ValueError, match="parameters this model does not have") as error:
        _apply_file(pipe, path)
    message = str(error.value)
    assert str(path) in message
    for key, param in [
        ("blocks.0.norm1.diff", "blocks.0.norm1.weight"),
        ("blocks.1.norm2.diff_b", "blocks.1.norm2.bias"),
        ("head.norm.diff", "head.norm.weight"),
        ("blocks.0.cross_attn.norm_k_img.diff", "blocks.0.cross_attn.norm_k_img.weight"),
        ("blocks.7.diff_m", "blocks.7.modulation"),
    ]:
        assert f"diffusion_model.{key} ({param})" in message
    assert "norm_q" not in message
    assert all(torch.equal(v, base[k]) for k, v in pipe.dit.state_dict().items())
    with pytest.raises(ValueError, match=r"match no module.*lora_unet_blocks_0_mlp\.diff_b"):
        lora_from_state_dict({"lora_unet_blocks_0_mlp.diff_b": torch.randn(64)})


def test_diffs_keep_the_other_rules(tmp_path):
    """With diffs present, a down without an up is still an error, and unknown suffixes are rejected."""
    lonely = _bad(
        tmp_path,
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 64),
            "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(64),
        },
    )
    with pytest.raises(ValueError, match=r"blocks\.0\.self_attn\.q has no up matrix"):
        read_lora(lonely)
    odd = _bad(
        tmp_path,
        {
            "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(64),
            "diffusion_model.blocks.0.self_attn.q.diff_w": torch.randn(64, 64),
        },
        "odd.safetensors",
    )
    with pytest.raises(ValueError, match=r"keys of no LoRA role.*blocks\.0\.self_attn\.q\.diff_w") as error:
        read_lora(odd)
    assert str(odd) in str(error.value) and "diff_b" not in str(error.value).split(": ")[-1]
