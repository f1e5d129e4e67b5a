"""A user's sample inputs for `kiln add`, from the photographs bundled with scikit-image.

    python make_samples.py            # writes onet_samples.npz, detector_samples.npz, photos/

- onet_samples.npz: 48x48 crops scaled as MTCNN scales them: `x` float32 [72, 3, 48, 48] for
  evaluation (the astronaut's face at 16 offsets and sizes, 48 faces of scikit-image's LFW subset,
  8 crops of other photographs without a face) and `calibration/x` [32, 3, 48, 48] for INT8
  calibration (16 other LFW faces, mirrored, and 16 crops without a face);
- detector_samples.npz: `images` float32 [12, 3, 320, 320], twelve photographs letterboxed to
  320x320 exactly as the served kiln_image step letterboxes them (evaluation), and
  `calibration/images`, eight crops of other photographs (INT8 calibration);
- photos/astronaut.png, photos/chelsea.png: two photographs to send to the served pipeline.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from kiln.serving.image import ImagePreprocessor, image_params

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from onet import SIDE, standardize  # noqa: E402

DETECTOR_SIDE = 320
SEED = 0
ASTRONAUT_FACE = (165, 60, 120)
"""x, y and side of the astronaut's face in skimage.data.astronaut(), in pixels."""
EVALUATION_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "horse", "camera", "page", "colorwheel", "coins",
    "moon", "retina", "hubble_deep_field",
)
CALIBRATION_PHOTOS = ("cat", "immunohistochemistry", "brick", "grass", "gravel", "text", "logo", "clock")
SERVED_PHOTOS = ("astronaut", "chelsea")


def photo(name: str) -> np.ndarray:
    """A scikit-image photograph as uint8 RGB [H, W, 3]."""
    image = getattr(skimage.data, name)()
    if image.dtype != np.uint8:
        image = np.clip(np.asarray(image) * (255 if image.max() <= 1 else 1), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[:, :, :3])


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def square(pixels: np.ndarray, x: int, y: int, side: int, size: int = SIDE) -> np.ndarray:
    """The square crop at (x, y) of `side` pixels, resized to `size` (bilinear)."""
    crop = Image.fromarray(pixels[y : y + side, x : x + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def lfw_faces(first: int, count: int) -> np.ndarray:
    """Faces of scikit-image's LFW subset (grey, 25x25; its first 100 images are faces) as uint8
    RGB [count, 48, 48, 3]."""
    faces = skimage.data.lfw_subset()[first : first + count]
    grey = [
        np.asarray(Image.fromarray((face * 255).astype(np.uint8)).resize((SIDE, SIDE), Image.BILINEAR))
        for face in faces
    ]
    return np.stack([np.stack([g] * 3, axis=-1) for g in grey])


def no_faces(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` square crops of photographs without a face, resized to 48x48."""
    others = [photo(n) for n in ("coffee", "chelsea", "rocket", "horse", "coins", "camera", "page", "colorwheel")]
    crops = []
    for k in range(count):
        image = others[k % len(others)]
        side = int(rng.integers(SIDE, min(image.shape[:2]) // 2))
        y, x = (int(rng.integers(0, d - side)) for d in image.shape[:2])
        crops.append(square(image, x, y, side))
    return np.stack(crops)


def onet_samples(rng: np.random.Generator) -> dict[str, np.ndarray]:
    astronaut = photo("astronaut")
    x0, y0, side = ASTRONAUT_FACE
    shifted = []
    for _ in range(16):  # the face, shifted and scaled a little, as MTCNN's earlier stages propose it
        s = int(side * rng.uniform(0.85, 1.15))
        dx, dy = (int(v) for v in rng.integers(-12, 13, size=2))
        shifted.append(square(astronaut, x0 + dx, y0 + dy, s))
    evaluation = np.concatenate([np.stack(shifted), lfw_faces(0, 48), no_faces(rng, 8)])
    calibration = np.concatenate([lfw_faces(48, 16)[:, :, ::-1], no_faces(rng, 16)])
    return {"x": standardize(evaluation), "calibration/x": standardize(calibration)}


def letterboxed(files: list[bytes]) -> np.ndarray:
    """Encoded photographs -> float32 [N, 3, 320, 320], as the served kiln_image step makes them
    (letterbox, grey 114 padding, pixels / 255)."""
    params = image_params("samples", {"resize_mode": "letterbox", "image_size": str(DETECTOR_SIDE)})
    return ImagePreprocessor(params, "image", "images").preprocess(files)


def detector_samples(rng: np.random.Generator) -> dict[str, np.ndarray]:
    evaluation = letterboxed([png(photo(n)) for n in EVALUATION_PHOTOS])
    crops = []
    for name in CALIBRATION_PHOTOS:
        image = photo(name)
        h, w = image.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 0.9)), int(w * rng.uniform(0.6, 0.9))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crops.append(png(image[y : y + ch, x : x + cw]))
    return {"images": evaluation, "calibration/images": letterboxed(crops)}


def main() -> None:
    np.savez("onet_samples.npz", **onet_samples(np.random.default_rng(SEED)))
    np.savez("detector_samples.npz", **detector_samples(np.random.default_rng(SEED)))
    Path("photos").mkdir(exist_ok=True)
    for name in SERVED_PHOTOS:
        Path("photos", f"{name}.png").write_bytes(png(photo(name)))
    print("wrote onet_samples.npz, detector_samples.npz and photos/ (" + ", ".join(SERVED_PHOTOS) + ")")


if __name__ == "__main__":
    main()
