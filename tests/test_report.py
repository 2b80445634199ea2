"""The per-participant HTML report (bids_app/report.py).

The fast test builds a report from a small synthetic derivatives folder; the browser test opens
it in headless Chromium (:func:`conftest.check_report_in_chromium`). Point it at another report
with ``SYNTH7T_REPORT=/path/sub-01.html``. The reports of the real ``../shared/data/bids_3t`` run
are opened the same way in tests/test_e2e.py.
"""
from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_app.report import generate_report
from conftest import check_report_in_chromium

SHAPE = (40, 48, 40)


def _blob(shape, zooms, affine_origin, seed):
    """A head-like ellipsoid with a darker 'ventricle' and smooth texture; returns image+mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid[0] / 0.7) ** 2 + (grid[1] / 0.8) ** 2 + (grid[2] / 0.7) ** 2)
    mask = r < 1.0
    vent = np.sqrt((grid[0] / 0.15) ** 2 + (grid[1] / 0.3) ** 2 + (grid[2] / 0.2) ** 2) < 1
    data = np.where(mask, 600 + 150 * np.cos(6 * grid[0]) * np.sin(5 * grid[1]), 0.0)
    data = data + np.where(mask, rng.normal(0, 20, shape), 0)
    data[vent] = 200
    aff = np.diag(list(zooms) + [1.0])
    aff[:3, 3] = affine_origin
    return (nb.Nifti1Image(data.astype(np.float32), aff),
            nb.Nifti1Image(mask.astype(np.uint8), aff))


def make_derivatives(out_dir: Path, label: str = "01", contrasts=("T1w", "FLAIR")) -> dict:
    """A small derivatives folder and the run_info that the BIDS App would pass."""
    anat = out_dir / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    inputs = []
    # reference space stand-in: 2 mm, MNI-like origin (the real one is 0.5 mm 364x436x364)
    ref_img, ref_mask = _blob((46, 54, 46), (2, 2, 2), (-46, -62, -40), seed=1)
    nb.save(ref_mask, out_dir / "tpl_desc-brain_mask.nii.gz")
    for k, contrast in enumerate(contrasts):
        img, mask = _blob(SHAPE, (1.5, 1.5, 1.5), (-30, -36, -30), seed=10 + k)
        names = {
            "preproc": f"sub-{label}_desc-preproc_{contrast}.nii.gz",
            "mask": f"sub-{label}_desc-brain_mask.nii.gz",
            "ref_preproc": f"sub-{label}_space-MRIxFields_desc-preproc_{contrast}.nii.gz",
            "synth": f"sub-{label}_space-MRIxFields_desc-synth7T_{contrast}.nii.gz",
            "synth_native": f"sub-{label}_desc-synth7T_{contrast}.nii.gz",
        }
        rimg, rmask = _blob((46, 54, 46), (2, 2, 2), (-46, -62, -40), seed=20 + k)
        synth = np.asanyarray(rimg.dataobj)
        synth = np.where(np.asanyarray(rmask.dataobj) > 0, 1.2 * synth.max() - synth, 0)
        synth = (synth / synth.max()).astype(np.float32)
        nb.save(img, anat / names["preproc"])
        nb.save(mask, anat / names["mask"])
        nb.save(rimg, anat / names["ref_preproc"])
        nb.save(nb.Nifti1Image(synth, rimg.affine), anat / names["synth"])
        nb.save(img, anat / names["synth_native"])
        inputs.append({
            "contrast": contrast,
            "session": None,
            "source": f"sub-{label}/anat/sub-{label}_{contrast}.nii.gz",
            "field": {"raw": 2.89, "bin": 3.0, "source": "sidecar", "passthrough": False},
            "protocol": {"TR": 2250.0, "TE": 4.11, "TI": 925.0, "FA": 9.0} if k == 0 else None,
            "model": {"Name": "default" if k == 0 else "baseline",
                      "Kind": "unet" if k == 0 else "baseline", "Version": "0.1.0",
                      "SHA256": "ab" * 32, "File": f"{contrast}_3T.safetensors",
                      "Description": "test model", "TrainingData": "simulated",
                      "Metrics": {"validation": {"PSNR": 27.31, "SSIM": 0.8712}}},
            "warnings": ["qform and sform disagree; used the sform"] if k == 0 else [],
            "derivatives": {key: f"sub-{label}/anat/{name}" for key, name in names.items()},
        })
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "participant": label,
        "sessions": [],
        "bids_dir": "/data/bids",
        "output_dir": str(out_dir),
        "command": ["synth7t", "/data/bids", str(out_dir), "participant"],
        "options": {"random_seed": 0},
        "start_time": (now - dt.timedelta(seconds=245)).isoformat(),
        "end_time": now.isoformat(),
        "versions": {"synth7t": "0.1.0"},
        "reference": {"space": "MRIxFields", "mask": str(out_dir / "tpl_desc-brain_mask.nii.gz")},
        "warnings": ["NaN voxels: 12 replaced by 0"],
        "inputs": inputs,
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("deriv")
    run_info = make_derivatives(out)
    return generate_report(out, "01", run_info), run_info


def test_report_written(report):
    path, run_info = report
    assert path.name == "sub-01.html" and path.is_file()
    text = path.read_text()
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', text)
    # per contrast: mask, registration, three mosaics
    assert len(srcs) == 5 * len(run_info["inputs"])
    for src in srcs:
        f = path.parent / src
        assert f.is_file() and f.stat().st_size > 1000, src
        assert f.parent == path.parent / "sub-01" / "figures"
    for needle in ("2.89 T", "3 T", "sidecar", "ab" * 32, "baseline", "PSNR", "27.31",
                   "qform and sform disagree", "NaN voxels", "4 min 05 s", "nibabel",
                   "TR 2250 ms, TE 4.11 ms, TI 925 ms, FA 9 deg", "not stated"):
        assert needle in text, needle
    assert "http://" not in text and "https://" not in text  # no network at view time
    # no temp files left behind
    assert not list(path.parent.rglob("*.tmp"))


def test_report_survives_missing_derivatives(tmp_path):
    run_info = {"participant": "02", "inputs": [
        {"contrast": "T2w", "error": "sub-02_T2w.nii.gz: all-zero image",
         "derivatives": {"preproc": "nope.nii.gz"}}]}
    path = generate_report(tmp_path, "sub-02", run_info)
    text = path.read_text()
    assert path == tmp_path / "sub-02.html"
    assert "all-zero image" in text and "Not available" in text


@pytest.mark.browser
def test_report_in_browser(report, tmp_path):
    """The fixture report; the real ``bids_3t`` reports are opened in tests/test_e2e.py."""
    path = Path(os.environ.get("SYNTH7T_REPORT") or report[0])
    images = check_report_in_chromium(path, tmp_path)
    assert len(images) == 5 * len(report[1]["inputs"])


def test_oblique_native_images_are_shown_on_their_voxel_axes():
    """An oblique image and its mask get the same axis-aligned display affine (no resampling,
    overlays exact), with the centre voxel where it was; aligned images are left alone."""
    from bids_app.report import _on_voxel_axes

    rot = np.eye(4)
    c, s = np.cos(0.2), np.sin(0.2)
    rot[1:3, 1:3] = [[c, -s], [s, c]]
    affine = rot @ np.diag([-1.0, 1.2, 1.5, 1.0])  # LAS and 11 degrees oblique
    affine[:3, 3] = [40.0, -60.0, -30.0]
    data = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    img = nb.Nifti1Image(data, affine)
    mask = nb.Nifti1Image((data > 0.5).astype(np.float32), affine)
    shown, shown_mask = _on_voxel_axes(img), _on_voxel_axes(mask)
    assert np.array_equal(shown.affine, shown_mask.affine)
    assert np.count_nonzero(shown.affine[:3, :3]) == 3 and np.all(np.diag(shown.affine)[:3] > 0)
    assert np.allclose(np.diag(shown.affine)[:3], [1.0, 1.2, 1.5])
    centre = (np.asarray(SHAPE) - 1) / 2
    assert np.allclose(shown.affine[:3, :3] @ centre + shown.affine[:3, 3],
                       affine[:3, :3] @ centre + affine[:3, 3])
    assert np.array_equal(np.asanyarray(shown.dataobj), data[::-1])  # L->R flip, no resampling
    aligned = nb.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    assert _on_voxel_axes(aligned) is aligned


def test_graph_reportlets_are_linked_and_a_failed_one_is_drawn_by_the_report(tmp_path,
                                                                            monkeypatch):
    """A reportlet drawn in the graph is linked as it is; one whose drawing failed (an empty
    file, never a failed node) is drawn by the report instead."""
    from workflows import reportlets

    out = tmp_path / "out"
    run_info = make_derivatives(out, contrasts=("T1w",))
    der = run_info["inputs"][0]["derivatives"]
    anat = out / "sub-01" / "anat"
    ok = reportlets.ContourReportlet(in_file=str(anat / Path(der["preproc"]).name),
                                     mask_file=str(anat / Path(der["mask"]).name),
                                     out_name="brain.png").run(cwd=str(tmp_path))
    drawn = Path(ok.outputs.out_report)
    assert drawn.stat().st_size > 1000

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(reportlets, "_fig_contour", broken)
    bad = reportlets.ContourReportlet(in_file=str(anat / Path(der["preproc"]).name),
                                      mask_file=str(anat / Path(der["mask"]).name),
                                      out_name="reg.png").run(cwd=str(tmp_path))
    assert Path(bad.outputs.out_report).stat().st_size == 0
    monkeypatch.undo()

    figs = out / "sub-01" / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    brain = figs / "graph_desc-brain_T1w.png"
    brain.write_bytes(drawn.read_bytes())
    reg = figs / "sub-01_space-MRIxFields_desc-reg_T1w.png"
    reg.write_bytes(b"")
    der["report_brain"] = str(brain.relative_to(out))
    der["report_reg"] = str(reg.relative_to(out))
    text = generate_report(out, "01", run_info).read_text()
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', text)
    assert "sub-01/figures/graph_desc-brain_T1w.png" in srcs  # linked, not redrawn
    assert not (figs / "sub-01_desc-brain_T1w.png").exists()
    assert reg.stat().st_size > 1000  # the empty reportlet was drawn by the report
    assert "sub-01/figures/sub-01_space-MRIxFields_desc-reg_T1w.png" in srcs


def test_graph_draws_the_mosaics_and_uncertainty_overlay_and_the_report_links_them(tmp_path):
    """The synthesis reportlet (beside the back-to-native nodes) draws the three mosaics and the
    uncertainty overlay; the report links them instead of loading the 0.5 mm images again."""
    from workflows import reportlets

    out = tmp_path / "out"
    run_info = make_derivatives(out, contrasts=("T1w",))
    der = run_info["inputs"][0]["derivatives"]
    anat = out / "sub-01" / "anat"
    synth = anat / Path(der["synth"]).name
    unc = anat / synth.name.replace("_desc-synth7T_", "_desc-uncertainty_")
    syn = nb.load(str(synth))
    nb.save(nb.Nifti1Image((0.05 * (np.asanyarray(syn.dataobj) > 0)).astype(np.float32),
                           syn.affine), str(unc))
    ref_mask = out / "tpl_desc-brain_mask.nii.gz"
    res = reportlets.SynthesisReportlet(
        in_file=str(anat / Path(der["ref_preproc"]).name), synth_file=str(synth),
        mask_file=str(ref_mask), uncertainty_file=str(unc), contrast="T1w").run(
            cwd=str(tmp_path))
    figs = out / "sub-01" / "figures"
    figs.mkdir(parents=True)
    for key in ("axial", "coronal", "sagittal", "uncertainty"):
        drawn = Path(getattr(res.outputs, f"out_{key}"))
        assert drawn.stat().st_size > 1000, key
        desc = "uncertainty" if key == "uncertainty" else f"synth7T{key}"
        (figs / f"sub-01_desc-{desc}_T1w.png").write_bytes(drawn.read_bytes())
        if key != "uncertainty":
            der[f"report_{key}"] = f"sub-01/figures/sub-01_desc-{desc}_T1w.png"
    stamps = {f: f.stat().st_mtime_ns for f in figs.iterdir()}
    text = generate_report(out, "01", run_info).read_text()
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', text)
    for desc in ("synth7Taxial", "synth7Tcoronal", "synth7Tsagittal", "uncertainty"):
        assert f"sub-01/figures/sub-01_desc-{desc}_T1w.png" in srcs, desc
    assert {f: f.stat().st_mtime_ns for f in figs.iterdir() if f in stamps} == stamps

    # an input it cannot read: empty files (the report then draws), never a failed node
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    res = reportlets.SynthesisReportlet(
        in_file=str(bad), synth_file=str(synth), mask_file=str(ref_mask),
        contrast="T1w").run(cwd=str(tmp_path))
    assert all(Path(getattr(res.outputs, f"out_{k}")).stat().st_size == 0
               for k in ("axial", "coronal", "sagittal"))


def test_uncertainty_warning_names_the_pairs_threshold_and_reads_older_sidecars():
    from bids_app.report import uncertainty_warning

    meta = {"UncertainShareBrain": 0.66, "UncertaintyThreshold": 0.05,
            "UncertaintyOODThreshold": 0.114, "UncertainShareAboveOODThreshold": 0.04,
            "UncertaintyOutOfDistribution": False}
    assert uncertainty_warning("T1w", meta) is None  # a normal 0.1 T scan: noisy, not novel
    meta.update(UncertainShareAboveOODThreshold=0.39, UncertaintyOutOfDistribution=True)
    text = uncertainty_warning("T1w", meta)
    assert "39 %" in text and "0.114" in text and "normal brain" in text
    older = {"UncertainShareBrain": 0.3, "UncertaintyThreshold": 0.05,
             "UncertaintyOutOfDistribution": True}
    text = uncertainty_warning("FLAIR", older)
    assert "30 %" in text and "0.05" in text and "normal brain" not in text
