"""Image-to-video conditioning: the output size from the image, the frame mask, the condition video.

The DiT of the image-to-video models takes 36 input channels per latent frame: the 16 noise channels,
4 mask channels and the 16 channels of the encoded condition video, in that order. The condition video
holds the given image(s) at their frame positions and zeros (mid-grey) elsewhere; the mask says which
pixel frames were given. The VAE folds 4 pixel frames into each latent frame (the first latent frame
holds pixel frame 0 alone), so the mask has 4 channels: channel c of latent frame t > 0 stands for pixel
frame 1 + 4 (t - 1) + c, and all 4 channels of latent frame 0 stand for pixel frame 0.

Image-to-video keeps pixel frame 0; first-last-frame-to-video keeps frames 0 and F - 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["condition_video", "crop_to_aspect", "frame_mask", "image_tensor", "size_for_image"]


def size_for_image(
    image_hw: tuple[int, int], max_area: int, stride: int = 8, patch: int = 2
) -> tuple[int, int]:
    """(width, height) of the video for an image of (height, width) within `max_area` pixels.

    The official arithmetic, float rounding included: the aspect ratio follows the image, and each
    latent side is rounded down to a multiple of the DiT's patch, so the pixel sides are multiples of
    `stride * patch` (16). (So an 832x480 image at 832*480 gives 832x464: sqrt(399360 * 480/832) is
    479.99999999999994 in floating point.)
    """
    h, w = image_hw
    if h < 1 or w < 1 or max_area < 1:
        raise ValueError(f"image size {w}x{h} and max area {max_area} must be positive")
    aspect = h / w
    lat_h = int(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = int(math.sqrt(max_area / aspect) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(
            f"an image of {w}x{h} leaves no room within {max_area} pixels: its aspect ratio is too extreme"
        )
    return lat_w * stride, lat_h * stride


def frame_mask(
    frame_num: int, latent_hw: tuple[int, int], *, keep_last: bool = False, temporal_stride: int = 4
) -> torch.Tensor:
    """The mask channels: [temporal_stride, T, h, w] float32 with T = (frame_num - 1) / stride + 1; 1 where
    the pixel frame behind a channel was given (frame 0; and frame_num - 1 with `keep_last`)."""
    if frame_num < 1 or (frame_num - 1) % temporal_stride:
        raise ValueError(f"frame_num {frame_num}: must be of the form {temporal_stride}n+1")
    given = torch.zeros(frame_num)
    given[0] = 1.0
    if keep_last:
        given[-1] = 1.0
    latent_frames = (frame_num - 1) // temporal_stride + 1
    # Pixel frame behind (channel c, latent frame t): 0 for t == 0, else 1 + stride * (t - 1) + c.
    index = torch.zeros(temporal_stride, latent_frames, dtype=torch.long)
    for t in range(1, latent_frames):
        index[:, t] = torch.arange(1 + temporal_stride * (t - 1), 1 + temporal_stride * t)
    return given[index][:, :, None, None].expand(-1, -1, *latent_hw).contiguous()


def condition_video(
    first: torch.Tensor, size: tuple[int, int], frame_num: int, last: torch.Tensor | None = None
) -> torch.Tensor:
    """The video the VAE encodes as the condition: [3, frame_num, H, W] in [-1, 1].

    first, last: images [3, h, w] in [-1, 1] (any size); size: (width, height). Frame 0 is `first`
    resized (bicubic, as the official code), the last frame `last` when given, zeros in between.
    """
    width, height = size
    video = first.new_zeros(3, frame_num, height, width, dtype=torch.float32)
    video[:, 0] = _resize(first, height, width)
    if last is not None:
        if frame_num < 2:
            raise ValueError("a last frame needs frame_num >= 5")
        video[:, -1] = _resize(last, height, width)
    return video


def crop_to_aspect(image: torch.Tensor, like_hw: tuple[int, int]) -> torch.Tensor:
    """Center-crop image [3, h, w] to the aspect ratio of `like_hw` (height, width), keeping the most of it.

    First-last-frame-to-video gives the last frame the first frame's shape this way (the official code
    means to, but crops to a swapped size and never resizes; diffusers squashes the frame instead).
    """
    h, w = image.shape[-2:]
    th, tw = like_hw
    if h * tw == w * th:
        return image
    if w * th > h * tw:  # too wide: crop the width
        new_w = max(1, round(h * tw / th))
        left = (w - new_w) // 2
        return image[..., left : left + new_w]
    new_h = max(1, round(w * th / tw))
    top = (h - new_h) // 2
    return image[..., top : top + new_h, :]


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image.float()
    return F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False)[0]


def image_tensor(image: Any) -> torch.Tensor:
    """A PIL image, a uint8 array [H, W, 3] or a float tensor [3, H, W] in [-1, 1] -> float32 [3, H, W]
    in [-1, 1] (the official `to_tensor(img).sub_(0.5).div_(0.5)`)."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"an image tensor must be float [3, H, W] in [-1, 1], got {image.dtype} "
                             f"{tuple(image.shape)}")  # fmt: skip
        return image.float()
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
