"""Write the data files the command-line examples use (examples/data/).

    python examples/make_data.py

Array names match the problem's data symbols; tv1d gets 5 samples (names suffixed __0 ... __4,
the layout `hypergen optimize` reads as several samples). The image examples (foe_denoise.py,
tv2d.py) get 64 x 64 grey crops of scikit-image's photographs: data/foe_train/ holds the training
crops as PNG files (`hypergen optimize ... --data examples/data/foe_train` adds the noise), and
data/foe_test.npz the held-out crops with their noisy copies (Y__s noisy, Xt__s clean; noise std
0.1, seed 1), from regions and images the training crops do not contain.
"""
import runpy
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CROP = 64
#: (scikit-image picture, top row, left column) of each 64 x 64 crop.
TRAIN_CROPS = [("camera", 200, 200), ("camera", 330, 90), ("astronaut", 80, 180),
               ("astronaut", 300, 330), ("coins", 100, 100), ("moon", 200, 200),
               ("text", 50, 100), ("page", 60, 150)]
TEST_CROPS = [("camera", 110, 270), ("astronaut", 200, 60), ("coins", 190, 250),
              ("chelsea", 90, 160)]
TEST_NOISE_SIGMA, TEST_NOISE_SEED = 0.1, 1


def image_crop(picture: str, row: int, col: int) -> np.ndarray:
    """A CROP x CROP crop of skimage.data.<picture> as grey values in [0, 1] (8-bit steps)."""
    from skimage import color, data

    image = getattr(data, picture)()
    if image.ndim == 3:
        image = np.round(color.rgb2gray(image) * 255).astype(np.uint8)
    return image[row:row + CROP, col:col + CROP].astype(float) / 255.0


def write_image_crops(out: Path) -> None:
    """data/foe_train/*.png (clean training crops) and data/foe_test.npz (held-out pairs)."""
    from skimage import io

    train = out / "foe_train"
    train.mkdir(exist_ok=True)
    for s, (picture, row, col) in enumerate(TRAIN_CROPS):
        crop = np.round(image_crop(picture, row, col) * 255).astype(np.uint8)
        io.imsave(train / f"{s:02d}_{picture}.png", crop, check_contrast=False)
    rng = np.random.default_rng(TEST_NOISE_SEED)
    test = {}
    for s, (picture, row, col) in enumerate(TEST_CROPS):
        clean = image_crop(picture, row, col)
        test[f"Xt__{s}"] = clean
        test[f"Y__{s}"] = clean + TEST_NOISE_SIGMA * rng.standard_normal(clean.shape)
    np.savez_compressed(out / "foe_test.npz", **test)


def main():
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    ridge = runpy.run_path(str(HERE / "ridge.py"))["example_data"](seed=0)
    np.savez(out / "ridge.npz", **ridge)
    tv1d = runpy.run_path(str(HERE / "tv1d.py"))["example_data"]
    samples = {f"{k}__{s}": v for s in range(5) for k, v in tv1d(seed=s).items()}
    np.savez(out / "tv1d.npz", **samples)
    write_image_crops(out)
    print("wrote", ", ".join(str(p.relative_to(HERE.parent)) for p in sorted(out.glob("*.npz"))))


if __name__ == "__main__":
    main()
