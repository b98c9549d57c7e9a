"""ZeRO-3 weight sharding: config checks with clear errors, and a sharded DiT in 2 gloo processes that holds
half the weights per rank and gives the unsharded output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_utils import run_gloo
from twins import randomise_dit

from wan.configs import get_preset
from wan.distributed.zero3 import DEFAULT_CONFIG, load_config, partition_stats, shard_zero3, validate_config
from wan.model import WanModel

INFRA = Path(__file__).parents[1] / "infra" / "deepspeed" / "zero3-inference.json"


def test_default_and_infra_configs_are_valid():
    assert load_config()["zero_optimization"]["stage"] == 3
    infra = load_config(INFRA)
    assert infra["zero_optimization"]["stage3_param_persistence_threshold"] == 1_000_000
    assert DEFAULT_CONFIG["zero_optimization"]["stage"] == 3  # validation copies, never edits


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([1, 2], "expected a JSON object, got list"),
        ({"zero_optimization": {"stage": 2}}, "'zero_optimization.stage' must be 3 (weight sharding), got 2"),
        ({"zero_optimization": 3}, "'zero_optimization' must be an object"),
        ({"optimizer": {"type": "Adam"}}, "'optimizer' is a training setting"),
        ({"bf16": {"enabled": True}}, "'bf16.enabled' must be false"),
        ({"zero_optimization": {"stage3_prefetch_bucket_size": -1}}, "stage3_prefetch_bucket_size' must be"),
        ({"zero_optimization": {"offload_param": {"device": "gpu"}}}, "offload_param.device' must be none"),
        ({"zero_optimization": {"memory_efficient_linear": True}}, "memory_efficient_linear' must be false"),
    ],
)
def test_bad_configs_name_the_key(config, message):
    with pytest.raises(ValueError, match=r"^my\.json: ") as info:
        validate_config(config, "my.json")
    assert message in str(info.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.json'?: cannot read it"):
        load_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(ValueError, match=r"broken\.json', line 2 column 36: not valid JSON"):
        load_config(broken)


def test_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        shard_zero3(torch.nn.Linear(2, 2))


def _model(dtype: torch.dtype) -> tuple[WanModel, tuple]:
    torch.manual_seed(0)
    model = WanModel(get_preset("tiny-t2v").dit).eval().cast(dtype)
    with torch.no_grad():
        randomise_dit(model, 1)
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_dim, 3, 6, 6, generator=g)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    return model, (x, torch.tensor([999.0, 420.0]), context)


def _worker(rank: int, world_size: int, workdir: Path) -> None:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for threshold in (0, None):  # every parameter sharded; the default (tiny ones kept whole)
            model, inputs = _model(dtype)
            with torch.no_grad():
                expected = model(*inputs)
            config = json.loads(json.dumps(DEFAULT_CONFIG))
            if threshold is not None:
                config["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
            linear = torch.nn.functional.linear
            handle = shard_zero3(model, config)
            assert torch.nn.functional.linear is linear  # nothing replaced process-wide
            with torch.no_grad():
                outs = [handle.module(*inputs) for _ in range(2)]  # the second forward replays the trace
            stats = partition_stats(handle.module)
            stats = (stats.total, stats.local, stats.persistent)  # plain values: torch.load is weights-only
            dtypes = {name: str(p.ds_tensor.dtype) for name, p in handle.module.named_parameters()}
            results[(str(dtype), threshold)] = (expected, outs, stats, dtypes)
            handle.release()
    torch.save(results, workdir / f"rank{rank}.pt")


@pytest.mark.distributed
def test_zero3_dit_world2(tmp_path):
    ranks = run_gloo(_worker, 2, tmp_path)
    for rank, results in enumerate(ranks):
        for (dtype, threshold), (expected, outs, (total, local, persistent), dtypes) in results.items():
            for out in outs:
                torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
            if threshold == 0:
                assert persistent == 0 and 0.5 <= local / total <= 0.51, (rank, local, total)
            else:
                assert persistent == local == total  # 161k parameters, each below 100k: kept whole
            if dtype == "torch.bfloat16":  # DeepSpeed kept the pipeline's mixed dtypes
                assert dtypes["blocks.0.modulation"] == "torch.float32"
                assert dtypes["blocks.0.self_attn.q.weight"] == "torch.bfloat16"
                assert dtypes["time_embedding.0.weight"] == "torch.float32"
