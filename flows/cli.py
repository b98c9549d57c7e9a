"""The `wanflow` command.

    wanflow generate MANIFEST --model M [--ckpt-dir D] [--out URL] [--catalog-url URL] [--seeds N]
                     [--shard-size N] [--skip-invalid] [--dry-run]    generate a manifest's videos
    wanflow validate MANIFEST                       check a manifest, listing every bad row
    wanflow demo                                    the bundled example manifest on the embedded defaults
    wanflow catalog upgrade                         bring the catalog database to the current schema
    wanflow catalog runs                            recent runs
    wanflow catalog jobs --run R --status failed    jobs of a run (by id or name), optionally by status
    wanflow catalog outputs --run R                 videos of a run
    wanflow catalog show JOB                        one job with its output
    wanflow catalog stats [--run R]                 counts by status, bytes, GPU seconds
    wanflow catalog export --run R --format parquet --to s3://bucket/datasets/r.parquet
    wanflow dataset export --to URL [--format webdataset|hf] [--run R]... [--where EXPR] [--drop-duplicates]

Every listing prints a table, or JSON with `--json`. The catalog and storage locations come from
`WANFLOW_*` settings (see flows/settings.py) unless `--catalog-url` is given; every command says on
standard error which catalog it opened. Bad input of any kind ends in one line naming the option,
variable or file and what it takes (exit code 1 or 2), never a traceback. Ctrl-C stops `generate` within
seconds (exit code 130): the job in flight goes back to pending, the run is marked cancelled (in Prefect
too), and running the same command again resumes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.settings import SettingsProblem, get_settings
from flows.terminal import quiet_prefect
from storage.catalog import MAX_ID, Catalog, CatalogError
from storage.catalog.filters import FILTER_FIELDS, Condition, parse_filter
from storage.export import EXPORT_FORMATS, export_run
from storage.urls import redact

if TYPE_CHECKING:
    from flows.manifest import RunDefaults
    from flows.planning import BatchPlan

app = typer.Typer(
    help="wanflow: bulk video generation with Wan 2.1.", no_args_is_help=True, pretty_exceptions_enable=False
)
catalog_app = typer.Typer(
    help="Query and maintain the catalog of runs, jobs and outputs.", no_args_is_help=True
)
app.add_typer(catalog_app, name="catalog")

_console = Console()
_err = Console(stderr=True, soft_wrap=True)
CatalogUrl = Annotated[
    str | None,
    typer.Option("--catalog-url", "--catalog_url", "--catalog", help="overrides WANFLOW_CATALOG_URL"),
]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]
RunRef = Annotated[str | None, typer.Option("--run", help="run id or name")]


def _fail(message: str) -> typer.Exit:
    _err.print(f"[red]error:[/red] {escape(redact(message))}", highlight=False)
    return typer.Exit(code=1)


def _settings(**overrides: Any):
    """The settings, or one line naming the bad variable."""
    try:
        return get_settings(**overrides)
    except SettingsProblem as exc:
        raise _fail(str(exc)) from exc


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite catalog URL (None for other databases and in-memory ones)."""
    head, sep, path = url.partition(":///")
    if not sep or head.split("+")[0] != "sqlite" or not path or path.startswith(":memory:"):
        return None
    return Path(path.split("?", 1)[0])


def _open(catalog_url: str | None, *, check_schema: bool = True, create: bool = False) -> Catalog:
    """Open the catalog, saying which on standard error. A SQLite file that does not exist is not created
    (reading commands would leave an empty `.wanflow/` behind) unless `create`."""
    url = _settings(catalog_url=catalog_url).catalog_url
    _err.print(f"catalog: {escape(redact(url))}", highlight=False, style="dim")
    file = _sqlite_file(url)
    if file is not None and not create and not file.exists():
        raise _fail(
            f"no catalog at {file}: run `wanflow generate` (or `wanflow catalog upgrade`) there first, "
            "pass --catalog-url, or set WANFLOW_CATALOG_URL"
        )
    try:
        catalog = Catalog(url)
        if check_schema:
            catalog.check_schema()
        return catalog
    except CatalogError as exc:
        raise _fail(str(exc)) from exc


def _run_id(catalog: Catalog, run: str | None) -> int | None:
    if run is None:
        return None
    record = catalog.get_run(run)
    if record is None:
        raise _fail(f"no run {run!r} in the catalog")
    return record.id


def _emit(rows: list[dict[str, Any]], as_json: bool, columns: list[str], title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    _console.print(table)


@catalog_app.command()
def upgrade(catalog_url: CatalogUrl = None) -> None:
    """Create the catalog or migrate it to the current schema."""
    url = _settings(catalog_url=catalog_url).catalog_url
    file = _sqlite_file(url)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    catalog = _open(catalog_url, check_schema=False, create=True)
    try:
        catalog.upgrade()
    except CatalogError as exc:
        raise _fail(str(exc)) from exc
    _console.print(f"catalog at {redact(catalog.url)} is up to date")


Limit = Annotated[int, typer.Option(min=1, max=MAX_ID, help="how many at most")]


@catalog_app.command()
def runs(catalog_url: CatalogUrl = None, limit: Limit = 50, as_json: AsJson = False) -> None:
    """Recent runs, newest first. Runs whose process died on this host are marked crashed first."""
    from flows.recovery import reap_crashed_runs

    catalog = _open(catalog_url)
    reap_crashed_runs(catalog)
    rows = [r.to_dict() for r in catalog.runs(limit=limit)]
    _emit(rows, as_json, ["id", "name", "status", "created_at", "finished_at", "manifest_uri"], "runs")


@catalog_app.command()
def jobs(
    run: RunRef = None,
    status: Annotated[str | None, typer.Option(help="pending, running, succeeded, failed or skipped")] = None,
    catalog_url: CatalogUrl = None,
    limit: Annotated[int | None, typer.Option(min=1, max=MAX_ID, help="how many at most")] = None,
    as_json: AsJson = False,
) -> None:
    """Jobs, optionally of one run and with one status."""
    catalog = _open(catalog_url)
    try:
        records = catalog.jobs(run_id=_run_id(catalog, run), status=status, limit=limit)
    except (CatalogError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        _emit([j.to_dict() for j in records], True, [], "jobs")
        return
    columns = ["id", "item_id", "seed", "status", "attempts", "seconds", "prompt", "error"]
    rows = [
        {"id": j.id, "item_id": j.item_id, "seed": j.seed, "status": j.status.value, "attempts": j.attempts,
         "seconds": None if j.seconds is None else f"{j.seconds:,.1f}",
         "prompt": _cut(j.params.get("prompt"), 40), "error": _cut(j.last_error, 80)}
        for j in records
    ]  # fmt: skip
    _emit(rows, False, columns, "jobs")


Where = Annotated[
    str | None,
    typer.Option("--where", help="only videos that meet every condition, e.g. 'motion > 0.02 and not "
                 f"frozen' (fields: {', '.join(FILTER_FIELDS)})"),
]  # fmt: skip


def _conditions(where: str | None) -> list[Condition]:
    """`--where` parsed (`storage.catalog.filters`); a bad filter ends the command with its message."""
    try:
        return parse_filter(where)
    except ValueError as exc:
        raise _fail(f"--where: {exc}") from exc


@catalog_app.command()
def outputs(
    run: RunRef = None, where: Where = None, catalog_url: CatalogUrl = None, as_json: AsJson = False
) -> None:
    """Videos in the catalog, optionally of one run, with their quality signals."""
    conditions = _conditions(where)
    catalog = _open(catalog_url)
    rows = [o.to_dict() for o in catalog.outputs(run_id=_run_id(catalog, run), where=conditions)]
    flags = ("black", "flat", "frozen")  # one column of the table
    shown = [{**row, "flags": ",".join(flag for flag in flags if row.get(flag))} for row in rows]
    columns = ["job_id", "uri", "frames", "motion", "flags"]
    if any(row.get("clip_score") is not None for row in rows):
        columns.append("clip_score")
    _emit(rows if as_json else shown, as_json, columns, "outputs")


@catalog_app.command()
def snapshots(
    name: Annotated[str | None, typer.Argument(help="a snapshot name (default: every snapshot)")] = None,
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="list this version's samples (needs NAME)")
    ] = None,
    catalog_url: CatalogUrl = None,
    as_json: AsJson = False,
) -> None:
    """Dataset snapshots (the export-dataset flow's versions): name, version, samples, where; with NAME and
    --version, that version's samples (key, job, video sha256)."""
    catalog = _open(catalog_url)
    found = [s.to_dict() for s in catalog.snapshots(name)]
    if version is None:
        columns = ["name", "version", "samples", "bytes", "format", "created_at", "uri"]
        _emit(found, as_json, columns, "snapshots")
        return
    match = [s for s in found if s["version"] == version]
    if name is None or not match:
        raise _fail(f"no snapshot {name or '(give its name)'} v{version} in the catalog")
    samples = catalog.snapshot_samples(match[0]["id"])
    _emit(samples, as_json, ["key", "job_id", "sha256"], f"{name} v{version}")


JobId = Annotated[int, typer.Argument(min=1, max=MAX_ID, help="a job id (`catalog jobs` lists them)")]


@catalog_app.command()
def show(job_id: JobId, catalog_url: CatalogUrl = None, as_json: AsJson = False) -> None:
    """One job with its parameters and output."""
    catalog = _open(catalog_url)
    job = catalog.get_job(job_id)
    if job is None:
        raise _fail(f"no job {job_id} in the catalog")
    doc = job.to_dict()
    output = catalog.output_of(job_id)
    doc["output"] = output.to_dict() if output else None
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        _console.print_json(json.dumps(doc, default=str))


@catalog_app.command()
def stats(run: RunRef = None, catalog_url: CatalogUrl = None, as_json: AsJson = False) -> None:
    """Job counts by status, stored bytes, generation seconds; per model: videos, GPU-seconds, videos per
    GPU-hour and, with WANFLOW_GPU_HOUR_PRICE set, the cost per video and in all."""
    catalog = _open(catalog_url)
    run_id = _run_id(catalog, run)
    doc = catalog.stats(run_id=run_id)
    price = _settings(catalog_url=catalog_url).gpu_hour_price
    doc["models"] = [_throughput(row, price) for row in catalog.model_stats(run_id)]
    doc["gpu_seconds"] = round(sum(m["gpu_seconds"] for m in doc["models"]), 6)
    if price is not None:
        doc["gpu_hour_price"] = price
        doc["cost"] = round(price * doc["gpu_seconds"] / 3600, 4)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    shown = {"jobs": f"{doc['jobs']:,}", "outputs": f"{doc['outputs']:,}",
             "output_bytes": _bytes(doc["output_bytes"]), "seconds": f"{doc['seconds']:,.1f}",
             "gpu_seconds": f"{doc['gpu_seconds']:,.1f}", "rejected": f"{doc['rejected']:,}"}  # fmt: skip
    rows = [{"metric": k, "value": v} for k, v in shown.items()]
    rows[1:1] = [{"metric": f"  {status}", "value": f"{n:,}"} for status, n in doc["by_status"].items()]
    if price is not None:
        rows.append({"metric": f"cost at {price:g} per GPU-hour", "value": f"{doc['cost']:,.2f}"})
    title = "stats" if run is None else f"stats of run {run}"
    _emit(rows, False, ["metric", "value"], title)
    if doc["models"]:
        columns = ["model", "videos", "seconds/video", "gpu_seconds", "videos/GPU-hour"]
        columns += ["cost/video"] if price is not None else []
        _emit([_model_row(m) for m in doc["models"]], False, columns, "per model (GPU: outputs made on cuda)")


def _throughput(row: dict[str, Any], price: float | None) -> dict[str, Any]:
    """A model's stats row with its throughput: seconds per video, videos per GPU-hour, cost per video."""
    out = dict(row)
    out["seconds_per_video"] = round(row["seconds"] / row["videos"], 3) if row["videos"] else None
    gpu_hours = row["gpu_seconds"] / 3600
    out["videos_per_gpu_hour"] = round(row["gpu_videos"] / gpu_hours, 2) if gpu_hours > 0 else None
    if price is not None:
        out["cost_per_video"] = round(price * gpu_hours / row["gpu_videos"], 4) if row["gpu_videos"] else None
    return out


def _model_row(m: dict[str, Any]) -> dict[str, Any]:
    def number(value: float | None, digits: int) -> str | None:
        return None if value is None else f"{value:,.{digits}f}"

    return {
        "model": m["model"], "videos": f"{m['videos']:,}", "seconds/video": number(m["seconds_per_video"], 1),
        "gpu_seconds": number(m["gpu_seconds"], 1), "videos/GPU-hour": number(m["videos_per_gpu_hour"], 1),
        "cost/video": number(m.get("cost_per_video"), 4),
    }  # fmt: skip


def _bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _cut(text: str | None, width: int) -> str | None:
    """`text` on one line, cut to `width` characters (an ellipsis says it was)."""
    if text is None:
        return None
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"

@catalog_app.command()
def export(
    run: Annotated[str, typer.Option("--run", help="run id or name")],
    to: Annotated[str, typer.Option("--to", help="destination: a path or any fsspec URL")],
    fmt: Annotated[str, typer.Option("--format", help=" or ".join(EXPORT_FORMATS))] = "parquet",
    catalog_url: CatalogUrl = None,
) -> None:
    """Write a dataset manifest of a run's videos (one row per video) to a file or object URL."""
    if fmt not in EXPORT_FORMATS:
        raise _fail(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    settings = _settings(catalog_url=catalog_url)
    catalog = _open(catalog_url)
    try:
        count = export_run(catalog, _run_id(catalog, run), to, fmt, settings.storage_options_for(to))
    except (OSError, ValueError) as exc:
        raise _fail(f"export to {to}: {exc}") from exc
    _console.print(f"wrote {count} rows to {redact(to)}")


# -------------------------------------------------------------------------------------------- datasets

dataset_app = typer.Typer(help="Training-ready datasets of the catalog's videos.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("export")
def dataset_export(
    to: Annotated[str, typer.Option("--to", help="destination folder: a path or any fsspec URL")],
    fmt: Annotated[
        str, typer.Option("--format", help="webdataset (tar shards) or hf (a Hugging Face videofolder)")
    ] = "webdataset",
    run: Annotated[
        list[str] | None, typer.Option("--run", help="run id or name; repeat for several (default: all runs)")
    ] = None,
    where: Where = None,
    model: Annotated[str | None, typer.Option("--model", help="only videos of this model id")] = None,
    lora: Annotated[
        str | None,
        typer.Option("--lora", help="only videos made with a LoRA whose URI contains TEXT or whose sha256 "
                     "starts with it"),
    ] = None,
    drop_duplicates: Annotated[
        bool, typer.Option("--drop-duplicates/--keep-duplicates", "--drop_duplicates/--keep_duplicates",
                           help="keep only the first video of each group of near-duplicates (phash)")
    ] = False,
    shard_size: Annotated[
        int, typer.Option("--shard-size", "--shard_size", min=1, help="webdataset: bytes per shard, about")
    ] = 2**30,
    catalog_url: CatalogUrl = None,
    as_json: AsJson = False,
) -> None:  # fmt: skip
    """Write the selected videos with every setting as a dataset (WebDataset shards or a Hugging Face
    folder) with an index and a dataset card. Running it again writes only what changed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from storage.dataset import DATASET_FORMATS, Selection, export_dataset

    if fmt not in DATASET_FORMATS:
        raise _fail(f"--format {fmt!r}: expected one of {', '.join(DATASET_FORMATS)}")
    _conditions(where)  # checked before the catalog opens
    settings = _settings(catalog_url=catalog_url)
    catalog = _open(catalog_url)
    selection = Selection(tuple(run or ()), where, model, lora, drop_duplicates)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=_err, transient=True, disable=not _err.is_terminal) as bar:
            task = bar.add_task("exporting", total=None)
            summary = export_dataset(
                catalog, to, fmt=fmt, selection=selection, shard_size=shard_size,
                storage_options=settings.storage_options_for(to), source_options=settings.storage_options_for,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
    except (OSError, ValueError) as exc:
        raise _fail(f"dataset export to {redact(to)}: {redact(str(exc))}") from exc
    finally:
        catalog.close()
    _print_export(summary.to_dict(), as_json)


def _print_export(doc: dict[str, Any], as_json: bool) -> None:
    """The summary of a dataset export: counts on one line, then one line per sample skipped."""
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    shards = f" in {doc['shards']} shards" if doc["format"] == "webdataset" else ""
    changed = f"{len(doc['written'])} objects written, {doc['kept']} parts unchanged"
    _console.print(
        f"exported {doc['samples']} samples{shards} ({_bytes(doc['bytes'])}) to {doc['url']}: {changed}; "
        f"{len(doc['skipped'])} skipped, {doc['duplicates_dropped']} near-duplicates dropped",
        highlight=False, markup=False, soft_wrap=True,
    )  # fmt: skip
    for skipped in doc["skipped"]:
        _err.print(f"skipped {skipped['key']}: {skipped['reason']}", highlight=False, markup=False)


# ----------------------------------------------------------------------------------------- generation

ManifestArg = Annotated[str, typer.Argument(help="JSON Lines, CSV or Parquet manifest: a path or URL")]
Model = Annotated[
    str | None,
    typer.Option("--model", help="preset: t2v-1.3B, t2v-14B, i2v-14B-480P, ... (tiny-t2v: random weights); "
                 "default WANFLOW_MODEL"),
]  # fmt: skip
NEGATIVE_PROMPT_HELP = "default negative prompt ('': the model's)"
CkptDir = Annotated[
    str | None, typer.Option("--ckpt-dir", "--ckpt_dir", help="checkpoint directory of --model")
]
Out = Annotated[str | None, typer.Option("--out", help="storage root (dir or URL); WANFLOW_STORAGE_ROOT")]
Seeds = Annotated[int | None, typer.Option("--seeds", min=1, help="seeds per row (rows may set num_seeds)")]
# The run's defaults for rows that leave a field unset: one flag per manifest field, both spellings, the
# official `generate.py` name too where there is one.
BaseSeed = Annotated[
    int, typer.Option("--base-seed", "--base_seed", help="mixed into the seeds of rows without one")
]
Size = Annotated[str | None, typer.Option("--size", help="default size W*H for rows without one")]
FrameNum = Annotated[
    int | None, typer.Option("--frame-num", "--frame_num", help="default frame count (4n+1)")
]
Steps = Annotated[int | None, typer.Option("--steps", "--sample_steps", help="default sampling steps")]
Shift = Annotated[
    float | None, typer.Option("--shift", "--sample_shift", help="default noise schedule shift")
]
GuideScale = Annotated[
    float | None,
    typer.Option("--guide-scale", "--guide_scale", "--sample_guide_scale", help="default guidance scale"),
]
Solver = Annotated[
    str | None, typer.Option("--solver", "--sample_solver", help="default sampler: unipc, dpm++ or euler")
]
NegativePrompt = Annotated[
    str | None, typer.Option("--negative-prompt", "--negative_prompt", help=NEGATIVE_PROMPT_HELP)
]
Lora = Annotated[
    list[str] | None,
    typer.Option("--lora", help="LoRA file for rows without `loras`, URI[:STRENGTH] (strength 1); repeat to "
                 "stack them"),
]  # fmt: skip
Cache = Annotated[
    str | None,
    typer.Option("--cache", help="step cache for rows without `cache`: fbcache[:THRESHOLD] (0.05) or "
                 "magcache[:THRESHOLD] (0.12); off: none"),
]  # fmt: skip
Recipe = Annotated[
    str | None,
    typer.Option("--recipe", help="sampling recipe for rows without `recipe`: few-step (4 steps, guidance 1, "
                 "for step/CFG-distilled LoRAs)"),
]  # fmt: skip
SkipInvalid = Annotated[
    bool, typer.Option("--skip-invalid/--no-skip-invalid", "--skip_invalid/--no_skip_invalid",
                       help="leave bad rows out (recorded in the catalog)")
]  # fmt: skip


def _model(model: str | None) -> str:
    """--model, else WANFLOW_MODEL; one line when neither names a preset."""
    from flows.batch import resolve_model

    try:
        return resolve_model(model, _settings())
    except ValueError as exc:
        raise _fail(str(exc)) from exc


def _defaults(model: str, seeds: int | None, base_seed: int, **params: Any) -> RunDefaults:
    from pydantic import ValidationError

    from flows.manifest import RunDefaults

    values = {k: v for k, v in params.items() if v is not None}
    if values.get("loras") is not None:  # local files given on the command line are relative to here
        values["loras"] = [_absolute_lora(value) for value in values["loras"]]
    try:
        return RunDefaults(
            model=model, base_seed=base_seed, **({"num_seeds": seeds} if seeds else {}), **values
        )
    except ValidationError as exc:
        flags = (f"--{'-'.join(map(str, e['loc'][:1])).replace('_', '-').replace('loras', 'lora')}: "
                 f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())  # fmt: skip
        raise _fail("; ".join(flags)) from exc


def _absolute_lora(value: str) -> Any:
    """A --lora value with a relative local path made absolute (from the working directory)."""
    from wan.fast_modes import parse_lora_ref

    try:
        ref = parse_lora_ref(value)
    except ValueError as exc:
        raise _fail(f"--lora {value!r}: {exc}") from exc
    if "://" in ref.uri or Path(ref.uri).is_absolute():
        return {"uri": ref.uri, "strength": ref.strength}
    return {"uri": str(Path(ref.uri).expanduser().resolve()), "strength": ref.strength}


def _load(
    manifest: str, defaults: RunDefaults, *, skip_invalid: bool, catalog_url: str | None, out: str | None,
    ckpt_dir: str | None = None, split_to: str | None = None,
):  # fmt: skip
    from flows.manifest import ManifestError
    from flows.planning import load_inputs

    settings = _settings(catalog_url=catalog_url, storage_root=out)
    try:
        loaded, sources, _ = load_inputs(
            manifest, defaults, settings, skip_invalid=skip_invalid, ckpt_dir=ckpt_dir, split_to=split_to
        )
    except ManifestError as exc:
        raise _fail(f"{exc}\n(fix the rows above, or pass --skip-invalid to leave them out)") from exc
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    return settings, loaded, sources


def _print_plan(plan: BatchPlan, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(plan.to_dict(), indent=2, default=str) + "\n")
        return
    _console.print(
        f"[bold]{plan.manifest}[/bold]: {plan.rows} rows ({plan.invalid} invalid), {plan.jobs} jobs: "
        f"{plan.already_done} done already, {plan.to_generate} to generate in {len(plan.shards)} shards"
    )
    if plan.inputs_unread:
        _console.print(
            f"{plan.inputs_unread} jobs with images or LoRA files counted as to generate: those inputs were "
            "not read (--read-inputs hashes them to find the jobs already done)"
        )
    rows = [
        {"shard": s.label, "model": s.model, "size": s.size, "frames": s.frame_num, "jobs": len(s.job_ids)}
        for s in plan.shards
    ]
    if rows:
        _emit(rows, False, ["shard", "model", "size", "frames", "jobs"], "shards")


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set environment variables (those given as not None) for the duration of the block."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_batch(
    manifest: str,
    defaults: RunDefaults,
    *,
    ckpt_dir: str | None,
    out: str | None,
    catalog_url: str | None,
    shard_size: int,
    skip_invalid: bool,
    verbose: bool,
    memory: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], set[tuple[str, int]]]:
    """Run `generate_batch` in this process with a progress bar fed by the shards' job events; returns the
    summary and the failed jobs already printed above the bar. The catalog URL reaches the flow through the
    environment, never as a (stored, displayed) flow parameter; so does a storage root that holds a
    credential."""
    quiet_prefect(verbose)
    from prefect import tags

    from flows.batch import BatchFailed, generate_batch
    from flows.events import add_progress_listener
    from flows.local_server import LocalServerError, prefect_api
    from flows.recovery import owner_tag
    from flows.settings import parameter_safe
    from flows.terminal import RunProgress, prefect_lines_above
    from storage.urls import absolute_url

    manifest = absolute_url(manifest)
    out_param = parameter_safe(out)
    crashed: list[Any] = []  # Prefect flow runs the engine ended Crashed (a Ctrl-C among them)
    api_url = None
    with RunProgress(_err) as progress:
        secret_root = out if out and out_param is None else None
        run_defaults = defaults.model_dump(exclude={"model", "num_seeds", "base_seed"}, exclude_none=True)
        batch = generate_batch.with_options(on_crashed=[lambda _flow, run, _state: crashed.append(run.id)])
        try:
            with (
                _interrupt_once(),
                add_progress_listener(progress.on_event),
                _environ(WANFLOW_CATALOG_URL=catalog_url, WANFLOW_STORAGE_ROOT=secret_root),
                prefect_api() as api_url,  # one local Prefect server per PREFECT_HOME, shared by all runs
                prefect_lines_above(_err, verbose),
                tags(owner_tag()),  # a kill before the run reaches the catalog: the reaper finds it by this
            ):
                try:
                    state = batch(
                        manifest, model=defaults.model, ckpt_dir=ckpt_dir, out=out_param, catalog_url=None,
                        seeds=defaults.num_seeds, base_seed=defaults.base_seed, shard_size=shard_size,
                        skip_invalid=skip_invalid, defaults=run_defaults, memory=memory, return_state=True,
                    )  # fmt: skip
                except KeyboardInterrupt:
                    progress.stop()
                    _cancel_flow_runs(crashed)  # (while the API is still configured)
                    raise
        except KeyboardInterrupt:
            progress.stop()
            _err.print(_interrupted(catalog_url, progress.planned), highlight=False)
            raise typer.Exit(code=130) from None
        except LocalServerError as exc:
            raise _fail(str(exc)) from exc
    result = state.result(raise_on_failure=False)
    if isinstance(result, BatchFailed):
        result = result.summary
    elif isinstance(result, BaseException):
        raise _fail(f"the run failed: {type(result).__name__}: {result}") from result
    flow_run_id = state.state_details.flow_run_id
    if api_url and flow_run_id:
        result["prefect_ui"] = f"{api_url.rstrip('/').removesuffix('/api')}/runs/flow-run/{flow_run_id}"
    return result, progress.said


@contextlib.contextmanager
def _interrupt_once() -> Iterator[None]:
    """Ctrl-C during a run: the first SIGINT raises KeyboardInterrupt as usual (the job in flight goes back to
    pending, the run is marked cancelled); one more while that is done is answered with a line instead of
    breaking the clean-up off half-way; a third quits at once. (Only in the main thread, and only where
    SIGINT has Python's default handler.)"""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal received
        received += 1
        if received == 1:
            raise KeyboardInterrupt
        if received == 2:  # plain write: a signal handler must not wait for the console's lock
            os.write(2, b"\nstopping: giving the job in flight back and marking the run cancelled "
                        b"(Ctrl-C again to quit at once)\n")  # fmt: skip
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _cancel_flow_runs(flow_run_ids: list[Any]) -> None:
    """Prefect ends a flow run stopped by Ctrl-C as Crashed; mark those runs, and the shard runs under them
    that had not finished, Cancelled instead, as the catalog does. Best effort: nothing if the API can't be
    reached."""
    if not flow_run_ids:
        return
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
            under = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=flow_run_ids))
            runs += client.read_flow_runs(flow_run_filter=under)
            for run in runs:
                if run.state is None or run.state.is_crashed() or not run.state.is_final():
                    state = Cancelled(message="interrupted (Ctrl-C) in the wanflow command that ran it")
                    client.set_flow_run_state(run.id, state, force=True)
    except Exception as exc:  # the terminal gets its answer all the same
        logging.getLogger(__name__).debug("could not mark the interrupted flow runs cancelled: %s", exc)


def _interrupted(catalog_url: str | None, planned: dict[str, Any]) -> str:
    """What a Ctrl-C left behind, as one line: the run's status as the catalog has it."""
    if not planned:
        return "[yellow]interrupted[/yellow] before any job was planned: nothing was generated"
    status = "in an unknown state"
    with contextlib.suppress(Exception):
        catalog = Catalog(_settings(catalog_url=catalog_url).catalog_url)
        try:
            run = catalog.get_run(planned["run_id"])
            status = f"marked {run.status.value}" if run else status
        finally:
            catalog.close()
    return (
        f"[yellow]interrupted[/yellow]: run {escape(planned['run_name'])} is {status}; the job in flight "
        "went back to pending and finished videos are kept: run the same command again to resume"
    )


def _print_summary(summary: dict[str, Any], as_json: bool, said: set[tuple[str, int]] | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
        return
    from flows.terminal import print_summary

    print_summary(_console, summary, said)


def _ensure_catalog(catalog_url: str | None) -> None:
    """Create a catalog that does not exist yet; refuse one at an older schema (see `catalog upgrade`)."""
    file = _sqlite_file(_settings(catalog_url=catalog_url).catalog_url)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    catalog = _open(catalog_url, check_schema=False, create=True)
    try:
        if catalog.current_revision() is None:
            catalog.upgrade()
        catalog.check_schema()
    except CatalogError as exc:
        raise _fail(str(exc)) from exc
    finally:
        catalog.close()


@app.command()
def generate(
    manifest: ManifestArg,
    model: Model = None,
    ckpt_dir: CkptDir = None,
    out: Out = None,
    catalog_url: CatalogUrl = None,
    seeds: Seeds = None,
    base_seed: BaseSeed = 0,
    shard_size: Annotated[
        int, typer.Option("--shard-size", "--shard_size", min=1, help="jobs per shard (one model load each)")
    ] = 16,
    size: Size = None,
    frame_num: FrameNum = None,
    steps: Steps = None,
    shift: Shift = None,
    guide_scale: GuideScale = None,
    solver: Solver = None,
    negative_prompt: NegativePrompt = None,
    lora: Lora = None,
    cache: Cache = None,
    recipe: Recipe = None,
    skip_invalid: SkipInvalid = False,
    offload_model: Annotated[
        bool | None, typer.Option("--offload-model/--no-offload-model", "--offload_model/--no_offload_model",
                                  help="GPU memory: models on the GPU only while they run")
    ] = None,
    t5_cpu: Annotated[
        bool | None, typer.Option("--t5-cpu/--no-t5-cpu", "--t5_cpu/--no_t5_cpu",
                                  help="GPU memory: the text encoder runs on the CPU")
    ] = None,
    vae_tiling: Annotated[
        str | None, typer.Option("--vae-tiling", "--vae_tiling",
                                 help="GPU memory: tiled VAE decode, TILE:OVERLAP latent cells, 'on' = 32:8")
    ] = None,
    save_latents: Annotated[
        bool | None, typer.Option("--save-latents/--no-save-latents", "--save_latents/--no_save_latents",
                                  help="keep each video's final latents beside it (safetensors)")
    ] = None,
    latents_only: Annotated[
        bool, typer.Option("--latents-only", "--latents_only",
                           help="store the final latents instead of the video: no VAE decode but the first "
                                "frame's, for the thumbnail")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run/--no-dry-run", "--dry_run/--no_dry_run",
                           help="print the plan; generate nothing, write nothing")
    ] = False,
    read_inputs: Annotated[
        bool, typer.Option("--read-inputs/--no-read-inputs", "--read_inputs/--no_read_inputs",
                           help="--dry-run: read and hash the images too, for an exact count of jobs done")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's log lines")] = False,
    as_json: AsJson = False,
) -> None:
    """Generate every (row, seed) of MANIFEST not already in the catalog with a verified video."""
    quiet_prefect(verbose)  # before anything imports Prefect
    if latents_only and save_latents is False:
        raise _fail("--latents-only stores the latents: it contradicts --no-save-latents")
    defaults = _defaults(_model(model), seeds, base_seed, size=size, frame_num=frame_num, steps=steps,
                         shift=shift, guide_scale=guide_scale, solver=solver, negative_prompt=negative_prompt,
                         loras=lora, cache=cache, recipe=recipe,
                         save_latents="only" if latents_only else save_latents)  # fmt: skip
    memory = _memory(offload_model, t5_cpu, vae_tiling)
    if dry_run:
        _dry_run(manifest, defaults, skip_invalid=skip_invalid, catalog_url=catalog_url, out=out,
                 ckpt_dir=ckpt_dir, shard_size=shard_size, as_json=as_json,
                 read_inputs=read_inputs)  # fmt: skip
        return
    from flows.manifest.opening import is_large_manifest

    if not is_large_manifest(manifest, _settings(catalog_url=catalog_url, storage_root=out)):
        # Check here first, for a quick and readable answer; a large manifest is checked by the run itself
        # as it is split, rather than read twice.
        loaded = _load(
            manifest, defaults, skip_invalid=skip_invalid, catalog_url=catalog_url, out=out, ckpt_dir=ckpt_dir
        )[1]
        if loaded.problems:
            _err.print(f"[yellow]{loaded.invalid_rows} invalid rows will be left out[/yellow]")
    _ensure_catalog(catalog_url)
    summary, said = _run_batch(
        manifest, defaults, ckpt_dir=ckpt_dir, out=out, catalog_url=catalog_url, shard_size=shard_size,
        skip_invalid=skip_invalid, verbose=verbose, memory=memory,
    )  # fmt: skip
    _print_summary(summary, as_json, said)
    if summary["status"] != "succeeded":
        raise typer.Exit(code=1)


def _memory(offload_model: bool | None, t5_cpu: bool | None, vae_tiling: str | None) -> dict[str, Any] | None:
    """The run's GPU-memory overrides: the flags given (None when none was); each worker's own `WANFLOW_*`
    settings apply to the rest."""
    if offload_model is None and t5_cpu is None and vae_tiling is None:
        return None
    from flows.models import memory_options

    given = {"offload_model": offload_model, "t5_cpu": t5_cpu, "vae_tiling": vae_tiling}
    try:  # only the flags given: each worker keeps its own settings for the rest
        return memory_options({k: v for k, v in given.items() if v is not None}, partial=True)
    except ValueError as exc:
        raise _fail(str(exc)) from exc


def _dry_run(
    manifest: str, defaults: RunDefaults, *, skip_invalid: bool, catalog_url: str | None, out: str | None,
    ckpt_dir: str | None, shard_size: int, as_json: bool, read_inputs: bool = False,
) -> None:  # fmt: skip
    """Print what `generate` would do; writes nothing (a large manifest is split into a temporary dir)."""
    import tempfile

    from flows.planning import dry_run as plan_dry_run

    with tempfile.TemporaryDirectory(prefix="wanflow-dry-run-") as scratch:
        settings, loaded, sources = _load(
            manifest, defaults, skip_invalid=skip_invalid, catalog_url=catalog_url, out=out,
            ckpt_dir=ckpt_dir, split_to=scratch,
        )  # fmt: skip
        if loaded.problems:
            _err.print(f"[yellow]{loaded.invalid_rows} invalid rows would be left out[/yellow]")
        url = settings.catalog_url
        existing: Catalog | None = None
        file = _sqlite_file(url)
        if file is None or file.exists():
            try:  # (opening a missing SQLite file would create it: a dry run writes nothing)
                existing = Catalog(url)
                existing.check_schema()
            except CatalogError as exc:
                raise _fail(str(exc)) from exc
        try:
            plan = plan_dry_run(existing, loaded, sources, settings, shard_size=shard_size,
                                read_images=read_inputs)  # fmt: skip
        except CatalogError as exc:
            raise _fail(str(exc)) from exc
        _print_plan(plan, as_json)


@app.command()
def validate(
    manifest: ManifestArg,
    model: Model = None,
    ckpt_dir: CkptDir = None,
    seeds: Seeds = None,
    base_seed: BaseSeed = 0,
    size: Size = None,
    frame_num: FrameNum = None,
    steps: Steps = None,
    shift: Shift = None,
    guide_scale: GuideScale = None,
    solver: Solver = None,
    negative_prompt: NegativePrompt = None,
    lora: Lora = None,
    cache: Cache = None,
    recipe: Recipe = None,
    as_json: AsJson = False,
) -> None:
    """Check every row of MANIFEST as a run with the same flags would (its model's weights, its local images
    and the run's defaults included); list each bad row with its line, field and reason. Reads no image
    bytes."""
    from flows.inputs import check_requests
    from flows.manifest import load_manifest

    defaults = _defaults(_model(model), seeds, base_seed, size=size, frame_num=frame_num, steps=steps,
                         shift=shift, guide_scale=guide_scale, solver=solver, negative_prompt=negative_prompt,
                         loras=lora, cache=cache, recipe=recipe)  # fmt: skip
    settings = _settings()
    try:
        loaded = load_manifest(manifest, defaults, storage_options=settings.storage_options_for(manifest))
        loaded = check_requests(loaded, settings, ckpt_dir, defaults.model)[0]
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        doc = {"manifest": redact(manifest), "rows": loaded.rows, "valid": len(loaded.requests),
               "invalid": loaded.invalid_rows, "jobs": loaded.jobs,
               "problems": [{k: redact(v) if isinstance(v, str) else v for k, v in p._asdict().items()}
                            for p in loaded.problems]}  # fmt: skip
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        unit = "row" if loaded.format == "parquet" else "line"
        for problem in loaded.problems:
            _err.print(problem.describe(redact(manifest), unit), highlight=False, markup=False)
        _console.print(
            f"{redact(manifest)}: {loaded.rows} rows, {len(loaded.requests)} valid, {loaded.invalid_rows} "
            f"invalid ({len(loaded.problems)} problems), {loaded.jobs} jobs", highlight=False
        )
    if loaded.problems:
        raise typer.Exit(code=1)


DEMO_MANIFEST = "demo.jsonl"


def demo_manifest() -> str:
    """Path of the bundled example manifest."""
    return str(resources.files("flows.examples").joinpath(DEMO_MANIFEST))


@app.command()
def demo(
    out: Out = None,
    catalog_url: CatalogUrl = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's log lines")] = False,
) -> None:
    """Run the bundled example manifest (12 text-to-video and 3 image-to-video rows, 2 seeds each) through
    the whole platform on the embedded defaults: Prefect's local server, the SQLite catalog, ./outputs,
    the tiny random-weight models."""
    manifest = demo_manifest()
    _console.print(
        "[bold]wanflow demo[/bold]: 12 prompts and 3 images x 2 seeds on [bold]tiny-t2v[/bold] and "
        "[bold]tiny-i2v[/bold], random-weight models small enough for a CPU. Their videos are abstract "
        "moving colour, not the prompts: real checkpoints need `wanflow generate MANIFEST --model t2v-1.3B "
        "--ckpt-dir DIR` on a GPU."
    )
    _ensure_catalog(catalog_url)
    defaults = _defaults("tiny-t2v", 2, 0)
    summary, said = _run_batch(
        manifest, defaults, ckpt_dir=None, out=out, catalog_url=catalog_url, shard_size=8, skip_invalid=False,
        verbose=verbose,
    )  # fmt: skip
    _print_summary(summary, False, said)
    catalog = _open(catalog_url)
    rows = []
    for o in catalog.outputs(run_id=summary["run_id"])[:6]:
        job = catalog.get_job(o.job_id) if o.job_id else None
        rows.append({"item": job.item_id if job else "", "seed": job.seed if job else "", "uri": o.uri})
    _emit(rows, False, ["item", "seed", "uri"], "some of the videos")
    _console.print("more: wanflow catalog stats | wanflow catalog outputs | the runs in the Prefect UI:")
    _console.print(_prefect_ui_hint(summary), highlight=False, markup=False)
    if summary["status"] != "succeeded":
        raise typer.Exit(code=1)


def _prefect_ui_hint(summary: dict[str, Any]) -> str:
    """Where to see the demo's runs in the Prefect UI: the link while the local server runs, and the command
    that serves the UI on the demo's Prefect state again later (after a reboot, say)."""
    from flows.local_server import prefect_home

    link = summary.get("prefect_ui") or "(no link: the run did not reach Prefect)"
    if os.environ.get("PREFECT_API_URL"):  # the user's own server: it shows the run
        return f"  {link}"
    prefect = Path(sys.executable).with_name("prefect")
    with contextlib.suppress(ValueError):
        prefect = prefect.relative_to(Path.cwd())
    later = f"PREFECT_HOME={prefect_home()} {prefect} server start, then open http://127.0.0.1:4200/runs"
    return f"  {link} (Prefect's local server keeps running in the background)\n  later: {later}"


def main() -> None:
    """The `wanflow` command: the typer app (which answers bad usage in one line itself), with any error it
    did not expect turned into one line too (exit 1; `WANFLOW_DEBUG=1` shows the traceback)."""
    try:
        app()
    except Exception as exc:
        if os.environ.get("WANFLOW_DEBUG"):
            raise
        text = " ".join(str(exc).split()) or "(no message)"
        _err.print(f"[red]error:[/red] {escape(redact(f'{type(exc).__name__}: {text}'))}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
