"""LoRA files at run time: a job's `loras` parameter (uri, sha256, strength per file, as planned) -> the
`wan.lora.LoraSet` its shard merges into the DiT.

Each file is read once per process (`LoraFiles` keeps what it read, by uri and sha256) through
`storage.faults.filesystem` with the storage options of its own URL, and refused when its bytes changed since
the job was planned (its sha256 is in the job's identity: a new file means new jobs, planned by a new run).
A bad file (missing, not safetensors, keys of no known layout, shapes that do not fit the model) is a
`BadLora`: the job fails once, with the reason, and is not retried.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from flows.images import read_input
from storage.urls import redact

__all__ = ["MAX_LORA_BYTES", "BadLora", "LoraFiles", "lora_entries", "process_lora_files"]

MAX_LORA_BYTES = 8 << 30  # a rank-128 LoRA of the 14B model is about 1.2 GB
KEPT_FILES = 8  # files kept in memory after use (the most recently used)
OptionsFor = Callable[[str], dict[str, Any]] | None


class BadLora(ValueError):
    """A LoRA file a job cannot use: missing, unreadable, changed since planning, or not a LoRA for this
    model. Not retried."""


def lora_entries(params: dict[str, Any]) -> list[tuple[str, str | None, float]]:
    """(uri, sha256, strength) per LoRA of a job's parameters, in stacking order ([] for none)."""
    return [(e["uri"], e.get("sha256"), float(e.get("strength", 1.0))) for e in params.get("loras") or ()]


class LoraFiles:
    """LoRA files read, by (uri, sha256); `load` turns a job's entries into a set. The `KEPT_FILES` most
    recently used stay in memory (a shard reads its set once); `reads` counts the files read."""

    def __init__(self) -> None:
        self._files: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0

    def load(
        self, entries: Sequence[tuple[str, str | None, float]], storage_options_for: OptionsFor = None
    ) -> Any:
        """The `wan.lora.LoraSet` of `entries` ((uri, sha256, strength) each), each file read with the
        options `storage_options_for(uri)` gives (none by default); BadLora names the file."""
        from wan.lora import LoraSet

        options_for = storage_options_for or (lambda url: {})
        files = [(self._file(uri, sha256, options_for), strength) for uri, sha256, strength in entries]
        return LoraSet.of(*files)

    def _file(self, uri: str, sha256: str | None, options_for: Callable[[str], dict[str, Any]]) -> Any:
        key = (uri, sha256)
        with self._lock:
            if key not in self._files:
                self._files[key] = self._read(uri, sha256, options_for(uri))
                self.reads += 1
                while len(self._files) > KEPT_FILES:
                    self._files.popitem(last=False)
            self._files.move_to_end(key)
            return self._files[key]

    def _read(self, uri: str, expected: str | None, options: dict[str, Any]) -> Any:
        from safetensors.torch import load as load_safetensors

        from wan.lora import lora_from_state_dict

        where = f"LoRA {redact(uri)}"
        if expected is None:
            raise BadLora(f"{where} could not be read when the job was planned; plan the run again")
        data = read_input(uri, options, where, MAX_LORA_BYTES, "LoRA files", BadLora)
        if hashlib.sha256(data).hexdigest() != expected:
            raise BadLora(f"{where} changed since the job was planned (sha256 differs); plan the run again")
        try:
            state_dict = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types
            raise BadLora(f"{where} is not a readable safetensors file: {exc}") from None
        try:
            return lora_from_state_dict(state_dict, name=redact(uri), sha256=expected)
        except ValueError as exc:
            raise BadLora(str(exc)) from None


_PROCESS_FILES = LoraFiles()


def process_lora_files() -> LoraFiles:
    """This process's LoRA files: read once each, kept for every later shard the process runs."""
    return _PROCESS_FILES
