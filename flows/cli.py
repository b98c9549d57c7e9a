"""The `wanflow` command.

    wanflow catalog upgrade                         bring the catalog database to the current schema
    wanflow catalog runs                            recent runs
    wanflow catalog jobs --run R --status failed    jobs of a run (by id or name), optionally by status
    wanflow catalog outputs --run R                 videos of a run
    wanflow catalog show JOB                        one job with its output
    wanflow catalog stats [--run R]                 counts by status, bytes, GPU seconds
    wanflow catalog export --run R --format parquet --to s3://bucket/datasets/r.parquet

Every listing prints a table, or JSON with `--json`. The catalog and storage locations come from
`WANFLOW_*` settings (see flows/settings.py) unless `--catalog-url` is given.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.settings import get_settings
from storage.catalog import Catalog, CatalogError
from storage.export import EXPORT_FORMATS, export_run
from storage.urls import redact

app = typer.Typer(help="wanflow: bulk video generation with Wan 2.1.", no_args_is_help=True)
catalog_app = typer.Typer(
    help="Query and maintain the catalog of runs, jobs and outputs.", no_args_is_help=True
)
app.add_typer(catalog_app, name="catalog")

_console = Console()
CatalogUrl = Annotated[str | None, typer.Option("--catalog-url", help="overrides WANFLOW_CATALOG_URL")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]
RunRef = Annotated[str | None, typer.Option("--run", help="run id or name")]


def _fail(message: str) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/red] {redact(message)}", highlight=False)
    return typer.Exit(code=1)


def _open(catalog_url: str | None, *, check_schema: bool = True) -> Catalog:
    url = get_settings(catalog_url=catalog_url).catalog_url
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
    catalog = _open(catalog_url, check_schema=False)
    try:
        catalog.upgrade()
    except CatalogError as exc:
        raise _fail(str(exc)) from exc
    _console.print(f"catalog at {redact(catalog.url)} is up to date")


@catalog_app.command()
def runs(catalog_url: CatalogUrl = None, limit: int = 50, as_json: AsJson = False) -> None:
    """Recent runs, newest first."""
    rows = [r.to_dict() for r in _open(catalog_url).runs(limit=limit)]
    _emit(rows, as_json, ["id", "name", "status", "created_at", "finished_at", "manifest_uri"], "runs")


@catalog_app.command()
def jobs(
    run: RunRef = None,
    status: Annotated[str | None, typer.Option(help="pending, running, succeeded, failed or skipped")] = None,
    catalog_url: CatalogUrl = None,
    limit: int | None = None,
    as_json: AsJson = False,
) -> None:
    """Jobs, optionally of one run and with one status."""
    catalog = _open(catalog_url)
    try:
        records = catalog.jobs(run_id=_run_id(catalog, run), status=status, limit=limit)
    except (CatalogError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    columns = ["id", "item_id", "seed", "status", "attempts", "seconds", "last_error"]
    _emit([j.to_dict() for j in records], as_json, columns, "jobs")


@catalog_app.command()
def outputs(run: RunRef = None, catalog_url: CatalogUrl = None, as_json: AsJson = False) -> None:
    """Videos in the catalog, optionally of one run."""
    catalog = _open(catalog_url)
    rows = [o.to_dict() for o in catalog.outputs(run_id=_run_id(catalog, run))]
    _emit(rows, as_json, ["job_id", "uri", "bytes", "width", "height", "frames", "fps", "sha256"], "outputs")


@catalog_app.command()
def show(job_id: int, catalog_url: CatalogUrl = None, as_json: AsJson = False) -> None:
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
    """Job counts by status, stored bytes and generation seconds."""
    catalog = _open(catalog_url)
    doc = catalog.stats(run_id=_run_id(catalog, run))
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    rows = [{"metric": k, "value": v} for k, v in doc.items() if k not in ("by_status", "run_id")]
    rows[1:1] = [{"metric": f"  {status}", "value": n} for status, n in doc.get("by_status", {}).items()]
    title = "stats" if run is None else f"stats of run {run}"
    _emit(rows, False, ["metric", "value"], title)


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
    settings = get_settings(catalog_url=catalog_url)
    catalog = _open(catalog_url)
    try:
        count = export_run(catalog, _run_id(catalog, run), to, fmt, settings.storage_options_for(to))
    except (OSError, ValueError) as exc:
        raise _fail(f"export to {to}: {exc}") from exc
    _console.print(f"wrote {count} rows to {redact(to)}")


if __name__ == "__main__":
    app()
