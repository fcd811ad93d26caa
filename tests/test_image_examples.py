"""The image examples: foe_denoise.py builds certified, image directories and npz pairs load
(errors name the file), learning improves a held-out crop, the hypergradient matches F.

Tiny crops (24 x 24) of the committed data keep every solve to milliseconds.
"""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")
from skimage import io  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio  # noqa: E402

import codegen  # noqa: E402
from codegen.cli.data import (  # noqa: E402
    DEFAULT_NOISE_SEED,
    DEFAULT_NOISE_SIGMA,
    image_roles,
    load_image_directory,
    read_image,
)
from codegen.cli.main import main  # noqa: E402
from codegen.cli.optimize import load_data  # noqa: E402
from codegen.errors import HypergenError  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TRAIN_DIR = EXAMPLES / "data" / "foe_train"
TEST_NPZ = EXAMPLES / "data" / "foe_test.npz"
SIDE = 24


@pytest.fixture(scope="module")
def foe():
    return codegen.load(str(EXAMPLES / "foe_denoise.py"))


@pytest.fixture(scope="module")
def theta0():
    import runpy
    return np.array(runpy.run_path(str(EXAMPLES / "foe_denoise.py"))["THETA0"])


def tiny_train_dir(tmp_path: Path, count: int = 3) -> Path:
    """The first `count` training PNGs, cropped to SIDE x SIDE from their centre."""
    out = tmp_path / "train"
    out.mkdir()
    for file in sorted(TRAIN_DIR.glob("*.png"))[:count]:
        image = io.imread(file)
        r, c = (image.shape[0] - SIDE) // 2, (image.shape[1] - SIDE) // 2
        io.imsave(out / file.name, image[r:r + SIDE, c:c + SIDE], check_contrast=False)
    return out


def test_foe_builds_with_every_constant_certified(foe, theta0):
    assert image_roles(foe.meta) == ("Y", "Xt")
    rng = np.random.default_rng(0)
    prob = foe.bind(Y=rng.random((8, 9)), Xt=rng.random((8, 9)))
    consts = prob.constants(theta0)
    assert consts["certified"]
    for name in ("mu", "L", "L_A", "L_B", "L_f"):
        assert np.isfinite(consts[name]) and consts[name] > 0, name
    # rounded outwards: mu a hair below the data term's 1, L a hair above the exact rule
    assert 1 - 1e-9 <= consts["mu"] <= 1
    # L = 1 + sum_f w_f ||K_f||^2 / nu; a DCT filter v_a v_b^T has ||K||^2 = ||k||_1^2 exactly
    # (its frequency response peaks at |v_a^| |v_b^| = ||v_a||_1 ||v_b||_1), so min(l1^2, the
    # FFT bound) is the l1 rule
    import runpy
    ns = runpy.run_path(str(EXAMPLES / "foe_denoise.py"))
    l1_sq = [(float(scale) * np.abs(k).sum()) ** 2
             for k, scale in zip(ns["FILTERS"], ns["FILTER_SCALE"])]
    w, nu = np.exp(theta0), 1e-3
    exact_rule = 1 + float(np.dot(w, l1_sq)) / nu
    assert exact_rule <= consts["L"] <= exact_rule * (1 + 1e-9)


def test_directory_of_pngs_gives_seeded_noisy_samples(foe, tmp_path):
    train = tiny_train_dir(tmp_path, count=2)
    samples = load_image_directory(train, foe.meta)
    assert len(samples) == 2
    rng = np.random.default_rng(DEFAULT_NOISE_SEED)
    for sample, file in zip(samples, sorted(train.glob("*.png"))):
        clean = io.imread(file) / 255.0
        np.testing.assert_array_equal(sample["Xt"], clean)
        noise = DEFAULT_NOISE_SIGMA * rng.standard_normal(clean.shape)
        np.testing.assert_allclose(sample["Y"], clean + noise, rtol=0, atol=1e-15)
    again = load_image_directory(train, foe.meta)
    np.testing.assert_array_equal(again[1]["Y"], samples[1]["Y"])


def test_colour_and_16_bit_images_become_grey_in_0_1(tmp_path):
    from skimage.color import rgb2gray
    rng = np.random.default_rng(3)
    rgb = (rng.random((6, 7, 3)) * 255).astype(np.uint8)
    io.imsave(tmp_path / "rgb.png", rgb, check_contrast=False)
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png"), rgb2gray(rgb / 255.0), atol=1e-15)
    deep = np.array([[0, 65535, 32768]] * 3, dtype=np.uint16)
    io.imsave(tmp_path / "deep.png", deep, check_contrast=False)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), deep / 65535.0)


def test_npz_of_clean_noisy_pairs(foe):
    samples = load_data(TEST_NPZ, ["Xt", "Y"])
    assert isinstance(samples, list) and len(samples) == 4
    for s in samples:
        assert s["Y"].shape == s["Xt"].shape == (64, 64)
        assert 0 <= s["Xt"].min() and s["Xt"].max() <= 1
        assert 0.08 < np.std(s["Y"] - s["Xt"]) < 0.12          # the stated sigma 0.1


@pytest.mark.filterwarnings("ignore:The legacy `DICOM` plugin:DeprecationWarning")
def test_bad_image_and_mismatched_pair_are_named(foe, tmp_path, capsys):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    io.imsave(bad_dir / "a.png", np.zeros((8, 8), np.uint8), check_contrast=False)
    (bad_dir / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(HypergenError, match=r"b\.png"):
        load_image_directory(bad_dir, foe.meta)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HypergenError, match="no image files"):
        load_image_directory(empty, foe.meta)
    pairs = tmp_path / "pairs.npz"
    np.savez(pairs, Y__0=np.zeros((8, 8)), Xt__0=np.zeros((8, 8)),
             Y__1=np.zeros((8, 8)), Xt__1=np.zeros((8, 9)))
    status = main(["optimize", str(EXAMPLES / "foe_denoise.py"), "--data", str(pairs),
                   "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    assert "pairs.npz: sample 1: Y has shape (8, 8) but Xt has shape (8, 9)" in err


def test_directory_refused_for_a_problem_without_image_pair(tmp_path, capsys):
    train = tiny_train_dir(tmp_path, count=1)
    status = main(["optimize", str(EXAMPLES / "ridge.py"), "--data", str(train),
                   "--out", str(tmp_path / "run"), "--no-progress"])
    assert status == 2
    assert "cannot read a directory of images" in capsys.readouterr().err


def test_cli_learns_from_a_directory(tmp_path, capsys):
    train = tiny_train_dir(tmp_path, count=2)
    status = main(["optimize", str(EXAMPLES / "foe_denoise.py"), "--data", str(train),
                   "--theta0=" + ",".join(["-3.9"] * 8), "--budget", "300",
                   "--out", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "foe_denoise: 2 samples, theta has 8 entries" in out


def test_learned_weights_beat_the_noisy_input_on_a_held_out_crop(foe, theta0, tmp_path):
    train = load_image_directory(tiny_train_dir(tmp_path, count=3), foe.meta)
    samples = foe.bind_samples(train)
    res = samples.optimize(theta0, budget=20000, progress=False)
    assert res.status != "failed", res.message
    start = samples.hypergradient(theta0).value
    assert res.value < start                                   # learning lowered F on training
    test = np.load(TEST_NPZ)
    noisy, clean = test["Y__0"][:SIDE, :SIDE], test["Xt__0"][:SIDE, :SIDE]
    sol = foe.bind(Y=noisy, Xt=clean).solve_lower(res.theta, tol=1e-8)
    assert sol.success
    denoised = np.asarray(sol.x).reshape(clean.shape)
    psnr_noisy = peak_signal_noise_ratio(clean, noisy, data_range=1.0)
    psnr_learned = peak_signal_noise_ratio(clean, denoised, data_range=1.0)
    assert psnr_learned > psnr_noisy + 3.0, (psnr_noisy, psnr_learned)


def test_hypergradient_matches_a_finite_difference_of_F(foe, theta0):
    test = np.load(TEST_NPZ)
    prob = foe.bind(Y=test["Y__1"][:16, :16], Xt=test["Xt__1"][:16, :16])

    def F(theta):
        sol = prob.solve_lower(theta, solver="newton", tol=1e-12)
        assert sol.success
        return prob.upper_value(sol.x, theta)

    hg = prob.hypergradient(theta0, rtol=1e-6)
    assert hg.ok and hg.certified and hg.bound <= 1e-6 * np.linalg.norm(hg.grad)
    step = 1e-4
    for k in range(theta0.size):
        e = np.zeros_like(theta0)
        e[k] = step
        fd = (F(theta0 + e) - F(theta0 - e)) / (2 * step)
        # the certified bound, plus the central difference's O(step^2 F''') truncation and the
        # solves' 1e-12 / step (measured: |fd - grad| <= 1e-9 at this step)
        assert abs(fd - hg.grad[k]) <= hg.bound + 1e-8, k


def test_learned_filter_1d_has_a_certified_hypergradient_on_the_ball():
    import runpy
    lf = codegen.load(str(EXAMPLES / "learned_filter_1d.py"))
    theta = np.array(runpy.run_path(str(EXAMPLES / "learned_filter_1d.py"))["THETA0"])
    data = np.load(EXAMPLES / "data" / "tv1d.npz")
    prob = lf.bind(y=data["y__0"], xt=data["xt__0"])
    consts = prob.constants(theta)
    assert np.isfinite([consts["mu"], consts["L"], consts["L_A"]]).all()
    assert consts["L_B"] == np.inf                  # x can grow along the filter's null space
    hg = prob.hypergradient(theta, rtol=1e-8)
    assert hg.certified and np.isfinite(hg.bound)   # the ball constants give a finite bound
    assert hg.bound <= 1e-8 * np.linalg.norm(hg.grad) + 1e-12

    def F(th):
        sol = prob.solve_lower(th, solver="newton", tol=1e-12)
        assert sol.success
        return prob.upper_value(sol.x, th)

    step = 1e-5
    for k in range(theta.size):
        e = np.zeros_like(theta)
        e[k] = step
        fd = (F(theta + e) - F(theta - e)) / (2 * step)
        assert fd == pytest.approx(hg.grad[k], rel=1e-5, abs=1e-7), k
