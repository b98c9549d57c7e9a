"""LoRA files for the Wan 2.1 DiT: read the published layouts, stack them, merge into the weights and undo.

Three layouts are read (detected from the keys):

- ``diffusers`` (PEFT): ``transformer.blocks.N.attn1.to_q.lora_A.weight`` / ``lora_B`` (the ``transformer.``
  prefix is optional); module names are diffusers' and are translated through `wan.dit_keys`.
- ``comfyui``: ``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` / ``lora_B`` or ``lora_down`` /
  ``lora_up``, optional ``.alpha``; module names are the official ones (ours). The prefix is optional.
- ``kohya`` (musubi-tuner): ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` / ``lora_up`` with
  ``.alpha``; the official module name with every ``.`` written as ``_``.

Each module's update is ``delta W = scale * up @ down`` with down [r, in], up [out, r] and
``scale = alpha / r`` when the file gives an alpha, else 1.

Community Wan 2.1 files (LightX2V's step/CFG-distill LoRAs, CausVid and AccVideo extractions) also carry
full deltas ("diffs") of single parameters, in any of the layouts (module part named as above):

- ``<module>.diff``: a delta of ``<module>.weight``, same shape (a linear's [out, in], a norm's [dim],
  e.g. ``head.head.diff``, ``blocks.N.self_attn.norm_q.diff``, ``blocks.N.norm3.diff``);
- ``<module>.diff_b``: a delta of ``<module>.bias``, same shape (e.g. ``blocks.N.self_attn.q.diff_b`` [out]);
- ``<module>.diff_m``: a delta of ``<module>.modulation`` (LightX2V's ``blocks.N.diff_m`` [1, 6, dim] for
  the parameter ``blocks.N.modulation``).

A diff is added as it is, times the strength (``param += strength * diff``, as LightX2V's loader and
ComfyUI do): the alpha / rank scale applies to ``up @ down`` only. A module may have a down/up pair, diffs,
or both. (diffusers reads ``.diff_b`` and ``head.head.diff`` the same way but drops the other diffs.)

A `LoraSet` stacks files with a strength each; `apply_loras` merges
``param += sum(strength * (scale * up @ down + diff))`` into the model (computed in float32) and keeps an
exact copy of each parameter it changes (weights, biases, norm weights, modulations), so `remove_loras`
(or applying another set) restores the base parameters bit-exactly without reading the checkpoint again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from wan.dit_keys import dit_state_dict_from_diffusers

__all__ = [
    "LAYOUTS",
    "LoraDiff",
    "LoraFile",
    "LoraModule",
    "LoraSet",
    "applied_loras",
    "apply_loras",
    "check_lora",
    "detect_layout",
    "lora_from_state_dict",
    "random_lora_state_dict",
    "read_lora",
    "remove_loras",
]

LAYOUTS = ("diffusers", "comfyui", "kohya")
_MAX_LISTED = 10
_STATE_ATTR = "_wanflow_lora_state"

# (suffix, role): the parts of one module's entry.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_down.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
    (".diff_m", "diff_m"),
)
_LOW_RANK_ROLES = ("down", "up", "alpha")
# A diff role -> the name of the module's parameter it changes.
_DIFF_PARAMS = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}
_KOHYA_PREFIX = "lora_unet_"
_COMFY_PREFIX = "diffusion_model."
_DIFFUSERS_PREFIX = "transformer."
# Module-name fragments only one naming uses (diffusers' vs the official one).
_DIFFUSERS_NAMES = re.compile(
    r"(^|\.)(attn1|attn2|condition_embedder|proj_out)\.|(^|\.)ffn\.net\.|^proj_out$"
)
_OFFICIAL_NAMES = re.compile(
    r"(^|\.)(self_attn|cross_attn)\.|(^|\.)ffn\.\d|^(text_embedding|time_embedding|time_projection|img_emb)\.|"
    r"^head\.head$|^head$|^blocks\.\d+$|^blocks\.\d+\.norm3$"
)


@dataclass(frozen=True)
class LoraModule:
    """One module's low-rank update: down [r, in], up [out, r]; delta W [out, in] = scale * up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """scale * up @ down in float32: [out, in]."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass(frozen=True)
class LoraDiff:
    """A full delta of one parameter (a ``.diff``, ``.diff_b`` or ``.diff_m`` key): param += strength * delta.

    `delta` has the parameter's shape (a weight's [out, in], a bias's [out], a norm's [dim], a block's
    modulation [1, 6, dim]); `key` is the file's key, for messages.
    """

    key: str
    delta: torch.Tensor


@dataclass(frozen=True)
class LoraFile:
    """A LoRA normalised to our names: low-rank updates {module name: LoraModule} and full deltas
    {parameter name: LoraDiff} (e.g. "blocks.0.self_attn.q.bias", "blocks.0.norm3.weight",
    "blocks.0.modulation"); a module may appear in both.

    `name` is where it came from (a path, for messages); `sha256` identifies its bytes (None when it was
    built from an in-memory state dict) and `layout` is one of `LAYOUTS`.
    """

    name: str
    layout: str
    modules: dict[str, LoraModule]
    sha256: str | None = None
    diffs: dict[str, LoraDiff] = field(default_factory=dict)

    @property
    def parameters(self) -> tuple[str, ...]:
        """The names of the model parameters this file changes (each linear's weight, then the diffs')."""
        return tuple(dict.fromkeys([f"{m}.weight" for m in self.modules] + list(self.diffs)))

    @property
    def identity(self) -> tuple[str, str]:
        """What makes two files the same LoRA: the content hash (or, without one, the object's id)."""
        return (self.name, self.sha256 or f"id:{id(self)}")


@dataclass(frozen=True)
class LoraSet:
    """Several LoRAs, each with a strength; merged together by `apply_loras`."""

    entries: tuple[tuple[LoraFile, float], ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, *entries: tuple[LoraFile, float]) -> LoraSet:
        return cls(tuple((lora, float(strength)) for lora, strength in entries))

    @property
    def identity(self) -> tuple[tuple[tuple[str, str], float], ...]:
        """The set's identity: (file identity, strength) per entry with a non-zero strength, in order."""
        return tuple((lora.identity, strength) for lora, strength in self.entries if strength != 0)


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _split(key: str) -> tuple[str, str] | None:
    """'prefix.module.lora_A.weight' -> ('prefix.module', 'down'), 'prefix.blocks.0.diff_m' ->
    ('prefix.blocks.0', 'diff_m'); None for keys of no known role."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def detect_layout(keys: Iterable[str], name: str = "<state dict>") -> str:
    """A LoRA state dict's layout from its keys: 'diffusers', 'comfyui' or 'kohya' (else ValueError)."""
    keys = list(keys)
    if not keys:
        raise ValueError(f"{name}: the LoRA file is empty")
    if all(k.startswith(_KOHYA_PREFIX) for k in keys):
        return "kohya"
    stems = []
    for key in keys:
        parts = _split(key)
        stem = parts[0] if parts else key
        stems.append(stem.removeprefix(_COMFY_PREFIX).removeprefix(_DIFFUSERS_PREFIX))
    diffusers_like = any(_DIFFUSERS_NAMES.search(s) for s in stems)
    official_like = any(_OFFICIAL_NAMES.search(s) for s in stems)
    if all(k.startswith(_COMFY_PREFIX) for k in keys) and not diffusers_like:
        return "comfyui"
    if all(k.startswith(_DIFFUSERS_PREFIX) for k in keys) and not official_like:
        return "diffusers"
    if not any(k.startswith((_COMFY_PREFIX, _DIFFUSERS_PREFIX, _KOHYA_PREFIX)) for k in keys):
        if diffusers_like and not official_like:
            return "diffusers"
        if official_like and not diffusers_like:
            return "comfyui"
    raise ValueError(
        f"{name}: unknown LoRA layout (expected diffusers 'transformer.blocks.N.attn1.to_q.lora_A.weight', "
        f"ComfyUI 'diffusion_model.blocks.N.self_attn.q.lora_A.weight' or Kohya "
        f"'lora_unet_blocks_N_self_attn_q.lora_down.weight'); keys: {_listed(keys)}"
    )


def _module_name(stem: str, layout: str) -> str | None:
    """A key's module part in `layout` -> our module name (None where it has none)."""
    if layout == "kohya":
        return _kohya_guess(stem.removeprefix(_KOHYA_PREFIX))
    if layout == "comfyui":
        return stem.removeprefix(_COMFY_PREFIX)
    module = stem.removeprefix(_DIFFUSERS_PREFIX)
    (renamed,) = dit_state_dict_from_diffusers({f"{module}.weight": torch.empty(0)})
    return renamed.removesuffix(".weight")


def _diff_target(stem: str, role: str, layout: str) -> str | None:
    """A diff key's module part and role in `layout` -> the name of our parameter it changes (None where it
    has none): ``.diff`` -> ``<module>.weight``, ``.diff_b`` -> ``<module>.bias``, ``.diff_m`` ->
    ``<module>.modulation``."""
    param = _DIFF_PARAMS[role]
    if layout == "diffusers":
        (renamed,) = dit_state_dict_from_diffusers(
            {f"{stem.removeprefix(_DIFFUSERS_PREFIX)}.{param}": torch.empty(0)}
        )
        return renamed
    module = _module_name(stem, layout)
    return None if module is None else f"{module}.{param}"


# Kohya's flat names are unflattened by these official patterns.
_KOHYA_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)$"),
        r"blocks.\1.\2.\3",
    ),
    (re.compile(r"^blocks_(\d+)_ffn_(\d+)$"), r"blocks.\1.ffn.\2"),
    (re.compile(r"^blocks_(\d+)_(norm\d)$"), r"blocks.\1.\2"),
    (re.compile(r"^blocks_(\d+)$"), r"blocks.\1"),  # the block itself: its modulation (``.diff_m``)
    (re.compile(r"^(text_embedding|time_embedding|time_projection)_(\d+)$"), r"\1.\2"),
    (re.compile(r"^img_emb_proj_(\d+)$"), r"img_emb.proj.\1"),
    (re.compile(r"^head_(head|norm)$"), r"head.\1"),
    (re.compile(r"^(head|patch_embedding)$"), r"\1"),
)


def _kohya_guess(flat: str) -> str | None:
    for pattern, replacement in _KOHYA_PATTERNS:
        if pattern.match(flat):
            return pattern.sub(replacement, flat)
    return None


def lora_from_state_dict(
    sd: Mapping[str, torch.Tensor], name: str = "<state dict>", sha256: str | None = None
) -> LoraFile:
    """Normalise a LoRA state dict in any of `LAYOUTS` to {our module name: LoraModule} and
    {our parameter name: LoraDiff}.

    Raises ValueError (naming `name`) for an unknown layout, keys of no known role, a module with a down
    or up matrix missing (an alpha without both), matrices that are not 2-D, a down/up rank mismatch, a
    non-scalar alpha, or keys that match no module of the Wan DiT. A module with diffs only is valid; the
    diffs' shapes are checked against a model by `check_lora`.
    """
    layout = detect_layout(sd.keys(), name)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # stem -> role -> (key, tensor)
    unknown = []
    for key, tensor in sd.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        stem, role = split
        parts.setdefault(stem, {})[role] = (key, tensor)
    if unknown:
        raise ValueError(
            f"{name}: keys of no LoRA role (not lora_A/B, lora_down/up, alpha, diff, diff_b or diff_m): "
            f"{_listed(unknown)}"
        )
    modules: dict[str, LoraModule] = {}
    diffs: dict[str, LoraDiff] = {}
    unmatched = []
    for stem, entry in parts.items():
        for role in _DIFF_PARAMS:
            if role in entry:
                target = _diff_target(stem, role, layout)
                if target is None:
                    unmatched.append(entry[role][0])
                else:
                    diffs[target] = LoraDiff(key=entry[role][0], delta=entry[role][1])
        if not any(role in entry for role in _LOW_RANK_ROLES):
            continue
        missing = [role for role in ("down", "up") if role not in entry]
        if missing:
            raise ValueError(f"{name}: {stem} has no {' or '.join(missing)} matrix")
        down, up = entry["down"][1], entry["up"][1]
        if down.ndim != 2 or up.ndim != 2:
            raise ValueError(
                f"{name}: {stem}: LoRA matrices must be 2-D, found down {tuple(down.shape)}, "
                f"up {tuple(up.shape)}"
            )
        if down.shape[0] != up.shape[1]:
            raise ValueError(
                f"{name}: {stem}: rank does not fit: down {tuple(down.shape)} has rank {down.shape[0]}, "
                f"up {tuple(up.shape)} expects rank {up.shape[1]}"
            )
        scale = 1.0
        if "alpha" in entry:
            alpha = entry["alpha"][1]
            if alpha.numel() != 1:
                raise ValueError(f"{name}: {stem}.alpha must be a scalar, found shape {tuple(alpha.shape)}")
            scale = float(alpha.float().item()) / down.shape[0]
        module = _module_name(stem, layout)
        if module is None:
            unmatched.append(stem)
            continue
        modules[module] = LoraModule(down=down, up=up, scale=scale)
    if unmatched:
        raise ValueError(f"{name}: LoRA keys that match no module of the Wan DiT: {_listed(unmatched)}")
    return LoraFile(name=name, layout=layout, modules=modules, sha256=sha256, diffs=diffs)


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA .safetensors file in any of `LAYOUTS` (see `lora_from_state_dict`)."""
    data = Path(path).read_bytes()
    try:
        sd = load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file: {error}") from error
    return lora_from_state_dict(sd, name=str(path), sha256=hashlib.sha256(data).hexdigest())


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _width_of(param: str, delta: torch.Tensor) -> int | None:
    """The model width a diff implies: a self-attention projection weight's inputs [out, in] -> in, or a
    modulation's last dimension [1, 6, dim] -> dim; None for other parameters."""
    if delta.ndim == 2 and re.search(r"(^|\.)self_attn\.[qkvo]\.weight$", param):
        return int(delta.shape[1])
    if delta.ndim >= 1 and re.search(r"(^|\.)blocks\.\d+\.modulation$", param):
        return int(delta.shape[-1])
    return None


def check_lora(model: nn.Module, lora: LoraFile) -> None:
    """Check that every module of `lora` is a linear layer of `model` with the shape its matrices imply, and
    that every diff changes a parameter of `model` of exactly its shape.

    Raises ValueError naming the file: for a LoRA made for another model width (both widths given), for
    modules or parameters the model lacks (listed; e.g. the weight of a norm without affine parameters), or
    for a shape that does not fit (key, expected, found).
    """
    linears = _linear_modules(model)
    width = getattr(getattr(model, "cfg", None), "dim", None)
    if width is not None:
        for module, entry in lora.modules.items():
            if re.search(r"(^|\.)self_attn\.[qkvo]$", module) and entry.down.shape[1] != width:
                raise ValueError(
                    f"{lora.name}: LoRA made for a model of width {entry.down.shape[1]} ({module} takes "
                    f"{entry.down.shape[1]} inputs); this model is {width} wide"
                )
        for param, diff in lora.diffs.items():
            implied = _width_of(param, diff.delta)
            if implied is not None and implied != width:
                raise ValueError(
                    f"{lora.name}: LoRA made for a model of width {implied} ({diff.key} has shape "
                    f"{list(diff.delta.shape)}); this model is {width} wide"
                )
    unmatched = [m for m in lora.modules if m not in linears]
    if unmatched:
        raise ValueError(f"{lora.name}: LoRA keys that match no module of this model: {_listed(unmatched)}")
    params = dict(model.named_parameters())
    absent = [f"{diff.key} ({param})" for param, diff in lora.diffs.items() if param not in params]
    if absent:
        raise ValueError(
            f"{lora.name}: LoRA diff keys for parameters this model does not have (key (parameter)): "
            f"{_listed(absent)}"
        )
    for module, entry in lora.modules.items():
        expected = tuple(linears[module].weight.shape)  # [out, in]
        found = (int(entry.up.shape[0]), int(entry.down.shape[1]))
        if found != expected:
            raise ValueError(
                f"{lora.name}: shape does not fit for {module}: expected [out, in] = {list(expected)}, found "
                f"down {list(entry.down.shape)} / up {list(entry.up.shape)} (= {list(found)})"
            )
    for param, diff in lora.diffs.items():
        expected = tuple(params[param].shape)
        if tuple(diff.delta.shape) != expected:
            raise ValueError(
                f"{lora.name}: shape does not fit for {param} ({diff.key}): expected {list(expected)}, "
                f"found {list(diff.delta.shape)}"
            )


@dataclass
class _MergeState:
    """What `apply_loras` leaves on a model: exact base copies of the changed parameters (by parameter name)
    and the applied set."""

    base: dict[str, torch.Tensor]
    identity: tuple
    loras: LoraSet


def _as_set(loras: LoraSet | Sequence[tuple[LoraFile, float]]) -> LoraSet:
    return loras if isinstance(loras, LoraSet) else LoraSet.of(*loras)


def applied_loras(model: nn.Module) -> LoraSet:
    """The LoRA set merged into `model` now (empty when none)."""
    state: _MergeState | None = getattr(model, _STATE_ATTR, None)
    return state.loras if state is not None else LoraSet()


@torch.no_grad()
def remove_loras(model: nn.Module) -> None:
    """Restore every parameter `apply_loras` changed to its exact base value (a no-op when none is merged)."""
    state: _MergeState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return
    params = dict(model.named_parameters())
    for name, base in state.base.items():
        params[name].copy_(base)
    delattr(model, _STATE_ATTR)


@torch.no_grad()
def apply_loras(
    model: nn.Module,
    loras: LoraSet | Sequence[tuple[LoraFile, float]],
    keep_base_on: torch.device | str = "cpu",
) -> None:
    """Merge a LoRA set into `model`'s parameters: a linear's weight W [out, in] += sum(strength * scale *
    up @ down), and every parameter with diffs (weights, biases, norm weights, modulations [1, 6, dim])
    += sum(strength * diff), the diff of the parameter's shape.

    Every file is checked against the model before anything changes. A set already merged is left as it
    is; any other set first restores the base parameters (bit-exactly) and is then merged onto them.
    Parameter by parameter (so only one float32 update of one parameter exists at a time), the sum of the
    updates is computed in float32 on the parameter's device, added to the float32 base and cast to the
    parameter's dtype. Entries of strength 0 change nothing. The exact base copies of the changed parameters
    are kept on `keep_base_on` (the CPU by default, so that a GPU holds no second copy of the model).
    """
    lora_set = _as_set(loras)
    for lora, _ in lora_set.entries:
        check_lora(model, lora)
    state: _MergeState | None = getattr(model, _STATE_ATTR, None)
    if state is not None and state.identity == lora_set.identity:
        return
    remove_loras(model)
    active = [(lora, strength) for lora, strength in lora_set.entries if strength != 0]
    targets = list(dict.fromkeys(p for lora, _ in active for p in lora.parameters))
    if not targets:
        return
    params = dict(model.named_parameters())
    base: dict[str, torch.Tensor] = {}
    for name in targets:
        param = params[name]
        merged = param.float()  # a new tensor unless the parameter is float32
        if merged is param:
            merged = merged.clone()
        module = name.removesuffix(".weight") if name.endswith(".weight") else None
        for lora, strength in active:
            entry = lora.modules.get(module) if module is not None else None
            if entry is not None:
                up = entry.up.to(param.device, torch.float32)
                down = entry.down.to(param.device, torch.float32)
                merged.addmm_(up, down, alpha=strength * entry.scale)
            diff = lora.diffs.get(name)
            if diff is not None:  # strength * diff rounded first, then added: exactly param + strength * diff
                merged.add_(diff.delta.to(param.device, torch.float32, copy=True).mul_(strength))
        base[name] = param.detach().to(keep_base_on, copy=True)
        param.copy_(merged.to(param.dtype))
    setattr(model, _STATE_ATTR, _MergeState(base=base, identity=lora_set.identity, loras=lora_set))


def random_lora_state_dict(
    model: nn.Module, *, rank: int = 4, seed: int = 0, scale: float = 0.1,
    pattern: str = r"\.self_attn\.[qkvo]$",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A random LoRA for `model` in the ComfyUI layout (for tests, benchmarks and demos): every linear layer
    whose name matches `pattern` (default: the self-attention projections) gets down [rank, in] ~ N(0, 1)
    and up [out, rank] ~ N(0, scale^2), drawn from a CPU generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, linear in _linear_modules(model).items():
        if re.search(pattern, name):
            out_features, in_features = linear.weight.shape
            sd[f"{_COMFY_PREFIX}{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=g)
            sd[f"{_COMFY_PREFIX}{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * scale
    if not sd:
        raise ValueError(f"no linear layer of the model matches {pattern!r}")
    return sd
