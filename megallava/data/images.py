"""CLIP image preprocessing, numerically LLaVA's: expand2square (pad) or shortest-side resize, bicubic, centre crop,
CLIP mean/std normalisation.

The pixels stay uint8 through PIL until the final normalise, exactly as HF's PIL-backend CLIPImageProcessor does
(it resizes a uint8 PIL image), so on full-resolution decodes the result is identical. JPEGs whose shortest side is
at least twice the target size are decoded at a reduced DCT scale (``Image.draft``), several times faster for large
photos, which changes pixels slightly (tests/test_images.py gives the measured difference); ``draft=False`` turns
it off. Transparency is composited onto white (HF's convert_to_rgb) and 16-bit grey is scaled to 8 bits.
Bad bytes raise ImageError; truncated files are errors (ImageFile.LOAD_TRUNCATED_IMAGES is left off).
"""
import io
from typing import Tuple

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), as LLaVA computes it
_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)


class ImageError(ValueError):
    pass


_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"RIFF", "WebP"), (b"BM", "BMP"))


def _open(data: bytes, draft_size: int = 0) -> Image.Image:
    """Decode fully (errors surface here, not later); optionally at a reduced JPEG scale."""
    if not data:
        raise ImageError("empty image file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # keeps both sides >= draft_size
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from e
    except Image.UnidentifiedImageError as e:
        fmt = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
        what = f"corrupt {fmt} file (header unreadable)" if fmt else f"not an image (starts with {data[:8]!r})"
        raise ImageError(f"{what}, {len(data)} bytes") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image ({len(data)} bytes): {e}") from e
    return img


def validate_image(data: bytes) -> Tuple[int, int]:
    """Fully decode; return (width, height) or raise ImageError."""
    img = _open(data)
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"image has size {w}x{h}")
    return w, h


def expand2square(img: Image.Image, color=PAD_COLOR) -> Image.Image:
    """LLaVA's expand2square: pad the short side with ``color``, image centred (offset rounded down)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is composited onto white (as HF's processor does; LLaVA's plain convert("RGB") would keep
    whatever colour hides under transparent pixels, often black)."""
    if img.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits (convert("RGB") would clip it to white)
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """HF CLIPImageProcessor: shortest side -> size (long side int-truncated), bicubic, then centre crop."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    if new != (w, h):
        img = img.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    if (left, top) != (0, 0) or new != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def load_image(data: bytes, image_size: int, mode: str = "pad", draft: bool = True) -> torch.Tensor:
    """Encoded image bytes -> float32 [3, image_size, image_size], CLIP-normalised.

    mode "pad": LLaVA's expand2square with the CLIP mean colour, then resize (+ centre crop, a no-op on a square);
    "resize": shortest side -> image_size, centre crop. ``draft=False`` decodes JPEGs at full scale (exact HF parity).
    """
    if mode not in ("pad", "resize"):
        raise ValueError(f"unknown image mode {mode!r}; expected 'pad' or 'resize'")
    img = _open(data, draft_size=image_size if draft else 0)
    img = to_rgb(img)
    if mode == "pad":
        img = expand2square(img)
    img = _resize_crop(img, image_size)
    x = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())  # uint8 [3, H, W]
    return x.float().div_(255.0).sub_(_MEAN).div_(_STD)  # in place: same arithmetic as HF, no temporaries
