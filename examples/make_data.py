"""Write the NPZ data files the command-line examples use (examples/data/<name>.npz).

    python examples/make_data.py

Array names match the problem's data symbols; tv1d gets 5 samples (names suffixed __0 ... __4,
the layout `hypergen optimize` reads as several samples).
"""
import runpy
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main():
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    ridge = runpy.run_path(str(HERE / "ridge.py"))["example_data"](seed=0)
    np.savez(out / "ridge.npz", **ridge)
    tv1d = runpy.run_path(str(HERE / "tv1d.py"))["example_data"]
    samples = {f"{k}__{s}": v for s in range(5) for k, v in tv1d(seed=s).items()}
    np.savez(out / "tv1d.npz", **samples)
    print("wrote", ", ".join(str(p.relative_to(HERE.parent)) for p in sorted(out.glob("*.npz"))))


if __name__ == "__main__":
    main()
