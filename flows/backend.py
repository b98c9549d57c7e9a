"""`GenerationBackend`: what a shard needs of whatever makes its videos.

Two things satisfy it: `wan.pipeline.WanPipeline`, in this process, and `flows.group.GroupPipeline`, a
`torchrun` worker group that spreads each video over several GPUs. `flows.shard` talks to either through
this protocol alone and never asks which one it has.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["GenerationBackend"]


@runtime_checkable
class GenerationBackend(Protocol):
    """Resolves settings, sizes videos and streams their frames; says where and how it runs."""

    memory: Any  # `wan.pipeline.MemoryOptions`: how the backend trades speed for GPU memory

    @property
    def device(self) -> torch.device:
        """Where the videos are sampled (rank 0's device for a group)."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The DiT's compute dtype."""
        ...

    def settings(self, **kwargs: Any) -> Any:
        """The request's settings resolved against the model's defaults (`wan.pipeline.GenerationSettings`);
        ValueError for a bad request (never retried)."""
        ...

    def video_size(self, settings: Any, image: Any | None = None) -> tuple[int, int]:
        """(width, height) of the video for `settings`; image-to-video keeps the image's aspect."""
        ...

    def generate_stream(
        self, prompt: str, *, seed: int = 0, image: Any = None, last_image: Any = None,
        progress: bool = False, **settings: Any,
    ) -> Iterator[torch.Tensor]:  # fmt: skip
        """The video's frames as they are decoded: uint8 chunks [n, H, W, 3]. `keep_latents=True` keeps the
        final latents (`last_latents`); `decode_video=False` then yields the first frame alone."""
        ...

    def latents_metadata(self) -> dict[str, str]:
        """Text metadata for a stored latents file (normalisation, layout); with `generate_stream(...,
        keep_latents=True)` the video's latents are then in `last_latents`."""
        ...

    def use_loras(self, loras: Any) -> bool:
        """Merge a `wan.lora.LoraSet` into the DiT for the next videos (None: the base weights); returns
        whether the weights changed. ValueError for a set that does not fit the model."""
        ...

    @property
    def last_cache_counts(self) -> Any:
        """The last video's step-cache counts (`wan.cache.CacheCounts`: forwards, skipped); None when it ran
        without a step cache."""
        ...

    def describe(self) -> dict[str, Any]:
        """How one video is spread over processes, for the sidecar; {} when it runs in one."""
        ...

    def reset_peak_memory(self) -> None:
        """Start measuring peak GPU memory for the next video."""
        ...

    @property
    def peak_memory_bytes(self) -> int | None:
        """Peak GPU memory of the last video (read once its frames are in); None on the CPU."""
        ...
