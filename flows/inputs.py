"""What a run would reject beyond the manifest's own rules: rows whose model has no weights here, rows whose
image or LoRA file lies outside the input roots, rows whose local image or LoRA file is missing (or a LoRA
that is not a .safetensors file). `wanflow validate`, `--dry-run` and the run itself share this check, so
the first two report exactly what the third would leave out (or, without `--skip-invalid`, refuse).

The input policy, for images and LoRA files alike: inputs are read only from under the input roots,
`WANFLOW_INPUT_ROOTS` (a JSON list of URL prefixes); by default the manifest's own folder (or bucket
prefix) and the storage root. The check is on the URL alone, made before anything is read: a path is
resolved (symlinks and `..` included) and must lie under a root; a URL is normalised and must start with a
root at a `/` boundary; http(s) inputs need an http(s) root. A file outside the roots gets the same message
whether or not it exists, so the check tells nothing about files it refuses. Under the roots, only file
metadata is looked at (a `stat`), never bytes; remote inputs are checked when the run hashes them.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.images import IMAGE_FIELDS, resolve_image_uri
from flows.manifest import Manifest, RowProblem
from flows.manifest.opening import LazyManifest, model_names
from flows.models import ModelSource, model_source
from flows.settings import Settings
from storage.urls import has_secret, redact

__all__ = [
    "check_requests", "input_roots", "local_path", "outside_roots",
    "resolve_image_uri",
]  # fmt: skip



def local_path(uri: str) -> str | None:
    """The file path of a local input (a plain path or file://); None for remote URLs."""
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return None if "://" in uri else uri


def _normal(url: str) -> str:
    """A URL or path in the form roots are compared in: local paths absolute and resolved; URLs with their
    path normalised (no `.` or `..`), query and fragment dropped, the scheme lower-cased."""
    path = local_path(url)
    if path is not None:
        return str(Path(path).expanduser().resolve())
    scheme, _, rest = url.partition("://")
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    host, slash, tail = rest.partition("/")
    tail = posixpath.normpath("/" + tail) if slash else ""
    return f"{scheme.lower()}://{host}{tail}".rstrip("/")


def input_roots(settings: Settings, manifest_url: str) -> list[str]:
    """The prefixes images may come from: `settings.input_roots`, else the manifest's folder and the
    storage root."""
    if settings.input_roots is not None:
        return [_normal(root) for root in settings.input_roots]
    normal = _normal(manifest_url)
    if "://" not in normal:
        folder = str(Path(normal).parent)
    else:  # s3://bucket/a/m.jsonl -> s3://bucket/a
        folder = normal.rsplit("/", 1)[0] if normal.count("/") > 2 else normal
    return [folder, _normal(settings.storage_root)]


def outside_roots(uri: str, roots: list[str]) -> bool:
    """Whether an (absolute) input URI lies outside every root."""
    target = _normal(uri)
    return not any(target == root or target.startswith(root.rstrip("/") + "/") for root in roots)


def check_requests(
    manifest: Manifest, settings: Settings, ckpt_dir: str | None, model: str
) -> tuple[Manifest, dict[str, ModelSource], list[RowProblem]]:
    """(the manifest without the rows a run would reject, a source for every model its rows still use, the
    problems found here). `ckpt_dir` is the weights of the run's `model`; other models take theirs from
    `settings.checkpoints`. A split manifest's rows are checked as they stream by."""
    sources: dict[str, ModelSource] = {}
    refused: dict[str, str] = {}
    for name in model_names(manifest):
        directory = ckpt_dir if name == model and ckpt_dir else settings.checkpoints.get(name)
        try:
            sources[name] = model_source(name, directory)
        except ValueError as exc:
            refused[name] = str(exc)

    roots = input_roots(settings, manifest.url)
    shown_roots = ", ".join(redact(root) for root in roots)

    def input_problem(what: str, value: str) -> str | None:
        """Why an input (`what`: "image", "LoRA") cannot be read under the policy, or None."""
        uri = resolve_image_uri(value, manifest.url)
        if has_secret(uri):
            return (f"{what} URL {redact(uri)} carries a credential; give the workers their credentials "
                    "through WANFLOW_INPUT_STORAGE_OPTIONS instead")  # fmt: skip
        if outside_roots(uri, roots):
            return (f"{what} {redact(uri)} is outside the input roots ({shown_roots}); allow its location "
                    "with WANFLOW_INPUT_ROOTS")  # fmt: skip
        if what == "LoRA" and not uri.split("?", 1)[0].lower().endswith(".safetensors"):
            return f"LoRA {redact(uri)}: expected a .safetensors file"
        path = local_path(uri)
        if path is not None and not os.path.isfile(path):
            return f"{what} file {path} {'is a directory' if os.path.isdir(path) else 'does not exist'}"
        return None

    def problems_of(request: Any) -> list[RowProblem]:
        found = []
        if request.model in refused:
            found.append(RowProblem(request.line, "model", refused[request.model], request.item_id))
        inputs = [(name, "image", getattr(request, name, None)) for name in IMAGE_FIELDS]
        inputs += [("loras", "LoRA", uri) for uri, _ in getattr(request, "loras", ())]
        for name, what, value in inputs:
            if value and (problem := input_problem(what, value)) is not None:
                found.append(RowProblem(request.line, name, problem, request.item_id))
        return found

    if isinstance(manifest, LazyManifest):
        late: list[RowProblem] = []

        def kept() -> Iterator[Any]:
            for request in manifest.requests:
                found = problems_of(request)
                late.extend(found)
                if not found:
                    yield request

        # The split's rows stream once; rows refused here are recorded as the run finds them.
        checked = dataclasses.replace(manifest, requests=kept(), problems=manifest.problems)
        return checked, sources, late
    problems: list[RowProblem] = []
    requests = []
    for request in manifest.requests:
        found = problems_of(request)
        problems.extend(found)
        if not found:
            requests.append(request)
    if not problems:
        return manifest, sources, []
    merged = sorted([*manifest.problems, *problems], key=lambda p: p.line)
    checked = dataclasses.replace(manifest, requests=requests, problems=merged, invalid_rows=-1)
    return checked, sources, problems
