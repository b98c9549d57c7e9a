"""Platform settings, from `WANFLOW_*` environment variables (or a `.env` file) with embedded defaults.

| variable | default | meaning |
|---|---|---|
| `WANFLOW_CATALOG_URL` | `sqlite:///.wanflow/catalog.db` | the catalog (SQLite or PostgreSQL URL) |
| `WANFLOW_STORAGE_ROOT` | `outputs` | where videos go: a directory or any fsspec URL (`s3://bucket/prefix`) |
| `WANFLOW_STORAGE_OPTIONS` | `{}` | JSON fsspec options for that root |
| `WANFLOW_S3_ENDPOINT_URL` | unset | S3-compatible endpoint (MinIO, a local test server) |
| `WANFLOW_INPUT_STORAGE_OPTIONS` | unset | JSON map protocol -> fsspec options for inputs outside the root |
| `WANFLOW_CHECKPOINTS` | `{}` | JSON map of model (preset) name to checkpoint directory on the workers |
| `WANFLOW_DEVICE` / `WANFLOW_DTYPE` | auto | where the model runs (`cuda`, `cpu`); its dtype (`bfloat16`) |
| `WANFLOW_SHARD_DEPLOYMENT` | unset | run shards on this deployment (`generate-shard/generate-shard`) |
| `WANFLOW_JOB_RETRIES` | `3` | retries of a job after a transient failure (I/O, storage, CUDA) |
| `WANFLOW_RETRY_DELAY_S` | `10` | first retry delay; doubles each retry, with jitter |
| `WANFLOW_LARGE_MANIFEST_BYTES` | `67108864` | larger manifests are split with dask, never loaded whole |
| `WANFLOW_CLAIM_TIMEOUT_S` | `21600` | a claim older than this whose worker never reported is requeued |
| `WANFLOW_GPUS_PER_JOB` | `1` | GPUs (processes) per video: above 1, a shard starts one `torchrun` group |
| `WANFLOW_ULYSSES_SIZE` / `WANFLOW_RING_SIZE` | auto | that group's context-parallel layout |
| `WANFLOW_CFG_PARALLEL` | auto | conditional and unconditional passes on separate halves (auto: when even) |
| `WANFLOW_DIT_ZERO3` / `WANFLOW_T5_ZERO3` | `false` | shard the DiT's / text encoder's weights (ZeRO-3) |
| `WANFLOW_DEEPSPEED_CONFIG` | built in | DeepSpeed JSON (`infra/deepspeed/zero3-inference.json`) |
| `WANFLOW_OFFLOAD_MODEL` | `false` | GPU memory: each model on the GPU only while it runs |
| `WANFLOW_T5_CPU` | `false` | GPU memory: the text encoder runs on the CPU |
| `WANFLOW_VAE_TILING` | off | tiled VAE decode, `TILE:OVERLAP` in latent cells (`on` = 32:8) |

S3 credentials come from the usual AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_PROFILE`, ...), read by the S3 client itself; they are never stored in the catalog or sidecars.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.urls import protocol, redact

__all__ = ["Settings", "check_secret_free", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WANFLOW_", env_file=".env", extra="ignore")

    catalog_url: str = "sqlite:///.wanflow/catalog.db"
    storage_root: str = "outputs"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    input_storage_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    s3_endpoint_url: str | None = None
    checkpoints: dict[str, str] = Field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    shard_deployment: str | None = None
    job_retries: int = Field(3, ge=0, le=20)
    retry_delay_s: float = Field(10.0, ge=0)
    claim_timeout_s: float = Field(6 * 3600, gt=0)
    large_manifest_bytes: int = Field(64 << 20, ge=0)
    gpus_per_job: int = Field(1, ge=1, le=1024)
    ulysses_size: int | None = Field(None, ge=1)
    ring_size: int | None = Field(None, ge=1)
    cfg_parallel: bool | None = None
    dit_zero3: bool = False
    t5_zero3: bool = False
    deepspeed_config: str | None = None
    offload_model: bool = False
    t5_cpu: bool = False
    vae_tiling: str | None = None

    def memory_options(self) -> dict[str, Any]:
        """This worker's default GPU-memory options (a run's `memory` parameter overrides them)."""
        return {"offload_model": self.offload_model, "t5_cpu": self.t5_cpu, "vae_tiling": self.vae_tiling}

    def parallel_layout(self) -> dict[str, Any]:
        """The worker group's layout flags (`flows.group_worker`), for jobs on `gpus_per_job` > 1."""
        return {"ulysses_size": self.ulysses_size, "ring_size": self.ring_size,
                "cfg_parallel": self.cfg_parallel, "dit_zero3": self.dit_zero3, "t5_zero3": self.t5_zero3,
                "deepspeed_config": self.deepspeed_config}  # fmt: skip

    def resolved_storage_options(self) -> dict[str, Any]:
        """fsspec options for the storage root, with the S3 endpoint folded in when set."""
        return self.storage_options_for(self.storage_root)

    def storage_options_for(self, url: str) -> dict[str, Any]:
        """fsspec options for any URL, plus the S3 endpoint for s3:// URLs when one is set: the root's own
        options under the storage root; elsewhere `input_storage_options[protocol]` when set (inputs in
        another bucket or account, e.g. {"s3": {"profile": "inputs"}}), else the root's options when the
        URL is on the same kind of storage."""
        root = self.storage_root.rstrip("/")
        under_root = url.rstrip("/") == root or url.startswith(root + "/")
        if not under_root and protocol(url) in self.input_storage_options:
            options = dict(self.input_storage_options[protocol(url)])
        else:
            options = dict(self.storage_options) if protocol(url) == protocol(self.storage_root) else {}
        if self.s3_endpoint_url and protocol(url) == "s3":
            client = dict(options.get("client_kwargs") or {})
            client.setdefault("endpoint_url", self.s3_endpoint_url)
            options["client_kwargs"] = client
        return options


def get_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with explicit overrides (for instance from command-line flags)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def check_secret_free(catalog_url: str | None) -> None:
    """Refuse a catalog URL holding a password as a flow parameter: Prefect stores flow parameters and
    shows them in its UI. The password belongs in the workers' environment (or ~/.pgpass)."""
    if not catalog_url or "://" not in catalog_url:
        return
    from sqlalchemy.engine import make_url

    try:
        password = make_url(catalog_url).password
    except Exception:  # not a database URL: Catalog reports that with its own message
        return
    if password:
        raise ValueError(
            f"catalog_url {redact(catalog_url)!r} holds a password, and flow parameters are stored in "
            "Prefect and shown in its UI: set WANFLOW_CATALOG_URL (or use ~/.pgpass) instead"
        )
