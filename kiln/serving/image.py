"""The kiln_image backend's logic: encoded image files -> a model's normalized NCHW input.

Per image (the only per-image work): check the payload size, recognize the format from its first
bytes, read the header and check the dimensions against `max_pixels` and `max_aspect_ratio`
BEFORE any pixel is decoded (a decompression bomb is a few kilobytes of header claiming gigapixels),
decode (for JPEG optionally in draft mode, see below), apply the EXIF orientation, convert the
color mode, resize with Pillow so the shorter side is `round(image_size / crop_fraction)`, and
take the center `image_size` x `image_size` crop as uint8. Then, once for the whole dynamic batch:
scale and normalize through a per-channel lookup table (256 float32 values per channel, computed
with the same float32 operations as `(pixel / pixel_scale - mean) / std`, so the result is
bit-identical to computing it) into one float [N, C, H, W] array.

The steps reproduce `kiln.models.resnet50.build.preprocess` exactly (checked by a unit test): RGBA is
composited on `alpha_background` (white) with the same float32 arithmetic, grey is repeated to
RGB (resized as one channel, which gives the same pixels), Pillow's resampling filter, the same
size rounding and crop offsets. For a one-channel model, RGB is converted to grey with Pillow's
ITU-R 601-2 luma (`Image.convert("L")`), RGBA composited first.

JPEG draft mode (`jpeg_draft`): libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, the
largest reduction that still leaves the image at least as large as the resize target; Pillow's
filter then resizes from there. The served step ran 2.4x faster on full-HD JPEGs and 3.4x on
12-megapixel ones, and equally fast at 640x480, where no reduction applies
(benchmarks/image_decode.py). The pixels differ from a full decode (the DCT reduction is an area
average, not Pillow's bilinear filter): by 0.6 of an 8-bit grey level on average, measured on
photographs upscaled to 1600-4032 pixels. The reference pipeline
(`kiln.build.reference.image`) decodes the same way when the spec turns it on.

Letterbox mode (`resize_mode: letterbox`, for detectors): instead of the center crop, the whole
image is resized keeping its aspect ratio so that its longer side is `image_size` (each side
`round(side * image_size / longer side)`, from the upright image's full dimensions), placed in the
middle of an `image_size` x `image_size` canvas of grey level `pad_value` (114, YOLO's; normalized
like every pixel), the odd pixel of padding going to the right and bottom. The default,
`center_crop`, is unchanged.

Either mode can also output, per image, the transform mapping the model input's pixel
coordinates back onto the original (upright) image: FP32 [6] = (scale_x, scale_y, pad_x, pad_y,
width, height), where `x_original = (x_model - pad_x) / scale_x`, `y_original = (y_model - pad_y) /
scale_y` and width x height is the original image's size (the bounds to clip to). In letterbox
mode scale_x = resized width / width (likewise y) and pad_x, pad_y are the padding on the left and
top; in center_crop mode the pads are minus the crop's offsets. A model config declares it as a
second output FP32 dims [6] (any name); without one, the step outputs only the image.

Errors are per image and name it: `ImageError` ("image 2 of the request could not be decoded:
..."), a `ValueError` whose `reason` ("decode", "too_large", "unsupported_format",
"bad_dimensions", "invalid_input") labels the backend's failure metric. A request with a bad image
fails alone; the other requests of the dynamic batch are answered.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.params import Param, ParamError, parse_params

PIXEL_LEVELS = 256
"""8-bit pixels: the lookup tables have one entry per level."""
MAX_LEVEL = 255
SIXTEEN_TO_EIGHT_BITS = 8
"""16-bit grey PNGs are reduced to 8 bits by dropping the low byte (as Pillow does for 16-bit RGB)."""
HEADER_BYTES_SHOWN = 8
"""Leading bytes quoted in the error for a payload that is neither JPEG nor PNG."""
EXIF_ORIENTATION_TAG = 0x0112
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
RESIZE_MODES = ("center_crop", "letterbox")
"""How an image becomes image_size x image_size: the center crop, or the whole image padded."""
LETTERBOX_PAD = 114
"""YOLO's letterbox grey level (114/255 after scaling)."""
TRANSFORM_FIELDS = ("scale_x", "scale_y", "pad_x", "pad_y", "width", "height")
"""The optional transform output's values, per image (FP32 [6]; see the module doc)."""
TRANSFORM_SIZE = len(TRANSFORM_FIELDS)
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
"""EXIF orientations that turn the image by 90 degrees (width and height swap)."""

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
"""Pillow's resampling filters by name (all antialias when shrinking, but nearest)."""

SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WEBP"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypheic", "HEIC"),
    (0, b"\x00\x00\x01\x00", "ICO"),
)
"""(offset, magic bytes, format) of the formats recognized by name; only JPEG and PNG decode."""
DECODABLE = ("JPEG", "PNG")

# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

IMAGE_PARAMS: tuple[Param, ...] = (
    Param("channels", "str", "3", "model input channels: 3 (RGB) or 1 (grey)", choices=("1", "3")),
    Param(
        "image_size", "int", 224, "height and width of the output (the center crop or the letterbox)",
        minimum=1,
    ),
    Param(
        "resize_mode", "str", "center_crop",
        "center_crop: resize the shorter side, then crop the center; letterbox: resize the longer "
        "side to image_size keeping the aspect ratio and pad the rest with pad_value",
        choices=RESIZE_MODES,
    ),
    Param(
        "crop_fraction", "float", 0.875,
        "the center crop's share of the resized shorter side, in (0, 1]: the shorter side is "
        "resized to round(image_size / crop_fraction) (center_crop only)", minimum=1e-3,
    ),
    Param(
        "pad_value", "int", LETTERBOX_PAD,
        "grey level (0-255) of the letterbox padding, normalized like the pixels (letterbox only)",
        minimum=0,
    ),
    Param("pixel_scale", "float", 255.0, "pixels are divided by this first", minimum=1e-6),
    Param(
        "mean", "floats", (0.0,),
        "subtracted per channel after scaling (one value, or one per channel)",
    ),
    Param(
        "std", "floats", (1.0,),
        "divided by per channel after subtracting the mean (one value, or one per channel; > 0)",
    ),
    Param("resample", "str", "bilinear", "Pillow's resampling filter", choices=tuple(RESAMPLING)),
    Param(
        "alpha_background", "int", MAX_LEVEL,
        "grey level (0-255) transparent pixels are composited on; 255 is white", minimum=0,
    ),
    Param(
        "jpeg_draft", "bool", False,
        "decode JPEGs at 1/2, 1/4 or 1/8 scale when that still covers the resize target "
        "(much faster for large photographs; changes pixels)",
    ),
    Param(
        "exif_orientation", "bool", True,
        "turn JPEGs upright by their EXIF orientation tag before resizing",
    ),
    Param("formats", "list", DECODABLE, "accepted image formats", choices=DECODABLE),
    Param(
        "max_image_bytes", "int", 20_000_000, "largest accepted payload (encoded bytes)", minimum=1
    ),
    Param(
        "max_pixels", "int", 40_000_000,
        "largest accepted width x height, checked from the header before decoding", minimum=1,
    ),
    Param(
        "max_aspect_ratio", "float", 20.0,
        "largest accepted longer side / shorter side (bounds the resized image)", minimum=1.0,
    ),
    Param(
        "threads", "int", 1,
        "threads decoding the images of one dynamic batch (Pillow releases the GIL)", minimum=1,
    ),
)
"""kiln_image's `parameters` (config.pbtxt); see the module docstring."""


@dataclass(frozen=True)
class ImageParams:
    """kiln_image's `parameters`, parsed (see IMAGE_PARAMS for each key's meaning)."""

    channels: str
    image_size: int
    resize_mode: str
    crop_fraction: float
    pad_value: int
    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str
    alpha_background: int
    jpeg_draft: bool
    exif_orientation: bool
    formats: tuple[str, ...]
    max_image_bytes: int
    max_pixels: int
    max_aspect_ratio: float
    threads: int

    @property
    def num_channels(self) -> int:
        """The output's channels, 1 or 3."""
        return int(self.channels)

    @property
    def letterbox(self) -> bool:
        """Whether the whole image is fitted and padded (else center-cropped)."""
        return self.resize_mode == "letterbox"


def image_params(model: str, raw: Mapping[str, str]) -> ImageParams:
    """Parses and cross-checks kiln_image's `parameters`.

    Raises:
        ParamError: a key is unknown, a value is out of its range, or values disagree (mean or std
            of another length than 1 or `channels`, a std of 0, crop_fraction above 1, an
            alpha_background or pad_value above 255, crop_fraction set with resize_mode letterbox
            or pad_value with center_crop), naming the model, the key and the value.
    """
    params = parse_params(model, raw, IMAGE_PARAMS, ImageParams)
    channels = params.num_channels
    for name in ("mean", "std"):
        values = getattr(params, name)
        if len(values) not in (1, channels):
            raise ParamError(
                f"model '{model}': parameter '{name}' must hold 1 or {channels} (channels) values, "
                f"got {len(values)}: {raw.get(name)!r}"
            )
    if any(s <= 0 for s in params.std):
        raise ParamError(f"model '{model}': parameter 'std' must be > 0 per channel, got {raw.get('std')!r}")
    if params.crop_fraction > 1:
        raise ParamError(
            f"model '{model}': parameter 'crop_fraction' must be in (0, 1], got {raw.get('crop_fraction')!r}"
        )
    for name in ("alpha_background", "pad_value"):
        if getattr(params, name) > MAX_LEVEL:
            raise ParamError(
                f"model '{model}': parameter '{name}' must be in 0..{MAX_LEVEL}, got {raw.get(name)!r}"
            )
    if params.letterbox and "crop_fraction" in raw:
        raise ParamError(
            f"model '{model}': parameter 'crop_fraction' applies to resize_mode center_crop only; "
            f"resize_mode letterbox keeps the whole image, got crop_fraction {raw['crop_fraction']!r}"
        )
    if not params.letterbox and "pad_value" in raw:
        raise ParamError(
            f"model '{model}': parameter 'pad_value' applies to resize_mode letterbox only, "
            f"got pad_value {raw['pad_value']!r} with resize_mode center_crop"
        )
    return params


class ImageError(RequestError):
    """One image of a request cannot be used; the message names the image and the problem.

    Attributes:
        index: The image's position in the request's batch, counting from 0.
        reason: "decode", "too_large", "unsupported_format", "bad_dimensions" or "invalid_input"
            (the label of the backend's failure metric).
        problem: What was wrong, without the image's position.
    """

    _WHAT = {
        "decode": "could not be decoded",
        "too_large": "is too large",
        "unsupported_format": "has an unsupported format",
        "bad_dimensions": "has unusable dimensions",
        "invalid_input": "is not an encoded image",
    }

    def __init__(self, index: int, reason: str, problem: str) -> None:
        self.index = index
        self.reason = reason
        self.problem = problem
        super().__init__(f"image {index} of the request {self._WHAT.get(reason, 'failed')}: {problem}")


def sniff(data: bytes) -> str | None:
    """The format named by the payload's first bytes ("JPEG", "PNG", "GIF", ...), or None."""
    for offset, magic, name in SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


_PNG_SIZE = struct.Struct(">II")
_PNG_IHDR_AT = 12
"""Offset of the first chunk's type; a valid PNG's first chunk is IHDR, width and height follow."""
_JPEG_U16 = struct.Struct(">H")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are others."""
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
"""Markers without a length field (TEM, RSTn, SOI, EOI)."""
_JPEG_SOS = 0xDA


def header_dimensions(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) read from a PNG's IHDR or a JPEG's start-of-frame segment, without Pillow
    and without touching pixel data; None when the header is cut short or malformed."""
    if kind == "PNG":
        if data[_PNG_IHDR_AT : _PNG_IHDR_AT + 4] != b"IHDR" or len(data) < _PNG_IHDR_AT + 12:
            return None
        width, height = _PNG_SIZE.unpack_from(data, _PNG_IHDR_AT + 4)
        return width, height
    if kind == "JPEG":
        at = 2  # after SOI
        while at + 4 <= len(data):
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            if marker in _JPEG_STANDALONE:
                at += 2
                continue
            if marker == _JPEG_SOS:
                return None  # scan data before any frame header
            (length,) = _JPEG_U16.unpack_from(data, at + 2)
            if marker in _JPEG_SOF:
                if at + 9 > len(data):
                    return None
                height, width = struct.unpack_from(">HH", data, at + 5)
                return width, height
            at += 2 + length
        return None
    return None


def resize_target(width: int, height: int, image_size: int, crop_fraction: float) -> tuple[int, int]:
    """(width, height) the image is resized to: the shorter side becomes
    `max(image_size, round(image_size / crop_fraction))`, the aspect ratio is kept (rounded), and
    neither side is below that."""
    short = max(image_size, round(image_size / crop_fraction))
    scale = short / min(width, height)
    return max(short, round(width * scale)), max(short, round(height * scale))


def letterbox_target(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) the image is resized to in letterbox mode: the longer side becomes
    `image_size`, the shorter `round(side * image_size / longer side)` (at least 1)."""
    scale = image_size / max(width, height)
    return max(1, min(image_size, round(width * scale))), max(1, min(image_size, round(height * scale)))


def _composite(rgba: np.ndarray, background: float) -> np.ndarray:
    """uint8 [H, W, 4] -> uint8 [H, W, 3] composited on `background` (float32 arithmetic, rounded
    half to even: the same operations as kiln.models.resnet50.build's RGBA conversion)."""
    rgb = rgba[:, :, :3].astype(np.float32)
    alpha = rgba[:, :, 3:].astype(np.float32) / float(MAX_LEVEL)
    composite = rgb * alpha + background * (1.0 - alpha)
    return np.clip(np.rint(composite), 0, MAX_LEVEL).astype(np.uint8)


def lookup_tables(params: ImageParams) -> np.ndarray:
    """float32 [channels, 256]: `(level / pixel_scale - mean[c]) / std[c]` for every 8-bit level,
    computed in float32 in that order (so a lookup equals the arithmetic, bit for bit)."""
    channels = params.num_channels
    levels = np.arange(PIXEL_LEVELS, dtype=np.float32)
    mean = np.broadcast_to(np.asarray(params.mean, dtype=np.float32), (channels,))
    std = np.broadcast_to(np.asarray(params.std, dtype=np.float32), (channels,))
    scaled = levels / np.float32(params.pixel_scale)
    return np.stack([(scaled - mean[c]) / std[c] for c in range(channels)]).astype(np.float32)


class ImagePreprocessor:
    """Encoded images -> normalized float [N, C, image_size, image_size] (see the module doc).

    `place` is the per-image work (bytes -> uint8 crop or letterbox, and its transform), `crop`
    the same without the transform; `normalize` the vectorized batch step; `run` serves a dynamic
    batch of Triton requests; `preprocess` (and `preprocess_with_transforms`) the in-process entry.
    With `transform_name`, `run` also outputs each image's transform (FP32 [6]) under that name.
    """

    def __init__(
        self,
        params: ImageParams,
        input_name: str,
        output_name: str,
        output_dtype: np.dtype | type = np.float32,
        transform_name: str | None = None,
    ) -> None:
        self.params = params
        self.input_name = input_name
        self.output_name = output_name
        self.output_dtype = np.dtype(output_dtype)
        self.transform_name = transform_name
        self.channels = params.num_channels
        self.size = params.image_size
        self.resample = RESAMPLING[params.resample]
        self.tables = lookup_tables(params)
        self.background = float(params.alpha_background)
        self._pool = ThreadPoolExecutor(params.threads) if params.threads > 1 else None

    # -- per image ----------------------------------------------------------------------------
    def open(self, data: Any, index: int = 0) -> Image.Image:
        """Checks the payload and the header; returns the opened (not yet decoded) image.

        Raises:
            ImageError: the payload is not bytes, empty, over `max_image_bytes`, of another format,
                its header is unreadable, or its dimensions are zero, over `max_pixels` or
                `max_aspect_ratio`.
        """
        data = self._payload(data, index)
        kind = self._format(data, index)
        width, height = self._dimensions(data, kind, index)
        return self._open_checked(data, kind, width, height, index)

    def _payload(self, data: Any, index: int) -> bytes:
        """The payload as bytes: not text, not empty, at most `max_image_bytes`."""
        if isinstance(data, np.ndarray) and data.dtype == object and data.size == 1:
            data = data.item()
        if isinstance(data, str):
            raise ImageError(
                index, "invalid_input", "got a text string; send the file's raw bytes (BYTES tensor)"
            )
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageError(
                index, "invalid_input", f"expected the file's bytes, got {type(data).__name__}"
            )
        data = bytes(data)
        if not data:
            raise ImageError(index, "decode", "the payload is empty (0 bytes)")
        limit = self.params.max_image_bytes
        if len(data) > limit:
            raise ImageError(
                index, "too_large", f"the payload is {len(data)} bytes, over max_image_bytes {limit}"
            )
        return data

    def _format(self, data: bytes, index: int) -> str:
        """The payload's format, from its magic bytes: one of the accepted `formats`."""
        kind = sniff(data)
        allowed = self.params.formats
        if kind is None:
            head = data[:HEADER_BYTES_SHOWN].hex(" ")
            raise ImageError(
                index, "decode",
                f"it is not a {' or '.join(allowed)} file (it starts with bytes {head})",
            )
        if kind not in allowed:
            raise ImageError(
                index, "unsupported_format", f"it is a {kind} file; accepted: {', '.join(allowed)}"
            )
        return kind

    def _dimensions(self, data: bytes, kind: str, index: int) -> tuple[int, int]:
        """(width, height) from the header, within `max_pixels` and `max_aspect_ratio`."""
        dimensions = header_dimensions(data, kind)
        if dimensions is None:
            raise ImageError(index, "decode", f"its {kind} header is truncated or malformed")
        width, height = dimensions
        if width < 1 or height < 1:
            raise ImageError(index, "decode", f"its {kind} header says {width}x{height}: no pixels")
        pixels = width * height
        if pixels > self.params.max_pixels:
            raise ImageError(
                index, "too_large",
                f"its {kind} header says {width}x{height} = {pixels} pixels, over max_pixels "
                f"{self.params.max_pixels} (rejected before decoding)",
            )
        ratio = max(width, height) / min(width, height)
        if ratio > self.params.max_aspect_ratio:
            raise ImageError(
                index, "bad_dimensions",
                f"{width}x{height} has an aspect ratio of {ratio:.1f}, over max_aspect_ratio "
                f"{self.params.max_aspect_ratio:g}",
            )
        return width, height

    @staticmethod
    def _open_checked(data: bytes, kind: str, width: int, height: int, index: int) -> Image.Image:
        """Pillow's opened image, which must agree with the checked header's dimensions."""
        try:
            image = Image.open(io.BytesIO(data), formats=(kind,))
        except Image.DecompressionBombError as error:  # only when max_pixels is above Pillow's limit
            raise ImageError(index, "too_large", str(error)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
            detail = "" if isinstance(error, UnidentifiedImageError) else f" ({error})"
            raise ImageError(index, "decode", f"its {kind} header is unreadable{detail}") from None
        if image.size != (width, height):  # e.g. a second, larger JPEG frame header after the first
            raise ImageError(
                index, "decode",
                f"its {kind} header is inconsistent: {width}x{height} first, {image.size[0]}x"
                f"{image.size[1]} to the decoder",
            )
        return image

    def decode(self, image: Image.Image, index: int = 0) -> Image.Image:
        """Decodes an opened image (draft mode and EXIF orientation as configured) into mode L,
        RGB or RGBA.

        Raises:
            ImageError: the data is truncated or corrupt, or the pixel mode is not supported.
        """
        return self._decode(image, index)[0]

    def _target(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of width x height is resized to (before the crop or the padding)."""
        if self.params.letterbox:
            return letterbox_target(width, height, self.size)
        return resize_target(width, height, self.size, self.params.crop_fraction)

    def _decode(self, image: Image.Image, index: int) -> tuple[Image.Image, int]:
        """`decode`, and the EXIF orientation it applied (1: none)."""
        kind = image.format or "image"
        if self.params.jpeg_draft and image.format == "JPEG":
            image.draft(image.mode, self._target(*image.size))
        orientation = 1
        try:
            if self.params.exif_orientation and image.format == "JPEG":
                orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
            image.load()
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error ...
            raise ImageError(index, "decode", f"its {kind} data is truncated or corrupt ({error})") from None
        image = _standard_mode(image, index)
        transpose = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
        if transpose is None:
            return image, 1
        return image.transpose(transpose), orientation

    def crop(self, data: Any, index: int = 0) -> np.ndarray:
        """One payload -> its uint8 center crop (or letterbox): [S, S] for grey, [S, S, 3] for RGB.

        Raises:
            ImageError: see `open` and `decode`.
        """
        return self.place(data, index)[0]

    def place(self, data: Any, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """One payload -> its uint8 center crop or letterbox ([S, S] grey, [S, S, 3] RGB) and the
        float32 [6] transform from its pixel coordinates back to the original image's.

        Raises:
            ImageError: see `open` and `decode`.
        """
        opened = self.open(data, index)
        width, height = opened.size  # the header's, before any draft reduction
        image, orientation = self._decode(opened, index)
        if orientation in _SWAPS_SIDES:
            width, height = height, width
        if image.mode == "RGBA":
            alpha_min, _ = image.getextrema()[3]
            if alpha_min == MAX_LEVEL:  # opaque: compositing changes nothing
                image = image.convert("RGB")
            else:
                image = Image.fromarray(_composite(np.asarray(image), self.background))
        if self.channels == 1 and image.mode != "L":
            image = image.convert("L")
        if self.params.letterbox:
            # From the full upright size, so the geometry does not depend on a draft reduction.
            target = letterbox_target(width, height, self.size)
            resized = np.asarray(image.resize(target, self.resample) if target != image.size else image)
            left, top = (self.size - target[0]) // 2, (self.size - target[1]) // 2
            pixels = np.full((self.size, self.size, *resized.shape[2:]), self.params.pad_value, np.uint8)
            pixels[top : top + target[1], left : left + target[0]] = resized
            shift = (left, top)
        else:
            target = self._target(*image.size)
            resized_image = image.resize(target, self.resample) if target != image.size else image
            left = (target[0] - self.size) // 2
            top = (target[1] - self.size) // 2
            pixels = np.asarray(resized_image.crop((left, top, left + self.size, top + self.size)))
            shift = (-left, -top)
        transform = np.array(
            (target[0] / width, target[1] / height, *shift, width, height), dtype=np.float32
        )
        return pixels, transform

    # -- the batch ----------------------------------------------------------------------------
    def normalize(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 crops (grey or RGB, mixed) -> normalized [N, C, S, S] of the output dtype, in
        one lookup per channel over the whole batch."""
        count, size, channels = len(crops), self.size, self.channels
        stacked = np.empty((count, channels, size, size), dtype=np.uint8)
        for i, crop in enumerate(crops):
            stacked[i] = crop if crop.ndim == 2 else crop.transpose(2, 0, 1)  # grey broadcasts
        out = np.empty((count, channels, size, size), dtype=np.float32)
        for c in range(channels):
            np.take(self.tables[c], stacked[:, c], out=out[:, c], mode="clip")
        return out if self.output_dtype == np.float32 else out.astype(self.output_dtype)

    def _crops(self, items: Sequence[tuple[Any, int]]) -> list[tuple[np.ndarray, np.ndarray] | ImageError]:
        def one(item: tuple[Any, int]) -> tuple[np.ndarray, np.ndarray] | ImageError:
            try:
                return self.place(*item)
            except ImageError as error:
                return error

        if self._pool is None or len(items) < 2:
            return [one(item) for item in items]
        return list(self._pool.map(one, items))

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Encoded images -> [N, C, S, S]; raises the first image's error (in-process use)."""
        return self.preprocess_with_transforms(images)[0]

    def preprocess_with_transforms(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Encoded images -> ([N, C, S, S], their transforms float32 [N, 6]); raises the first
        image's error (in-process use)."""
        placed = self._crops([(data, i) for i, data in enumerate(images)])
        for item in placed:
            if isinstance(item, ImageError):
                raise item
        crops = [item[0] for item in placed]  # type: ignore[index]
        transforms = np.stack([item[1] for item in placed]) if placed else np.empty((0, TRANSFORM_SIZE))
        return self.normalize(crops), transforms.astype(np.float32)  # type: ignore[union-attr]

    def _request_images(self, inputs: Mapping[str, np.ndarray | None]) -> np.ndarray:
        array = inputs.get(self.input_name)
        if array is None:
            raise ValueError(f"the request has no input '{self.input_name}'")
        if array.ndim != 2 or array.shape[1] != 1 or array.shape[0] == 0:
            raise ValueError(
                f"input '{self.input_name}' has shape {list(array.shape)}; expected [-1, 1] "
                "(one encoded image per item, at least one item)"
            )
        return array[:, 0]

    def run(
        self, requests: Sequence[Mapping[str, np.ndarray | None]]
    ) -> list[dict[str, np.ndarray] | Exception]:
        """A dynamic batch: every request's images cropped, all crops normalized at once, split
        back. A request with a bad image gets that image's error; the others their outputs."""
        results: list[dict[str, np.ndarray] | Exception] = [ValueError("not run")] * len(requests)
        items: list[tuple[Any, int]] = []
        owners: list[int] = []
        for r, request in enumerate(requests):
            try:
                images = self._request_images(request)
            except ValueError as error:
                results[r] = error
                continue
            items += [(data, i) for i, data in enumerate(images)]
            owners += [r] * len(images)
        placed = self._crops(items)
        accepted: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        failed: set[int] = set()
        for owner, item in zip(owners, placed, strict=True):
            if owner in failed:
                continue
            if isinstance(item, ImageError):  # the request's first bad image is its error
                results[owner] = item
                failed.add(owner)
                accepted.pop(owner, None)
            else:
                accepted.setdefault(owner, []).append(item)
        if accepted:
            batch = self.normalize([crop for owned in accepted.values() for crop, _ in owned])
            offset = 0
            for owner, owned in accepted.items():
                outputs = {self.output_name: batch[offset : offset + len(owned)]}
                if self.transform_name is not None:
                    outputs[self.transform_name] = np.stack([transform for _, transform in owned])
                results[owner] = outputs
                offset += len(owned)
        return results


def _standard_mode(image: Image.Image, index: int) -> Image.Image:
    """A decoded image in mode L, RGB or RGBA (palette images with transparency and grey+alpha
    become RGBA; 16-bit grey drops its low byte; CMYK and YCbCr become RGB)."""
    mode = image.mode
    if mode in ("L", "RGB", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in ALPHA_MODES:
        return image.convert("RGBA")
    if mode in ("CMYK", "YCbCr", "RGBX"):
        return image.convert("RGB")
    if mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.uint16) >> SIXTEEN_TO_EIGHT_BITS
        return Image.fromarray(grey.astype(np.uint8))
    raise ImageError(
        index, "unsupported_format",
        f"its pixel mode {mode} is not supported (grey, RGB, RGBA, palette, CMYK, 16-bit grey are)",
    )


class ImageLoadError(ModelLoadError):
    """The model config and the parameters disagree; the message names the model and the cause."""


OUTPUT_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}
"""Output data types kiln_image writes (the model's input type)."""
BYTES_TYPES = ("TYPE_STRING", "TYPE_BYTES")
"""Triton's JSON names BYTES "TYPE_STRING"."""
TRANSFORM_TYPE = "TYPE_FP32"
SELF_TEST_SIZE = 2
"""Side of the tiny PNG each model decodes at load (imports Pillow's plugins, checks the path)."""


class ImageTensors(NamedTuple):
    """The tensor names and output type a kiln_image config declares."""

    input: str
    output: str
    dtype: np.dtype
    transform: str | None
    """The transform output's name, or None when the config declares none."""


def check_config(model: str, config: Mapping[str, Any], params: ImageParams) -> ImageTensors:
    """The config must declare one BYTES input [1], one FP32/FP16 output [C, S, S] agreeing with
    `channels` and `image_size`, and optionally one FP32 output [6] (the transform).

    Returns:
        The input name, the image output's name and numpy dtype, the transform output's name.

    Raises:
        ImageLoadError: naming the tensor and what was expected and given.
    """
    inputs, outputs = list(config.get("input", ())), list(config.get("output", ()))
    if len(inputs) != 1 or inputs[0].get("data_type") not in BYTES_TYPES or [
        int(d) for d in inputs[0].get("dims", ())
    ] != [1]:
        got = ", ".join(_describe(t) for t in inputs)
        raise ImageLoadError(
            f"model '{model}': kiln_image needs exactly one input of TYPE_STRING (BYTES) dims [1], "
            f"got {got or 'none'}"
        )
    transforms = [t for t in outputs if len(t.get("dims", ())) == 1]
    images = [t for t in outputs if len(t.get("dims", ())) != 1]
    want = [params.num_channels, params.image_size, params.image_size]
    if (
        len(images) != 1
        or images[0].get("data_type") not in OUTPUT_TYPES
        or [int(d) for d in images[0].get("dims", ())] != want
    ):
        got = ", ".join(_describe(t) for t in images)
        raise ImageLoadError(
            f"model '{model}': kiln_image needs exactly one output of {' or '.join(OUTPUT_TYPES)} "
            f"dims {want} (channels, image_size, image_size from its parameters), got {got or 'none'}"
        )
    if len(transforms) > 1 or any(
        t.get("data_type") != TRANSFORM_TYPE or [int(d) for d in t.get("dims", ())] != [TRANSFORM_SIZE]
        for t in transforms
    ):
        raise ImageLoadError(
            f"model '{model}': kiln_image's only other output is the transform, {TRANSFORM_TYPE} dims "
            f"[{TRANSFORM_SIZE}] ({', '.join(TRANSFORM_FIELDS)}), got "
            f"{', '.join(_describe(t) for t in transforms)}"
        )
    return ImageTensors(
        inputs[0]["name"],
        images[0]["name"],
        np.dtype(OUTPUT_TYPES[images[0]["data_type"]]),
        transforms[0]["name"] if transforms else None,
    )


def _describe(tensor: Mapping[str, Any]) -> str:
    return f"{tensor.get('name')} {tensor.get('data_type')} {list(tensor.get('dims', ()))}"


def from_config(model: str, config: Mapping[str, Any], raw_params: Mapping[str, str]) -> ImagePreprocessor:
    """Builds the step from a model config (Triton's JSON) and its `parameters`, then runs a tiny
    generated PNG through it so a broken installation fails at load, not on the first request.

    Raises:
        ParamError: a parameter is unknown or out of range.
        ImageLoadError: the config's tensors disagree with the parameters, or the self-test failed.
    """
    params = image_params(model, raw_params)
    names = check_config(model, config, params)
    step = ImagePreprocessor(params, names.input, names.output, names.dtype, names.transform)
    buffer = io.BytesIO()
    Image.new("RGB", (SELF_TEST_SIZE, SELF_TEST_SIZE)).save(buffer, "PNG")
    try:
        step.preprocess([buffer.getvalue()])
    except Exception as error:
        raise ImageLoadError(f"model '{model}': the load self-test failed: {error}") from error
    return step


def load(context: Any) -> ImagePreprocessor:
    """The adapter's hook (`kiln.serving.adapter.python_model`): the step of one kiln_image model."""
    return from_config(context.model_name, context.config, context.parameters)
