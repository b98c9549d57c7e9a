"""Platform settings, from `WANFLOW_*` environment variables (or a `.env` file) with embedded defaults.

| variable | default | meaning |
|---|---|---|
| `WANFLOW_CATALOG_URL` | `.wanflow/catalog.db` found upwards | the catalog (SQLite or PostgreSQL URL) |
| `WANFLOW_STORAGE_ROOT` | `outputs` | where videos go: a directory or any fsspec URL (`s3://bucket/prefix`) |
| `WANFLOW_MODEL` | unset | the run's model when `--model` is not given (random weights only by name) |
| `WANFLOW_JOB_TIMEOUT_S` | `7200` | a job still running after this long fails its attempt (retried) |
| `WANFLOW_STORAGE_OPTIONS` | `{}` | JSON fsspec options for that root |
| `WANFLOW_S3_ENDPOINT_URL` | unset | S3-compatible endpoint (MinIO, a local test server) |
| `WANFLOW_STORAGE_CONNECT_TIMEOUT_S` / `_READ_TIMEOUT_S` | `10` / `60` | every storage call's timeouts |
| `WANFLOW_S3_PART_SIZE` | `5242880` | part size of streamed S3 uploads (smaller videos: one PUT) |
| `WANFLOW_INPUT_STORAGE_OPTIONS` | unset | JSON map protocol -> fsspec options for inputs outside the root |
| `WANFLOW_INPUT_ROOTS` | manifest's folder + root | JSON list of URL prefixes images may be read from |
| `WANFLOW_CHECKPOINTS` | `{}` | JSON map of model (preset) name to checkpoint directory on the workers |
| `WANFLOW_DEVICE` / `WANFLOW_DTYPE` | auto | where the model runs (`cuda`, `cpu`); its dtype (`bfloat16`) |
| `WANFLOW_SHARD_DEPLOYMENT` | unset | run shards on this deployment (`generate-shard/generate-shard`) |
| `WANFLOW_JOB_RETRIES` | `3` | retries of a job after a transient failure (I/O, storage, CUDA) |
| `WANFLOW_RETRY_DELAY_S` | `10` | first retry delay; doubles each retry, with jitter |
| `WANFLOW_LARGE_MANIFEST_BYTES` | `67108864` | larger manifests are split with dask, never loaded whole |
| `WANFLOW_CLAIM_TIMEOUT_S` | `21600` | a claim older than this whose worker never reported is requeued |
| `WANFLOW_GPU_HOUR_PRICE` | unset | price of one GPU-hour: `wanflow catalog stats` then shows costs |
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

Locations are stated once: a local storage root becomes an absolute path, and so does a SQLite catalog's
file. Without `WANFLOW_CATALOG_URL`, the catalog is the first `.wanflow/catalog.db` found in the working
directory or a directory above it (as git finds `.git`), else `./.wanflow/catalog.db`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from storage.faults import with_timeouts
from storage.urls import absolute_url, has_secret, protocol, redact

__all__ = [
    "CATALOG_DIR", "Settings", "SettingsProblem", "check_secret_free", "default_catalog_path", "get_settings",
    "parameter_safe",
]  # fmt: skip

CATALOG_DIR = ".wanflow"
CATALOG_FILE = "catalog.db"


def default_catalog_path(start: Path | None = None) -> Path:
    """The embedded catalog: the nearest `.wanflow/catalog.db` in `start` (default: the working directory)
    or above it; else `start/.wanflow/catalog.db` (created by the first run)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CATALOG_DIR / CATALOG_FILE
        if candidate.is_file():
            return candidate
    return here / CATALOG_DIR / CATALOG_FILE


def _default_catalog_url() -> str:
    return f"sqlite:///{default_catalog_path()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WANFLOW_", env_file=".env", extra="ignore")

    catalog_url: str = Field(default_factory=_default_catalog_url)
    storage_root: str = "outputs"
    model: str | None = None
    job_timeout_s: float = Field(2 * 3600, gt=0)
    storage_connect_timeout_s: float = Field(10.0, gt=0)
    storage_read_timeout_s: float = Field(60.0, gt=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    input_storage_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    input_roots: list[str] | None = None
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
    gpu_hour_price: float | None = Field(None, ge=0, allow_inf_nan=False)
    ulysses_size: int | None = Field(None, ge=1)
    ring_size: int | None = Field(None, ge=1)
    cfg_parallel: bool | None = None
    dit_zero3: bool = False
    t5_zero3: bool = False
    deepspeed_config: str | None = None
    offload_model: bool = False
    t5_cpu: bool = False
    vae_tiling: str | None = None
    # Text-video similarity of each video (`outputs.clip_score`): the official CLIP file, or a folder holding
    # it (an image-to-video checkpoint), with its `xlm-roberta-large/` tokenizer folder beside it.
    clip_score: str | None = None
    clip_score_device: str | None = None  # default: WANFLOW_DEVICE (or the GPU) on one-GPU workers, else CPU

    @field_validator("storage_root")
    @classmethod
    def _absolute_root(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the storage root is empty")
        return absolute_url(value)

    @field_validator("catalog_url")
    @classmethod
    def _absolute_catalog(cls, value: str) -> str:
        """A SQLite catalog's relative path is taken from the working directory, once."""
        head, sep, path = value.partition(":///")
        if sep and head.split("+")[0] == "sqlite" and path and not path.startswith(("/", ":memory:")):
            path, _, query = path.partition("?")
            resolved = str(Path(path).expanduser().resolve())
            return f"{head}:///{resolved}" + (f"?{query}" if query else "")
        return value

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
        # connect and read timeouts on every call (a value set in the options themselves wins)
        return with_timeouts(
            options, url, connect=self.storage_connect_timeout_s, read=self.storage_read_timeout_s
        )


class SettingsProblem(ValueError):
    """A `WANFLOW_*` setting (or an override) that cannot be used; the message names it."""


def get_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with explicit overrides (for instance from command-line flags).
    A bad value raises SettingsProblem naming the variable and what it takes."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"][:1]) or "settings"
            problems.append(f"WANFLOW_{name.upper()}: {error['msg']}")
        raise SettingsProblem("; ".join(problems)) from None
    except SettingsError as exc:  # a JSON-valued variable that is not JSON
        import re

        field = re.search(r'field "(\w+)"', str(exc))
        name = f"WANFLOW_{field[1].upper()}" if field else "a WANFLOW_* variable"
        cause = redact(str(exc.__cause__)) if exc.__cause__ else "cannot be parsed"
        raise SettingsProblem(f"{name}: expected JSON ({cause})") from None


def _secret_in_url(url: str) -> bool:
    if has_secret(url):
        return True
    if "://" not in url:
        return False
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a database URL: redact's patterns were the whole check
        return False
    return bool(parsed.password) or any("password" in key.lower() for key in parsed.query)


def check_secret_free(catalog_url: str | None, **urls: str | None) -> None:
    """Refuse a URL holding a credential (a password in the userinfo or in the query, a signature) as a
    flow parameter: Prefect stores flow parameters and shows them in its UI. Such URLs belong in the
    workers' environment (WANFLOW_CATALOG_URL, WANFLOW_STORAGE_ROOT) or in ~/.pgpass."""
    named = {"catalog_url": catalog_url, **urls}
    for name, url in named.items():
        if url and _secret_in_url(url):
            variable = {"catalog_url": "WANFLOW_CATALOG_URL (or ~/.pgpass)", "out": "WANFLOW_STORAGE_ROOT",
                        "storage_root": "WANFLOW_STORAGE_ROOT"}.get(name, "the environment")  # fmt: skip
            raise ValueError(
                f"{name} {redact(url)!r} holds a credential, and flow parameters are stored in Prefect and "
                f"shown in its UI: set {variable} instead"
            )


def parameter_safe(url: str | None) -> str | None:
    """`url` if it may travel as a flow parameter (no credential in it), else None: the receiving flow
    then reads it from its own environment."""
    return url if url and not _secret_in_url(url) else None
