"""Image-to-video conditioning against the official construction, written out as the facts sheet gives it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wan.conditioning import condition_video, crop_to_aspect, frame_mask, image_tensor, size_for_image
from wan.configs import PRESETS, default_shift


def official_mask(frame_num: int, h: int, w: int, keep_last: bool) -> torch.Tensor:
    """Facts sheet 2.5 step 3, literally: ones, zero the later frames, repeat frame 0 four times, fold."""
    msk = torch.ones(1, frame_num, h, w)
    if keep_last:
        msk[:, 1:-1] = 0
    else:
        msk[:, 1:] = 0
    msk = torch.cat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, h, w)
    return msk.transpose(1, 2)[0]


@pytest.mark.parametrize("frame_num", [5, 9, 81])
@pytest.mark.parametrize("keep_last", [False, True])
def test_mask_matches_the_official_layout(frame_num, keep_last):
    ours = frame_mask(frame_num, (6, 10), keep_last=keep_last)
    expected = official_mask(frame_num, 6, 10, keep_last)
    assert ours.shape == (4, (frame_num - 1) // 4 + 1, 6, 10)
    assert torch.equal(ours, expected)


def test_mask_rejects_frame_counts_the_vae_cannot_fold():
    with pytest.raises(ValueError, match="4n\\+1"):
        frame_mask(8, (2, 2))


@pytest.mark.parametrize("frame_num", [5, 9, 81])
def test_condition_video_holds_the_images_at_their_frames(frame_num):
    torch.manual_seed(0)
    first, last = torch.rand(3, 40, 70) * 2 - 1, torch.rand(3, 50, 30) * 2 - 1
    video = condition_video(first, (64, 48), frame_num)
    expected_first = F.interpolate(first[None], size=(48, 64), mode="bicubic", align_corners=False)[0]
    assert video.shape == (3, frame_num, 48, 64)
    assert torch.equal(video[:, 0], expected_first) and not video[:, 1:].any()
    both = condition_video(first, (64, 48), frame_num, last=last)
    expected_last = F.interpolate(last[None], size=(48, 64), mode="bicubic", align_corners=False)[0]
    assert torch.equal(both[:, -1], expected_last) and not both[:, 1:-1].any()


@pytest.mark.parametrize(
    ("hw", "area", "expected"),
    [
        ((480, 832), 832 * 480, (832, 464)),  # the official float rounding: sqrt gives 479.99999999999994
        ((832, 480), 832 * 480, (480, 832)),
        ((720, 1280), 1280 * 720, (1280, 720)),
        ((1000, 1000), 832 * 480, (624, 624)),
        ((300, 400), 64 * 48, (64, 48)),
    ],
)
def test_size_follows_the_image_within_the_area(hw, area, expected):
    h, w = hw
    aspect_ratio = h / w  # image2video.py, literally
    official_h = round(np.sqrt(area * aspect_ratio) // 8 // 2 * 2) * 8
    official_w = round(np.sqrt(area / aspect_ratio) // 8 // 2 * 2) * 8
    assert size_for_image(hw, area) == (official_w, official_h) == expected


def test_size_for_an_extreme_aspect_ratio_is_refused():
    with pytest.raises(ValueError, match="aspect ratio"):
        size_for_image((10, 5000), 64 * 48)


def test_image_inputs():
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[..., 0] = 255
    image = image_tensor(pixels)
    assert image.shape == (3, 4, 6) and image[0].eq(1).all() and image[1].eq(-1).all()
    from PIL import Image

    assert torch.equal(image_tensor(Image.fromarray(pixels)), image)
    with pytest.raises(ValueError, match="uint8"):
        image_tensor(np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"float \[3, H, W\]"):
        image_tensor(torch.zeros(4, 6, 3, dtype=torch.uint8))


def test_a_last_frame_of_another_shape_is_center_cropped_to_the_first_frames_aspect():
    image = torch.arange(3 * 40 * 100, dtype=torch.float32).view(3, 40, 100)
    wide = crop_to_aspect(image, (48, 64))  # 100 wide at 40 high -> 53 wide (4:3), centred
    assert wide.shape == (3, 40, 53) and torch.equal(wide, image[:, :, 23:76])
    tall = crop_to_aspect(image.transpose(1, 2), (48, 64))  # 40 x 100 (w x h) -> 40 x 30
    assert tall.shape == (3, 30, 40)
    assert crop_to_aspect(image, (20, 50)) is image  # same aspect: untouched


def test_image_to_video_shift_follows_the_size_as_the_official_defaults():
    for name in ("i2v-14B-480P", "i2v-14B-720P"):
        preset = PRESETS[name]
        assert default_shift(preset, (832, 480)) == default_shift(preset, (480, 832)) == 3.0
        assert default_shift(preset, (1280, 720)) == 5.0
    assert default_shift(PRESETS["flf2v-14B"], (832, 480)) == 16.0
    assert default_shift(PRESETS["t2v-1.3B"], (832, 480)) == 5.0
