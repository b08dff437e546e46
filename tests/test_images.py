"""megallava.data.images against HF's CLIPImageProcessor after LLaVA's expand2square, on real photographs.

Measured (transformers 5.24, PIL backend, no torchvision): PNG photos and full-scale JPEG decodes match HF exactly
(max abs diff 0.0 after normalisation): both resize the uint8 image with PIL's bicubic filter. With the default
JPEG draft decode, large JPEGs are DCT-downscaled first: retina.jpg (1411 px, scale 1/4) differs by mean 0.010,
max 0.74 (at the sharp rim of the fundus disc); hubble_deep_field.jpg (1000 px, scale 1/2) mean 0.010, max 0.23.
"""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from megallava.data.demo_data import skimage_data_dir
from megallava.data.images import (CLIP_MEAN, CLIP_STD, PAD_COLOR, ImageError, expand2square, load_image, to_rgb,
                                   validate_image)

DATA = skimage_data_dir()


def raw(name):
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def hf():
    from transformers import CLIPImageProcessor
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                              do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=Image.BICUBIC)
    # HF's PIL backend (the one without torchvision) resizes uint8 PIL images, as we do: exact. The torchvision
    # backend resizes tensors and differs slightly.
    tol = 1e-5 if type(proc).__name__.endswith("Pil") else 0.05

    def run(img):
        return torch.from_numpy(np.asarray(proc(img, return_tensors="np")["pixel_values"][0])), tol
    return run


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "horse.png"])
def test_pad_matches_hf_after_expand2square(hf, name):
    data = raw(name)
    ours = load_image(data, 336, mode="pad")
    assert ours.shape == (3, 336, 336) and ours.dtype == torch.float32
    ref, tol = hf(expand2square(to_rgb(Image.open(io.BytesIO(data)))))
    assert (ours - ref).abs().max().item() <= tol


@pytest.mark.parametrize("name", ["chelsea.png", "page.png"])
def test_resize_matches_hf(hf, name):
    data = raw(name)
    ref, tol = hf(to_rgb(Image.open(io.BytesIO(data))))
    assert (load_image(data, 336, mode="resize") - ref).abs().max().item() <= tol


def test_jpeg_full_scale_is_exact_and_draft_is_close(hf):
    for name in ("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg"):
        data = raw(name)
        ref, tol = hf(expand2square(to_rgb(Image.open(io.BytesIO(data)))))
        assert (load_image(data, 336, draft=False) - ref).abs().max().item() <= tol
        diff = (load_image(data, 336) - ref).abs()
        assert diff.mean().item() < 0.02 and diff.max().item() < 1.0, name
    # rocket.jpg is 640x427: less than twice 336, so the draft keeps full scale and stays exact
    ref, tol = hf(expand2square(to_rgb(Image.open(io.BytesIO(raw("rocket.jpg"))))))
    assert (load_image(raw("rocket.jpg"), 336) - ref).abs().max().item() <= tol


def test_pad_geometry():
    x = load_image(raw("chelsea.png"), 336)  # 451x300: padded top and bottom with the CLIP mean colour
    pad = (torch.tensor(PAD_COLOR, dtype=torch.float32) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    band = 75 * 336 // 451 - 3  # rows fully inside the top pad, away from the bicubic blur at the edge
    assert PAD_COLOR == (122, 116, 104)
    assert torch.allclose(x[:, :band, :], pad.view(3, 1, 1).expand(3, band, 336), atol=1e-6)
    assert torch.allclose(x[:, -band:, :], pad.view(3, 1, 1).expand(3, band, 336), atol=1e-6)
    assert not torch.allclose(x[:, 168, :], pad.view(3, 1).expand(3, 336))
    gray = load_image(raw("camera.png"), 224)  # grayscale -> 3 identical channels before normalising
    un = gray * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert gray.shape == (3, 224, 224)
    assert torch.allclose(un[0], un[1], atol=1e-6) and torch.allclose(un[1], un[2], atol=1e-6)


def test_16bit_grey_is_scaled_not_clipped():
    grey = np.asarray(Image.open(io.BytesIO(raw("camera.png"))).convert("L"))
    buf8, buf16 = io.BytesIO(), io.BytesIO()
    Image.fromarray(grey).save(buf8, "PNG")
    Image.fromarray(grey.astype(np.uint16) * 257).save(buf16, "PNG")  # I;16, full 16-bit range
    assert Image.open(io.BytesIO(buf16.getvalue())).mode.startswith("I;16")
    assert torch.equal(load_image(buf16.getvalue(), 224), load_image(buf8.getvalue(), 224))


def test_validate_image():
    assert validate_image(raw("chelsea.png")) == (451, 300)
    assert validate_image(raw("rocket.jpg")) == (640, 427)


def _bad_inputs():
    jpg, png = raw("rocket.jpg"), raw("astronaut.png")
    return {
        "zero-byte": (b"", "empty image file"),
        "non-image": (b"this is a caption, not a picture", "not an image"),
        "truncated JPEG": (jpg[: len(jpg) // 2], "truncated"),
        "truncated PNG": (png[: len(png) // 2], "truncated"),
        "PNG header only": (png[:40], "corrupt PNG file"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_bytes_raise_image_error(case):
    data, words = _bad_inputs()[case]
    for fn in (lambda d: load_image(d, 336), validate_image):
        with pytest.raises(ImageError, match=words):
            fn(data)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown image mode 'crop'"):
        load_image(raw("chelsea.png"), 336, mode="crop")
