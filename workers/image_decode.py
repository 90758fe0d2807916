"""Decode a classify-image job's images into what EfficientNet-Lite0 reads: float32 tensors of
3 x 224 x 224, RGB, ``(x - 127) / 128``. Runs in the prepare step (off the ingest thread, while
the device runs the previous batch), so a batch is only a stack of ready tensors.

Every cost is bounded before it is paid, and every problem with an image is ``InvalidJob``
naming the image (its index and its path, or the size of inline bytes; never its contents):

- a file's size is checked with ``stat`` before it is opened (``MAX_IMAGE_FILE_BYTES``), and
  again on the descriptor opened (``O_NOFOLLOW | O_NONBLOCK``: a symlink or FIFO swapped in
  after the look is refused, not followed or waited on); Pillow reads from that descriptor as it
  decodes, never the whole file into memory; inline bytes are capped by the job schema;
- only JPEG, PNG and WebP are opened (Pillow tries no other plugin); GIF, BMP, TIFF, HEIC... are
  named and refused;
- the pixel count is read from the header and checked (``MAX_IMAGE_PIXELS``) before anything is
  decoded; Pillow's own decompression-bomb check (``DecompressionBombError``, or its warning
  turned into an error) is refused the same way;
- a JPEG is decoded at a reduced scale (libjpeg's DCT scaling, ``draft``) where it is at least
  twice the size the crop needs, so a 50 MP photo costs a fraction of its full decode;
- a truncated or corrupt file fails (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off).

Then, as TensorFlow's EfficientNet-Lite evaluation does: the EXIF orientation is applied (as
``ImageOps.exif_transpose`` would), transparency is composited onto white, the central square of
0.875 x the short side is resized to 224 x 224 (bicubic, antialiased), and normalized.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.kinds.classify_image import ImageRef
from shared.settings import Settings

INPUT_SIZE: Final = 224
CROP_FRACTION: Final = 0.875
MEAN: Final = 127.0
STD: Final = 128.0
# 64 MiB: a 50 MP PNG compresses to less. Checked before the file is opened.
MAX_IMAGE_FILE_BYTES: Final = 64 * 1024 * 1024
# 50 megapixels (8,660 x 5,773; a phone's full-resolution 50 MP photo fits): decoded RGBA that is
# 200 MB, within Pillow's own bomb limit (89.5 MP), checked from the header first.
MAX_IMAGE_PIXELS: Final = 50_000_000
ACCEPTED_FORMATS: Final = ("JPEG", "PNG", "WEBP")  # Pillow's plugin names; a JPEG with MP data opens as MPO
# A JPEG at least twice this short side is decoded at 1/2, 1/4 or 1/8 scale, never below it.
_DRAFT_SIDE: Final = 2 * round(INPUT_SIZE / CROP_FRACTION)
_OPEN_FLAGS: Final = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
_ORIENTATION_TAG: Final = 0x0112
# EXIF orientation -> the transpose that makes the image upright (ImageOps.exif_transpose's table).
_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Formats refused by name, from their first bytes (anything else is "not an image").
_OTHER_FORMATS: Final = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
)


def load_job_images(images: list[ImageRef], settings: Settings | None = None) -> list[torch.Tensor]:
    """Every image of a job, decoded and preprocessed; the first bad one fails the job."""
    settings = settings or Settings()
    return [load_image(image, i, settings) for i, image in enumerate(images)]


def load_image(image: ImageRef, index: int, settings: Settings | None = None) -> torch.Tensor:
    where = f"images.{index} ({image.source()})"
    if image.path is not None:
        resolved = resolve_input(image.path, settings, field=f"images.{index}.path")
        return load_image_file(resolved, where)
    assert image.b64 is not None  # the schema requires exactly one source
    return decode_image(image.b64, where)


def load_image_file(path: Path, where: str | None = None, max_bytes: int = MAX_IMAGE_FILE_BYTES) -> torch.Tensor:
    """Decode the file at ``path`` (already resolved, see ``resolve_input``): size checked with
    ``stat`` first, then on the descriptor, which Pillow reads from."""
    where = where or str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InvalidJob(f"{where}: file not found") from None
    except OSError as exc:
        raise InvalidJob(f"{where}: cannot read ({exc.strerror or type(exc).__name__})") from exc
    _check_file(info, where, max_bytes)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise InvalidJob(f"{where}: cannot read ({exc.strerror or type(exc).__name__})") from exc
    with os.fdopen(fd, "rb") as f:  # closes fd, whatever happens
        _check_file(os.fstat(fd), where, max_bytes)
        return _decode(f, where)


def decode_image(data: bytes, where: str = "image") -> torch.Tensor:
    """Decode JPEG, PNG or WebP bytes into a 3 x 224 x 224 float32 tensor, or ``InvalidJob``."""
    if not data:
        raise InvalidJob(f"{where}: empty (0 bytes)")
    return _decode(io.BytesIO(data), where)


def _check_file(info: os.stat_result, where: str, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise InvalidJob(f"{where}: not a regular file")
    if info.st_size == 0:
        raise InvalidJob(f"{where}: empty (0 bytes)")
    if info.st_size > max_bytes:
        raise InvalidJob(
            f"{where}: {info.st_size / (1024 * 1024):.1f} MB, over the limit of {max_bytes / (1024 * 1024):.0f} MB"
            " for an image file"
        )


def _decode(fp: BinaryIO, where: str) -> torch.Tensor:
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone in this process turned Pillow's check off
        raise InvalidJob(f"{where}: cannot decode safely (PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this worker)")
    head = fp.read(16)
    fp.seek(0)
    try:
        with Image.open(fp, formats=ACCEPTED_FORMATS) as im:
            width, height = im.size
            if width < 1 or height < 1:
                raise InvalidJob(f"{where}: the image is {width} x {height} pixels")
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidJob(
                    f"{where}: {width} x {height} = {width * height} pixels, over the limit of {MAX_IMAGE_PIXELS}"
                )
            kind = im.format or "image"
            if kind in ("JPEG", "MPO"):
                im.draft(None, (_DRAFT_SIDE, _DRAFT_SIDE))  # DCT scaling: at 1/2..1/8 when that still leaves 2x
            im.load()
            orientation = _orientation(im)
            return preprocess(im, orientation)
    except InvalidJob:
        raise
    except UnidentifiedImageError:
        raise InvalidJob(f"{where}: {_not_accepted(head)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidJob(
            f"{where}: its header claims more pixels than Pillow decodes safely (a decompression bomb);"
            f" the limit is {MAX_IMAGE_PIXELS} pixels"
        ) from None
    except Exception as exc:  # Pillow's parsers raise many types on hostile bytes
        problem = "truncated" if "truncated" in str(exc) else "corrupt"
        raise InvalidJob(f"{where}: not a readable JPEG, PNG or WebP image ({problem}: {type(exc).__name__})") from None


def _not_accepted(head: bytes) -> str:
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return f"{name} images are not accepted; send JPEG, PNG or WebP"
    if head[4:8] == b"ftyp":
        return "HEIC/AVIF images are not accepted; send JPEG, PNG or WebP"
    return "not a JPEG, PNG or WebP image"


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 to 8), 1 where there is none or the EXIF block is unreadable (the
    pixels are still good: the image is used as stored)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block costs its orientation only
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _upright_modes(im: Image.Image) -> Image.Image:
    """One of L, LA, RGB or RGBA (whatever the decoder gave: palette, 1-bit, 16-bit, CMYK...)."""
    mode = im.mode
    has_key = "transparency" in im.info  # a palette's or a colour-key's transparent entry
    if mode in ("RGB", "L"):
        return im.convert("RGBA" if mode == "RGB" else "LA") if has_key else im
    if mode in ("RGBA", "LA"):
        return im
    if mode in ("P", "PA"):
        return im.convert("RGBA" if has_key or mode == "PA" else "RGB")
    if mode == "1":
        return im.convert("L")
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit greys: PNG's range is 0-65535
        grey = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8), mode="L")
    if mode in ("RGBa", "La"):
        return im.convert(mode.upper())
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def preprocess(im: Image.Image, orientation: int = 1) -> torch.Tensor:
    """The central square (0.875 of the short side), resized to 224 x 224 (bicubic), turned as
    the EXIF orientation says, on white where transparent, as ``(rgb - 127) / 128``, CHW.

    Cropping before turning is the same crop: a centred square stays centred under every
    orientation, so the turn is applied to 224 x 224 pixels, not the whole photo."""
    im = _upright_modes(im)
    width, height = im.size
    side = CROP_FRACTION * min(width, height)
    if side < 1:  # a line of pixels: take all of its short side
        side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    small = im.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    if orientation in _TRANSPOSE:
        small = small.transpose(_TRANSPOSE[orientation])
    if small.mode in ("RGBA", "LA"):
        white = Image.new("RGBA", small.size, (255, 255, 255, 255))
        white.alpha_composite(small.convert("RGBA"))
        small = white
    rgb = np.asarray(small.convert("RGB"), dtype=np.float32)  # H x W x 3, a fresh array
    rgb -= MEAN
    rgb /= STD
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
