"""Text-video similarity with open-clip's xlm-roberta-large-ViT-H-14: a quality signal of generated videos.

The CLIP file of Wan's image-to-video checkpoints, `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`,
holds both towers of that model: `visual.*`, the ViT-H/14 whose penultimate block conditions image-to-video
(`wan.image_encoder`), and `textual.*`, an XLM-RoBERTa-large whose mean-pooled output goes through a two-layer
head. `ClipScorer` runs both the way open_clip does: a frame is resized (bicubic, shortest side) and
centre-cropped to 224, normalised with the OpenAI CLIP mean/std, and embedded as `ln_post(CLS) @ proj`; a
prompt is cleaned (ftfy, HTML entities, whitespace), tokenized to 77 tokens and embedded as the head of the
mean over its non-pad tokens. A video's score for its prompt is the mean, over some of its frames, of the
cosine similarity of the two embeddings (-1 to 1, higher for a closer match).

Towers: transformers' `CLIPVisionModelWithProjection` (the visual keys translated by `wan.image_encoder`) and
`XLMRobertaModel` (`textual_state_dict_from_official` below); both read their architecture off the tensor
shapes. The tokenizer is the checkpoint's `xlm-roberta-large/` folder, read offline.

Shapes: frames [n, H, W, 3] uint8; pixel values [n, 3, S, S] (S = 224); tokens [B, L] (L = 77); embeddings
[B, E] (E = 1024 for the real model), unit length.
"""

from __future__ import annotations

import copy
import functools
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionModelWithProjection, XLMRobertaConfig, XLMRobertaModel

from wan.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    clip_config_from_official,
    clip_state_dict_from_official,
    clip_state_dict_to_official,
)
from wan.text_encoder import load_tokenizer
from wan.weights import (
    CheckpointError,
    check_state_dict,
    load_strict,
    read_state_dict,
    restore_meta_buffers,
    tensor_shape,
)

__all__ = [
    "CLIP_TOKENIZER_DIR",
    "CONTEXT_LENGTH",
    "ClipScorer",
    "build_tiny_clip_tokenizer",
    "clean_prompt",
    "textual_config_from_official",
    "textual_state_dict_from_official",
    "textual_state_dict_to_official",
]

CONTEXT_LENGTH = 77  # open_clip's token length for this model (its text config names none: the default)
CLIP_TOKENIZER_DIR = "xlm-roberta-large"  # the tokenizer folder beside the CLIP file in the checkpoints
_TEXT_HEAD_DIM = 64  # XLM-RoBERTa-large: 1024 wide, 16 heads; the head count is not in the weights
_PAD_ID = 1  # XLM-RoBERTa's <pad>: masked out, and the base of the position ids

# ---------------------------------------------------------------------------------------------------
# Official `textual.*` <-> transformers `XLMRobertaModel` (+ our `head.*`)

_TEXT_TOP = {
    "textual.token_embedding.weight": "text.embeddings.word_embeddings.weight",
    "textual.type_embedding.weight": "text.embeddings.token_type_embeddings.weight",
    "textual.pos_embedding.weight": "text.embeddings.position_embeddings.weight",
    "textual.norm.weight": "text.embeddings.LayerNorm.weight",  # post-norm model: applied to the embeddings
    "textual.norm.bias": "text.embeddings.LayerNorm.bias",
    "textual.head.0.weight": "head.0.weight",  # [M, D], M = (D + E) / 2, no bias
    "textual.head.2.weight": "head.2.weight",  # [E, M]
}
_TEXT_TOP_INV = {v: k for k, v in _TEXT_TOP.items()}
_TEXT_BLOCK = {
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "ffn.0": "intermediate.dense",
    "ffn.2": "output.dense",
    "norm2": "output.LayerNorm",
}
_TEXT_BLOCK_INV = {v: k for k, v in _TEXT_BLOCK.items()}
_OFFICIAL_TEXT_BLOCK = re.compile(r"textual\.blocks\.(\d+)\.(.+)\.(weight|bias)")
_OURS_TEXT_BLOCK = re.compile(r"text\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")


def _renamed(
    key: str, top: Mapping[str, str], block: re.Pattern[str], modules: Mapping[str, str], prefix: str
) -> str:
    """`key` under the other naming: a whole-tensor rename from `top`, or a block key (`block` matching
    layer, module, kind) with its module renamed by `modules` under `prefix`.{layer}; else `key` itself."""
    if key in top:
        return top[key]
    if (m := block.fullmatch(key)) and m.group(2) in modules:
        layer, module, kind = m.groups()
        return f"{prefix}.{layer}.{modules[module]}.{kind}"
    return key


def textual_state_dict_from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official `textual.*` keys -> `ClipScorer` text keys (`text.*`: an `XLMRobertaModel`; `head.*`).

    Whole-tensor renames; keys of neither tower's text part (`visual.*`, `log_scale`) are dropped, any other
    `textual.*` key passes through unchanged, so a strict load reports it.
    """
    return {_renamed(key, _TEXT_TOP, _OFFICIAL_TEXT_BLOCK, _TEXT_BLOCK, "text.encoder.layer"): value
            for key, value in sd.items() if key.startswith("textual.")}  # fmt: skip


def textual_state_dict_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ClipScorer` text keys (`text.*`, `head.*`) -> official `textual.*` keys (the inverse of the above);
    other keys pass through unchanged."""
    return {_renamed(key, _TEXT_TOP_INV, _OURS_TEXT_BLOCK, _TEXT_BLOCK_INV, "textual.blocks"): value
            for key, value in sd.items()}  # fmt: skip


def textual_config_from_official(
    sd: Mapping[str, torch.Tensor], source: str = "state dict", num_heads: int | None = None
) -> tuple[XLMRobertaConfig, int]:
    """The `XLMRobertaConfig` of an official text tower and its embedding size E, read off the shapes:
    vocabulary and width from `token_embedding` [V, D], positions from `pos_embedding` [P, D], token types
    from `type_embedding` [T, D], layers from the `blocks.{i}` indices, the MLP width from `ffn.0` [I, D],
    E from `head.2` [E, M]. `num_heads=None`: D / 64 (XLM-RoBERTa-large: 16). `CheckpointError` names
    `source` and the key when one is missing or has the wrong number of dimensions."""

    shape = functools.partial(tensor_shape, sd, source=source, needed_for="to read the CLIP text tower")

    vocab, width = shape("textual.token_embedding.weight", 2)
    positions = shape("textual.pos_embedding.weight", 2)[0]
    types = shape("textual.type_embedding.weight", 2)[0]
    layers = {int(m.group(1)) for k in sd if (m := _OFFICIAL_TEXT_BLOCK.fullmatch(k))}
    if not layers:
        raise CheckpointError(f"{source}: no 'textual.blocks.{{i}}.*' keys: the file has no CLIP text tower")
    intermediate = shape("textual.blocks.0.ffn.0.weight", 2)[0]
    embed = shape("textual.head.2.weight", 2)[0]
    heads = num_heads or max(1, width // _TEXT_HEAD_DIM)
    if width % heads:
        raise CheckpointError(f"{source}: text width {width} is not divisible by {heads} attention heads")
    config = XLMRobertaConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=max(layers) + 1, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=positions, type_vocab_size=types,
        pad_token_id=_PAD_ID, layer_norm_eps=1e-5, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return config, embed


# ---------------------------------------------------------------------------------------------------
# Prompts and frames as open_clip prepares them


def build_tiny_clip_tokenizer(vocab_size: int = 256) -> Any:
    """A deterministic offline tokenizer with XLM-RoBERTa's conventions, for tests and tiny checkpoints:
    `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then the pieces of `wan.text_encoder.build_tiny_tokenizer`;
    `<s> ... </s>` around each text. All ids are < `vocab_size`."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    from wan.text_encoder import build_tiny_tokenizer

    base = build_tiny_tokenizer(vocab_size - 1)._tokenizer  # <pad>, </s>, <unk>, pieces...
    pieces = [(piece, score) for piece, score in json.loads(base.to_str())["model"]["vocab"][3:]]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces][:vocab_size]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = base.normalizer, base.pre_tokenizer, base.decoder
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        padding_side="right",
    )  # fmt: skip


def clean_prompt(text: str) -> str:
    """open_clip's "whitespace" cleaning: ftfy's fixes, HTML entities unescaped (twice), whitespace runs
    collapsed to one space, ends stripped (case kept)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip()


def _resize_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the shortest side resized to `size` (PIL bicubic, the long
    side int(size * long / short)), then the centre crop (offsets rounded half to even, as torchvision)."""
    image = Image.fromarray(np.ascontiguousarray(frame[..., :3]))
    width, height = image.size
    if (width, height) != (size, size):
        tall = width <= height
        new = (size, int(size * height / width)) if tall else (int(size * width / height), size)
        image = image.resize(new, Image.Resampling.BICUBIC)
        width, height = image.size
    top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    return np.asarray(image)[top : top + size, left : left + size]


# ---------------------------------------------------------------------------------------------------
# The scorer


class ClipScorer(nn.Module):
    """Both CLIP towers and the tokenizer: `score(frames, prompt)` -> mean cosine similarity.

    `vision` is a complete `CLIPVisionModelWithProjection`, `text` an `XLMRobertaModel` without pooler,
    `head` the text projection (Linear D->M, GELU, Linear M->E, no biases). Eval mode, no grad.
    """

    def __init__(
        self, vision: CLIPVisionModelWithProjection, text: XLMRobertaModel, head: nn.Sequential,
        tokenizer: Any, context_length: int = CONTEXT_LENGTH,
    ) -> None:  # fmt: skip
        super().__init__()
        self.vision, self.text, self.head = vision, text, head
        self.tokenizer, self.context_length = tokenizer, context_length
        self.source: str | None = None  # the file it was loaded from
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.head[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head[0].weight.dtype

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def pixel_values(self, frames: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 frames [n, H, W, 3] (or a list of [H, W, 3]) -> normalised pixels [n, 3, S, S] float32."""
        arrays = [np.asarray(f) for f in frames]
        if not arrays or any(a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8 for a in arrays):
            raise ValueError("expected uint8 frames [n, H, W, 3] with n >= 1")
        crops = np.stack([_resize_crop(a, self.image_size) for a in arrays])
        pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        """Cleaned prompts -> token ids [B, L]: padded / truncated to `context_length`, as open_clip does."""
        return self.tokenizer(
            [clean_prompt(p) for p in prompts], return_tensors="pt", max_length=self.context_length,
            padding="max_length", truncation=True,
        ).input_ids  # fmt: skip

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 frames [n, H, W, 3] -> unit image embeddings [n, E] float32."""
        pixels = self.pixel_values(frames).to(self.device, self.dtype)
        embeds = self.vision(pixel_values=pixels).image_embeds
        return F.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> unit text embeddings [B, E] float32 (the mean over non-pad tokens, then the
        head)."""
        ids = ids.to(self.device)
        mask = ids.ne(self.text.config.pad_token_id).long()
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return F.normalize(self.head(pooled).float(), dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> unit text embeddings [B, E] float32."""
        return self.encode_ids(self.tokens(prompts))

    def similarities(self, frames: np.ndarray | Sequence[np.ndarray], prompt: str) -> torch.Tensor:
        """Cosine similarity of each frame with the prompt: [n] float32 in [-1, 1]."""
        return self.encode_frames(frames) @ self.encode_text([prompt])[0]

    def score(self, frames: np.ndarray | Sequence[np.ndarray], prompt: str) -> float:
        """The video's text-video similarity: the mean of `similarities` over the given frames."""
        return float(self.similarities(frames, prompt).mean())

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_official(
        cls,
        path: str | Path,
        tokenizer: str | Path | Any | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        vision_heads: int | None = None,
        text_heads: int | None = None,
        context_length: int = CONTEXT_LENGTH,
    ) -> ClipScorer:
        """Load the official CLIP file (both towers; `log_scale` is not needed for cosines) and its tokenizer
        (a folder, default `xlm-roberta-large/` beside the file, or a tokenizer object). Architectures come
        from the tensor shapes (head counts: `vision_heads` default width / 80, `text_heads` width / 64).
        Every key of both towers is checked: one `CheckpointError` names the file and the missing, unexpected
        or mis-shaped official keys. `dtype=None` keeps the stored dtype."""
        source = str(path)
        sd = read_state_dict(path)
        visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
        textual = {k: v for k, v in sd.items() if k.startswith("textual.")}
        if not textual:
            raise CheckpointError(f"{source}: no 'textual.*' keys: the file has no CLIP text tower to score")
        vision_config = clip_config_from_official(visual, source=source, num_heads=vision_heads)
        text_config, embed = textual_config_from_official(textual, source=source, num_heads=text_heads)
        target = dtype or visual["visual.patch_embedding.weight"].dtype
        scorer = cls.from_configs(vision_config, text_config, embed, tokenizer=None, device="meta")
        scorer.to(target)
        vision_keys = {k: v.shape for k, v in clip_state_dict_to_official(scorer.vision.state_dict()).items()}
        text_keys = {k: v.shape for k, v in textual_state_dict_to_official(scorer._text_state()).items()}
        check_state_dict({**vision_keys, **text_keys}, {**visual, **textual}, source)
        load_strict(scorer.vision, clip_state_dict_from_official(visual), source)
        theirs = textual_state_dict_from_official(textual)
        for name, module in (("text", scorer.text), ("head", scorer.head)):
            part = {k.removeprefix(f"{name}."): v for k, v in theirs.items() if k.startswith(f"{name}.")}
            load_strict(module, part, source)
        restore_meta_buffers(scorer)
        if tokenizer is None:
            tokenizer = Path(path).parent / CLIP_TOKENIZER_DIR
        scorer.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
        scorer.context_length, scorer.source = context_length, source
        return scorer.to(device)

    @classmethod
    def from_configs(
        cls, vision_config: Any, text_config: XLMRobertaConfig, embed_dim: int, *, tokenizer: Any,
        device: str | torch.device = "cpu",
    ) -> ClipScorer:  # fmt: skip
        """Both towers with random weights (`device="meta"`: shapes only), for tests and loading. The
        configs are copied (SDPA attention set on the copies)."""
        vision_config, text_config = copy.deepcopy(vision_config), copy.deepcopy(text_config)
        vision_config._attn_implementation = "sdpa"
        text_config._attn_implementation = "sdpa"
        width = text_config.hidden_size
        middle = (width + embed_dim) // 2
        with torch.device(device):
            vision = CLIPVisionModelWithProjection(vision_config)
            text = XLMRobertaModel(text_config, add_pooling_layer=False)
            head = nn.Sequential(nn.Linear(width, middle, bias=False), nn.GELU(),
                                 nn.Linear(middle, embed_dim, bias=False))  # fmt: skip
        return cls(vision, text, head, tokenizer)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Both towers under the official keys (`visual.*`, `textual.*`; no `log_scale`)."""
        return {**clip_state_dict_to_official(self.vision.state_dict()),
                **textual_state_dict_to_official(self._text_state())}  # fmt: skip

    def _text_state(self) -> dict[str, torch.Tensor]:
        return {**{f"text.{k}": v for k, v in self.text.state_dict().items()},
                **{f"head.{k}": v for k, v in self.head.state_dict().items()}}  # fmt: skip
