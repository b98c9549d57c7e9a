"""Text-video similarity (`wan.clip_score.ClipScorer`) against open_clip_torch on tiny random weights.

The reference runs in its own process (tests/clip_reference.py, with the open_clip site `make venv` installs
off the main path): it builds a tiny `CustomTextCLIP` like open_clip's xlm-roberta-large-ViT-H-14 (ViT tower,
Hugging Face XLM-RoBERTa text tower, mean pooling, MLP projection), randomises every weight, and embeds frames
and prompts its own way (its preprocessing, its tokenizer wrapper). Here its weights are written in the
official Wan layout (`visual.*`, `textual.*`, `log_scale`: the file the image-to-video checkpoints ship) and
read back with `ClipScorer.from_official`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from stream_helpers import record_stream

from wan.clip_score import (
    CLIP_TOKENIZER_DIR,
    ClipScorer,
    build_tiny_clip_tokenizer,
    clean_prompt,
    textual_config_from_official,
)
from wan.weights import CheckpointError

OPENCLIP_SITE = Path(sys.prefix) / "openclip-site"
REFERENCE = Path(__file__).with_name("clip_reference.py")
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
TEXT = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}
VISION = {"image_size": 28, "patch_size": 14, "width": 32, "layers": 2, "head_width": 8, "mlp_ratio": 2.0}
EMBED = 16
PROMPTS = ["a red  cat &amp; a dog\n", "  sunset over the sea, slow motion close up shot " * 12]

needs_open_clip = pytest.mark.skipif(
    not (OPENCLIP_SITE / "open_clip").is_dir(),
    reason=f"open_clip's reference site {OPENCLIP_SITE} is missing: `make venv` installs it",
)


def _tiny_text_dir(root: Path) -> tuple[Path, Path]:
    """A tiny XLM-RoBERTa config folder (for open_clip's text tower) and a tokenizer folder."""
    from transformers import XLMRobertaConfig

    tokenizer = build_tiny_clip_tokenizer()
    tok_dir = root / CLIP_TOKENIZER_DIR
    tokenizer.save_pretrained(tok_dir)
    config_dir = root / "xlm-roberta-tiny"
    XLMRobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=80, type_vocab_size=1, pad_token_id=1,
                     layer_norm_eps=1e-5, **TEXT).save_pretrained(config_dir)  # fmt: skip
    return config_dir, tok_dir


def _official_from_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's CustomTextCLIP keys -> the official Wan file's keys (the names Wan's clip.py gives the
    same tensors)."""
    from wan.clip_score import textual_state_dict_to_official

    renames = {"visual.conv1.weight": "visual.patch_embedding.weight", "visual.proj": "visual.head",
               "logit_scale": "log_scale", "text.proj.0.weight": "head.0.weight",
               "text.proj.2.weight": "head.2.weight"}  # fmt: skip
    block = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.to_qkv.weight",
             "attn.in_proj_bias": "attn.to_qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.0",
             "mlp.c_proj": "mlp.2"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in renames:
            out[renames[key]] = value
        elif key == "visual.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif key.startswith(("visual.ln_pre.", "visual.ln_post.")):
            out[key.replace("ln_pre", "pre_norm").replace("ln_post", "post_norm")] = value
        elif key.startswith("visual.transformer.resblocks."):
            rest = key.removeprefix("visual.transformer.resblocks.")
            layer, _, name = rest.partition(".")
            for theirs, ours in block.items():
                if name.startswith(theirs):
                    name = ours + name[len(theirs) :]
                    break
            out[f"visual.transformer.{layer}.{name}"] = value
        elif key.startswith("text.transformer."):
            out["text." + key.removeprefix("text.transformer.")] = value
        else:
            out[key] = value
    return textual_state_dict_to_official(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """open_clip's outputs, its weights in the official layout (the tokenizer folder beside), the frames."""
    root = tmp_path_factory.mktemp("clip")
    config_dir, tok_dir = _tiny_text_dir(root)
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, size=(3, 40, 58, 3), dtype=np.uint8)  # not square: resize and crop
    frames[1] = frames[0] // 2 + 60  # a darker, related frame
    np.save(root / "frames.npy", frames)
    spec = {
        "seed": 3, "embed_dim": EMBED, "vision_cfg": VISION, "context_length": 77, "prompts": PROMPTS,
        "frames": str(root / "frames.npy"),
        "text_cfg": {"hf_model_name": str(config_dir), "hf_tokenizer_name": str(tok_dir),
                     "hf_model_pretrained": False, "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"},
    }  # fmt: skip
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "reference.pt"
    command = [sys.executable, str(REFERENCE), str(OPENCLIP_SITE), str(root / "spec.json"), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = torch.load(out, weights_only=False)
    official = _official_from_open_clip(ref["state_dict"])
    torch.save(official, root / CLIP_FILE)
    return ref, root / CLIP_FILE, frames, official


@needs_open_clip
def test_scores_match_open_clip(reference):
    ref, path, frames, _ = reference
    heads = {"vision_heads": VISION["width"] // VISION["head_width"],
             "text_heads": TEXT["num_attention_heads"]}  # fmt: skip
    scorer = ClipScorer.from_official(path, **heads)  # the tokenizer folder beside the file
    assert torch.equal(scorer.tokens(PROMPTS), ref["ids"])  # same cleaning, same padding and truncation
    assert (scorer.pixel_values(frames) - ref["pixels"]).abs().max().item() <= 1e-6
    image, text = scorer.encode_frames(frames), scorer.encode_text(PROMPTS)
    assert (image - ref["image"]).abs().max().item() <= 1e-5
    assert (text - ref["text"]).abs().max().item() <= 1e-5
    theirs = ref["image"] @ ref["text"][0]
    assert (scorer.similarities(frames, PROMPTS[0]) - theirs).abs().max().item() <= 1e-5
    assert scorer.score(frames, PROMPTS[0]) == pytest.approx(theirs.mean().item(), abs=1e-5)
    one = (ref["image"][0] @ ref["text"][1]).item()
    assert scorer.score(list(frames[:1]), PROMPTS[1]) == pytest.approx(one, abs=1e-5)


@needs_open_clip
def test_the_official_file_is_checked_key_by_key(reference, tmp_path):
    _, path, _, official = reference
    heads = {"vision_heads": 4, "text_heads": 2}
    broken = {k: v for k, v in official.items() if k != "textual.blocks.1.ffn.2.bias"}
    broken["textual.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / CLIP_FILE)
    (tmp_path / CLIP_TOKENIZER_DIR).symlink_to(path.parent / CLIP_TOKENIZER_DIR)
    with pytest.raises(CheckpointError, match=r"textual\.blocks\.1\.ffn\.2\.bias") as info:
        ClipScorer.from_official(tmp_path / CLIP_FILE, **heads)
    assert "textual.extra.weight" in str(info.value) and CLIP_FILE in str(info.value)
    torch.save({k: v for k, v in official.items() if not k.startswith("textual.")}, tmp_path / CLIP_FILE)
    with pytest.raises(CheckpointError, match=r"no 'textual\.\*' keys"):
        ClipScorer.from_official(tmp_path / CLIP_FILE, **heads)
    with pytest.raises(CheckpointError, match="tokenizer directory not found"):
        ClipScorer.from_official(path, tmp_path / "nowhere", **heads)
    # The same weights back under the official names, bit for bit.
    scorer = ClipScorer.from_official(path, **heads)
    assert {k: v.shape for k, v in scorer.official_state_dict().items()} == {
        k: v.shape for k, v in official.items() if k != "log_scale"
    }


def test_prompts_are_cleaned_as_open_clip_cleans_them():
    assert clean_prompt("  a  red\tcat &amp;amp; a dog\n") == "a red cat & a dog"
    assert clean_prompt("caf\u00c3\u00a9 at night") == "caf\u00e9 at night"  # ftfy repairs mojibake
    assert clean_prompt("Keep Case") == "Keep Case"


def test_the_full_size_text_tower_on_the_meta_device():
    """XLM-RoBERTa-large with its head, built from official shapes: 24 layers, 16 heads, E = 1024."""
    from transformers import XLMRobertaConfig

    from wan.image_encoder import clip_vit_h14_config

    large = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                             num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                             type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)  # fmt: skip
    scorer = ClipScorer.from_configs(clip_vit_h14_config(), large, 1024, tokenizer=None, device="meta")
    official = scorer.official_state_dict()
    textual = {k: v for k, v in official.items() if k.startswith("textual.")}
    config, embed = textual_config_from_official(textual)
    shape = (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size, embed)
    assert shape == (24, 16, 4096, 1024)
    assert official["textual.token_embedding.weight"].shape == (250002, 1024)
    assert official["textual.head.0.weight"].shape == (1024, 1024)
    assert official["visual.head"].shape == (1280, 1024)
    text_params = sum(v.numel() for k, v in official.items() if k.startswith("textual."))
    assert 560e6 < text_params < 563e6  # XLM-RoBERTa-large (about 560M) and the 2.1M head


def _tiny_official_file(folder: Path) -> Path:
    """A tiny random CLIP file in the official layout, its tokenizer folder beside it; the widths make the
    head counts the loader infers (80 per head in the ViT, 64 in the text tower) the ones it was made with."""
    from transformers import XLMRobertaConfig

    from wan.image_encoder import tiny_clip_config

    tokenizer = build_tiny_clip_tokenizer()
    text = XLMRobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=80, type_vocab_size=1,
                            pad_token_id=1, layer_norm_eps=1e-5, hidden_size=64, num_hidden_layers=1,
                            num_attention_heads=1, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    vision = tiny_clip_config(hidden_size=80, heads=1, layers=2, intermediate_size=80)
    scorer = ClipScorer.from_configs(vision, text, EMBED, tokenizer=tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({**scorer.official_state_dict(), "log_scale": torch.tensor(4.6)}, folder / CLIP_FILE)
    tokenizer.save_pretrained(folder / CLIP_TOKENIZER_DIR)
    return folder / CLIP_FILE


def test_a_worker_with_a_clip_file_scores_each_video(tmp_path, monkeypatch):
    """WANFLOW_CLIP_SCORE: each video's score, from the frames the poster shows (full size), in the row, the
    sidecar and the export, and filterable; latents-only outputs get none."""
    import flows.shard
    from flows.models import load_clip_scorer, model_source
    from flows.shard import JobContext, run_job
    from storage.catalog import Catalog, JobSpec
    from storage.catalog.filters import parse_filter
    from storage.export import dataset_rows
    from storage.layout import OutputLayout

    path = _tiny_official_file(tmp_path / "i2v-checkpoint")
    with pytest.raises(CheckpointError, match="weight file not found"):
        load_clip_scorer(str(tmp_path / "nowhere.pth"), "cpu")
    scorer = load_clip_scorer(str(path.parent), "cpu")  # a checkpoint folder: the file in it
    assert scorer is load_clip_scorer(str(path), "cpu") and scorer.dtype == torch.float32
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.upgrade()
    source = model_source("tiny-t2v")
    fast = {"size": "64*48", "frame_num": 9, "steps": 2}
    only = {"save_latents": "only"}
    specs = [JobSpec("fox", 1, "tiny-t2v", source.fingerprint, {"prompt": "a red fox", **fast}),
             JobSpec("owl", 2, "tiny-t2v", source.fingerprint, {"prompt": "an owl", **fast, **only})]
    run = catalog.create_run("scored", "m.jsonl", "0" * 64, {})
    catalog.plan_jobs(run.id, specs)
    pipe = flows.shard.load_pipeline(source)
    encoded = record_stream(monkeypatch, pipe)  # the frames handed to the encoder, as they went
    ctx = JobContext(
        catalog=catalog, run_id=run.id, run_name=run.name, source=source, pipeline=pipe,
        layout=OutputLayout(str(tmp_path / "out")), storage_options={}, worker="w", scorer=scorer,
    )  # fmt: skip
    for job in catalog.jobs(run.id):
        encoded.clear()
        assert run_job(ctx, job.id)["status"] == "succeeded"
        frames = np.concatenate(encoded)
        output = catalog.output_of(job.id)
        if job.item_id == "owl":
            assert output.clip_score is None  # latents only: no video to score
            continue
        # 9 frames, 8 kept at most: every other one (0, 2, 4, 6, 8), full size.
        expected = scorer.score(frames[::2], "a red fox")
        assert output.clip_score == pytest.approx(expected, abs=1e-6) and -1 <= output.clip_score <= 1
        sidecar = json.loads(Path(output.sidecar_uri).read_text())
        assert sidecar["signals"]["clip_score"] == output.clip_score
        assert sidecar["signals"]["clip_score_frames"] == 5
    scored = catalog.outputs(run.id, where=parse_filter("clip_score > -2"))
    assert [o.uri.rpartition("/")[2] for o in scored] == ["fox-s1.mp4"]
    rows = {r["item_id"]: r for r in dataset_rows(catalog, run.id)}
    assert rows["fox"]["clip_score"] == scored[0].clip_score and rows["owl"]["clip_score"] is None
    catalog.close()


@pytest.mark.slow
def test_the_batch_flow_scores_with_the_configured_clip_file(tmp_path, monkeypatch):
    """`WANFLOW_CLIP_SCORE` through the batch flow: a file that cannot load fails the shard's jobs with the
    reason (nothing made without its score), then a good one scores every video."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.batch import BatchFailed, generate_batch
    from storage.catalog import Catalog

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"item_id": i, "prompt": f"a {i}", "size": "64*48", "frame_num": 5,
                                            "steps": 2}) + "\n" for i in ("cat", "dog")))  # fmt: skip
    catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(catalog_url).upgrade()
    run = {"model": "tiny-t2v", "out": str(tmp_path / "out"), "catalog_url": catalog_url}
    monkeypatch.setenv("WANFLOW_CLIP_SCORE", str(tmp_path / "missing"))
    monkeypatch.setenv("WANFLOW_JOB_RETRIES", "0")
    with prefect_test_harness(server_startup_timeout=90):
        with pytest.raises(BatchFailed, match=r"CLIP file for scores \(WANFLOW_CLIP_SCORE\) could not"):
            generate_batch(str(manifest), **run)
        monkeypatch.setenv("WANFLOW_CLIP_SCORE", str(_tiny_official_file(tmp_path / "clip").parent))
        summary = generate_batch(str(manifest), **run)
    assert summary["by_status"]["succeeded"] == 2, summary
    with Catalog(catalog_url) as catalog:
        outputs = catalog.outputs(summary["run_id"])
    assert len(outputs) == 2 and all(-1 <= o.clip_score <= 1 for o in outputs)
    sidecar = json.loads(Path(outputs[0].sidecar_uri).read_text())
    assert sidecar["clip_score"]["file"].endswith(CLIP_FILE) and sidecar["clip_score"]["device"] == "cpu"
