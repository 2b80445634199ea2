"""The ``synth7t`` command line: flags, exit codes, run config, dataset-level files (fast).

The Nipype graph is not run here: ``bids_app.run._run_graph`` is replaced by a stub that records
what it would have run (the graph itself is covered by test_workflows.py and test_e2e.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bids_app import run as app
from bids_app.exitcodes import (
    EX_BAD_ANALYSIS_LEVEL,
    EX_BIDS_INVALID,
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NO_MATCH,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
)
from bids_app.parser import build_parser, parse_args


@pytest.fixture
def graph_stub(monkeypatch):
    """Replace the graph run and the report with recorders; returns the call log."""
    calls = []

    def fake_run_graph(items, models, opts, plugin, provenance, log_dir, t_start):
        calls.append({"items": items, "models": models, "opts": opts, "plugin": plugin,
                      "provenance": provenance})
        return None, {}, None

    monkeypatch.setattr(app, "_run_graph", fake_run_graph)
    monkeypatch.setattr(app, "_report", lambda *a, **k: None)
    return calls


def _run(capsys, *args):
    code = app.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out + err


# --------------------------------------------------------------------------- parser
def test_parser_defaults_and_flags(tmp_path):
    filt = tmp_path / "f.json"
    filt.write_text(json.dumps({"t1w": {"acquisition": "mprage"}}))
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\n")
    opts = parse_args([
        "bids", "out", "participant", "--participant-label", "sub-01", "02",
        "--session-label", "ses-A", "--bids-filter-file", str(filt), "--skip-bids-validation",
        "--nprocs", "4", "--omp-nthreads", "2", "--mem", "8G", "--use-plugin", str(plugin),
        "-w", str(tmp_path / "w"), "--stop-on-first-crash", "--random-seed", "42", "--notrack",
        "-vv", "--contrasts", "T1w", "FLAIR", "--field-strength", "2.89",
        "--skull-strip", "force", "--device", "cpu", "--model-dir", str(tmp_path),
        "--output-dtype", "float32"])
    assert opts.participant_label == ["01", "02"] and opts.session_label == ["A"]
    assert opts.bids_filters == {"t1w": {"acquisition": "mprage"}}
    assert opts.skip_bids_validation and opts.stop_on_first_crash and opts.notrack
    assert (opts.nprocs, opts.omp_nthreads, opts.memory_gb) == (4, 2, 8)
    assert opts.work_dir == tmp_path / "w" and opts.use_plugin == plugin
    assert opts.random_seed == 42 and opts.verbose_count == 2
    assert opts.contrasts == ["T1w", "FLAIR"] and opts.field_strength == 2.89
    assert (opts.skull_strip, opts.device, opts.output_dtype) == ("force", "cpu", "float32")
    assert opts.bids_dir.is_absolute() and opts.output_dir.is_absolute()

    d = parse_args(["bids", "out", "participant"])
    assert d.contrasts == ["T1w", "T2w", "FLAIR"] and d.skull_strip == "auto"
    assert d.device == "auto" and d.output_dtype == "uint16" and d.random_seed == 0
    assert d.participant_label is None and not d.skip_bids_validation
    assert d.work_dir == Path.cwd() / "work"
    assert parse_args(["b", "o", "participant", "--mem", "16000"]).memory_gb == 16


def test_help_lists_fmriprep_flags():
    text = build_parser().format_help()
    for flag in ("--participant-label", "--session-label", "--bids-filter-file",
                 "--skip-bids-validation", "--nprocs", "--omp-nthreads", "--mem",
                 "--use-plugin", "--work-dir", "--stop-on-first-crash", "--random-seed",
                 "--notrack", "--verbose", "--version", "--contrasts", "--field-strength",
                 "--skull-strip", "--device", "--model-dir", "--output-dtype"):
        assert flag in text, flag


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        app.main(["--version"])
    assert exc.value.code == 0
    assert "synth7t v" in capsys.readouterr().out


def test_bad_analysis_level(capsys, bids_two_subjects, tmp_path):
    code, text = _run(capsys, bids_two_subjects, tmp_path / "out", "session")
    assert code == EX_BAD_ANALYSIS_LEVEL and "session" in text and "participant" in text
    assert "group" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label", ["../x", "sub-../../etc", "01/../02", "0 1", "a_b"])
def test_label_with_path_characters(capsys, bids_two_subjects, tmp_path, label):
    code, text = _run(capsys, bids_two_subjects, tmp_path / "out", "participant",
                      "--participant-label", label)
    assert code == EX_USAGE and label in text and "participant" in text
    assert "Traceback" not in text and not (tmp_path / "out").exists()


def test_filter_file_not_json(capsys, bids_two_subjects, tmp_path):
    bad = tmp_path / "filters.json"
    bad.write_text("t1w: {datatype: anat}\n")
    code, text = _run(capsys, bids_two_subjects, tmp_path / "out", "participant",
                      "--bids-filter-file", bad)
    assert code == EX_USAGE and "filters.json" in text and "JSON" in text


def test_unknown_flag_is_usage_error(capsys, tmp_path):
    code, text = _run(capsys, tmp_path, tmp_path / "out", "participant", "--bogus")
    assert code == EX_USAGE and "usage:" in text


# --------------------------------------------------------------------------- dataset checks
def test_label_matching_nothing(capsys, bids_two_subjects, tmp_path, graph_stub):
    code, text = _run(capsys, bids_two_subjects, tmp_path / "out", "participant",
                      "--participant-label", "01", "nobody7")
    assert code == EX_NO_MATCH and "sub-nobody7" in text and not graph_stub


def test_missing_dataset(capsys, tmp_path):
    code, text = _run(capsys, tmp_path / "nothing", tmp_path / "out", "participant")
    assert code == EX_NOINPUT and "nothing" in text


def test_bids_error_exit_16_and_skip(capsys, tiny_bids, tmp_path, graph_stub):
    """A dataset-level validation error stops the run before anything is written.

    (Errors in one participant's files refuse only that participant: tests/test_group.py.)
    """
    root = tiny_bids({"01": {"T1w": 3}})
    (root / "notbids.json").write_text("{}")
    code, text = _run(capsys, root, tmp_path / "out", "participant", "-w", tmp_path / "w")
    assert code == EX_BIDS_INVALID
    assert "notbids.json" in text and "NOT_INCLUDED" in text  # the validator's words
    assert not graph_stub and not (tmp_path / "out").exists()
    code, text = _run(capsys, root, tmp_path / "out", "participant", "-w", tmp_path / "w",
                      "--skip-bids-validation")
    assert code == EX_OK, text
    assert len(graph_stub) == 1 and graph_stub[0]["items"][0].subject == "01"


def test_valid_dataset_runs(capsys, bids_two_subjects, tmp_path, graph_stub):
    out = tmp_path / "out"
    code, text = _run(capsys, bids_two_subjects, out, "participant", "-w", tmp_path / "w",
                      "--nprocs", "2", "--omp-nthreads", "1", "--random-seed", "5")
    assert code == EX_OK, text
    (call,) = graph_stub
    assert [i.name for i in call["items"]] == ["sub-01", "sub-02"]
    assert call["plugin"]["plugin"] == "MultiProc"
    assert call["plugin"]["plugin_args"]["n_procs"] == 2
    models = call["models"]
    assert set(models[("01", None)]) == {"T1w", "T2w"}
    assert models[("02", None)]["FLAIR"].provenance["SourceFieldBin"] == 1.5
    prov = call["provenance"]
    assert prov["RandomSeed"] == 5 and prov["ProcessingSoftwareVersions"]["synth7t"]
    assert prov["CommandLine"].startswith("synth7t <bids_dir> <output_dir> participant")
    assert "<work_dir>" in prov["CommandLine"] and str(tmp_path) not in prov["CommandLine"]

    # dataset-level files
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "synth7t"
    assert desc["SourceDatasets"][0]["URL"].startswith("file://")
    assert Path(desc["DatasetLinks"]["raw"]) == bids_two_subjects.resolve()
    assert "logs/" in (out / ".bidsignore").read_text()
    (toml_file,) = (out / "logs").glob("config-*.toml")
    cfg = tomllib.loads(toml_file.read_text())
    assert cfg["seeds"]["master"] == 5
    assert cfg["workflow"]["contrasts"] == ["T1w", "T2w", "FLAIR"]
    assert cfg["nipype"]["plugin"] == "MultiProc" and cfg["nipype"]["omp_nthreads"] == 1
    assert cfg["execution"]["bids_dir"] == str(bids_two_subjects)
    info = json.loads(next((out / "logs" / "sub-01").glob("run-*.json")).read_text())
    assert info["participant"] == "01" and info["inputs"][0]["field"]["bin"] == 3.0
    assert list((out / "logs").glob("synth7t-*.log"))


def test_container_in_generated_by(capsys, bids_two_subjects, tmp_path, graph_stub,
                                   monkeypatch):
    monkeypatch.setenv("SYNTH7T_CONTAINER", "singularity")
    monkeypatch.setenv("SINGULARITY_CONTAINER", "/images/synth7t_0.1.0.sif")
    code, _ = _run(capsys, bids_two_subjects, tmp_path / "out", "participant",
                   "-w", tmp_path / "w", "--skip-bids-validation")
    assert code == EX_OK
    desc = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "singularity",
                                                    "Tag": "synth7t_0.1.0.sif"}


def test_missing_field_strength_exit_65(capsys, tiny_bids, tmp_path, graph_stub):
    root = tiny_bids({"01": {"T1w": None}})
    code, text = _run(capsys, root, tmp_path / "out", "participant", "-w", tmp_path / "w")
    assert code == EX_DATAERR and "--field-strength" in text and "sub-01" in text
    assert not graph_stub


def test_field_strength_flag_overrides(capsys, tiny_bids, tmp_path, graph_stub):
    root = tiny_bids({"01": {"T1w": None, "T2w": 1.5}})
    code, text = _run(capsys, root, tmp_path / "out", "participant", "-w", tmp_path / "w",
                      "--field-strength", "3")
    assert code == EX_OK, text
    images = graph_stub[0]["items"][0].images
    assert {c: (i.routing.bin, i.routing.source) for c, i in images.items()} == {
        "T1w": (3.0, "--field-strength"), "T2w": (3.0, "--field-strength")}
    assert images["T2w"].routing.raw == 1.5


def test_bad_participant_does_not_stop_others(capsys, tiny_bids, tmp_path, graph_stub):
    root = tiny_bids({"01": {"T1w": 3}, "02": {"T1w": 3}, "03": {"T1w": None}})
    (root / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"\x1f\x8b truncated")
    code, text = _run(capsys, root, tmp_path / "out", "participant", "-w", tmp_path / "w",
                      "--skip-bids-validation")
    assert code == EX_DATAERR
    assert "sub-02_T1w.nii.gz" in text and "--field-strength" in text
    assert [i.subject for i in graph_stub[0]["items"]] == ["01"]
    info = json.loads(next((tmp_path / "out" / "logs" / "sub-02").glob("run-*.json"))
                      .read_text())
    assert info["status"] == "refused" and info["errors"]


def test_output_not_creatable(capsys, bids_two_subjects, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, text = _run(capsys, bids_two_subjects, blocker / "out", "participant",
                      "-w", tmp_path / "w", "--skip-bids-validation")
    assert code == EX_CANTCREAT and str(blocker / "out") in text and "Traceback" not in text


def test_output_inside_bids_dir_refused(capsys, bids_two_subjects, tmp_path):
    out = bids_two_subjects / "derivatives" / "synth7t"
    code, text = _run(capsys, bids_two_subjects, out, "participant", "-w", tmp_path / "w",
                      "--skip-bids-validation")
    assert code == EX_USAGE and "inside the input dataset" in text and not out.exists()


def test_use_plugin_file(capsys, bids_two_subjects, tmp_path, graph_stub):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 3\n  memory_gb: 5\n")
    code, _ = _run(capsys, bids_two_subjects, tmp_path / "out", "participant",
                   "-w", tmp_path / "w", "--use-plugin", plugin, "--skip-bids-validation")
    assert code == EX_OK
    args = graph_stub[0]["plugin"]["plugin_args"]
    assert graph_stub[0]["plugin"]["plugin"] == "MultiProc"
    assert args["n_procs"] == 3 and args["memory_gb"] == 5
    plugin.write_text("- not a mapping\n")
    code, text = _run(capsys, bids_two_subjects, tmp_path / "out", "participant",
                      "-w", tmp_path / "w", "--use-plugin", plugin, "--skip-bids-validation")
    assert code == EX_USAGE and "plugin" in text


def test_model_integrity_refused_before_running(capsys, tiny_bids, tmp_path, graph_stub):
    mdir = tmp_path / "models"
    mdir.mkdir()
    (mdir / "m.safetensors").write_bytes(b"\x80\x04not really")
    (mdir / "card.json").write_text("{}")
    (mdir / "registry.json").write_text(json.dumps({"models": [
        {"name": "default", "kind": "unet", "contrast": "T1w", "field_bin": 3.0,
         "version": "9", "file": "m.safetensors", "sha256": "0" * 64, "card": "card.json"}]}))
    root = tiny_bids({"01": {"T1w": 3}})
    code, text = _run(capsys, root, tmp_path / "out", "participant", "-w", tmp_path / "w",
                      "--model-dir", mdir, "--skip-bids-validation")
    assert code == EX_DATAERR and "m.safetensors" in text and not graph_stub
    code, text = _run(capsys, root, tmp_path / "out", "participant", "-w", tmp_path / "w",
                      "--model-dir", tmp_path / "w", "--skip-bids-validation")
    assert code == EX_NOINPUT and "registry.json" in text


def test_normalised_command(tmp_path):
    opts = parse_args([str(tmp_path / "b"), str(tmp_path / "o"), "participant",
                       "-w", str(tmp_path / "w")])
    cmd = app.normalised_command([str(tmp_path / "b"), str(tmp_path / "o"), "participant",
                                  f"--work-dir={tmp_path / 'w'}", "--nprocs", "2"], opts)
    assert cmd == "synth7t <bids_dir> <output_dir> participant --work-dir=<work_dir> --nprocs 2"


def test_console_script_exit_code(bids_two_subjects, tmp_path):
    """The installed console script maps errors to exit codes (no traceback)."""
    exe = Path(sys.executable).parent / "synth7t"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bids_app.run"]
    proc = subprocess.run(cmd + [str(bids_two_subjects), str(tmp_path / "o"), "participant",
                                 "--participant-label", "07"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EX_NO_MATCH and "sub-07" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_node_crash_writes_text_crash_files(capsys, bids_two_subjects, tmp_path, monkeypatch):
    """A crashing node: exit 1, a text crash file per participant under logs/sub-<label>/."""
    from workflows import interfaces

    def boom(self, runtime):
        raise RuntimeError("synthetic failure for the test")

    monkeypatch.setattr(interfaces.Conform, "_run_interface", boom)
    monkeypatch.setattr(app, "_report", lambda *a, **k: None)
    plugin = tmp_path / "linear.yml"
    plugin.write_text("plugin: Linear\n")  # in-process, so the patch applies
    out = tmp_path / "out"
    code, text = _run(capsys, bids_two_subjects, out, "participant", "-w", tmp_path / "w",
                      "--use-plugin", plugin, "--skip-bids-validation")
    assert code == 1, text
    for label in ("01", "02"):
        crashes = list((out / "logs" / f"sub-{label}").glob("crash-*.txt"))
        assert crashes, f"no crash file for sub-{label}"
        assert "synthetic failure for the test" in crashes[0].read_text()
        assert f"sub-{label}" in text
    assert "RuntimeError: synthetic failure for the test" in text
    assert not list(out.rglob("*synth7T*"))
