"""Encoded image bytes -> uint8 RGB pixels; every failure is an `ImageError` saying why.

The one place images are decoded (the LLaVA pipeline and builder, the eval files, the
scene suite's TFDS records, predict's --image). What it accepts and does:

* formats: `FORMATS` only (PNG, JPEG, GIF, BMP, WebP, TIFF, PPM); other bytes are an
  "unreadable image", as are corrupt or truncated files (never decoded in part);
* size: any, up to `MAX_PIXELS` (width x height, read from the header before any pixel is
  decoded): a larger one is an "image too large" (a decompression-bomb guard); `decode`
  resizes to ``size x size`` (bicubic), so a 1x1 image is legitimate;
* mode: RGB as is; grayscale, bilevel, palette, CMYK, YCbCr converted to RGB; alpha
  (RGBA, LA, PA, a palette or colour key with transparency) composited over white,
  what a viewer shows; 16-bit grayscale scaled to 8 bits (v * 255 / 65535, rounded).
  32-bit float or integer images beyond 16 bits have no defined range: "unsupported
  image mode". Animated images: the first frame.

`ImageError.reason` is the short reason a reader counts skipped rows by.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_PIXELS = 1 << 26  # 67M pixels (8192 x 8192); more is an "image too large"
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")  # JPEG includes MPO
UNREADABLE, TOO_LARGE, UNSUPPORTED_MODE, WRONG_IMAGE = (
    "unreadable image", "image too large", "unsupported image mode", "wrong image")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
  """Bytes that give no usable image; ``reason`` is one of the module's reasons."""

  def __init__(self, reason: str, message: str):
    self.reason = reason
    super().__init__(message)

  def __reduce__(self):  # Picklable: grain's worker processes send errors back.
    return type(self), (self.reason, str(self))


def _open(data: bytes) -> Image.Image:
  """The image in ``data``, its header read and its size checked (no pixels decoded)."""
  if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
    raise ImageError(UNREADABLE, f"no image bytes (got {type(data).__name__} of "
                     f"{len(data) if hasattr(data, '__len__') else '?'} bytes)")
  Image.init()  # Registers every plugin (once), so that FORMATS are all known.
  try:
    im = Image.open(io.BytesIO(data), formats=FORMATS)
  except Image.DecompressionBombError as e:  # PIL's own guard, at twice its MAX_IMAGE_PIXELS
    raise ImageError(TOO_LARGE, f"{e} (over images.MAX_PIXELS = {MAX_PIXELS} too: a "
                     "decompression-bomb guard)") from None
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types.
    raise ImageError(UNREADABLE, f"not a {'/'.join(FORMATS)} image "
                     f"({type(e).__name__}: {e})") from None
  w, h = im.size
  if w * h > MAX_PIXELS or w <= 0 or h <= 0:
    im.close()
    raise ImageError(TOO_LARGE, f"{w}x{h} = {w * h} pixels, over the limit of {MAX_PIXELS} "
                     "(images.MAX_PIXELS, a decompression-bomb guard)")
  return im


def _to_rgb(im: Image.Image) -> Image.Image:
  """The decoded image in mode RGB, as the module docstring says; loads the pixels."""
  im.load()  # Decodes now: a corrupt or truncated file raises here.
  mode = im.mode
  if mode == "RGB" and "transparency" not in im.info:
    return im
  if mode in _16_BIT_MODES:
    a = np.asarray(im)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise ImageError(UNSUPPORTED_MODE, f"mode {mode} with values in [{a.min()}, {a.max()}], "
                       "beyond 16 bits")
    gray = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
  if mode in ("F", "I;32", "I;32B", "I;32L"):
    raise ImageError(UNSUPPORTED_MODE, f"mode {mode} (32-bit values have no defined range)")
  if mode in _ALPHA_MODES or "transparency" in im.info:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return im.convert("RGB")


def _decoded(im: Image.Image) -> Image.Image:
  """An opened image (`_open`) decoded to RGB at its own size; `ImageError` if it cannot be."""
  try:
    return _to_rgb(im)
  except ImageError:
    raise
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types.
    raise ImageError(UNREADABLE, f"{im.format} {im.mode} {im.size[0]}x{im.size[1]}: "
                     f"{type(e).__name__}: {e}") from None


def decode(data: bytes, size: int | None) -> np.ndarray:
  """Encoded bytes -> uint8 [size, size, 3] (bicubic resize when the size differs), or
  with ``size`` None uint8 [H, W, 3] at the image's own size. Raises `ImageError`."""
  im = _decoded(_open(data))
  if size is not None and im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(im, np.uint8)


def decode_exact(data: bytes, height: int, width: int) -> np.ndarray:
  """Encoded bytes of an RGB image of exactly ``height`` x ``width`` -> uint8 [H, W, 3];
  anything else (another size, a mode that needs converting) is an `ImageError` "wrong
  image": for images whose pixels labels are aligned with (the scene suite)."""
  im = _open(data)
  if im.mode != "RGB" or im.size != (width, height):
    raise ImageError(WRONG_IMAGE, f"a {im.mode} {im.size[0]}x{im.size[1]} image; expected "
                     f"RGB {width}x{height}")
  return np.asarray(_decoded(im), np.uint8)
