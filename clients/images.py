"""Image inputs for the image task clients: encoded bytes, file paths or numpy arrays.

The pipelines take encoded image files, so a numpy array is encoded here as a PNG, with the
standard library only (zlib), to keep the SDK free of imaging libraries.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray]
"""What an image task client accepts per image: encoded bytes (JPEG, PNG), a file path, or a
uint8 array (H x W grey, H x W x 1|3|4: grey, RGB, RGBA)."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BIT_DEPTH = 8
PNG_COLOR_TYPES = {1: 0, 3: 2, 4: 6}
"""Channels -> PNG color type: grey, RGB (truecolor), RGBA (truecolor with alpha)."""
PNG_FILTER_NONE = b"\x00"
ZLIB_LEVEL = 1
"""Fast compression: the bytes travel once over a local network or shared memory."""
MAX_SIDE = 65_535
"""Largest width or height encoded here (the servers reject far smaller images anyway)."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image array.

    Args:
        array: H x W (grey) or H x W x C with C = 1 (grey), 3 (RGB) or 4 (RGBA), dtype uint8.

    Raises:
        ValueError: Another dtype or shape (the message says what was given and what works).
    """
    if array.dtype != np.uint8:
        raise ValueError(
            f"an image array must be uint8 (0-255), given {array.dtype}; convert it, e.g. "
            "(array * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in PNG_COLOR_TYPES:
        raise ValueError(
            f"an image array must be H x W or H x W x C with C in 1, 3, 4; given shape {list(array.shape)}"
        )
    height, width, channels = array.shape
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise ValueError(f"an image must be 1..{MAX_SIDE} pixels on each side, given {width} x {height}")
    rows = np.ascontiguousarray(array).reshape(height, width * channels)
    raw = np.empty((height, 1 + width * channels), dtype=np.uint8)
    raw[:, 0] = 0  # filter type 0 (none) for every row
    raw[:, 1:] = rows
    header = struct.pack(">IIBBBBB", width, height, PNG_BIT_DEPTH, PNG_COLOR_TYPES[channels], 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), ZLIB_LEVEL))
        + _chunk(b"IEND", b"")
    )


def image_bytes(image: ImageInput) -> bytes:
    """The encoded bytes of one image input.

    Raises:
        ValueError: An empty image, an array that cannot be encoded, or an unsupported type.
        OSError: A path that cannot be read.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    elif isinstance(image, np.ndarray):
        data = encode_png(image)
    else:
        raise ValueError(
            "an image must be encoded bytes, a file path or a uint8 numpy array, "
            f"given {type(image).__name__}"
        )
    if not data:
        raise ValueError("the image is empty (0 bytes)")
    return data
