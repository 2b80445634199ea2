"""Field-physics simulator: physics table, rendered contrasts, noise, determinism, CLI.

Fast: everything renders small boxes of the reference grid from the BrainWeb labels (Colin27:
allowed in tests, never for training); one simulator is shared by the module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from synth7t.physics import PROTOCOL_FIELDS, Physics
from synth7t.reference import REF_AFFINE

os.environ.setdefault("NIPYPE_NO_ET", "1")

BRAINWEB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / \
    "brainweb_crisp_labels.nii.gz"
if not BRAINWEB.exists():
    BRAINWEB = Path("/work/shared/data/brainweb_crisp_labels.nii.gz")
pytestmark = pytest.mark.skipif(not BRAINWEB.exists(), reason="BrainWeb labels not available")

#: Axial slab through the lateral ventricles (CSF), cortex (GM) and centrum semiovale (WM).
ROI = (slice(90, 274), slice(110, 350), slice(170, 182))
SOURCE_FIELDS = (0.1, 1.5, 3.0, 5.0)

# FIELD_PHYSICS.md table: B0 -> (T1 WM, T1 GM, T2 WM, T2 GM, T2* WM, T2* GM)
DESIGN_TABLE = {
    0.1: (242, 361, 85, 95, 63, 89),
    1.5: (681, 998, 80, 87, 52, 73),
    3.0: (887, 1295, 71, 76, 43, 59),
    5.0: (1078, 1570, 59, 62, 33, 44),
    7.0: (1226, 1781, 47, 47, 25, 33),
}


@pytest.fixture(scope="module")
def sim():
    from synth7t.simulate import Simulator

    return Simulator.from_labels(str(BRAINWEB))


@pytest.fixture(scope="module")
def pure(sim):
    """Voxels of the ROI that are pure CSF/GM/WM even after the thickest blur (5 mm slices)."""
    fr = sim.anatomy.resample(ROI)
    masks = {k: ndi.gaussian_filter(fr[k], (2, 2, 4)) > 0.9 for k in ("CSF", "GM", "WM")}
    for k, m in masks.items():
        assert m.sum() > 5000, f"too few pure {k} voxels in the test ROI"
    return masks


@pytest.fixture(scope="module")
def rendered(sim):
    """Noisy renders of every contrast at every source field (undeformed, so masks apply)."""
    return {f: sim.sample_all_contrasts(field=f, seed=4, roi=ROI, deform=False)
            for f in SOURCE_FIELDS}


def medians(img: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.median(img[m])) for k, m in masks.items()}


# --- the physics table ------------------------------------------------------------------------

def test_relaxation_reproduces_design_table():
    phys = Physics.load()
    for b0, (t1w, t1g, t2w, t2g, t2sw, t2sg) in DESIGN_TABLE.items():
        wm, gm = phys.relaxation("WM", b0), phys.relaxation("GM", b0)
        assert wm.T1 == pytest.approx(t1w, rel=0.01) and gm.T1 == pytest.approx(t1g, rel=0.01)
        assert wm.T2 == pytest.approx(t2w, abs=0.5) and gm.T2 == pytest.approx(t2g, abs=0.5)
        assert wm.T2star == pytest.approx(t2sw, abs=1.0)
        assert gm.T2star == pytest.approx(t2sg, abs=1.0)
        assert phys.relaxation("CSF", b0).T1 == 4300
    # deep nuclei: shorter T1 than cortex, and the pallidum below WM at 7 T (iron)
    for nucleus in ("caudate", "putamen", "thalamus", "pallidum"):
        assert phys.relaxation(nucleus, 7.0).T1 < phys.relaxation("GM", 7.0).T1
    assert phys.relaxation("pallidum", 7.0).T1 < phys.relaxation("WM", 7.0).T1


def test_every_number_has_a_source():
    table = json.loads(Path(Physics.load.__globals__["PHYSICS_JSON"]).read_text())
    missing = []

    def walk(node, where):
        if isinstance(node, dict):
            numeric = any(isinstance(v, (int, float)) and not isinstance(v, bool)
                          for k, v in node.items() if k != "source")
            if numeric and "source" not in node and not where.endswith(("_ms", "_deg")):
                missing.append(where)
            for k, v in node.items():
                walk(v, f"{where}.{k}")

    walk(table, "physics")
    assert not missing, f"entries without a source: {missing}"
    assert any("FLAIR" in n for n in table["notes"])


def test_protocols_exist_for_every_contrast_and_field():
    phys = Physics.load()
    rng = np.random.default_rng(0)
    for c in ("T1w", "T2w", "FLAIR"):
        for f in PROTOCOL_FIELDS:
            p = phys.protocol(c, f, rng)
            assert p["TR"] > 0 and p["TE"] > 0
            assert phys.protocol(c, 7.0, rng) == phys.protocol(c, 7.0)  # fixed target
    with pytest.raises(ValueError):
        phys.protocol("T1w", 2.0)


# --- rendered images ------------------------------------------------------------------------------

@pytest.mark.parametrize("field", SOURCE_FIELDS)
def test_contrast_relations(rendered, pure, field):
    out = rendered[field]
    for role in ("source", "target"):
        t1 = medians(out["T1w"][role], pure)
        t2 = medians(out["T2w"][role], pure)
        fl = medians(out["FLAIR"][role], pure)
        assert t1["WM"] > t1["GM"] > t1["CSF"], (role, "T1w", t1)
        assert t2["CSF"] > t2["GM"] and t2["CSF"] > t2["WM"], (role, "T2w", t2)
        if role == "source":  # at 7 T the table's GM and WM T2 are equal (47 ms)
            assert t2["GM"] > t2["WM"], (role, "T2w", t2)
        assert fl["CSF"] < 0.5 * fl["GM"], (role, "FLAIR: CSF not nulled", fl)


def test_t1w_gm_wm_contrast_larger_at_7t(rendered, pure):
    def contrast(img):
        m = medians(img, pure)
        return (m["WM"] - m["GM"]) / (m["WM"] + m["GM"])

    c15 = contrast(rendered[1.5]["T1w"]["source"])
    c7 = contrast(rendered[1.5]["T1w"]["target"])
    assert c7 > 1.3 * c15, (c15, c7)


def test_noise_rises_as_field_falls(sim):
    box = (slice(200, 260), slice(200, 280), slice(200, 216))  # centrum semiovale: pure WM
    wm = ndi.binary_erosion(sim.anatomy.resample(box)["WM"] > 0.99, iterations=2)
    assert wm.sum() > 5000
    levels = []
    for f in SOURCE_FIELDS:
        noisy = sim.sample("T1w", f, seed=4, roi=box, deform=False)
        clean = sim.sample("T1w", f, seed=4, roi=box, deform=False, noise=False)
        diff = (noisy["source"] - clean["source"])[wm]
        levels.append(float(diff.std()) / float(np.median(clean["source"][wm])))
    target = float((noisy["target"] - clean["target"])[wm].std())
    assert all(a > b for a, b in zip(levels, levels[1:])), levels
    assert levels[-1] > target > 0, (levels, target)


def test_output_contract(rendered):
    out = rendered[3.0]
    shape = tuple(s.stop - s.start for s in ROI)
    assert out["mask"].dtype == bool and out["mask"].shape == shape and out["mask"].any()
    for c in ("T1w", "T2w", "FLAIR"):
        assert np.array_equal(out[c]["mask"], out["mask"])
        for role in ("source", "target"):
            img = out[c][role]
            assert img.dtype == np.float32 and img.shape == shape
            assert np.all(img[~out["mask"]] == 0)
            assert img.min() >= 0 and img.max() <= 1 and img[out["mask"]].max() > 0.9
        json.dumps(out[c]["params"])  # params are JSON-able


def test_same_seed_same_bytes_different_seed_differs(sim):
    roi = (slice(150, 230), slice(150, 250), slice(170, 180))
    a = sim.sample("FLAIR", 1.5, seed=123, roi=roi)
    b = sim.sample("FLAIR", 1.5, seed=123, roi=roi)
    c = sim.sample("FLAIR", 1.5, seed=124, roi=roi)
    for k in ("source", "target", "mask"):
        assert a[k].tobytes() == b[k].tobytes()
    assert a["source"].tobytes() != c["source"].tobytes()
    assert a["params"] == b["params"] and a["params"] != c["params"]


def test_roi_does_not_change_the_image(sim):
    """Two overlapping boxes of the same (deformed, noiseless) sample agree in the overlap."""
    big = (slice(100, 260), slice(120, 300), slice(160, 190))
    small = (slice(140, 200), slice(160, 240), slice(170, 178))
    a = sim.sample("T2w", 1.5, seed=9, roi=big, noise=False)
    b = sim.sample("T2w", 1.5, seed=9, roi=small, noise=False)
    inner = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(small, big))
    assert np.array_equal(a["mask"][inner], b["mask"])
    for k in ("source", "target"):
        assert np.abs(a[k][inner] - b[k]).max() < 1e-3


# --- command line -------------------------------------------------------------------------------

def test_cli_mrixfields_layout(tmp_path):
    from synth7t.commands.simulate import main

    out = tmp_path / "mrix"
    rc = main(["--anatomy", f"labels:{BRAINWEB}", "--contrasts", "T1w", "FLAIR",
               "--fields", "0.1", "3", "--n-subjects", "2", "--seed", "1", "--roi",
               "150:200,150:230,172:176", "--no-progress", "-o", str(out)])
    assert rc == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    expected = sorted(f"Training_prospective/{mod}/{fl}/P_{mod}_{fl}_{i:04d}.nii.gz"
                      for mod in ("T1W", "T2FLAIR") for fl in ("0.1T", "3T", "7T")
                      for i in (1, 2))
    assert files == expected
    img = nib.load(out / expected[0])
    assert img.get_data_dtype() == np.float32 and img.shape == (50, 80, 4)
    shifted = REF_AFFINE.copy()
    shifted[:3, 3] = (REF_AFFINE @ [150, 150, 172, 1])[:3]
    assert np.allclose(img.affine, shifted)
    assert (out / "simulation.json").is_file()
    assert not list(out.rglob("*.tmp"))


def test_cli_bids_layout(sim, tmp_path):
    from synth7t.commands.simulate import write_dataset

    out = tmp_path / "bids"
    roi = (slice(150, 200), slice(150, 230), slice(172, 176))
    write_dataset(sim, out, contrasts=("T2w",), fields=[1.5], n_subjects=1, fmt="bids",
                  roi=roi, progress=False)
    for ses, field in (("1p5T", 1.5), ("7T", 7.0)):
        stem = out / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_T2w"
        assert Path(f"{stem}.nii.gz").is_file()
        side = json.loads(Path(f"{stem}.json").read_text())
        assert side["MagneticFieldStrength"] == field and side["EchoTime"] < 1
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and (out / "participants.tsv").read_text().startswith(
        "participant_id\nsub-01")


def test_cli_usage_errors(tmp_path):
    from synth7t.commands.simulate import main

    assert main(["--fields", "2", "-o", str(tmp_path)]) == 64
    assert main(["--roi", "1:2", "-o", str(tmp_path)]) == 64
    assert main(["--anatomy", "labels:/does/not/exist.nii.gz", "-o", str(tmp_path)]) == 66
