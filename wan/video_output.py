"""Decoded videos in the shapes diffusers' video pipelines hand back (`WanPipeline.__call__`).

`output_type` as in diffusers: "np" (float32 array [B, F, H, W, 3] in [0, 1]), "pt" (float tensor
[B, F, 3, H, W] in [0, 1]), "pil" (a list of B lists of F RGB `PIL.Image`s) or "latent" (the latents
[B, z, T, h, w], not decoded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["OUTPUT_TYPES", "VideoPipelineOutput", "check_output_type", "frames_as"]

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class VideoPipelineOutput:
    """What a call of the pipeline returns: `frames`, one video per prompt and seed, in `output_type`'s shape
    (see the module docstring)."""

    frames: Any


def check_output_type(output_type: str) -> None:
    """ValueError naming the accepted values, for anything but `OUTPUT_TYPES`."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r}: expected one of {', '.join(map(repr, OUTPUT_TYPES))}")


def frames_as(videos: torch.Tensor, output_type: str) -> Any:
    """Decoded videos [B, 3, F, H, W] in [-1, 1] as `output_type` ("np", "pt" or "pil") wants them."""
    check_output_type(output_type)
    if output_type == "latent":
        raise ValueError("frames_as takes decoded videos; 'latent' output is the latents themselves")
    unit = (videos.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W] in [0, 1]
    if output_type == "pt":
        return unit
    array = unit.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, F, H, W, 3]
    if output_type == "np":
        return array
    from PIL import Image

    pixels = (array * 255).round().astype(np.uint8)
    return [[Image.fromarray(frame) for frame in video] for video in pixels]
