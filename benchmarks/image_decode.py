"""Which decoder should kiln_image use? Images per second, per decoder and image size.

Each row times the per-image work of kiln_image on one CPU thread: decode only, and the whole
path to the 224x224 uint8 center crop (decode, resize the shorter side to 256 with Pillow's
bilinear filter, crop) -- the resize has to be Pillow's for the served input to equal the build's
preprocessing bit for bit, so decoders that return numpy arrays pay `Image.fromarray` on top.
The last rows time the served step itself (`kiln.serving.image.ImagePreprocessor.preprocess` on a
batch of 16, normalization included) with JPEG draft mode off and on.

Test images: scikit-image's `astronaut` resized (bicubic) to each size with Gaussian noise
(sigma 4) added so they compress like camera photographs, saved as JPEG (quality 90, 4:2:0) and,
for the smaller sizes, PNG. Optional decoders (simplejpeg, PyTurboJPEG, opencv-python-headless)
are measured when importable and listed as missing otherwise.

Run:
    .venv/bin/python benchmarks/image_decode.py [--repeats 5] [--seconds 0.5] [--json out.json]

Every figure is the median over `--repeats` timed rounds of at least `--seconds` each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
CROP_FRACTION = 0.875
SIZES = ((640, 480), (1920, 1080), (4032, 3024))
"""(width, height): VGA, full HD, a 12-megapixel phone photograph."""
PNG_SIZES = ((640, 480), (1920, 1080))
JPEG_QUALITY = 90
NOISE_SIGMA = 4.0
SEED = 0
BATCH = 16
"""Images per call of the served step's rows."""
IMAGENET_MEAN = "0.485,0.456,0.406"
IMAGENET_STD = "0.229,0.224,0.225"


def make_image(width: int, height: int) -> np.ndarray:
    """A photograph-like uint8 RGB image of the given size."""
    import skimage.data

    base = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(SEED)
    noisy = np.asarray(base, dtype=np.float32) + rng.normal(0.0, NOISE_SIGMA, (height, width, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def target(width: int, height: int) -> tuple[int, int]:
    from kiln.serving.image import resize_target

    return resize_target(width, height, IMAGE_SIZE, CROP_FRACTION)


def crop(image: Image.Image) -> np.ndarray:
    """Pillow resize (bilinear) to the target, center crop: what kiln_image does per image."""
    size = target(*image.size)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
    return np.asarray(resized.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)))


def pillow_decode(data: bytes, draft: bool = False) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if draft:
        image.draft(image.mode, target(*image.size))
    image.load()
    return image


def decoders() -> tuple[dict[str, tuple[Callable, Callable]], dict[str, str]]:
    """name -> (decode only, decode to crop) for JPEG; and the missing optional decoders."""
    found: dict[str, tuple[Callable, Callable]] = {
        "pillow": (lambda b: pillow_decode(b), lambda b: crop(pillow_decode(b))),
        "pillow draft": (
            lambda b: pillow_decode(b, draft=True),
            lambda b: crop(pillow_decode(b, draft=True)),
        ),
    }
    missing: dict[str, str] = {}
    try:
        import simplejpeg

        def scaled(b: bytes) -> np.ndarray:
            width, height, _, _ = simplejpeg.decode_jpeg_header(b)
            w, h = target(width, height)
            return simplejpeg.decode_jpeg(b, colorspace="RGB", min_width=w, min_height=h)

        found["simplejpeg"] = (
            lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"),
            lambda b: crop(Image.fromarray(simplejpeg.decode_jpeg(b, colorspace="RGB"))),
        )
        found["simplejpeg scaled"] = (scaled, lambda b: crop(Image.fromarray(scaled(b))))
    except ImportError as error:
        missing["simplejpeg"] = str(error)
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        jpeg = TurboJPEG()
        found["pyturbojpeg"] = (
            lambda b: jpeg.decode(b, pixel_format=TJPF_RGB),
            lambda b: crop(Image.fromarray(jpeg.decode(b, pixel_format=TJPF_RGB))),
        )
    except Exception as error:  # ImportError, or RuntimeError when libturbojpeg is not installed
        missing["pyturbojpeg"] = str(error).splitlines()[0]
    try:
        import cv2

        cv2.setNumThreads(1)

        def cv_decode(b: bytes, flag: int = cv2.IMREAD_COLOR) -> np.ndarray:
            return cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), flag), cv2.COLOR_BGR2RGB)

        found["opencv"] = (cv_decode, lambda b: crop(Image.fromarray(cv_decode(b))))
    except ImportError as error:
        missing["opencv"] = str(error)
    return found, missing


def rate(function: Callable[[], object], items: int, seconds: float, repeats: int) -> float:
    """Median items per second over `repeats` rounds of at least `seconds` each."""
    function()  # warm up (imports, plugin registration)
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            function()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(calls * items / elapsed)
    return statistics.median(rates)


def served_step(jpeg_draft: bool):
    from kiln.serving.image import ImagePreprocessor, image_params

    params = image_params(
        "bench",
        {
            "image_size": str(IMAGE_SIZE),
            "crop_fraction": str(CROP_FRACTION),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "jpeg_draft": str(jpeg_draft).lower(),
            "max_pixels": str(50_000_000),
            "max_image_bytes": str(50_000_000),
        },
    )
    return ImagePreprocessor(params, "image", "images")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per figure (median)")
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum length of one round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    found, missing = decoders()
    sizes = {f"{w}x{h}": (w, h) for w, h in SIZES}
    payloads = payloads_for(sizes)
    rows = decoder_rows(payloads, found, args.seconds, args.repeats)
    served = served_rows(payloads, sizes, args.seconds, args.repeats)
    print_tables(rows, served, sizes, missing, args.seconds, args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "served": served, "missing": missing}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def payloads_for(sizes: dict[str, tuple[int, int]]) -> dict[tuple[str, str], bytes]:
    """(format, size label) -> the encoded test image: JPEG at every size, PNG at PNG_SIZES."""
    payloads = {}
    for label, (w, h) in sizes.items():
        pixels = make_image(w, h)
        payloads[("JPEG", label)] = encode(pixels, "JPEG")
        if (w, h) in PNG_SIZES:
            payloads[("PNG", label)] = encode(pixels, "PNG")
    return payloads


def decoder_rows(
    payloads: dict[tuple[str, str], bytes],
    found: dict[str, tuple[Callable, Callable]],
    seconds: float,
    repeats: int,
) -> list[dict]:
    """One row per payload and decoder: decodes and decodes-to-crop per second (every JPEG
    decoder found; Pillow, and OpenCV when found, for PNG)."""
    rows: list[dict] = []

    def add(fmt: str, label: str, decoder: str, decode: Callable, full: Callable, data: bytes) -> None:
        row = {
            "format": fmt,
            "size": label,
            "bytes": len(data),
            "decoder": decoder,
            "decode_per_s": rate(lambda: decode(data), 1, seconds, repeats),
            "crop_per_s": rate(lambda: full(data), 1, seconds, repeats),
        }
        rows.append(row)
        print(
            f"{fmt:4} {label:>9} {decoder:18} decode {row['decode_per_s']:8.1f}/s   "
            f"to crop {row['crop_per_s']:8.1f}/s",
            file=sys.stderr,
            flush=True,
        )

    for (fmt, label), data in payloads.items():
        if fmt == "JPEG":
            for name, (decode, full) in found.items():
                add(fmt, label, name, decode, full, data)
        else:
            add(fmt, label, "pillow", pillow_decode, lambda b: crop(pillow_decode(b)), data)
            if "opencv" in found:
                import cv2

                def cv_png(b: bytes) -> np.ndarray:
                    return cv2.cvtColor(
                        cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
                    )

                add(fmt, label, "opencv", cv_png, lambda b: crop(Image.fromarray(cv_png(b))), data)
    return rows


def served_rows(
    payloads: dict[tuple[str, str], bytes], sizes: dict[str, tuple[int, int]], seconds: float, repeats: int
) -> list[dict]:
    """Images per second of the served step on batches of BATCH JPEGs, jpeg_draft off and on."""
    served = []
    for draft in (False, True):
        step = served_step(draft)
        for label in sizes:
            batch = [payloads[("JPEG", label)]] * BATCH
            per_s = rate(lambda s=step, b=batch: s.preprocess(b), BATCH, seconds, repeats)
            served.append({"size": label, "jpeg_draft": draft, "images_per_s": per_s})
            print(
                f"served step, JPEG {label:>9}, jpeg_draft {draft!s:5}: {per_s:8.1f} images/s",
                file=sys.stderr,
                flush=True,
            )
    return served


def print_tables(
    rows: list[dict],
    served: list[dict],
    sizes: dict[str, tuple[int, int]],
    missing: dict[str, str],
    seconds: float,
    repeats: int,
) -> None:
    """The machine line, the decoder table, the served-step table and the decoders not measured."""
    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; Pillow {Image.__version__}; "
        f"median of {repeats} rounds of >= {seconds} s, one thread.\n"
    )
    print("| format | size | file | decoder | decode only (images/s) | decode + resize + crop (images/s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['format']} | {row['size']} | {row['bytes'] / 1e3:.0f} kB | {row['decoder']} | "
            f"{row['decode_per_s']:.1f} | {row['crop_per_s']:.1f} |"
        )
    print("\n| served step (batch of 16 JPEGs, to normalized FP32) | jpeg_draft false | jpeg_draft true |")
    print("| --- | --- | --- |")
    for label in sizes:
        off, on = (
            next(s["images_per_s"] for s in served if s["size"] == label and s["jpeg_draft"] is d)
            for d in (False, True)
        )
        print(f"| {label} | {off:.1f} images/s | {on:.1f} images/s |")
    if missing:
        print(
            "\nNot measured (not importable): " + "; ".join(f"{name}: {why}" for name, why in missing.items())
        )


if __name__ == "__main__":
    sys.exit(main())
