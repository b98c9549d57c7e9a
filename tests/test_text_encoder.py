"""umT5 text encoder: parity with transformers' UMT5EncoderModel, official key mapping, loaders, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, UMT5EncoderModel

from wan.text_encoder import (
    WanTextEncoder,
    build_tiny_tokenizer,
    clean_text,
    load_tokenizer,
    t5_config_from_official,
    t5_state_dict_from_official,
    t5_state_dict_to_official,
    tiny_t5_config,
)
from wan.weights import CheckpointError

TEXT_LEN = 48
NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
PROMPTS = [
    "A red fox runs through fresh snow at dawn, slow motion, close up shot",
    "cat",
    "",
    NEG_PROMPT,
    "the quick brown dog jumps over the lazy sea " * 20,  # longer than TEXT_LEN: truncated
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(256)


@pytest.fixture(scope="module")
def config():
    return tiny_t5_config(vocab_size=256, d_model=32, num_layers=2, num_heads=4, d_ff=64)


@pytest.fixture(scope="module")
def encoder(config, tokenizer):
    return WanTextEncoder.from_config(config, tokenizer, seed=0, text_len=TEXT_LEN)


def _reference(model: UMT5EncoderModel, tokenizer, prompts: list[str], text_len: int):
    """transformers run directly: hidden states [B, L, D] and the attention mask [B, L]."""
    batch = tokenizer(
        [clean_text(p) for p in prompts],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return out, batch["input_ids"], batch["attention_mask"]


# ---------------------------------------------------------------------------------------------------
# Parity with transformers


def test_encode_matches_transformers_and_trims_to_true_length(encoder, tokenizer):
    ref, ids, mask = _reference(encoder.model, tokenizer, PROMPTS, TEXT_LEN)
    outs = encoder.encode(PROMPTS)
    assert len(outs) == len(PROMPTS)
    lengths = [len(u) for u in outs]
    for i, u in enumerate(outs):
        n = int((ids[i] != tokenizer.pad_token_id).sum())  # non-pad tokens, EOS included
        assert n == lengths[i] == int(mask[i].sum())
        assert ids[i, n - 1] == tokenizer.eos_token_id
        assert u.shape == (n, 32) and u.dtype == torch.float32
        torch.testing.assert_close(u, ref[i, :n], rtol=0, atol=0)
    assert lengths[1] == 2  # "▁cat" is one piece, + EOS
    assert lengths[2] == 1  # empty prompt: EOS only
    assert lengths[4] == TEXT_LEN  # truncated, EOS kept at the end
    assert len(set(lengths)) >= 4  # a batch of different true lengths


def test_encode_padded_is_trimmed_output_zero_padded(encoder):
    outs = encoder.encode(PROMPTS)
    padded = encoder.encode_padded(PROMPTS)
    assert padded.shape == (len(PROMPTS), TEXT_LEN, 32)
    for i, u in enumerate(outs):
        assert torch.equal(padded[i, : len(u)], u)
        assert torch.count_nonzero(padded[i, len(u) :]) == 0


def test_encode_single_string_and_batch_independence(encoder):
    single = encoder.encode(PROMPTS[0])
    batch = encoder.encode(PROMPTS)
    assert len(single) == 1
    torch.testing.assert_close(single[0], batch[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no prompts"):
        encoder.encode([])


def test_encoder_properties_and_seed(encoder, config, tokenizer):
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32
    assert encoder.to("cpu") is encoder
    assert not encoder.model.training
    assert encoder.model.config._attn_implementation == "eager"
    again = WanTextEncoder.from_config(config, tokenizer, seed=0, text_len=TEXT_LEN)
    other = WanTextEncoder.from_config(config, tokenizer, seed=1, text_len=TEXT_LEN)
    w = encoder.model.encoder.block[0].layer[0].SelfAttention.q.weight
    assert torch.equal(again.model.encoder.block[0].layer[0].SelfAttention.q.weight, w)
    assert not torch.equal(other.model.encoder.block[0].layer[0].SelfAttention.q.weight, w)


# ---------------------------------------------------------------------------------------------------
# Official layout


def _official_keys(num_layers: int) -> set[str]:
    per_block = [
        "norm1.weight",
        "attn.q.weight",
        "attn.k.weight",
        "attn.v.weight",
        "attn.o.weight",
        "norm2.weight",
        "ffn.gate.0.weight",
        "ffn.fc1.weight",
        "ffn.fc2.weight",
        "pos_embedding.embedding.weight",
    ]
    keys = {"token_embedding.weight", "norm.weight"}
    keys |= {f"blocks.{i}.{k}" for i in range(num_layers) for k in per_block}
    return keys


def test_key_mapping_round_trip(encoder):
    hf_sd = encoder.model.state_dict()
    official = t5_state_dict_to_official(hf_sd)
    assert set(official) == _official_keys(2)
    assert official["blocks.1.pos_embedding.embedding.weight"].shape == (32, 4)
    ffn = "encoder.block.0.layer.1.DenseReluDense"
    assert official["blocks.0.ffn.gate.0.weight"] is hf_sd[f"{ffn}.wi_0.weight"]  # the GELU-gated branch
    assert official["blocks.0.ffn.fc1.weight"] is hf_sd[f"{ffn}.wi_1.weight"]
    back = t5_state_dict_from_official(official)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k
    assert back["shared.weight"] is back["encoder.embed_tokens.weight"]


def test_config_from_official_tiny_and_full_size(encoder, config):
    inferred = t5_config_from_official(t5_state_dict_to_official(encoder.model.state_dict()))
    for field in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers"):
        assert getattr(inferred, field) == getattr(config, field), field
    assert inferred.relative_attention_num_buckets == 32
    assert inferred.feed_forward_proj == "gated-gelu" and inferred.dense_act_fn == "gelu_new"
    assert inferred.layer_norm_epsilon == 1e-6 and inferred.relative_attention_max_distance == 128
    assert inferred.dropout_rate == 0.0

    # umT5-XXL from meta tensors of the real shapes (nothing allocated).
    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=torch.bfloat16)

    real = {"token_embedding.weight": meta(256384, 4096), "norm.weight": meta(4096)}
    for i in range(24):
        real |= {
            f"blocks.{i}.attn.q.weight": meta(4096, 4096),
            f"blocks.{i}.ffn.fc1.weight": meta(10240, 4096),
            f"blocks.{i}.pos_embedding.embedding.weight": meta(32, 64),
        }
    xxl = t5_config_from_official(real)
    assert (xxl.vocab_size, xxl.d_model, xxl.num_heads, xxl.d_kv) == (256384, 4096, 64, 64)
    assert (xxl.d_ff, xxl.num_layers, xxl.relative_attention_num_buckets) == (10240, 24, 32)
    with torch.device("meta"):
        model = UMT5EncoderModel(xxl)
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    assert 5.6e9 < n_params < 5.8e9


def _write_official(model: UMT5EncoderModel, path: Path, dtype=torch.bfloat16, edit=None) -> Path:
    sd = {k: v.to(dtype).clone() for k, v in t5_state_dict_to_official(model.state_dict()).items()}
    if edit is not None:
        edit(sd)
    torch.save(sd, path)
    return path


def test_from_official_bf16_matches_source_model(encoder, tokenizer, tmp_path):
    pth = _write_official(encoder.model, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    loaded = WanTextEncoder.from_official(pth, tokenizer, text_len=TEXT_LEN)
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}  # `wo` too, as upstream
    assert loaded.model.shared.weight is loaded.model.encoder.embed_tokens.weight
    assert not any(p.is_meta for p in loaded.model.parameters())
    # Reference: the source model cast to bf16.
    ref_model = WanTextEncoder.from_config(encoder.model.config, tokenizer, seed=0, text_len=TEXT_LEN).model
    ref_model.to(torch.bfloat16)
    ref, _, _ = _reference(ref_model, tokenizer, PROMPTS, TEXT_LEN)
    for i, u in enumerate(loaded.encode(PROMPTS)):
        assert u.dtype == torch.bfloat16
        torch.testing.assert_close(u, ref[i, : len(u)], rtol=0, atol=0)
    # An explicit dtype casts on load; fp32 from the bf16 file stays close to the fp32 source.
    as_fp32 = WanTextEncoder.from_official(pth, tokenizer, dtype=torch.float32, text_len=TEXT_LEN)
    assert as_fp32.dtype == torch.float32
    for a, b in zip(as_fp32.encode(PROMPTS), encoder.encode(PROMPTS), strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_from_diffusers_layout(encoder, tokenizer, tmp_path):
    te_dir, tok_dir = tmp_path / "text_encoder", tmp_path / "tokenizer"
    encoder.model.save_pretrained(te_dir)
    tokenizer.save_pretrained(tok_dir)
    loaded = WanTextEncoder.from_diffusers(te_dir, tok_dir, text_len=TEXT_LEN)
    assert loaded.dtype == torch.float32
    for a, b in zip(loaded.encode(PROMPTS), encoder.encode(PROMPTS), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        WanTextEncoder.from_diffusers(tmp_path / "tokenizer", tokenizer)


# ---------------------------------------------------------------------------------------------------
# Tokenizer and cleaning


def test_tiny_tokenizer_conventions_and_round_trip(tokenizer, tmp_path):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    texts = [clean_text(p) for p in PROMPTS] + ["Ünïcödé ✓ 🙂 \t\n", "   "]
    ids = tokenizer(texts)["input_ids"]
    for row in ids:
        assert row[-1] == 1 and all(0 <= t < 256 for t in row)
    assert 2 in tokenizer(NEG_PROMPT)["input_ids"]  # Chinese characters map to <unk>
    tokenizer.save_pretrained(tmp_path)
    for again in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert again(texts)["input_ids"] == ids
        kwargs = {"padding": "max_length", "truncation": True, "max_length": TEXT_LEN}
        assert again(texts, **kwargs)["input_ids"] == tokenizer(texts, **kwargs)["input_ids"]
    small = build_tiny_tokenizer(40)
    assert max(max(r) for r in small(texts)["input_ids"]) < 40


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A &amp;amp; B", "A & B"),  # unescaped twice
        ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
        ("cafÃ©", "café"),  # UTF-8 read as Latin-1, repaired by ftfy
        ("The Mona Lisa doesnÃ¢â‚¬â„¢t smile", "The Mona Lisa doesn't smile"),
        ("  a\t\tb \n c  ", "a b c"),
        ("x\u00a0\u3000y", "x y"),
        ("", ""),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_from_official_missing_file(tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth"):
        WanTextEncoder.from_official(tmp_path / "nope.pth", tokenizer)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda sd: sd.pop("blocks.1.ffn.fc1.weight"), "blocks.1.ffn.fc1.weight"),
        (lambda sd: sd.__setitem__("blocks.1.attn.k.weight", torch.zeros(16, 32)), "blocks.1.attn.k.weight"),
        (lambda sd: sd.__setitem__("blocks.0.extra.weight", torch.zeros(3)), "blocks.0.extra.weight"),
        (lambda sd: sd.pop("blocks.0.attn.q.weight"), "blocks.0.attn.q.weight"),
        (lambda sd: sd.pop("token_embedding.weight"), "token_embedding.weight"),
    ],
    ids=["missing", "wrong-shape", "unexpected", "missing-config-key", "missing-embedding"],
)
def test_from_official_bad_checkpoint_names_file_and_key(encoder, tokenizer, tmp_path, edit, key):
    pth = _write_official(encoder.model, tmp_path / "bad_t5.pth", edit=edit)
    with pytest.raises(CheckpointError) as info:
        WanTextEncoder.from_official(pth, tokenizer)
    assert "bad_t5.pth" in str(info.value) and key in str(info.value)
