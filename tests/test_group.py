"""Study-scale runs (issue 12): per-participant BIDS validation, worst-outcome exit codes, and
the ``group`` analysis level (group_qc.tsv/.json, group.html).

Fast tests use tiny synthetic datasets with the Nipype graph replaced by a stub (as in
test_cli.py) and generated participant records (benchmarks/bench_group.make_study). The slow
test runs the real App on a copy of ../shared/data/bids_3t/sub-02 (T1w) next to the four broken
T1w files of the issue, then the group level on what it left.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app import run as app
from bids_app.exitcodes import (
    EX_BIDS_INVALID,
    EX_DATAERR,
    EX_NODE_CRASHED,
    EX_NOINPUT,
    EX_NO_MATCH,
    EX_OK,
    worst_exit_code,
)

from conftest import REPO, baseline_model_dir, check_report_in_chromium, run_app, tree_digest

BROKEN = ("fourd", "notnii", "trunc", "zero")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_group",
                                                  REPO / "benchmarks" / "bench_group.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def break_t1w(path: Path, kind: str, good: Path | None = None) -> None:
    """Overwrite ``path`` with one of the issue's broken T1w files (made from ``good``)."""
    src = nib.load(good or path)
    data = np.asanyarray(src.dataobj)
    if kind == "fourd":
        nib.Nifti1Image(np.stack([data, data], -1), src.affine).to_filename(path)
    elif kind == "notnii":
        with gzip.open(path, "wb") as fh:
            fh.write(b'{"this": "is not a NIfTI image"}\n' * 20)
    elif kind == "trunc":
        tmp = path.with_name("full.nii.gz")
        nib.Nifti1Image(data, src.affine).to_filename(tmp)
        blob = tmp.read_bytes()
        tmp.unlink()
        path.write_bytes(blob[: len(blob) * 6 // 10])
    elif kind == "zero":
        nib.Nifti1Image(np.zeros(data.shape, data.dtype), src.affine).to_filename(path)
    else:  # pragma: no cover
        raise ValueError(kind)


@pytest.fixture
def graph_stub(monkeypatch):
    calls = []

    def fake_run_graph(items, models, opts, plugin, provenance, log_dir, t_start):
        calls.append([i.subject for i in items])
        return None, {}, None

    monkeypatch.setattr(app, "_run_graph", fake_run_graph)
    monkeypatch.setattr(app, "_report", lambda *a, **k: None)
    return calls


@pytest.fixture
def broken_tiny(tiny_bids):
    """Tiny dataset: sub-01, sub-02 good; one participant per broken T1w of the issue."""
    root = tiny_bids({"01": {"T1w": 3}, "02": {"T1w": 3},
                      **{k: {"T1w": 3} for k in BROKEN}})
    for k in BROKEN:
        break_t1w(root / f"sub-{k}" / "anat" / f"sub-{k}_T1w.nii.gz", k)
    return root


def _main(capsys, *args):
    code = app.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out + err


# --------------------------------------------------------------------------- exit codes
def test_worst_exit_code_order():
    assert worst_exit_code([]) == EX_OK and worst_exit_code([0, 0]) == EX_OK
    assert worst_exit_code([EX_DATAERR, EX_BIDS_INVALID, 0]) == EX_BIDS_INVALID
    assert worst_exit_code([EX_BIDS_INVALID, EX_NODE_CRASHED]) == EX_NODE_CRASHED
    assert worst_exit_code([EX_NO_MATCH, EX_NOINPUT, EX_DATAERR]) == EX_DATAERR
    assert worst_exit_code([EX_NO_MATCH, EX_NOINPUT]) == EX_NOINPUT


# --------------------------------------------------------------------------- validation
def test_validation_refuses_only_the_broken_participants(capsys, broken_tiny, tmp_path,
                                                         graph_stub):
    before = tree_digest(broken_tiny)
    out = tmp_path / "out"
    code, text = _main(capsys, broken_tiny, out, "participant", "-w", tmp_path / "w")
    assert code == EX_BIDS_INVALID, text
    assert graph_stub == [["01", "02"]]  # the good ones still run
    # the validator's refusals name the file (4D, not a NIfTI); the others are bad data
    assert re.search(r"sub-fourd_T1w\.nii\.gz: BIDS validation error "
                     r"T1W_FILE_WITH_TOO_MANY_DIMENSIONS", text), text
    assert re.search(r"sub-notnii_T1w\.nii\.gz: BIDS validation error NIFTI_HEADER_UNREADABLE",
                     text), text
    assert re.search(r"sub-trunc_T1w\.nii\.gz: truncated", text), text
    assert re.search(r"sub-zero_T1w\.nii\.gz: empty image", text), text
    summary = [ln for ln in text.splitlines() if "finished in" in ln][-1]
    assert "2 participant(s) ok" in summary and "2 invalid (BIDS validation)" in summary
    assert "2 bad data" in summary and "(exit 16)" in summary
    assert summary.index("invalid") < summary.index("bad data")  # worst first
    for label, want in (("fourd", 16), ("notnii", 16), ("trunc", 65), ("zero", 65),
                        ("01", 0)):
        (rec,) = (out / "logs" / f"sub-{label}").glob("run-*.json")
        info = json.loads(rec.read_text())
        assert info["exit_code"] == want, (label, info)
        assert info["status"] == ("ok" if want == 0 else "refused")
        if want:
            assert f"sub-{label}_T1w.nii.gz" in info["errors"][0]
    assert tree_digest(broken_tiny) == before  # the input dataset was not touched


def test_validation_scoped_to_selected_participants(capsys, broken_tiny, tmp_path, graph_stub):
    code, text = _main(capsys, broken_tiny, tmp_path / "out", "participant", "-w",
                       tmp_path / "w", "--participant-label", "01")
    assert code == EX_OK, text
    assert "view of 1 participant" in text and "fourd" not in text and "notnii" not in text
    code, text = _main(capsys, broken_tiny, tmp_path / "out2", "participant", "-w",
                       tmp_path / "w", "--participant-label", "02", "notnii")
    assert code == EX_BIDS_INVALID and "sub-notnii_T1w.nii.gz" in text
    assert "fourd" not in text and graph_stub[-1] == ["02"]


def test_participants_tsv_of_the_view_and_dataset_level_errors(capsys, tiny_bids, tmp_path,
                                                               graph_stub):
    """participants.tsv is reduced to the selection; a top-level error still stops (16)."""
    root = tiny_bids({"01": {"T1w": 3}, "02": {"T1w": 3}})
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t40\n")
    code, text = _main(capsys, root, tmp_path / "o1", "participant", "-w", tmp_path / "w",
                       "--participant-label", "02")
    assert code == EX_OK, text
    (root / "stray.txt").write_text("x")
    code, text = _main(capsys, root, tmp_path / "o2", "participant", "-w", tmp_path / "w",
                       "--participant-label", "02")
    assert code == EX_BIDS_INVALID and "stray.txt" in text and "dataset-level" in text
    assert not (tmp_path / "o2").exists()
    from bids_app.validation import make_view

    view = make_view(root, ["01"], tmp_path / "view")
    assert sorted(p.name for p in view.iterdir() if p.name.startswith("sub-")) == ["sub-01"]
    assert (view / "participants.tsv").read_text().splitlines() == ["participant_id\tage",
                                                                     "sub-01\t30"]
    assert (root / "participants.tsv").read_text().count("sub-") == 2


# --------------------------------------------------------------------------- group level
def _tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_robust_z_definition():
    from bids_app.group import robust_z

    vals = [10.0, 11.0, 9.0, 10.0, 10.5, 9.5, 30.0]
    z = robust_z(vals)
    med, mad = 10.0, 0.5
    assert z[0] == 0 and z[-1] == pytest.approx((30 - med) / (1.4826 * mad))
    assert [abs(v) > 3 for v in z] == [False] * 6 + [True]
    # MAD 0: falls back to the mean absolute deviation
    z = robust_z([5.0, 5.0, 5.0, 5.0, 9.0])
    assert z[-1] == pytest.approx(4 / (1.2533 * 0.8))


def test_group_on_generated_study(capsys, tmp_path):
    bids, out = _bench().make_study(tmp_path, 30, doubled="007")
    before = tree_digest(bids)
    code, text = _main(capsys, bids, out, "group")
    assert code == EX_OK, text
    rows = _tsv(out / "group_qc.tsv")
    assert len(rows) == 30
    by = {r["participant_id"]: r for r in rows}
    assert by["sub-003"]["status"] == "refused" and by["sub-003"]["exit_code"] == "16"
    assert "sub-003_T1w.nii.gz" in by["sub-003"]["reason"]
    assert by["sub-005"]["exit_code"] == "65" and by["sub-011"]["status"] == "crashed"
    for label in ("027", "028", "029"):
        assert by[f"sub-{label}"]["status"] == "not run"
    assert "not run yet" in text and "sub-029" in text
    # the doubled brain volume is the one BrainVolumeML outlier
    flagged = [r["participant_id"] for r in rows if "BrainVolumeML(" in r["outliers"]]
    assert flagged == ["sub-007"]
    assert float(by["sub-007"]["BrainVolumeML"]) > 1.8 * float(by["sub-008"]["BrainVolumeML"])
    # the input's protocol, per contrast; the one participant off the study's protocol stands out
    assert float(by["sub-001"]["T1w_TI_ms"]) == 900 and float(by["sub-002"]["T2w_TE_ms"]) == 408
    assert "T2w_TI_ms" not in by["sub-001"]  # no T2w input states one: no column
    assert [r["participant_id"] for r in rows if "T1w_TI_ms(" in r["outliers"]] == ["sub-013"]
    # generic pick-up of numeric sidecar keys, per contrast
    assert by["sub-001"]["T1w_UncertaintyMeanBrain"] != "n/a"
    assert by["sub-001"]["T1w_UncertaintyOutOfDistribution"] == "true"
    assert by["sub-002"]["T1w_UncertaintyOutOfDistribution"] == "false"
    assert "T1w_UncertaintyThreshold" not in by["sub-001"]  # a setting, not a QC value
    assert by["sub-001"]["model"] == "default" and float(by["sub-001"]["field_bin"]) == 3.0
    desc = json.loads((out / "group_qc.json").read_text())
    assert set(desc) == set(rows[0])
    assert all(d.get("Description") for d in desc.values())
    assert "robust z" in desc["outliers"]["Description"]
    assert desc["T1w_TI_ms"]["Units"] == "ms" and "InversionTime" in desc["T1w_TI_ms"]["Description"]
    page = (out / "group.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no network
    assert page.count('src="data:image/jpeg;base64,') == 25  # 27 records - 2 refused
    assert 'href="sub-001.html"' in page and "robust z-score" in page
    assert re.search(r'<td class="num out" data-v="[0-9.]+" title="robust z = \+', page)
    assert "group_qc.tsv" in (out / ".bidsignore").read_text()
    assert tree_digest(bids) == before


def test_group_participant_label_and_missing(capsys, tmp_path):
    bids, out = _bench().make_study(tmp_path, 8, doubled=None, not_run=2)
    code, text = _main(capsys, bids, out, "group", "--participant-label", "001", "007")
    assert code == EX_OK, text
    rows = _tsv(out / "group_qc.tsv")
    assert [(r["participant_id"], r["status"]) for r in rows] == [("sub-001", "ok"),
                                                                  ("sub-007", "not run")]
    code, text = _main(capsys, bids, out, "group", "--participant-label", "001", "nobody")
    assert code == EX_NO_MATCH and "sub-nobody" in text
    # no derivatives at all: 66, nothing written
    code, text = _main(capsys, bids, tmp_path / "nothing", "group")
    assert code == EX_NOINPUT and "participant level first" in text
    assert not (tmp_path / "nothing").exists()
    # derivatives without any record, dataset present: everybody 'not run', exit 0
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = _main(capsys, bids, empty, "group")
    assert code == EX_OK
    assert {r["status"] for r in _tsv(empty / "group_qc.tsv")} == {"not run"}


def test_group_sessions_newest_record_wins(capsys, tmp_path):
    """Session runs in separate jobs are merged; a rerun replaces an older refusal."""
    bids = tmp_path / "bids"
    for ses in ("a", "b", "c"):
        (bids / "sub-01" / f"ses-{ses}" / "anat").mkdir(parents=True)
    out = tmp_path / "out"
    logs = out / "logs" / "sub-01"
    logs.mkdir(parents=True)

    def rec(name, end, **kw):
        base = {"participant": "01", "end_time": end, "status": "ok", "exit_code": 0,
                "errors": [], "inputs": []}
        base.update(kw)
        (logs / f"run-{name}.json").write_text(json.dumps(base))

    def inp(ses, vol):
        return {"contrast": "T1w", "session": ses, "qc": {"BrainVolumeML": vol}}

    rec("1", "2026-11-01T00:00:00", status="refused", exit_code=65,
        errors=["/x/sub-01_ses-a_T1w.nii.gz: empty image"])
    rec("2", "2026-11-02T00:00:00", inputs=[inp("a", 1200.0)])
    rec("3", "2026-11-03T00:00:00", inputs=[inp("b", 1210.0)])
    code, text = _main(capsys, bids, out, "group")
    assert code == EX_OK, text
    rows = {r["session_id"]: r for r in _tsv(out / "group_qc.tsv")}
    assert set(rows) == {"ses-a", "ses-b", "ses-c"}
    assert rows["ses-a"]["status"] == "ok" and rows["ses-a"]["BrainVolumeML"] == "1200"
    assert rows["ses-b"]["BrainVolumeML"] == "1210" and rows["ses-c"]["status"] == "not run"


@pytest.mark.browser
def test_group_html_in_chromium(tmp_path):
    bids, out = _bench().make_study(tmp_path / "study", 12, doubled="004")
    assert app.main([str(bids), str(out), "group"]) == EX_OK
    sizes = check_report_in_chromium(out / "group.html", tmp_path)
    assert len(sizes) == 7 and all(s[0].startswith("data:image/jpeg") for s in sizes)
    _check_sort_and_filter(out / "group.html", tmp_path)


def _check_sort_and_filter(page: Path, tmp_path: Path) -> None:
    """Clicking a header sorts the rows; typing filters them (the page's inline script)."""
    import shutil as _sh

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = Options()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={tmp_path / 'chrome-sort'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(_sh.which("chromedriver") or
                                              "/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(page.absolute().as_uri())
        heads = [h.text.strip() for h in driver.find_elements(By.CSS_SELECTOR, "#qc thead th")]
        col = heads.index("BrainVolumeML")
        th = driver.find_elements(By.CSS_SELECTOR, "#qc thead th")[col]
        th.click()
        th.click()  # descending: the doubled volume first

        def first_participant():
            return driver.execute_script(
                "return document.querySelector('#qc tbody tr').cells[%d].textContent"
                % heads.index("participant_id"))
        assert first_participant() == "sub-004"
        box = driver.find_element(By.ID, "filter")
        box.send_keys("sub-00")
        visible = driver.execute_script(
            "return Array.from(document.querySelectorAll('#qc tbody tr'))"
            ".filter(r => r.style.display !== 'none').length")
        assert visible == 10  # sub-000 .. sub-009 of 12
    finally:
        driver.quit()


# --------------------------------------------------------------------------- real run
@pytest.mark.slow
def test_study_with_broken_participants_end_to_end(tmp_path, bids_3t):
    """Issue 12 checks on the real App: validation on, 2 good + the 4 broken T1w files."""
    bids = tmp_path / "bids"
    bids.mkdir()
    shutil.copy(bids_3t / "dataset_description.json", bids)
    (bids / "README").write_text("sub-02 of bids_3t twice, and four broken T1w files.\n")
    src = bids_3t / "sub-02" / "anat"
    for label in ("good1", "good2", *BROKEN):
        d = bids / f"sub-{label}" / "anat"
        d.mkdir(parents=True)
        side = json.loads((src / "sub-02_T1w.json").read_text())
        if label == "good1":  # a protocol in BIDS units, for the run record to carry
            side.update(RepetitionTime=2.25, EchoTime=0.00411, InversionTime=0.925, FlipAngle=9)
        (d / f"sub-{label}_T1w.json").write_text(json.dumps(side))
        t1 = d / f"sub-{label}_T1w.nii.gz"
        shutil.copy(src / "sub-02_T1w.nii.gz", t1)
        t1.chmod(0o644)
        if label in BROKEN:
            break_t1w(t1, label, good=src / "sub-02_T1w.nii.gz")
    before = tree_digest(bids)
    out, work = tmp_path / "out", tmp_path / "work"
    # Neither the network nor its uncertainty maps are what this test is about: the
    # tissue-table baseline synthesises in seconds (the U-Net runs in tests/test_e2e.py).
    models = baseline_model_dir(tmp_path)
    proc = run_app([bids, out, "participant", "-w", work, "--nprocs", "2", "--no-uncertainty",
                    "--model-dir", models], REPO)
    check_first_run(proc.returncode, proc.stdout + proc.stderr, out)
    assert tree_digest(bids) == before
    check_label_run(bids, out, work, models)
    check_group(bids, out, tmp_path, before)


def check_first_run(returncode: int, text: str, out: Path) -> None:
    """The whole dataset, validation on: exit 16, messages, summary, good derivatives, QC."""
    assert returncode == EX_BIDS_INVALID, text[-3000:]
    for label, pattern in (("fourd", "T1W_FILE_WITH_TOO_MANY_DIMENSIONS"),
                           ("notnii", "NIFTI_HEADER_UNREADABLE"),
                           ("trunc", "truncated"), ("zero", "empty image")):
        assert re.search(rf"sub-{label}: \S*sub-{label}_T1w\.nii\.gz: [^\n]*{pattern}", text), \
            (label, text[-3000:])
        assert not (out / f"sub-{label}" / "anat").exists()
    summary = [ln for ln in text.splitlines() if "finished in" in ln][-1]
    assert re.search(r"2 participant\(s\) ok, 2 invalid \(BIDS validation\), 2 bad data;.*"
                     r"\(exit 16\)", summary), summary
    for label in ("good1", "good2"):
        anat = out / f"sub-{label}" / "anat"
        for name in ("desc-preproc_T1w", "desc-brain_mask", "space-MRIxFields_desc-synth7T_T1w",
                     "desc-synth7T_T1w", "space-MRIxFields_desc-brain_mask"):
            assert (anat / f"sub-{label}_{name}.nii.gz").is_file(), name
            assert (anat / f"sub-{label}_{name}.json").is_file(), name
        assert (out / f"sub-{label}.html").is_file()
        info = json.loads(next((out / "logs" / f"sub-{label}").glob("run-*.json")).read_text())
        qc = info["inputs"][0]["qc"]
        assert 900 < qc["BrainVolumeML"] < 2000 and qc["RegistrationDice"] > 0.8, qc
        proto = info["inputs"][0]["protocol"]
        if label == "good1":
            assert proto == pytest.approx({"TR": 2250, "TE": 4.11, "TI": 925, "FA": 9}), proto
        else:
            assert proto is None, proto  # sub-02's sidecar states no protocol
        assert -1 < qc["NoiseReduction"] < 1 and 0 < qc["TissueAgreementDice"] <= 1, qc


def check_label_run(bids: Path, out: Path, work: Path, models: Path) -> None:
    """--participant-label <good> on the dataset with the broken files exits 0."""
    proc = run_app([bids, out, "participant", "-w", work, "--nprocs", "2", "--no-uncertainty",
                    "--model-dir", models, "--participant-label", "good1"], REPO)
    assert proc.returncode == EX_OK, (proc.stdout + proc.stderr)[-3000:]
    assert "view of 1 participant" in proc.stderr and "sub-fourd" not in proc.stderr


def check_group(bids: Path, out: Path, tmp_path: Path, before: dict) -> None:
    """The group level lists everyone with status and reason, flags an injected outlier."""
    proc = run_app([bids, out, "group"], REPO)
    assert proc.returncode == EX_OK, proc.stderr[-3000:]
    rows = {r["participant_id"]: r for r in _tsv(out / "group_qc.tsv")}
    assert set(rows) == {f"sub-{k}" for k in ("good1", "good2", *BROKEN)}
    assert rows["sub-good1"]["status"] == rows["sub-good2"]["status"] == "ok"
    for label, code, word in (("fourd", "16", "T1W_FILE_WITH_TOO_MANY_DIMENSIONS"),
                              ("notnii", "16", "NIFTI_HEADER_UNREADABLE"),
                              ("trunc", "65", "truncated"), ("zero", "65", "empty image")):
        r = rows[f"sub-{label}"]
        assert r["status"] == "refused" and r["exit_code"] == code, r
        assert f"sub-{label}_T1w.nii.gz" in r["reason"] and word in r["reason"], r
    assert float(rows["sub-good1"]["RegistrationDice"]) > 0.8
    assert rows["sub-good1"]["model"] != "n/a" and float(rows["sub-good1"]["field_bin"]) == 3.0
    assert tree_digest(bids) == before

    # inject an outlier: more participants from good1's record, one with the volume doubled
    study = tmp_path / "study"
    shutil.copytree(out, study, ignore=shutil.ignore_patterns("*.nii.gz"))
    # good1 has a record per run (the whole dataset, then --participant-label): the newest
    rec_file = max((study / "logs" / "sub-good1").glob("run-*.json"),
                   key=lambda f: json.loads(f.read_text())["end_time"])
    rec = json.loads(rec_file.read_text())
    vol = rec["inputs"][0]["qc"]["BrainVolumeML"]
    for k, factor in enumerate((0.97, 1.02, 0.99, 1.01, 1.03, 2.0)):
        label = f"extra{k}"
        r = json.loads(json.dumps(rec))
        r["participant"] = label
        r["inputs"][0]["qc"]["BrainVolumeML"] = round(vol * factor, 2)
        (study / "logs" / f"sub-{label}").mkdir()
        (study / "logs" / f"sub-{label}" / rec_file.name).write_text(json.dumps(r))
    proc = run_app([bids, study, "group"], REPO)
    assert proc.returncode == EX_OK, proc.stderr[-3000:]
    rows = {r["participant_id"]: r for r in _tsv(study / "group_qc.tsv")}
    flagged = [p for p, r in rows.items() if "BrainVolumeML(" in r["outliers"]]
    assert flagged == ["sub-extra5"], flagged
    assert "not in" in proc.stderr  # records of participants absent from the dataset are named
    check_report_in_chromium(out / "group.html", tmp_path)


# --------------------------------------------------------------------------- QC values
def test_qc_values_on_tiny_images(tmp_path):
    """bids_app.qc: volume, registration Dice (both grid paths), noise reduction, tissues."""
    from bids_app import qc
    from synth7t.reference import REF_AFFINE

    tmask = nib.load(qc.template_mask_path())
    t = np.asanyarray(tmask.dataobj) > 0
    # the template mask on the 0.5 mm grid (slicing path): Dice 1; shifted by 4 mm: lower
    up = np.repeat(np.repeat(np.repeat(t, 2, 0), 2, 1), 2, 2).astype(np.uint8)
    nib.Nifti1Image(up, REF_AFFINE).to_filename(tmp_path / "ref.nii")
    assert qc.registration_dice(tmp_path / "ref.nii") == pytest.approx(1.0)
    nib.Nifti1Image(np.roll(up, 8, axis=0), REF_AFFINE).to_filename(tmp_path / "shift.nii")
    d_shift = qc.registration_dice(tmp_path / "shift.nii")
    assert 0.5 < d_shift < 0.97
    # a 2 mm grid (resampling path)
    aff2 = tmask.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    nib.Nifti1Image(t[::2, ::2, ::2].astype(np.uint8), aff2).to_filename(tmp_path / "m2.nii")
    assert qc.registration_dice(tmp_path / "m2.nii") > 0.95

    # native images: mask of a known size, noisy input, smooth synthetic image
    rng = np.random.default_rng(0)
    shape = (30, 32, 28)
    mask = np.zeros(shape, np.uint8)
    mask[5:25, 6:26, 4:24] = 1  # 20 x 20 x 20 voxels of 2 mm = 64 mL
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    zz = np.indices(shape)[0]
    clean = (100 + 60 * (zz > 15) + 30 * (zz > 20)).astype(np.float32) * mask
    noisy = clean + rng.normal(0, 12, shape).astype(np.float32) * mask
    for name, data in (("preproc", noisy), ("synth", clean), ("mask", mask)):
        nib.Nifti1Image(data, aff).to_filename(tmp_path / f"{name}.nii.gz")
    assert qc.brain_volume_ml(tmp_path / "mask.nii.gz") == pytest.approx(64.0)
    item = {"contrast": "T1w", "derivatives": {"preproc": "preproc.nii.gz",
                                               "synth_native": "synth.nii.gz",
                                               "mask": "mask.nii.gz"}}
    got = qc.input_qc(tmp_path, item)
    assert got["NoiseReduction"] > 0.3, got  # the smooth image has less local noise
    assert 0.5 < got["TissueAgreementDice"] <= 1.0, got
    same = qc.input_qc(tmp_path, {**item, "derivatives": {**item["derivatives"],
                                                          "synth_native": "preproc.nii.gz"}})
    assert same == {"NoiseReduction": 0.0, "TissueAgreementDice": 1.0}
    info = {"participant": "x", "inputs": [dict(item, session=None)]}
    info["inputs"][0]["derivatives"] = dict(item["derivatives"], ref_mask="ref.nii")
    qc.add_qc(tmp_path, info)
    assert info["inputs"][0]["qc"]["BrainVolumeML"] == pytest.approx(64.0)
    assert info["inputs"][0]["qc"]["RegistrationDice"] == pytest.approx(1.0)
