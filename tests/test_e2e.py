"""End to end: ``synth7t ../shared/data/bids_3t <out> participant`` on real 3T data (slow).

sub-01 is a whole-head T1w (skull stripping runs); sub-02 has T1w, T2w and FLAIR that are
already brain-extracted (detected, not stripped again). The App runs twice with the same work
directory: the second run must reuse Nipype's cache for every node.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, run_app, tree_digest
from synth7t.reference import REF_AFFINE, REF_SHAPE, REF_SPACE, REF_ZOOMS

pytestmark = pytest.mark.slow

CONTRASTS = {"01": ("T1w",), "02": ("T1w", "T2w", "FLAIR")}
PROVENANCE_KEYS = ("Sources", "SkullStripped", "ProcessingSoftwareVersions", "CommandLine",
                   "RandomSeed")
SYNTH_KEYS = ("MagneticFieldStrength", "SourceMagneticFieldStrength", "SourceFieldBin",
              "SynthesisModel")


def expected_files(label: str) -> list[str]:
    """Every derivative ARCHITECTURE.md lists for sub-<label> (plus the sidecars)."""
    contrasts = CONTRASTS[label]
    a = contrasts[0]
    p = f"sub-{label}/anat/sub-{label}"
    files = [f"{p}_desc-brain_mask.nii.gz", f"{p}_space-{REF_SPACE}_desc-brain_mask.nii.gz",
             f"{p}_from-{a}_to-{REF_SPACE}_mode-image_xfm.h5",
             f"{p}_from-{REF_SPACE}_to-{a}_mode-image_xfm.h5"]
    for c in contrasts:
        files += [f"{p}_desc-preproc_{c}.nii.gz", f"{p}_space-{REF_SPACE}_desc-preproc_{c}.nii.gz",
                  f"{p}_space-{REF_SPACE}_desc-synth7T_{c}.nii.gz", f"{p}_desc-synth7T_{c}.nii.gz",
                  f"{p}_space-{REF_SPACE}_desc-uncertainty_{c}.nii.gz",
                  f"{p}_desc-uncertainty_{c}.nii.gz"]
        if c != a:
            files += [f"{p}_space-{c}_desc-brain_mask.nii.gz",
                      f"{p}_from-{c}_to-{a}_mode-image_xfm.txt",
                      f"{p}_from-{a}_to-{c}_mode-image_xfm.txt"]
    return files + [f.split(".")[0] + ".json" for f in files]


@pytest.fixture(scope="module")
def e2e(bids_3t_run):
    """The session's first run (conftest.bids_3t_run) and a second one with the same work dir."""
    run = bids_3t_run
    results = {p: p.stat().st_mtime_ns for p in run.work.rglob("result_*.pklz")}
    outputs = {p: p.stat().st_mtime_ns for p in run.out.rglob("sub-*/anat/*")}
    second = run_app(run.args, REPO)
    return SimpleNamespace(out=run.out, work=run.work, first=run.proc, second=second,
                           results=results, outputs=outputs, bids=run.bids, before=run.before,
                           after=tree_digest(run.bids))


def _describe(proc) -> str:
    return f"exit {proc.returncode} after {proc.seconds:.0f} s\n" + \
        "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])


def test_first_run_succeeds(e2e):
    assert e2e.first.returncode == 0, _describe(e2e.first)
    assert "Traceback" not in e2e.first.stderr


@pytest.mark.parametrize("label", sorted(CONTRASTS))
def test_every_derivative_written(e2e, label):
    missing = [f for f in expected_files(label) if not (e2e.out / f).is_file()]
    assert not missing, missing
    for name in ("dataset_description.json", ".bidsignore"):
        assert (e2e.out / name).is_file()
    assert list((e2e.out / "logs").glob("config-*.toml"))
    assert not list((e2e.out / "logs").rglob("crash-*"))
    assert not (e2e.out / ".synth7t-staging").exists()


@pytest.mark.parametrize("label", sorted(CONTRASTS))
def test_reference_space_grid(e2e, label):
    files = sorted((e2e.out / f"sub-{label}" / "anat").glob(f"*space-{REF_SPACE}_*.nii.gz"))
    assert files
    for f in files:
        img = nib.load(f)
        assert img.shape == REF_SHAPE, f.name
        assert np.allclose(img.header.get_zooms()[:3], REF_ZOOMS), f.name
        assert np.allclose(img.affine, REF_AFFINE, atol=1e-5), f.name
        assert int(img.header["sform_code"]) == 4
        if "_mask" not in f.name:  # scaled integers by default
            assert img.get_data_dtype() == np.uint16, f.name


@pytest.mark.parametrize("label", sorted(CONTRASTS))
def test_synthetic_images(e2e, label):
    anat = e2e.out / f"sub-{label}" / "anat"
    a = CONTRASTS[label][0]
    ref_mask = np.asanyarray(nib.load(
        anat / f"sub-{label}_space-{REF_SPACE}_desc-brain_mask.nii.gz").dataobj) > 0
    assert 0.5e6 < ref_mask.sum() * 0.125 / 1000 * 1000 < 3e6  # 0.5-3 L of brain
    for c in CONTRASTS[label]:
        for space, mask in (("ref", ref_mask), ("native", None)):
            if space == "ref":
                f = anat / f"sub-{label}_space-{REF_SPACE}_desc-synth7T_{c}.nii.gz"
            else:
                f = anat / f"sub-{label}_desc-synth7T_{c}.nii.gz"
                mname = (f"sub-{label}_desc-brain_mask.nii.gz" if c == a
                         else f"sub-{label}_space-{c}_desc-brain_mask.nii.gz")
                mask = np.asanyarray(nib.load(anat / mname).dataobj) > 0
                assert nib.load(f).shape == nib.load(
                    anat / f"sub-{label}_desc-preproc_{c}.nii.gz").shape
            data = nib.load(f).get_fdata(dtype=np.float32)
            assert np.isfinite(data).all(), f.name
            assert data.min() >= 0 and data.max() <= 1, f.name
            assert not data[~mask].any(), f"{f.name}: non-zero outside the brain mask"
            assert data[mask].mean() > 0.05, f"{f.name}: empty brain"


def _resolve(uri: str, out: Path, links: dict) -> Path:
    if uri.startswith("bids::"):
        return out / uri[len("bids::"):]
    dataset, _, rel = uri[len("bids:"):].partition(":")
    return Path(links[dataset]) / rel


@pytest.mark.parametrize("label", sorted(CONTRASTS))
def test_sidecars(e2e, label):
    desc = json.loads((e2e.out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "synth7t" and desc["SourceDatasets"]
    links = desc["DatasetLinks"]
    sidecars = sorted((e2e.out / f"sub-{label}" / "anat").glob("*.json"))
    assert len(sidecars) == len(expected_files(label)) // 2
    for js in sidecars:
        meta = json.loads(js.read_text())
        for key in PROVENANCE_KEYS:
            assert key in meta, f"{js.name}: no {key}"
        assert meta["RandomSeed"] == 0
        assert "Unknown" not in json.dumps(meta)
        assert meta["Sources"] and all(_resolve(s, e2e.out, links).is_file()
                                       for s in meta["Sources"]), (js.name, meta["Sources"])
        if "_space-" in js.name:
            assert _resolve(meta["SpatialReference"], e2e.out, links).is_file(), js.name
        if "synth7T" in js.name:
            for key in SYNTH_KEYS:
                assert key in meta, f"{js.name}: no {key}"
            assert meta["MagneticFieldStrength"] == 7
            assert meta["SourceMagneticFieldStrength"] == 3 and meta["SourceFieldBin"] == 3.0
            model = meta["SynthesisModel"]
            assert model["Name"] and model["Version"] and len(model["SHA256"]) == 64
            if model.get("Kind") == "baseline":
                assert model["Description"].startswith("baseline: non-deep")
    preproc = json.loads((e2e.out / f"sub-{label}" / "anat" /
                          f"sub-{label}_desc-preproc_T1w.json").read_text())
    assert preproc["SkullStripped"] is (label == "02")  # sub-01 is a whole head


def test_pybids_indexes_derivatives(e2e):
    from bids.layout import BIDSLayout

    layout = BIDSLayout(str(e2e.out), validate=False, is_derivative=True)
    assert sorted(layout.get_subjects()) == ["01", "02"]
    synth = layout.get(desc="synth7T", space=REF_SPACE, extension=".nii.gz")
    assert sorted((f.entities["subject"], f.entities["suffix"]) for f in synth) == [
        ("01", "T1w"), ("02", "FLAIR"), ("02", "T1w"), ("02", "T2w")]
    assert layout.get_metadata(synth[0].path)["MagneticFieldStrength"] == 7
    xfms = layout.get(subject="02", suffix="xfm", extension=".txt")
    assert len(xfms) == 4


def test_derivatives_pass_the_validator(e2e):
    from bids_app.validation import validator_command

    proc = subprocess.run([*validator_command(), "--format", "json", str(e2e.out)],
                          capture_output=True, text=True, timeout=300)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [i for i in issues if i.get("severity") == "error"]
    assert not errors, errors[:5]


def test_input_dataset_untouched(e2e):
    assert e2e.before == e2e.after


def test_second_run_reuses_the_cache(e2e):
    assert e2e.second.returncode == 0, _describe(e2e.second)
    assert e2e.results, "no Nipype result files after the first run"
    rerun = [str(p.relative_to(e2e.work)) for p, t in e2e.results.items()
             if p.stat().st_mtime_ns != t]
    assert not rerun, f"{len(rerun)} nodes ran again: {rerun[:10]}"
    new = set(e2e.work.rglob("result_*.pklz")) - set(e2e.results)
    assert not new, new
    rewritten = [p.name for p, t in e2e.outputs.items() if p.stat().st_mtime_ns != t]
    assert not rewritten, rewritten
    for label in CONTRASTS:
        infos = sorted((e2e.out / "logs" / f"sub-{label}").glob("run-*.json"),
                       key=lambda p: p.stat().st_mtime)
        assert len(infos) == 2
        assert json.loads(infos[0].read_text())["executed_nodes"]
        assert json.loads(infos[-1].read_text())["executed_nodes"] == []


@pytest.mark.browser
@pytest.mark.parametrize("label", sorted(CONTRASTS))
def test_real_report_in_browser(e2e, label, tmp_path):
    """The report of the ``bids_3t`` run renders in headless Chromium (screenshot in tmp_path)."""
    from conftest import check_report_in_chromium

    report = e2e.out / f"sub-{label}.html"
    assert report.is_file(), report
    images = check_report_in_chromium(report, tmp_path)
    # per contrast: mask, registration, 3 mosaics and the uncertainty overlay
    assert len(images) == 6 * len(CONTRASTS[label])
    assert all(f"sub-{label}/figures/" in src for src, _, _ in images)
