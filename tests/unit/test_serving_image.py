"""kiln_image's logic without Triton: parameters, the build's preprocessing reproduced bit for bit,
every guard's error, and a dynamic batch where a bad image fails only its own request.

The expected values are computed with Pillow and `kiln.models.resnet50.build.preprocess` (the build's
own code), never with `kiln.serving.image`.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageOps

from kiln import tensors
from kiln.models.resnet50 import build as resnet50
from kiln.models.resnet50 import pipeline as resnet50_pipeline
from kiln.serving.image import (
    IMAGE_PARAMS,
    ImageError,
    ImageLoadError,
    ImagePreprocessor,
    _standard_mode,
    from_config,
    header_dimensions,
    image_params,
)
from kiln.serving.params import ParamError

IMAGE_SIZE = 224
IMAGENET = {"mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225"}
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "moon")
"""RGB and grey photographs of different sizes (scikit-image ships them)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def photo(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def encode(pixels: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pillow_pixels(data: bytes) -> np.ndarray:
    """The test's own decode: Pillow, then the array the build's preprocess takes."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)


def rgba_photo() -> np.ndarray:
    """chelsea with a horizontal alpha gradient: every level from transparent to opaque."""
    rgb = photo("chelsea")
    alpha = np.linspace(0, 255, rgb.shape[1]).round().astype(np.uint8)
    return np.dstack([rgb, np.broadcast_to(alpha, rgb.shape[:2])])


def step(channels: int = 3, image_size: int = IMAGE_SIZE, dtype=np.float32, **raw: str) -> ImagePreprocessor:
    params = {"channels": str(channels), "image_size": str(image_size), **raw}
    if channels == 3 and "mean" not in raw:
        params.update(IMAGENET)
    return ImagePreprocessor(image_params("m", params), tensors.IMAGE, "out", dtype)


def png_header_only(width: int, height: int, idat: bytes = b"") -> bytes:
    """A grey 8-bit PNG with the given header and `idat` as its only data (CRCs correct)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- parameters ---------------------------------------------------------------------------------


def test_params_defaults_and_parsing() -> None:
    params = image_params("m", {"mean": "0.5", "jpeg_draft": "true", "formats": "PNG"})
    assert params.num_channels == 3 and params.image_size == 224 and params.crop_fraction == 0.875
    assert params.mean == (0.5,) and params.std == (1.0,)
    assert params.jpeg_draft is True and params.formats == ("PNG",)
    assert {p.name for p in IMAGE_PARAMS} == set(params.__dataclass_fields__)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"channels": "2"}, "model 'm': parameter 'channels' must be one of 1, 3, got '2'"),
        ({"mean": "0.1,0.2"}, "model 'm': parameter 'mean' must hold 1 or 3 (channels) values, got 2: '0.1,0.2'"),
        ({"std": "1,0,1"}, "model 'm': parameter 'std' must be > 0 per channel, got '1,0,1'"),
        ({"crop_fraction": "1.5"}, "model 'm': parameter 'crop_fraction' must be in (0, 1], got '1.5'"),
        ({"crop_fraction": "0"}, "parameter 'crop_fraction' must be a finite number >= 0.001, got '0'"),
        ({"alpha_background": "256"}, "parameter 'alpha_background' must be in 0..255, got '256'"),
        ({"resample": "cubic"}, "parameter 'resample' must be one of nearest, box, bilinear"),
        ({"formats": "GIF"}, "parameter 'formats' must be a comma-separated list of JPEG, PNG, got 'GIF'"),
        ({"max_pixels": "0"}, "parameter 'max_pixels' must be an integer >= 1, got '0'"),
        ({"decoder": "x"}, "model 'm': unknown parameter 'decoder'; allowed: "),
    ],
)
def test_bad_params_name_the_model_key_and_value(raw: dict, message: str) -> None:
    with pytest.raises(ParamError) as caught:
        image_params("m", raw)
    assert message in str(caught.value)


def test_spec_constants_are_the_builds() -> None:
    """The spec module cannot import the build (torch); its copies must agree with it."""
    assert resnet50_pipeline.IMAGENET_MEAN == resnet50.IMAGENET_MEAN
    assert resnet50_pipeline.IMAGENET_STD == resnet50.IMAGENET_STD
    assert resnet50_pipeline.RESNET50_CROP_FRACTION == resnet50.CENTER_CROP_FRACTION
    assert resnet50_pipeline.PIXEL_SCALE == resnet50.PIXEL_MAX
    assert resnet50_pipeline.RESAMPLE == "bilinear" and resnet50.RESAMPLE == Image.Resampling.BILINEAR
    spec = resnet50_pipeline.RESNET50_PREPROCESS_SPEC
    params = image_params(spec.name, spec.parameters)
    assert (params.num_channels, params.image_size) == (resnet50.CHANNELS, 224)


# -- the build's preprocessing, reproduced ------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_png_photo_equals_build_preprocess_bit_for_bit(name: str) -> None:
    pixels = photo(name)
    served = step().preprocess([encode(pixels, "PNG")])
    assert served.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and served.dtype == np.float32
    np.testing.assert_array_equal(served[0], resnet50.preprocess(pixels, IMAGE_SIZE))


def test_rgba_with_transparency_is_composited_on_white_as_the_build_does() -> None:
    pixels = rgba_photo()
    served = step().preprocess([encode(pixels, "PNG")])
    np.testing.assert_array_equal(served[0], resnet50.preprocess(pixels, IMAGE_SIZE))
    # Against a white composite computed here, to the rounding of one level.
    alpha = pixels[..., 3:] / 255.0
    white = np.rint(pixels[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    np.testing.assert_allclose(served[0], resnet50.preprocess(white, IMAGE_SIZE), atol=1.01 / 255 / 0.224)


@pytest.mark.parametrize("name", ("astronaut", "camera", "coffee"))
def test_jpeg_equals_build_preprocess_of_pillows_decode(name: str) -> None:
    data = encode(photo(name), "JPEG", quality=90)
    served = step().preprocess([data])
    np.testing.assert_array_equal(served[0], resnet50.preprocess(pillow_pixels(data), IMAGE_SIZE))


def test_jpeg_draft_equals_build_preprocess_of_pillows_draft_decode() -> None:
    big = np.asarray(Image.fromarray(photo("coffee")).resize((1800, 1200), Image.Resampling.BICUBIC))
    data = encode(big, "JPEG", quality=90)
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (384, 256))  # the resize target of 1800x1200 for a 256 shorter side
    assert image.size == (450, 300)  # reduced by 4 in the DCT domain
    expected = resnet50.preprocess(np.asarray(image), IMAGE_SIZE)
    drafted = step(jpeg_draft="true").preprocess([data])[0]
    np.testing.assert_array_equal(drafted, expected)
    full = step().preprocess([data])[0]
    assert not np.array_equal(full, drafted)  # draft mode does change pixels (documented)
    assert np.abs(full - drafted).mean() < 0.05  # ... by little: 1% of the normalized range


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: Image.fromarray(p).convert("P"), lambda p: np.asarray(Image.fromarray(p).convert("P").convert("RGB"))),
        (lambda p: Image.fromarray(p).convert("LA"), lambda p: np.asarray(Image.fromarray(p).convert("L"))),
        (
            lambda p: Image.fromarray(p[..., 0].astype(np.uint16) * 256 + 127),
            lambda p: p[..., 0],  # 16-bit grey keeps its high byte
        ),
        (lambda p: Image.fromarray(p).convert("1"), lambda p: np.asarray(Image.fromarray(p).convert("1").convert("L"))),
    ],
    ids=["palette", "grey+alpha", "16-bit grey", "1-bit"],
)
def test_other_png_modes(make: Callable, expected: Callable) -> None:
    pixels = photo("coffee")
    served = step().preprocess([encode(make(pixels), "PNG")])
    np.testing.assert_array_equal(served[0], resnet50.preprocess(expected(pixels), IMAGE_SIZE))


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.fromarray(photo("coffee")).convert("CMYK"), "JPEG", quality=95)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "CMYK"
    served = step().preprocess([data])
    np.testing.assert_array_equal(served[0], resnet50.preprocess(np.asarray(image.convert("RGB")), IMAGE_SIZE))


def test_exif_orientation_turns_the_photo_upright() -> None:
    pixels = photo("coffee")  # 600 wide, 400 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(pixels, "JPEG", quality=90, exif=exif.tobytes())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert upright.shape[:2] == (600, 400)
    np.testing.assert_array_equal(step().preprocess([data])[0], resnet50.preprocess(upright, IMAGE_SIZE))
    ignored = step(exif_orientation="false").preprocess([data])[0]
    np.testing.assert_array_equal(ignored, resnet50.preprocess(pillow_pixels(data), IMAGE_SIZE))


def test_digits_png_reproduces_the_model_input() -> None:
    """An 8x8 PNG with pixel round(v * 255 / 16) gives v / 16 to 0.5/255 (the digits contract)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:50]
    grey = step(channels=1, image_size=8, crop_fraction="1", mean="0", std="1")
    files = [encode(np.rint(d * 255 / 16).astype(np.uint8), "PNG") for d in digits]
    served = grey.preprocess(files)
    assert served.shape == (50, 1, 8, 8)
    assert np.abs(served[:, 0] - digits / 16).max() <= 0.5 / 255 + 1e-7
    np.testing.assert_array_equal(served[:, 0], (np.rint(digits * 255 / 16) / np.float32(255)).astype(np.float32))


def test_grey_model_converts_rgb_with_pillow_luma_and_composites_rgba() -> None:
    grey = step(channels=1, image_size=32, crop_fraction="1", mean="0", std="1")
    rgb = photo("coffee")
    expected = np.asarray(Image.fromarray(rgb).convert("L").resize((48, 32), Image.Resampling.BILINEAR))
    served = grey.preprocess([encode(rgb, "PNG")])[0, 0]
    np.testing.assert_array_equal(served, expected[:, 8:40] / np.float32(255))
    rgba = rgba_photo()
    composite = resnet50._to_rgb(rgba)  # the build's white composite
    expected = np.asarray(Image.fromarray(composite).convert("L").resize((48, 32), Image.Resampling.BILINEAR))
    served = grey.preprocess([encode(rgba, "PNG")])[0, 0]
    np.testing.assert_array_equal(served, expected[:, 8:40] / np.float32(255))


def test_fp16_output_and_threads_give_the_same_values() -> None:
    files = [encode(photo(name), "PNG") for name in PHOTOS]
    reference = step().preprocess(files)
    np.testing.assert_array_equal(step(threads="2").preprocess(files), reference)
    half = step(dtype=np.float16).preprocess(files)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, reference.astype(np.float16))


def test_served_spec_equals_the_reference_pipeline() -> None:
    """The served configuration (JPEG draft on) and `kiln.build.reference.image` see the same input."""
    from kiln.build.reference.image import ReferencePreprocessing

    spec = resnet50_pipeline.RESNET50_PREPROCESS_SPEC
    served = ImagePreprocessor(image_params(spec.name, spec.parameters), tensors.IMAGE, "out")
    big = np.asarray(Image.fromarray(photo("astronaut")).resize((1500, 1100), Image.Resampling.BICUBIC))
    files = [encode(big, "JPEG", quality=90), encode(photo("camera"), "JPEG"), encode(rgba_photo(), "PNG")]
    np.testing.assert_array_equal(served.preprocess(files), ReferencePreprocessing(spec)(files))


# -- guards ---------------------------------------------------------------------------------------


def one_error(preprocessor: ImagePreprocessor, data) -> ImageError:
    with pytest.raises(ImageError) as caught:
        preprocessor.crop(data, 2)
    return caught.value


def test_header_dimensions_read_png_and_jpeg_without_pillow() -> None:
    pixels = photo("coffee")
    for fmt, options in (("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True})):
        assert header_dimensions(encode(pixels, fmt, **options), fmt) == (600, 400)
    assert header_dimensions(png_header_only(30000, 20000), "PNG") == (30000, 20000)
    assert header_dimensions(encode(pixels, "JPEG")[:20], "JPEG") is None


@pytest.mark.parametrize(
    ("data", "reason", "message"),
    [
        (b"", "decode", "image 2 of the request could not be decoded: the payload is empty (0 bytes)"),
        (
            np.random.default_rng(0).bytes(1000),
            "decode",
            "image 2 of the request could not be decoded: it is not a JPEG or PNG file (it starts with bytes ",
        ),
        (b"GIF89a" + bytes(100), "unsupported_format", "image 2 of the request has an unsupported format: it is a GIF file; accepted: JPEG, PNG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "unsupported_format", "it is a WEBP file; accepted: JPEG, PNG"),
        ("a string", "invalid_input", "image 2 of the request is not an encoded image: got a text string"),
        (3, "invalid_input", "expected the file's bytes, got int"),
        (png_header_only(0, 5), "decode", "image 2 of the request could not be decoded: its PNG header says 0x5: no pixels"),
        (
            png_header_only(30000, 30000),
            "too_large",
            "image 2 of the request is too large: its PNG header says 30000x30000 = 900000000 pixels, over "
            "max_pixels 40000000 (rejected before decoding)",
        ),
        (
            png_header_only(2000, 50),
            "bad_dimensions",
            "image 2 of the request has unusable dimensions: 2000x50 has an aspect ratio of 40.0, over max_aspect_ratio 20",
        ),
        (PNG_SIGNATURE + b"\x00\x00", "decode", "could not be decoded: its PNG header is truncated or malformed"),
    ],
    ids=["empty", "random bytes", "gif", "webp", "str", "int", "zero pixels", "bomb header", "aspect", "cut header"],
)
def test_guards_name_the_image_the_reason_and_the_problem(data, reason: str, message: str) -> None:
    error = one_error(step(), data)
    assert error.reason == reason and error.index == 2
    assert message in str(error)
    assert isinstance(error, ValueError)  # INVALID_ARG at the server


def test_bomb_is_rejected_from_the_header_before_any_decoding() -> None:
    """The header claims 30000x30000 but the pixel data is garbage: were it decoded, the error
    would be "could not be decoded"; it is "too large", so nothing was decoded."""
    error = one_error(step(), png_header_only(30000, 30000, idat=b"not zlib data"))
    assert error.reason == "too_large"
    small = png_header_only(100, 100, idat=b"not zlib data")
    assert one_error(step(), small).reason == "decode"


def test_a_second_larger_jpeg_frame_header_cannot_sneak_past_the_pixel_check() -> None:
    """Pillow sizes a JPEG by its last frame header, the check reads the first: they must agree."""
    data = encode(np.zeros((8, 8), np.uint8), "JPEG")
    at = data.index(b"\xff\xc0")
    end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    second = bytearray(data[at:end])
    second[5:9] = struct.pack(">HH", 9000, 9000)
    crafted = data[:end] + bytes(second) + data[end:]
    assert Image.open(io.BytesIO(crafted)).size == (9000, 9000)
    error = one_error(step(), crafted)
    assert error.reason == "decode"
    assert "its JPEG header is inconsistent: 8x8 first, 9000x9000 to the decoder" in str(error)


@pytest.mark.parametrize("fmt", ("JPEG", "PNG"))
def test_truncated_files_are_decode_errors(fmt: str) -> None:
    data = encode(photo("coffee"), fmt)
    error = one_error(step(), data[: len(data) // 2])
    assert error.reason == "decode"
    assert f"could not be decoded: its {fmt} data is truncated or corrupt (image file is truncated" in str(error)


def test_corrupt_png_crc_is_a_decode_error() -> None:
    data = bytearray(encode(photo("camera"), "PNG"))
    data[100] ^= 0xFF  # inside the first IDAT chunk: its CRC no longer matches
    error = one_error(step(), bytes(data))
    assert error.reason == "decode" and "could not be decoded" in str(error)


def test_payload_and_format_limits() -> None:
    data = encode(photo("coffee"), "JPEG")
    error = one_error(step(max_image_bytes=str(len(data) - 1)), data)
    assert error.reason == "too_large"
    assert f"the payload is {len(data)} bytes, over max_image_bytes {len(data) - 1}" in str(error)
    error = one_error(step(formats="PNG"), data)
    assert error.reason == "unsupported_format" and "it is a JPEG file; accepted: PNG" in str(error)
    error = one_error(step(max_pixels="1000"), encode(photo("coffee"), "PNG"))
    assert "its PNG header says 600x400 = 240000 pixels, over max_pixels 1000" in str(error)


def test_an_unsupported_pixel_mode_is_named() -> None:
    with pytest.raises(ImageError) as caught:
        _standard_mode(Image.new("F", (4, 4)), 1)
    assert caught.value.reason == "unsupported_format"
    assert "image 1 of the request has an unsupported format: its pixel mode F is not supported" in str(caught.value)


# -- a dynamic batch ------------------------------------------------------------------------------


def request(*files) -> dict:
    return {tensors.IMAGE: np.array([[f] for f in files], dtype=object)}


def test_a_bad_image_fails_only_its_request() -> None:
    good = [encode(photo(name), "PNG") for name in ("astronaut", "camera", "coffee")]
    truncated = encode(photo("chelsea"), "JPEG")[:3000]
    requests = [
        request(good[0]),
        request(good[1], good[2], b"\x00garbage"),  # its third image is bad: the whole request fails
        request(truncated),
        request(good[2], good[1]),
        {tensors.IMAGE: None},
        {tensors.IMAGE: np.array([good[0], good[1]], dtype=object)},  # [2], not [2, 1]
    ]
    results = step().run(requests)
    assert len(results) == len(requests)
    np.testing.assert_array_equal(results[0]["out"][0], resnet50.preprocess(photo("astronaut"), IMAGE_SIZE))
    assert str(results[1]).startswith("image 2 of the request could not be decoded: it is not a JPEG or PNG")
    assert str(results[2]).startswith("image 0 of the request could not be decoded: its JPEG data is truncated")
    assert results[3]["out"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(results[3]["out"][0], resnet50.preprocess(photo("coffee"), IMAGE_SIZE))
    np.testing.assert_array_equal(results[3]["out"][1], resnet50.preprocess(photo("camera"), IMAGE_SIZE))
    assert "the request has no input 'image'" in str(results[4])
    assert str(results[5]) == (
        "input 'image' has shape [2]; expected [-1, 1] (one encoded image per item, at least one item)"
    )


def test_all_bad_batch_returns_only_errors() -> None:
    results = step().run([request(b"x"), request(b"")])
    assert all(isinstance(r, ImageError) for r in results)


# -- load ---------------------------------------------------------------------------------------------


def config(out_dims=(3, 224, 224), in_type="TYPE_STRING", out_type="TYPE_FP32", **params) -> dict:
    return {
        "input": [{"name": tensors.IMAGE, "data_type": in_type, "dims": [1]}],
        "output": [{"name": "images", "data_type": out_type, "dims": list(out_dims)}],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }


def test_from_config_builds_and_self_tests() -> None:
    preprocessor = from_config("m", config(out_type="TYPE_FP16"), IMAGENET)
    assert preprocessor.output_name == "images" and preprocessor.output_dtype == np.float16
    result = preprocessor.run([request(encode(photo("camera"), "PNG"))])[0]
    assert result["images"].dtype == np.float16


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (config(out_dims=(3, 256, 256)), "kiln_image needs exactly one output of TYPE_FP32 or TYPE_FP16 dims [3, 224, 224]"),
        (config(out_dims=(1, 224, 224)), "got images TYPE_FP32 [1, 224, 224]"),
        (config(in_type="TYPE_UINT8"), "kiln_image needs exactly one input of TYPE_STRING (BYTES) dims [1], got image TYPE_UINT8 [1]"),
        (config(out_type="TYPE_INT64"), "got images TYPE_INT64 [3, 224, 224]"),
    ],
)
def test_config_disagreeing_with_parameters_fails_the_load(cfg: dict, message: str) -> None:
    with pytest.raises(ImageLoadError) as caught:
        from_config("m", cfg, {})
    assert str(caught.value).startswith("model 'm': ")
    assert message in str(caught.value)


# -- letterbox mode and the transform output ------------------------------------------------------


LETTERBOX = {"resize_mode": "letterbox", "mean": "0", "std": "1"}
YOLO_PAD = 114


def letterbox_step(image_size: int = 320, channels: int = 3, **raw: str) -> ImagePreprocessor:
    params = image_params("m", {"channels": str(channels), "image_size": str(image_size), **LETTERBOX, **raw})
    return ImagePreprocessor(params, tensors.IMAGE, "out", np.float32, "letterbox")


def rectangle_image(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A dark grey RGB image with one bright red rectangle covering pixels x1..x2-1, y1..y2-1."""
    pixels = np.full((height, width, 3), 30, np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = (250, 10, 10)
    return pixels


def found_box(model_input: np.ndarray) -> np.ndarray:
    """The red rectangle's box (x1, y1, x2, y2, pixel edges) in a [3, S, S] input in [0, 1]:
    the pixels more red than half way."""
    ys, xs = np.nonzero(model_input[0] > 0.5)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def back_to_original(box: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """The documented mapping, written out: x = (x_model - pad_x) / scale_x (likewise y)."""
    scale_x, scale_y, pad_x, pad_y = (float(v) for v in transform[:4])
    return np.array([(box[0] - pad_x) / scale_x, (box[1] - pad_y) / scale_y,
                     (box[2] - pad_x) / scale_x, (box[3] - pad_y) / scale_y])


def test_letterbox_params_default_to_the_center_crop() -> None:
    params = image_params("m", {})
    assert params.resize_mode == "center_crop" and params.letterbox is False and params.pad_value == 114
    assert image_params("m", {"resize_mode": "letterbox", "pad_value": "0"}).letterbox is True


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"resize_mode": "pad"}, "model 'm': parameter 'resize_mode' must be one of center_crop, letterbox, got 'pad'"),
        ({"resize_mode": "letterbox", "pad_value": "256"}, "model 'm': parameter 'pad_value' must be in 0..255, got '256'"),
        ({"resize_mode": "letterbox", "pad_value": "-1"}, "model 'm': parameter 'pad_value' must be an integer >= 0, got '-1'"),
        (
            {"resize_mode": "letterbox", "crop_fraction": "0.9"},
            "model 'm': parameter 'crop_fraction' applies to resize_mode center_crop only; resize_mode "
            "letterbox keeps the whole image, got crop_fraction '0.9'",
        ),
        (
            {"pad_value": "114"},
            "model 'm': parameter 'pad_value' applies to resize_mode letterbox only, got pad_value '114' "
            "with resize_mode center_crop",
        ),
    ],
)
def test_bad_letterbox_params_are_named_whole(raw: dict, message: str) -> None:
    with pytest.raises(ParamError) as caught:
        image_params("m", raw)
    assert str(caught.value) == message


def test_letterbox_640x480_into_320_scales_by_half_and_pads_y() -> None:
    pixels = photo("astronaut")
    landscape = np.asarray(Image.fromarray(pixels).resize((640, 480), Image.Resampling.BICUBIC))
    result = letterbox_step().run([request(encode(landscape, "PNG"))])[0]
    assert set(result) == {"out", "letterbox"}
    np.testing.assert_array_equal(
        result["letterbox"], np.array([[0.5, 0.5, 0.0, 40.0, 640.0, 480.0]], np.float32)
    )
    served = result["out"][0]
    assert served.shape == (3, 320, 320)
    # The test's own letterbox: Pillow's bilinear resize to 320x240, in rows 40..279 of a 114 canvas.
    expected = np.full((320, 320, 3), YOLO_PAD, np.uint8)
    expected[40:280] = np.asarray(Image.fromarray(landscape).resize((320, 240), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(served, expected.transpose(2, 0, 1) / np.float32(255))
    assert np.all(served[:, :40] == np.float32(YOLO_PAD) / np.float32(255))


def test_letterbox_portrait_pads_x_and_the_odd_pixel_goes_right_and_bottom() -> None:
    portrait = rectangle_image(480, 640, (0, 0, 0, 0))
    result = letterbox_step().run([request(encode(portrait, "PNG"))])[0]
    np.testing.assert_array_equal(result["letterbox"][0], np.array([0.5, 0.5, 40, 0, 480, 640], np.float32))
    assert np.all(result["out"][0, :, :, :40] == np.float32(YOLO_PAD / 255))
    assert np.all(result["out"][0, :, :, 40:280] == np.float32(30 / 255))
    # 100x36 into 64: resized to 64x23 (36 * 0.64 = 23.04), 41 rows of padding: 20 above, 21 below.
    grey = letterbox_step(image_size=64, channels=1, pad_value="0")
    out = grey.run([request(encode(np.full((36, 100), 200, np.uint8), "PNG"))])[0]
    np.testing.assert_array_equal(out["letterbox"][0], np.array([0.64, 23 / 36, 0, 20, 100, 36], np.float32))
    rows = out["out"][0, 0, :, 10]
    assert rows[:20].max() == 0 and rows[43:].max() == 0 and np.all(rows[20:43] == np.float32(200 / 255))


@pytest.mark.parametrize(
    ("size", "box"),
    [((640, 480), (100, 200, 300, 400)), ((480, 640), (40, 500, 480, 640)), ((1000, 333), (0, 0, 250, 100))],
)
def test_boxes_mapped_back_through_the_transform_land_on_the_original(size, box) -> None:
    """A red rectangle found in the model input and mapped back lands on the original rectangle
    (within 1 original pixel per model pixel of resampling blur)."""
    data = encode(rectangle_image(*size, box), "PNG")
    result = letterbox_step().run([request(data)])[0]
    transform = result["letterbox"][0]
    mapped = back_to_original(found_box(result["out"][0]), transform)
    tolerance = 1.0 / float(transform[0])
    np.testing.assert_allclose(mapped, np.array(box, np.float64), atol=tolerance)


def test_the_transform_is_of_the_upright_full_size_image_with_exif_and_jpeg_draft() -> None:
    big = rectangle_image(1600, 1200, (400, 300, 800, 900))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": upright it is 1200 wide, 1600 high
    data = encode(big, "JPEG", quality=95, exif=exif.tobytes())
    for draft in ("false", "true"):
        result = letterbox_step(jpeg_draft=draft).run([request(data)])[0]
        np.testing.assert_array_equal(
            result["letterbox"][0], np.array([0.2, 0.2, 40, 0, 1200, 1600], np.float32)
        )
        # Upright, the rectangle's x is 1200 - y2 .. 1200 - y1, its y the stored x.
        mapped = back_to_original(found_box(result["out"][0]), result["letterbox"][0])
        np.testing.assert_allclose(mapped, [300, 400, 900, 800], atol=2 / 0.2)


def test_center_crop_can_output_its_transform_too_and_is_otherwise_unchanged() -> None:
    data = encode(rectangle_image(640, 480, (200, 100, 440, 380)), "PNG")
    plain = step(mean="0", std="1").run([request(data)])[0]
    assert set(plain) == {"out"}
    with_transform = ImagePreprocessor(
        image_params("m", {"mean": "0", "std": "1"}), tensors.IMAGE, "out", np.float32, "t"
    ).run([request(data)])[0]
    np.testing.assert_array_equal(with_transform["out"], plain["out"])
    # Shorter side 480 -> 256 (224 / 0.875), so 640 -> 341; crop offsets (58, 16).
    np.testing.assert_array_equal(
        with_transform["t"][0], np.array([341 / 640, 256 / 480, -58, -16, 640, 480], np.float32)
    )
    mapped = back_to_original(found_box(with_transform["out"][0]), with_transform["t"][0])
    np.testing.assert_allclose(mapped, [200, 100, 440, 380], atol=2.0)


def test_preprocess_with_transforms_in_process() -> None:
    files = [encode(rectangle_image(640, 480, (0, 0, 1, 1)), "PNG"), encode(rectangle_image(200, 400, (0, 0, 1, 1)), "PNG")]
    images, transforms = letterbox_step().preprocess_with_transforms(files)
    assert images.shape == (2, 3, 320, 320) and transforms.dtype == np.float32
    np.testing.assert_array_equal(transforms, np.array([[0.5, 0.5, 0, 40, 640, 480], [0.8, 0.8, 80, 0, 200, 400]], np.float32))


def letterbox_config(outputs: list[dict]) -> dict:
    return {"input": [{"name": tensors.IMAGE, "data_type": "TYPE_STRING", "dims": [1]}], "output": outputs}


IMAGES_320 = {"name": "images", "data_type": "TYPE_FP32", "dims": [3, 320, 320]}


def test_from_config_finds_the_transform_output_by_its_shape() -> None:
    params = {"image_size": "320", "resize_mode": "letterbox"}
    transform = {"name": "lb", "data_type": "TYPE_FP32", "dims": [6]}
    preprocessor = from_config("m", letterbox_config([transform, IMAGES_320]), params)
    assert (preprocessor.output_name, preprocessor.transform_name) == ("images", "lb")
    assert from_config("m", letterbox_config([IMAGES_320]), params).transform_name is None


@pytest.mark.parametrize(
    ("extra", "got"),
    [
        ([{"name": "lb", "data_type": "TYPE_FP16", "dims": [6]}], "lb TYPE_FP16 [6]"),
        ([{"name": "lb", "data_type": "TYPE_FP32", "dims": [4]}], "lb TYPE_FP32 [4]"),
        (
            [{"name": "a", "data_type": "TYPE_FP32", "dims": [6]}, {"name": "b", "data_type": "TYPE_FP32", "dims": [6]}],
            "a TYPE_FP32 [6], b TYPE_FP32 [6]",
        ),
    ],
)
def test_a_bad_transform_output_fails_the_load(extra: list, got: str) -> None:
    with pytest.raises(ImageLoadError) as caught:
        from_config("m", letterbox_config([IMAGES_320, *extra]), {"image_size": "320", "resize_mode": "letterbox"})
    assert str(caught.value) == (
        "model 'm': kiln_image's only other output is the transform, TYPE_FP32 dims [6] "
        f"(scale_x, scale_y, pad_x, pad_y, width, height), got {got}"
    )
