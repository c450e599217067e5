"""EXIF orientation: decoded upright for training and evaluation, recorded upright by the builder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from albef_ray.data.build.candidates import Candidate
from albef_ray.data.transforms import AugmentSpec, decode_image, eval_image, pretrain_image
from albef_ray.data.build.validate import check_candidate, image_size

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _stored(orientation: int, fmt: str = "JPEG", size=(64, 32)) -> bytes:
    """A stored image, left half red and right half blue, tagged with an EXIF orientation."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = RED
    pixels[:, size[0] // 2 :] = BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decoding_turns_the_image_as_a_viewer_does(orientation, fmt):
    data = _stored(orientation, fmt)
    viewed = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    decoded = decode_image(data)
    assert decoded.size == viewed.size
    assert np.array_equal(np.asarray(decoded), np.asarray(viewed))
    assert image_size(data) == viewed.size  # the builder records the displayed size
    row = check_candidate(Candidate("s", "in", "id", ["a tall picture"], image=data)).rows[0]
    assert (row["width"], row["height"]) == viewed.size


def test_a_portrait_photo_stored_sideways_is_trained_and_evaluated_upright():
    # Orientation 6: stored 64x32 (red left, blue right), displayed 32x64 with red on top.
    data = _stored(6)
    for jpeg_draft in (True, False):
        image = eval_image(data, 16, jpeg_draft)
        top, bottom = image[:, 2, 8], image[:, 13, 8]
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    spec = AugmentSpec(image_res=16, crop_scale=(1.0, 1.0), flip_prob=0.0, randaug_ops=0, jpeg_draft=True)
    # the crop is sampled on the 32x64 upright image (an aspect outside 3/4..4/3: the centred
    # 32x43 box), so the red top and blue bottom both stay in it.
    image = pretrain_image(data, spec, torch.Generator().manual_seed(0))
    assert image[0, 1, 8] > 200 and image[2, 1, 8] < 60 and image[2, 14, 8] > 200 and image[0, 14, 8] < 60


def test_an_upright_image_is_left_alone():
    data = _stored(1)
    assert decode_image(data).size == (64, 32) and image_size(data) == (64, 32)
