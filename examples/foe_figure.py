"""Learned filters against tuned total variation on held-out photographs: PSNR, SSIM, a figure.

    python examples/foe_figure.py [--budget 30s]      # needs scikit-image; matplotlib optional

Both models are learned with hypergen's own `optimize` (its default method) on the same training
set, the clean crops of examples/data/foe_train/ with the noise `hypergen optimize --data DIR`
adds (std 0.1, seed 0, codegen/cli/data.py):

* TV: examples/tv2d.py, isotropic smoothed TV, theta = (log alpha, log nu);
* FoE: examples/foe_denoise.py, the 8 fixed 3 x 3 DCT filters with learned weights.

Each learned theta then denoises the held-out crops of examples/data/foe_test.npz (regions and a
picture the training set does not contain) with a tight lower solve; the script prints PSNR and
SSIM (skimage.metrics, data range 1) of the noisy input, TV and FoE per crop and on average, and
writes examples/figures/foe_denoise.png (clean, noisy, TV, FoE per crop, and the filters).
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import codegen
from codegen.cli.data import load_image_directory

HERE = Path(__file__).resolve().parent


def learn(problem_file: str, theta0: list[float], train_dir: Path, budget: str | None) -> Any:
    """Build, bind the training directory's samples and run `optimize` with its defaults."""
    module = codegen.load(str(HERE / problem_file))
    samples = load_image_directory(train_dir, module.meta)
    res = module.bind_samples(samples).optimize(theta0, budget=budget, progress=False)
    print(f"{module.name}: theta = {np.array2string(res.theta, precision=4)}, "
          f"F = {res.value:.6g}, {res.work} work units, {res.seconds:.1f} s, {res.status}")
    return module, res


def denoise(module: Any, theta: np.ndarray, noisy: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The lower solution at theta for one noisy image, certified to ||x - x*|| <= 1e-8."""
    sol = module.bind(Y=noisy, Xt=clean).solve_lower(theta, tol=1e-8)
    if not sol.success:
        raise RuntimeError(f"{module.name}: lower solve {sol.status}")
    return np.asarray(sol.x).reshape(noisy.shape)


def quality(image: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of `image` against `clean`, grey values on a [0, 1] range."""
    return (float(peak_signal_noise_ratio(clean, image, data_range=1.0)),
            float(structural_similarity(clean, image, data_range=1.0)))


def figure(rows: list[dict[str, np.ndarray]], filters: np.ndarray, weights: np.ndarray,
           path: Path) -> None:
    """Clean, noisy, TV, FoE per test crop, and the filters scaled by their learned weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["clean", "noisy", "TV", "FoE"]
    filter_rows = -(-len(filters) // 4)
    fig, axes = plt.subplots(len(rows) + filter_rows, 4,
                             figsize=(8, 2 * (len(rows) + filter_rows)))
    for r, row in enumerate(rows):
        for c, name in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(np.clip(row[name], 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            title = name if name == "clean" else f"{name} {quality(row[name], row['clean'])[0]:.2f} dB"
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    for f in range(4 * filter_rows):
        ax = axes[len(rows) + f // 4, f % 4]
        ax.axis("off")
        if f < len(filters):
            ax.imshow(filters[f], cmap="RdBu", vmin=-1, vmax=1)
            ax.set_title(f"filter {f}, weight {weights[f]:.3g}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path.relative_to(HERE.parent)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default=None, help="optimize's budget for each model (default none)")
    args = p.parse_args(argv)
    train = HERE / "data" / "foe_train"
    foe_ns = runpy.run_path(str(HERE / "foe_denoise.py"))
    tv_ns = runpy.run_path(str(HERE / "tv2d.py"))
    tv_mod, tv_res = learn("tv2d.py", tv_ns["THETA0"], train, args.budget)
    foe_mod, foe_res = learn("foe_denoise.py", foe_ns["THETA0"], train, args.budget)
    test = np.load(HERE / "data" / "foe_test.npz")
    rows = []
    print(f"{'crop':>4} | {'noisy PSNR':>10} {'SSIM':>6} | {'TV PSNR':>8} {'SSIM':>6} | "
          f"{'FoE PSNR':>8} {'SSIM':>6}")
    scores = []
    for s in range(len(test.files) // 2):
        noisy, clean = test[f"Y__{s}"], test[f"Xt__{s}"]
        row = {"clean": clean, "noisy": noisy,
               "TV": denoise(tv_mod, tv_res.theta, noisy, clean),
               "FoE": denoise(foe_mod, foe_res.theta, noisy, clean)}
        rows.append(row)
        score = [v for name in ("noisy", "TV", "FoE") for v in quality(row[name], clean)]
        scores.append(score)
        print(f"{s:>4} | {score[0]:10.2f} {score[1]:6.3f} | {score[2]:8.2f} {score[3]:6.3f} | "
              f"{score[4]:8.2f} {score[5]:6.3f}")
    mean = np.mean(scores, axis=0)
    print(f"mean | {mean[0]:10.2f} {mean[1]:6.3f} | {mean[2]:8.2f} {mean[3]:6.3f} | "
          f"{mean[4]:8.2f} {mean[5]:6.3f}")
    print(f"FoE - TV: {mean[4] - mean[2]:+.2f} dB PSNR, {mean[5] - mean[3]:+.3f} SSIM")
    filters = foe_ns["FILTERS"] * np.array(foe_ns["FILTER_SCALE"], dtype=float)[:, None, None]
    try:
        figure(rows, filters, np.exp(foe_res.theta[:len(filters)]),
               HERE / "figures" / "foe_denoise.png")
    except ImportError:
        print("(matplotlib not installed: no figure)")


if __name__ == "__main__":
    main()
