"""Reading image and mask files as users have them: EXIF orientation, 16-bit and float pixels, palette and
0/1 masks, and Pillow's pixel limit, each a one-line error naming the file when it cannot be read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from shortcut_lightning.errors import DataError

EXIF_ORIENTATION = 0x0112
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT = (
    "I;16",
    "I;16B",
    "I;16L",
    "I;16N",
    "I",
)  # "I" (32-bit) is what older decoders give 16-bit data as
IMAGE_FIX = "Fix or remove the file, or run with check_images: full to find and skip every unreadable image before training."
MASK_FIX = "Fix the file or drop the mask_filename column."


@contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Our own limit replaces Pillow's while a file is read (in whichever process reads it)."""
    if max_pixels is None:
        yield
        return
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _pixels(path: Path) -> int:
    with _pixel_limit(0), Image.open(path) as im:
        return im.width * im.height


def _too_large(message: str, pixels: int) -> DataError:
    error = DataError(message)
    error.pixels = pixels  # for the setup check's short list of bad files
    return error


@contextmanager
def open_image(path: Path, what: str = "image", max_pixels: int | None = None) -> Iterator[Image.Image]:
    """The opened (not yet decoded) file; errors while opening or decoding it in the block name the file."""
    try:
        with _pixel_limit(max_pixels), Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise _too_large(
                    f"{what} {path} has {im.width * im.height:,} pixels, more than data.max_image_pixels "
                    f"({max_pixels:,}): raise data.max_image_pixels to at least {im.width * im.height}",
                    im.width * im.height,
                )
            yield im
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        pixels = _pixels(path)
        raise _too_large(
            f"{what} {path} has {pixels:,} pixels, more than Pillow allows ({2 * Image.MAX_IMAGE_PIXELS:,}, a guard "
            f"against decompression bombs): if the file is genuine, set data.max_image_pixels to at least {pixels}",
            pixels,
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot read {what} {path}: {exc}. {IMAGE_FIX if what == 'image' else MASK_FIX}"
        ) from exc


def orientation(im: Image.Image) -> int:
    """The file's EXIF orientation (1: as stored)."""
    value = im.getexif().get(EXIF_ORIENTATION, 1)
    return value if value in TRANSPOSE else 1


def orient(im: Image.Image, value: int) -> Image.Image:
    """``im`` turned as EXIF orientation ``value`` says the camera held it."""
    return im.transpose(TRANSPOSE[value]) if value in TRANSPOSE else im


def to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB: 16-bit values scaled (65535 -> 255, not clipped), floats in [0, 1] scaled, the rest converted."""
    if im.mode in SIXTEEN_BIT:
        values = np.asarray(im).astype(np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        values = np.asarray(im)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if np.isnan(values).any() or low < 0 or high > 1:
            raise DataError(
                f"image {path} holds floating-point pixels from {low:g} to {high:g}: only values in [0, 1] are "
                "read (as value * 255); save it as an 8- or 16-bit image"
            )
        return Image.fromarray(np.rint(values * 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these through RGBA only
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def as_tensor(rgb: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 [3, H, W] (a view of an [H, W, 3] array) from an RGB image or array."""
    array = np.array(rgb, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1)


def read_image(path: Path, max_image_pixels: int | None = None) -> tv_tensors.Image:
    """RGB uint8 image as the camera held it; a missing, unreadable or oversized file is named in the error."""
    with open_image(path, "image", max_image_pixels) as im:
        turn = orientation(im)
        rgb = orient(to_rgb(im, path), turn)
        return tv_tensors.Image(as_tensor(rgb))


def mask_pixels(im: Image.Image, threshold: float = 0.0) -> np.ndarray:
    """Bool [H, W]: where the mask is set (docs/datasets.md, Masks).

    A pixel is set where its value exceeds ``threshold`` times the format's maximum (0: where it is non-zero);
    RGB where any channel does; with an alpha channel where the colour does and alpha > 0, or, when every
    colour value is zero, where alpha does. Palette images: where the palette index is non-zero.
    """
    mode = im.mode
    if mode == "1":
        return np.array(im, dtype=bool)
    if mode in ("P", "PA"):
        values = np.asarray(im)
        if mode == "P":
            return values != 0
        index, alpha = values[..., 0], values[..., 1]
        return (index != 0) & (alpha > 0) if index.any() else alpha > threshold * 255
    if mode not in ("L", "LA", "RGB", "RGBA", "F", *SIXTEEN_BIT):
        im = im.convert("RGBA" if "A" in mode or "a" in mode else "RGB")
        mode = im.mode
    top = 1.0 if mode == "F" else 65535 if mode in SIXTEEN_BIT else 255
    values = np.asarray(im)

    def above(v: np.ndarray) -> np.ndarray:
        return v > threshold * top if threshold > 0 else v != 0

    if mode in ("LA", "RGBA"):
        colour, alpha = values[..., :-1], values[..., -1]
        if not colour.any():
            return above(alpha)
        return above(colour).any(axis=-1) & (alpha > 0)
    set_ = above(values)
    return set_.any(axis=-1) if set_.ndim == 3 else set_


def read_mask_array(path: Path, threshold: float = 0.0, max_pixels: int | None = None) -> np.ndarray:
    """Bool [H, W] mask of ``path``, EXIF orientation applied as to images."""
    with open_image(path, "mask", max_pixels) as im:
        turn = orientation(im)
        pixels = mask_pixels(im, threshold)
    if turn in TRANSPOSE:
        pixels = np.asarray(orient(Image.fromarray(pixels), turn), dtype=bool)
    return pixels


def read_mask(
    path: Path, invert: bool = False, threshold: float = 0.0, max_pixels: int | None = None
) -> tv_tensors.Mask:
    """Binary mask [1, H, W]; ``invert`` when the file marks the core object instead of the spurious region."""
    mask = torch.from_numpy(read_mask_array(path, threshold, max_pixels).copy()).unsqueeze(0)
    return tv_tensors.Mask(~mask if invert else mask)
