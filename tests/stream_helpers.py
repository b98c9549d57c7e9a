"""Watching what a pipeline streams to storage, for tests that check stored outputs against their frames."""

from __future__ import annotations

from typing import Any

import numpy as np


def record_stream(monkeypatch: Any, pipe: Any) -> list[np.ndarray]:
    """Make `pipe.generate_stream` hand each uint8 chunk [n, H, W, 3] it yields to the list returned as well
    (copied, in order); the caller clears the list between videos."""
    seen: list[np.ndarray] = []
    original = pipe.generate_stream

    def recording(*args: Any, **kwargs: Any) -> Any:
        for chunk in original(*args, **kwargs):
            seen.append(np.asarray(chunk).copy())
            yield chunk

    monkeypatch.setattr(pipe, "generate_stream", recording)
    return seen
