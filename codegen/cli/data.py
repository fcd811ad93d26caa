"""Image data for `hypergen optimize FILE --data DIR`: a directory of clean images -> samples.

A denoising problem has two data images shaped like its lower variable x: the noisy input, read
by the lower level, and the clean target, read by the upper level (examples/foe_denoise.py: Y and
Xt). `image_roles` finds the two from the built module's kernel table, so a problem file needs no
extra declaration. `load_image_directory` reads every image file of a directory (sorted by name)
as grey values in [0, 1] and makes its noisy copy clean + sigma * N(0, 1) with one NumPy
generator seeded once (the s-th image in name order gets the s-th draw), so the same directory,
sigma and seed always give the same samples. Every error names the file at fault.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HypergenError

__all__ = ["IMAGE_SUFFIXES", "DEFAULT_NOISE_SIGMA", "DEFAULT_NOISE_SEED", "image_roles",
           "read_image", "load_image_directory", "check_image_pairs"]

#: File name endings read as images (case-insensitive); other files in the directory are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: The noise added to a directory's clean images: standard deviation on the [0, 1] grey scale.
DEFAULT_NOISE_SIGMA = 0.1
DEFAULT_NOISE_SEED = 0


def _kernel_data(meta: Mapping[str, Any], kernel: str) -> set[str]:
    for k in meta["kernels"]:
        if k["name"] == kernel:
            return {p["name"] for p in k["params"] if p["role"] == "data"}
    return set()


def image_roles(meta: Mapping[str, Any]) -> tuple[str, str]:
    """(noisy, clean): the data arrays shaped like x that only the lower level reads and only the
    upper level reads. A problem with any other data arrays cannot take an image directory."""
    x_shape = next(a["shape"] for a in meta["arrays"] if a["role"] == "x")
    data = [a["name"] for a in meta["arrays"] if a["role"] == "data"]
    lower, upper = _kernel_data(meta, "lower_value"), _kernel_data(meta, "upper_value")
    images = [a["name"] for a in meta["arrays"] if a["role"] == "data" and a["shape"] == x_shape]
    noisy = [n for n in images if n in lower and n not in upper]
    clean = [n for n in images if n in upper and n not in lower]
    if len(x_shape) != 2 or len(noisy) != 1 or len(clean) != 1 or len(data) != 2:
        raise HypergenError(
            f"problem {meta['name']!r} cannot read a directory of images: that needs a 2-D x and "
            f"exactly two data images shaped like it, a noisy one in the lower level and a clean "
            f"one in the upper level (its data names are {', '.join(data)}); pass an .npz instead")
    return noisy[0], clean[0]


def read_image(path: Path) -> np.ndarray:
    """One image file as a 2-D float array of grey values in [0, 1] (colour -> luminance)."""
    try:
        from skimage import color, io  # optional: pip install hypergen[examples]
    except ImportError:
        raise HypergenError(f"reading {path} needs scikit-image (pip install scikit-image)") from None
    try:
        raw = io.imread(str(path))
    except Exception as exc:  # the image libraries raise many types for a corrupt file
        raise HypergenError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
    image = np.asarray(raw)
    if np.issubdtype(image.dtype, np.integer):        # 8 or 16 bit: the type's full range is 1
        image = image / float(np.iinfo(image.dtype).max)
    image = image.astype(np.float64)
    if image.ndim == 3 and image.shape[-1] in (3, 4):  # colour (an alpha channel is dropped)
        image = color.rgb2gray(image[..., :3])
    if image.ndim != 2 or min(image.shape) < 3:
        raise HypergenError(f"image {path} has shape {np.shape(raw)}; expected a grey or colour "
                            f"image of at least 3 x 3 pixels")
    grey = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(grey)):
        raise HypergenError(f"image {path} has non-finite pixel values")
    return grey


def load_image_directory(path: Path, meta: Mapping[str, Any],
                         sigma: float = DEFAULT_NOISE_SIGMA,
                         seed: int = DEFAULT_NOISE_SEED) -> list[dict[str, np.ndarray]]:
    """One sample per image file of `path`: {noisy: clean + sigma N(0, 1), clean: clean}."""
    noisy_name, clean_name = image_roles(meta)
    files = sorted(p for p in Path(path).iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise HypergenError(f"data directory {path} holds no image files "
                            f"({', '.join(IMAGE_SUFFIXES)})")
    rng = np.random.default_rng(seed)
    samples = []
    for file in files:
        clean = read_image(file)
        noisy = clean + sigma * rng.standard_normal(clean.shape)
        samples.append({noisy_name: noisy, clean_name: clean})
    return samples


def check_image_pairs(samples: list[dict[str, np.ndarray]], meta: Mapping[str, Any],
                      source: Path) -> None:
    """A noisy and a clean image of one sample must have the same shape (error names the sample
    and `source`); problems that are not image problems are left to bind's own checks."""
    try:
        noisy_name, clean_name = image_roles(meta)
    except HypergenError:
        return
    for s, sample in enumerate(samples):
        noisy, clean = sample.get(noisy_name), sample.get(clean_name)
        if noisy is not None and clean is not None and np.shape(noisy) != np.shape(clean):
            raise HypergenError(f"{source}: sample {s}: {noisy_name} has shape {np.shape(noisy)} "
                                f"but {clean_name} has shape {np.shape(clean)}")
