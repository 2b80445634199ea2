"""Tests for synth7t.preprocess and the shipped reference data.

Fast tests use small synthetic images; ``slow`` tests run the real pipeline on
``../shared/data/bids_3t`` (sub-01: whole head with face; sub-02: brain-extracted, oblique).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine, from_matvec

from synth7t import preprocess as P
from synth7t.io import conform, load_image
from synth7t.reference import DATA_DIR, REF_AFFINE, REF_SHAPE, TEMPLATEFLOW_HOME

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BIDS = SHARED / "bids_3t"
THREADS = 1
#: NCC with the template inside its brain mask after the (default) affine registration.
#: Measured 0.51 (sub-01) and 0.54 (sub-02): a single subject's folding against a smooth
#: population average cannot reach 0.8 after an affine (the 2 mm SyN stage gives ~0.64; the full
#: CC SyN of antsRegistrationSyN ~0.79 at ~260 s CPU).
NCC_MASK_MIN = 0.45
#: The same NCC after smoothing both images (sigma 4 mm, the scale an affine aligns):
#: measured 0.88 / 0.86.
NCC_SMOOTH_MIN = 0.8
SMOOTH_SIGMA_MM = 4.0


def _rot(axis: int, deg: float) -> np.ndarray:
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _phantom(shape=(48, 56, 48), zoom=2.0, centre_mm=(0.0, -10.0, 5.0),
             affine: np.ndarray | None = None) -> nib.Nifti1Image:
    """Smooth head-like phantom: an ellipsoid 'brain' with an off-centre 'ventricle'."""
    if affine is None:
        affine = from_matvec(np.diag([zoom] * 3), -np.array(shape) * zoom / 2)
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = apply_affine(affine, ijk) - np.asarray(centre_mm)
    r = np.sqrt((xyz[:, 0] / 40) ** 2 + (xyz[:, 1] / 50) ** 2 + (xyz[:, 2] / 38) ** 2)
    v = np.sqrt(((xyz[:, 0] - 8) / 8) ** 2 + ((xyz[:, 1] + 5) / 14) ** 2 + ((xyz[:, 2] - 6) / 7) ** 2)
    data = 100.0 / (1 + np.exp((r - 1) * 20)) - 60.0 / (1 + np.exp((v - 1) * 6))
    data += 30.0 * np.exp(-((xyz[:, 2] + 20) ** 2) / 200)  # a 'cerebellum' band breaks symmetry
    img = nib.Nifti1Image(np.clip(data, 0, None).reshape(shape).astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


# ---------------------------------------------------------------- shipped data


def test_shipped_templates_geometry_and_size():
    tpl = TEMPLATEFLOW_HOME / "tpl-MRIxFields"
    expected = {1: (182, 218, 182), 2: (91, 109, 91)}
    for res, shape in expected.items():
        for desc, suffix in [(None, "T1w"), ("brain", "mask")]:
            img = nib.load(P.template_path(res, desc=desc, suffix=suffix))
            assert img.shape == shape
            aff = np.diag([-res, res, res, 1.0])
            aff[:3, 3] = [90, -126, -72]
            np.testing.assert_array_equal(img.affine, aff)
            assert img.get_data_dtype() == np.uint8
    # the 1 mm grid is the 0.5 mm reference grid subsampled by 2
    np.testing.assert_array_equal(nib.load(P.template_path(1)).affine[:3, 3], REF_AFFINE[:3, 3])
    desc = json.loads((tpl / "template_description.json").read_text())
    assert desc["res"]["05"]["shape"] == list(REF_SHAPE)
    np.testing.assert_array_equal(np.array(desc["res"]["05"]["affine"]), REF_AFFINE)
    assert desc["res"]["05"]["stored"] is False
    assert not list(tpl.glob("*res-05*.nii*"))
    total = sum(f.stat().st_size for f in DATA_DIR.rglob("*") if f.is_file()
                if "templateflow" in f.parts or "colin27" in f.parts)
    assert total < 5e6
    assert (tpl / "NOTICE").read_text().count("McConnell Brain Imaging Centre") >= 1


def test_shipped_colin27_and_notices():
    head = nib.load(P.COLIN27_HEAD)
    mask = nib.load(P.COLIN27_BRAIN_MASK)
    assert head.get_data_dtype() == np.uint8 and head.header.get_zooms() == (2.0, 2.0, 2.0)
    assert nib.aff2axcodes(head.affine) == ("R", "A", "S")
    vol_l = mask.get_fdata().sum() / 1e6
    assert 1.4 < vol_l < 2.0
    folder = P.COLIN27_HEAD.parent
    assert "BSD-3-clause" in (folder / "copyright").read_text()
    assert "Montreal Neurological Institute" in (folder / "NOTICE").read_text()


def test_templateflow_offline_get(tmp_path):
    code = (
        "import templateflow.api as api;"
        "p = api.get('MRIxFields', resolution=1, desc=None, suffix='T1w');"
        "m = api.get('MRIxFields', resolution=2, desc='brain', suffix='mask');"
        "print(p); print(m)"
    )
    env = dict(os.environ, TEMPLATEFLOW_HOME=str(TEMPLATEFLOW_HOME), TEMPLATEFLOW_AUTOUPDATE="0",
               HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out[0].endswith("tpl-MRIxFields_res-1_T1w.nii.gz") and Path(out[0]).stat().st_size > 0
    assert out[1].endswith("tpl-MRIxFields_res-2_desc-brain_mask.nii.gz")


# ---------------------------------------------------------------- nibabel <-> ANTs


@pytest.mark.parametrize("affine", [
    np.diag([-1.0, -1.0, 1.0, 1.0]),
    from_matvec(_rot(0, 19) @ _rot(2, 7) @ np.diag([1.0, 1.2, 0.9]), [-60, -110, -28]),
    REF_AFFINE,
])
def test_nib_ants_round_trip_preserves_world(affine):
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), affine)
    a = P.nib_to_ants(img)
    for ijk in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        lps = np.asarray(P._ants().transform_index_to_physical_point(a, ijk))
        np.testing.assert_allclose(lps * [-1, -1, 1], apply_affine(affine, ijk), atol=1e-4)
    back = P.ants_to_nib(a)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(back.get_fdata(), img.get_fdata())


# ---------------------------------------------------------------- detection


def test_detect_skull_stripped_synthetic():
    rng = np.random.default_rng(1)
    shape = (160, 192, 160)
    aff = np.eye(4)
    ijk = np.indices(shape, sparse=True)
    r = np.sqrt(((ijk[0] - 80) / 60) ** 2 + ((ijk[1] - 96) / 75) ** 2 + ((ijk[2] - 80) / 60) ** 2)
    brain = np.where(r < 1, 100.0, 0.0).astype(np.float32)  # ~1.13 L, zero background
    assert P.detect_skull_stripped(nib.Nifti1Image(brain, aff))
    head = brain + rng.uniform(1, 5, size=shape).astype(np.float32)  # noisy air
    assert not P.detect_skull_stripped(nib.Nifti1Image(head, aff))
    big = np.where(r < 1.5, 100.0, 0.0).astype(np.float32)  # 3.8 L head, zeroed background
    assert not P.detect_skull_stripped(nib.Nifti1Image(big, aff))


# ---------------------------------------------------------------- ANTs on small phantoms


def test_n4_correct_reduces_bias():
    img = _phantom()
    data = img.get_fdata(dtype=np.float32)
    x = np.linspace(-1, 1, data.shape[0])[:, None, None]
    biased = data * (1 + 0.4 * x)
    obj = data > 90
    cv = lambda d: d[obj].std() / d[obj].mean()  # noqa: E731
    out = P.n4_correct(nib.Nifti1Image(biased, img.affine), threads=THREADS)
    assert out.shape == img.shape and out.get_data_dtype() == np.float32
    np.testing.assert_array_equal(out.affine, img.affine)
    assert cv(out.get_fdata()) < 0.5 * cv(biased)


def test_n4_in_its_own_process_on_fixed_threads(monkeypatch):
    """The App's N4: the result of two ITK threads, reproducible, and this process untouched."""
    monkeypatch.setenv(P.THREADS_ENV, "1")  # as the App sets it for the whole run
    img = _phantom()
    data = img.get_fdata(dtype=np.float32)
    biased = nib.Nifti1Image(data * (1 + 0.4 * np.linspace(-1, 1, data.shape[0])[:, None, None]),
                             img.affine)
    before = os.environ.get(P.THREADS_ENV)
    a = P.n4_correct_isolated(biased)
    b = P.n4_correct_isolated(biased)
    assert os.environ.get(P.THREADS_ENV) == before == "1"
    # the child really ran on N4_THREADS threads, not on the caller's one
    one = P.n4_correct_isolated(biased, threads=1)
    assert not np.array_equal(one.get_fdata(), a.get_fdata())
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
    np.testing.assert_array_equal(a.affine, img.affine)
    obj = data > 90
    cv = lambda d: d[obj].std() / d[obj].mean()  # noqa: E731
    assert cv(a.get_fdata()) < 0.5 * cv(biased.get_fdata())
    with pytest.raises(RuntimeError, match="N4 bias-field correction failed: .*no positive"):
        P.n4_correct_isolated(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), img.affine))


@pytest.mark.parametrize("shape, factor", [((124, 160, 140), 4), ((181, 217, 181), 5),
                                           ((192, 256, 256), 6), ((256, 320, 320), 8),
                                           ((20, 24, 20), 4)])
def test_n4_shrink_factor_bounds_the_fitting_grid(shape, factor):
    got = P.n4_shrink_factor(shape)
    assert got == factor
    # the fitting grid is within budget, and one step finer would not have been
    assert np.prod(shape) / got**3 <= P.N4_MAX_FIT_VOXELS
    if got > 4:
        assert np.prod(shape) / (got - 1) ** 3 > P.N4_MAX_FIT_VOXELS


def test_register_rigid_recovers_shift(tmp_path):
    fixed = _phantom()
    moving = _phantom(centre_mm=(6.0, -10.0 + 4.0, 5.0 - 3.0))  # anatomy moved by (6, 4, -3) mm
    xfm = P.register_rigid(moving, fixed, out_prefix=tmp_path / "t2w_to_t1w_", threads=THREADS)
    assert xfm.endswith("0GenericAffine.mat") and Path(xfm).is_file()
    # A fixed-space point maps to the moving-space point of the same anatomy (ITK LPS).
    tx = P._ants().read_transform(xfm)
    p_fixed = np.array([0.0, -10.0, 5.0]) * [-1, -1, 1]
    p_moving = np.asarray(tx.apply_to_point(p_fixed.tolist())) * [-1, -1, 1]
    np.testing.assert_allclose(p_moving - [0.0, -10.0, 5.0], [6, 4, -3], atol=1.0)


def test_to_reference_and_back_with_identity(tmp_path):
    ants = P._ants()
    ident = str(tmp_path / "identity.mat")
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform",
                                                    dimension=3), ident)
    # Native: an LPS, oblique 2 mm image somewhere in MNI space.
    aff = from_matvec(_rot(0, 10) @ np.diag([-2.0, -2.0, 2.0]), [48, 60, -40])
    src = _phantom(affine=aff, centre_mm=(0.0, -10.0, 5.0))
    ref = P.to_reference(src, [ident])
    assert ref.shape == REF_SHAPE
    np.testing.assert_array_equal(ref.affine, REF_AFFINE)
    assert int(ref.header["sform_code"]) == 4 and ref.get_data_dtype() == np.float32
    # The phantom's centre stays at the same world coordinate.
    centre = apply_affine(np.linalg.inv(REF_AFFINE), [0.0, -10.0, 5.0]).round().astype(int)
    assert ref.get_fdata(dtype=np.float32)[tuple(centre)] > 50
    back = P.to_native(ref, src, [ident])
    assert back.shape == src.shape
    np.testing.assert_array_equal(back.affine, src.affine)
    inside = src.get_fdata() > 20
    assert np.corrcoef(back.get_fdata()[inside], src.get_fdata()[inside])[0, 1] > 0.98
    # nearest neighbour invents no values (0 is the outside-the-field-of-view fill)
    grid = _phantom(shape=(30, 34, 30), zoom=3.0)
    nn = P.to_native(src, grid, ident, interpolation="nearest")
    assert nn.shape == grid.shape
    assert set(np.unique(nn.get_fdata(dtype=np.float32))) <= set(
        np.unique(src.get_fdata(dtype=np.float32))) | {0.0}


def test_transform_argument_errors(tmp_path):
    img = _phantom()
    with pytest.raises(FileNotFoundError):
        P.to_reference(img, [str(tmp_path / "missing.h5")])
    with pytest.raises(ValueError, match="unknown interpolation"):
        P.to_native(img, img, [str(tmp_path / "x.mat")], interpolation="cubic-ish")


# ---------------------------------------------------------------- real data (slow)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _template_nccs(ref_img: nib.Nifti1Image, template) -> tuple[float, float]:
    """(NCC inside the template brain mask, same after 4 mm smoothing of both images)."""
    from scipy import ndimage as ndi

    t1, tmask = template
    sub = _in_template_space(ref_img)
    smooth = _ncc(ndi.gaussian_filter(sub, SMOOTH_SIGMA_MM)[tmask],
                  ndi.gaussian_filter(t1, SMOOTH_SIGMA_MM)[tmask])
    return _ncc(sub[tmask], t1[tmask]), smooth


def _in_template_space(ref_img: nib.Nifti1Image) -> np.ndarray:
    """Reference-grid (0.5 mm) data on the 1 mm template grid: same origin, every 2nd voxel."""
    return ref_img.get_fdata(dtype=np.float32)[::2, ::2, ::2]


@pytest.fixture(scope="module")
def template():
    t1 = nib.load(P.template_path(1)).get_fdata(dtype=np.float32)
    mask = nib.load(P.template_path(1, desc="brain", suffix="mask")).get_fdata() > 0
    return t1, mask


def _cerebellum_box(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxels of the 1 mm template grid inside an MNI box that holds only cerebellum."""
    ijk = np.indices(shape).reshape(3, -1)
    x, y, z = apply_affine(nib.load(P.template_path(1)).affine, ijk.T).T
    box = (np.abs(x) <= 40) & (y >= -85) & (y <= -50) & (z >= -55) & (z <= -30)
    return box.reshape(shape)


@pytest.fixture(scope="module")
def sub01(tmp_path_factory):
    path = BIDS / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    out = tmp_path_factory.mktemp("sub01")
    img, _ = conform(load_image(path), name=path.name)
    n4 = P.n4_correct(img, threads=THREADS)
    # the App's default brain extraction (the template method: benchmarks/bench_brain_extraction)
    from synth7t.brain_extraction import extract_brain

    res = extract_brain(n4, device="cpu", threads=2)
    brain, mask = res.brain, res.mask
    xfm = P.register_to_reference(brain, mask, out_prefix=out / "from-T1w_to-ref_",
                                  threads=THREADS, seed=0)
    return dict(img=img, n4=n4, brain=brain, mask=mask, xfm=xfm)


@pytest.mark.slow
def test_sub01_whole_head_is_not_detected_as_stripped(sub01):
    assert not P.detect_skull_stripped(sub01["img"])
    assert not P.detect_skull_stripped(sub01["n4"])


@pytest.mark.slow
def test_sub01_brain_mask_volume_and_cerebellum(sub01, template):
    mask = sub01["mask"]
    litres = mask.get_fdata().sum() * abs(np.linalg.det(mask.affine[:3, :3])) / 1e6
    assert 1.0 < litres < 1.9
    assert (sub01["brain"].get_fdata()[mask.get_fdata() == 0] == 0).all()
    in_ref = _in_template_space(P.to_reference(mask, [sub01["xfm"]["forward"]],
                                               interpolation="nearest")) > 0.5
    _, tmask = template
    cerebellum = _cerebellum_box(tmask.shape) & tmask
    assert cerebellum.sum() > 20000
    assert (in_ref & cerebellum).sum() / cerebellum.sum() > 0.95
    dice = 2 * (in_ref & tmask).sum() / (in_ref.sum() + tmask.sum())
    assert dice > 0.9


@pytest.mark.slow
def test_sub01_registration_to_reference(sub01, template):
    xfm = sub01["xfm"]
    assert Path(xfm["forward"]).name == "from-T1w_to-ref_Composite.h5"
    assert Path(xfm["inverse"]).name == "from-T1w_to-ref_InverseComposite.h5"
    ref = P.to_reference(sub01["brain"], [xfm["forward"]])
    assert ref.shape == REF_SHAPE
    np.testing.assert_array_equal(ref.affine, REF_AFFINE)
    ncc, ncc_smooth = _template_nccs(ref, template)
    assert ncc > NCC_MASK_MIN, f"NCC {ncc:.3f}"
    assert ncc_smooth > NCC_SMOOTH_MIN, f"NCC (smoothed) {ncc_smooth:.3f}"
    # round trip back to native space
    native = P.to_native(ref, sub01["brain"], [xfm["inverse"]])
    m = sub01["mask"].get_fdata() > 0
    assert _ncc(native.get_fdata()[m], sub01["brain"].get_fdata()[m]) > 0.95


@pytest.fixture(scope="module")
def sub02():
    path = BIDS / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    img, warns = conform(load_image(path), name=path.name)
    assert any("oblique" in w for w in warns)
    return img


@pytest.mark.slow
def test_sub02_stripped_oblique_registers(sub02, tmp_path, template):
    assert P.detect_skull_stripped(sub02)
    n4 = P.n4_correct(sub02, threads=THREADS)
    brain, mask = P.skull_strip(n4, threads=THREADS, seed=0)  # no registration needed
    # the mask is the (hole-filled) non-zero region of the input
    nonzero = sub02.get_fdata() != 0
    m = mask.get_fdata() > 0
    assert (m & nonzero).sum() / nonzero.sum() > 0.99
    assert (brain.get_fdata()[~m] == 0).all()
    xfm = P.register_to_reference(brain, mask, out_prefix=tmp_path / "s02_", threads=THREADS,
                                  seed=0)
    ref = P.to_reference(brain, [xfm["forward"]])
    ncc, ncc_smooth = _template_nccs(ref, template)
    assert ncc > NCC_MASK_MIN, f"NCC {ncc:.3f}"
    assert ncc_smooth > NCC_SMOOTH_MIN, f"NCC (smoothed) {ncc_smooth:.3f}"
    tmask = template[1]
    in_ref = _in_template_space(P.to_reference(mask, xfm["forward"], interpolation="nearest")) > 0
    assert 2 * (in_ref & tmask).sum() / (in_ref.sum() + tmask.sum()) > 0.9


_DETERMINISM_SCRIPT = """
import sys, numpy as np
from synth7t import preprocess as P
from synth7t.io import conform, load_image
img, _ = conform(load_image(sys.argv[1]))
brain, mask = P.skull_strip(img)
out = []
for i in range(2):
    x = P.register_to_reference(brain, mask, out_prefix=f"{sys.argv[2]}/run{i}_", threads=1, seed=0)
    out.append(P.to_reference(brain, x["forward"]).get_fdata(dtype=np.float32)[::2, ::2, ::2])
print("identical" if np.array_equal(out[0], out[1]) else "different")
"""


@pytest.mark.slow
def test_registration_is_deterministic_with_one_thread(sub02, tmp_path):
    # ITK sizes its thread pool once per process, so run where the first ITK call uses 1 thread.
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1",
               PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    path = BIDS / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    res = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT, str(path), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "identical"


@pytest.mark.slow
def test_sub02_nonlinear_improves_alignment(sub02, tmp_path, template):
    brain, mask = P.skull_strip(sub02, threads=THREADS, seed=0)
    affine = P.register_to_reference(brain, mask, out_prefix=tmp_path / "aff_", threads=THREADS)
    syn = P.register_to_reference(brain, mask, out_prefix=tmp_path / "syn_", threads=THREADS,
                                  nonlinear=True)
    ncc_affine, _ = _template_nccs(P.to_reference(brain, affine["forward"]), template)
    ncc_syn, _ = _template_nccs(P.to_reference(brain, syn["forward"]), template)
    assert ncc_syn > ncc_affine + 0.05, (ncc_affine, ncc_syn)


def test_seed_zero_is_not_antsregistration_clock_seed():
    # antsRegistration --random-seed 0 means "seed from the clock"
    assert P._ants_seed(0) == 1 and P._ants_seed(41) == 42
    with pytest.raises(ValueError):
        P._ants_seed(-1)
