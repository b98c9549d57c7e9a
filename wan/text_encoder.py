"""umT5-XXL text encoder: transformers' `UMT5EncoderModel` behind the official Wan 2.1 interface.

The official file `models_t5_umt5-xxl-enc-bf16.pth` uses its own key names; `t5_state_dict_from_official`
and `t5_state_dict_to_official` translate them to and from the transformers layout, and
`t5_config_from_official` reads the architecture off the tensor shapes. `WanTextEncoder.encode` cleans
the prompts, tokenizes them to `text_len` tokens (EOS appended, padded), runs the encoder with the
attention mask and trims each output to its true length, as the official code does.

Shapes: `B` prompts, `L = text_len` (512), `D = d_model` (4096 for umT5-XXL), `L_i` = tokens of prompt
`i` including EOS.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import ftfy
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from wan.configs import TextEncoderConfig
from wan.weights import CheckpointError, check_state_dict, load_strict, read_state_dict, tensor_shape

__all__ = [
    "WanTextEncoder",
    "build_tiny_tokenizer",
    "clean_text",
    "load_tokenizer",
    "t5_config_from_official",
    "t5_state_dict_from_official",
    "t5_state_dict_to_official",
    "text_encoder_dtype",
    "tiny_t5_config",
]


def text_encoder_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype umT5 runs in when the rest of a pipeline runs in `dtype`: float16 becomes bfloat16, any
    other dtype is kept.

    umT5's activations outgrow float16's range (max 65504: the official T5 carries an fp16 clamping helper,
    transformers clamps its T5 hidden states in fp16 and keeps the FFN output layer in float32), and the
    official code always runs the encoder in bf16 (`t5_dtype`), whatever the DiT's dtype.
    """
    return torch.bfloat16 if dtype == torch.float16 else dtype


# ---------------------------------------------------------------------------------------------------
# Text cleaning


def clean_text(text: str) -> str:
    """Official `clean='whitespace'`: ftfy repair, HTML-unescape twice, strip, collapse whitespace runs.

    (ftfy already drops the ASCII separators U+001C..U+001F, the only characters where `re`'s `\\s`
    and the `regex` module used upstream disagree.)
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------------
# Official <-> transformers key mapping

# Per-block suffixes: official `blocks.{i}.<key>` <-> transformers `encoder.block.{i}.<key>`.
# The official FFN is `fc2(fc1(x) * gelu_tanh(gate(x)))`; transformers' gated FFN activates `wi_0`.
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEYS_INV = {v: k for k, v in _BLOCK_KEYS.items()}
_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")
# transformers keeps the embedding twice (tied): `shared` and the encoder stack's own `embed_tokens`.
_HF_EMBED = ("shared.weight", "encoder.embed_tokens.weight")


def t5_state_dict_from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official umT5 encoder keys -> `UMT5EncoderModel` keys (tensors are shared, not copied).

    `token_embedding.weight` [V, D] becomes both `shared.weight` and `encoder.embed_tokens.weight` (the
    same tensor). Keys that are not part of the official layout pass through unchanged, so a strict load
    reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "token_embedding.weight":
            for name in _HF_EMBED:
                out[name] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _OFFICIAL_BLOCK.fullmatch(key)) and m.group(2) in _BLOCK_KEYS:
            out[f"encoder.block.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}"] = value
        else:
            out[key] = value
    return out


def t5_state_dict_to_official(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`UMT5EncoderModel` keys -> official umT5 encoder keys (the inverse of `t5_state_dict_from_official`).

    The encoder's own `encoder.embed_tokens.weight` is preferred for `token_embedding.weight`, falling
    back to `shared.weight`. Unknown keys pass through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_sd.items():
        if key in _HF_EMBED:
            if key == "encoder.embed_tokens.weight" or "encoder.embed_tokens.weight" not in hf_sd:
                out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif (m := _HF_BLOCK.fullmatch(key)) and m.group(2) in _BLOCK_KEYS_INV:
            out[f"blocks.{m.group(1)}.{_BLOCK_KEYS_INV[m.group(2)]}"] = value
        else:
            out[key] = value
    return out


def _umt5_config(**sizes: int) -> UMT5Config:
    """A `UMT5Config` with the umT5 settings Wan uses (gated tanh-GELU, eps 1e-6, max distance 128)."""
    return UMT5Config(
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        tie_word_embeddings=False,
        **sizes,
    )


def t5_config_from_official(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> UMT5Config:
    """Infer the `UMT5Config` of an official-layout encoder state dict from its tensor shapes.

    vocab_size, d_model from `token_embedding.weight` [V, D]; num_layers from the `blocks.{i}` indices;
    relative_attention_num_buckets, num_heads from `blocks.0.pos_embedding.embedding.weight` [buckets,
    heads]; d_kv = rows of `blocks.0.attn.q.weight` / heads; d_ff from `blocks.0.ffn.fc1.weight` [F, D].
    Raises `CheckpointError` naming `source` and the key when one of these is missing or inconsistent.
    """

    shape = functools.partial(tensor_shape, sd, source=source, needed_for="to infer the umT5 config")

    vocab_size, d_model = shape("token_embedding.weight", 2)
    layers = {int(m.group(1)) for k in sd if (m := _OFFICIAL_BLOCK.fullmatch(k))}
    if not layers:
        raise CheckpointError(f"{source}: no 'blocks.{{i}}.*' keys, not a umT5 encoder state dict")
    num_buckets, num_heads = shape("blocks.0.pos_embedding.embedding.weight", 2)
    inner_dim = shape("blocks.0.attn.q.weight", 2)[0]
    if inner_dim % num_heads:
        raise CheckpointError(
            f"{source}: 'blocks.0.attn.q.weight' has {inner_dim} rows, not divisible by {num_heads} heads"
        )
    d_ff = shape("blocks.0.ffn.fc1.weight", 2)[0]
    return _umt5_config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        num_heads=num_heads,
        d_ff=d_ff,
        num_layers=max(layers) + 1,
        num_decoder_layers=max(layers) + 1,
        relative_attention_num_buckets=num_buckets,
    )


def tiny_t5_config(
    vocab_size: int = 256, d_model: int = 32, num_layers: int = 2, num_heads: int = 4, d_ff: int = 64
) -> UMT5Config:
    """A small umT5 config for tests and tiny presets (d_kv = d_model / num_heads, 32 buckets)."""
    return _umt5_config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        num_heads=num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        relative_attention_num_buckets=32,
    )


# ---------------------------------------------------------------------------------------------------
# Tokenizers

_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
_TINY_TEXT = (
    "the a an of and in on at to with is are by for from over under into its his her their this that man "
    "woman person people child dog cat bird horse car city street road night day sun sunset sky sea beach "
    "water forest mountain snow rain light camera video slow motion close up shot view walking running "
    "flying dancing playing sitting standing red blue green white black yellow golden bright dark "
    "beautiful old young small large quality static blurred details style worst low"
)
_TINY_WORDS = tuple(_TINY_TEXT.split())


def build_tiny_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A deterministic offline tokenizer with T5 conventions, for tests and the tiny demo.

    Unigram model over a generated vocabulary: `<pad>`=0, `</s>`=1, `<unk>`=2, the word marker `▁`,
    printable ASCII characters, `▁`+letter, then common English words, cut at `vocab_size` pieces.
    Sentencepiece-style Metaspace pre-tokenization; NFKC normalization; `</s>` appended by the
    post-processor. Characters outside the vocabulary (e.g. Chinese) become `<unk>` (runs fused), so
    every string tokenizes. All ids are < `vocab_size`.
    """
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be at least 4 (3 special tokens and '▁'), got {vocab_size}")
    pieces = ["▁", *(chr(c) for c in range(33, 127)), *(f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    pieces += [f"▁{w}" for w in _TINY_WORDS if f"▁{w}" not in pieces]
    pieces = pieces[: vocab_size - 3]
    # Log-probabilities favouring longer pieces, so words win over their characters.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -10.0 + len(p)) for p in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    )


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory (e.g. the checkpoint's `google/umt5-xxl/`) with `AutoTokenizer`, offline."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer directory not found")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # any loader failure, reported with the directory name
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------------------------------
# The encoder


class WanTextEncoder:
    """umT5 encoder + tokenizer with the official Wan prompt handling.

    `model` is a `UMT5EncoderModel` (switched to eval mode, no grad and transformers' eager attention),
    `tokenizer` any HF tokenizer with T5 conventions (pad 0, EOS appended), `text_len` the padded token
    length (512 in Wan 2.1). Eager attention takes the softmax in float32 like the official T5, so a
    bf16 model reproduces the official encoder bit for bit (SDPA differs by a few bf16 ulps); every
    constructor therefore runs the same attention path and gives identical outputs for identical weights.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = 512):
        model.set_attn_implementation("eager")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def dim(self) -> int:
        """d_model, the width D of the outputs."""
        return self.model.config.d_model

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Self:
        """Move (and optionally cast) the model in place; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenize: ids [B, L] int64 and mask [B, L] (1 on tokens incl. EOS, 0 on padding)."""
        texts = [clean_text(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        if not texts:
            raise ValueError("no prompts to encode")
        batch = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> list[torch.Tensor]:
        """Encode prompts; returns one [L_i, D] tensor per prompt, trimmed to its true length (incl. EOS).

        The encoder runs on all L positions with the attention mask (padded keys are masked out).
        """
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths, strict=True)]

    def encode_padded(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Encode and zero-pad the trimmed outputs back to L: [B, L, D] (what the DiT consumes)."""
        outs = self.encode(prompts)
        padded = torch.zeros(len(outs), self.text_len, self.dim, device=self.device, dtype=outs[0].dtype)
        for i, u in enumerate(outs):
            padded[i, : u.shape[0]] = u
        return padded

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_official(
        cls,
        pth_path: str | Path,
        tokenizer_dir: str | Path | PreTrainedTokenizerBase,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        text_len: int = 512,
    ) -> WanTextEncoder:
        """Load `models_t5_umt5-xxl-enc-bf16.pth` (or any official-layout encoder file).

        The config is read off the tensor shapes; the model is built on the meta device and takes the
        file's tensors directly (no random init). `dtype=None` keeps the stored dtype (bf16 for the real
        file); every weight, `wo` included, gets the same dtype, as in the official code. Errors name the
        file and the official key.
        """
        tokenizer = _as_tokenizer(tokenizer_dir)  # fail fast, before touching the weights
        source = str(pth_path)
        sd = read_state_dict(pth_path)
        config = t5_config_from_official(sd, source=source)
        target = dtype or sd["token_embedding.weight"].dtype
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        model.to(target)
        expected = {k: v.shape for k, v in t5_state_dict_to_official(model.state_dict()).items()}
        check_state_dict(expected, sd, source)
        sd = {k: v.to(target) for k, v in sd.items()}  # cast once: the embedding tensor stays shared
        load_strict(model, t5_state_dict_from_official(sd), source)
        model.set_input_embeddings(model.shared)  # re-tie shared / encoder.embed_tokens after assign
        return cls(model, tokenizer, text_len).to(device)

    @classmethod
    def from_diffusers(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path | PreTrainedTokenizerBase,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        text_len: int = 512,
    ) -> WanTextEncoder:
        """Load a diffusers `text_encoder/` directory (a transformers `UMT5EncoderModel` save), offline.

        `dtype=None` keeps the stored dtype. (transformers keeps the FFN output `wo` in float32 only when
        loading in float16; bf16 applies to every weight.)
        """
        path = Path(text_encoder_dir)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a transformers model directory (no config.json)")
        try:
            model = UMT5EncoderModel.from_pretrained(str(path), dtype=dtype or "auto", local_files_only=True)
        except Exception as exc:  # any loader failure, reported with the directory name
            reason = f"{type(exc).__name__}: {exc}"
            raise CheckpointError(f"{path}: cannot load UMT5EncoderModel ({reason})") from exc
        return cls(model, _as_tokenizer(tokenizer_dir), text_len).to(device)

    @classmethod
    def from_config(
        cls,
        config: UMT5Config,
        tokenizer: PreTrainedTokenizerBase,
        *,
        seed: int = 0,
        text_len: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WanTextEncoder:
        """Random weights (transformers' T5 init) drawn from `seed`, without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(config)
        return cls(model.to(dtype), tokenizer, text_len).to(device)

    @classmethod
    def random(
        cls, size: TextEncoderConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> WanTextEncoder:
        """A random-weight encoder of `size` (`wan.configs.TextEncoderConfig`) with the tiny offline tokenizer
        (`build_tiny_tokenizer`), for tiny presets and benchmarks."""
        config = tiny_t5_config(vocab_size=size.vocab_size, d_model=size.d_model, num_layers=size.num_layers,
                                num_heads=size.num_heads, d_ff=size.d_ff)  # fmt: skip
        return cls.from_config(config, build_tiny_tokenizer(size.vocab_size), seed=seed, dtype=dtype)


def _as_tokenizer(tokenizer: str | Path | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    return tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else load_tokenizer(tokenizer)
