"""MRIxFields2026 Task 1 container contract: synth7t-mrixfields on a small fake challenge input."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synth7t import mrixfields as MX
from synth7t.commands import mrixfields as cmd

SHAPE = (24, 28, 20)
CASES = ("0021", "0022")
SOURCES = ("0.1T", "1.5T", "3T", "5T")
MODS = ("T1W", "T2W", "T2FLAIR")
AFFINE = np.array([[-0.5, 0, 0, 6.0], [0, 0.5, 0, -7.0], [0, 0, 0.5, -5.0], [0, 0, 0, 1]])
# Header fields that must survive byte for byte (datatype, bitpix, scl_*, vox_offset may change).
KEPT_FIELDS = ("dim", "pixdim", "xyzt_units", "qform_code", "sform_code", "quatern_b",
               "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "srow_x",
               "srow_y", "srow_z", "descrip", "intent_code", "cal_min", "cal_max", "slice_code",
               "dim_info", "aux_file", "intent_name")


def _brain(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    c = (np.array(SHAPE) - 1) / 2
    r = np.sqrt(sum(((a - ci) / (ci * 0.9)) ** 2 for a, ci in zip((z, y, x), c)))
    vol = np.where(r < 1, 0.4 + 0.5 * (r < 0.6) + 0.05 * rng.random(SHAPE), 0).astype(np.float32)
    return np.clip(vol, 0, 1)


def make_challenge(root: Path, *, cases=CASES) -> tuple[Path, Path, Path]:
    inp, out = root / "input", root / "output"
    inp.mkdir(parents=True)
    out.mkdir()
    samples = []
    seed = 0
    for mod in MODS:
        for src in SOURCES:
            pair = f"{src}_to_7T"
            for cid in cases:
                seed += 1
                rel_in = f"{mod}/{pair}/src/P_{mod}_{src}_{cid}.nii.gz"
                hdr = nib.Nifti1Header()
                hdr["descrip"] = b"MRIxFields fake"
                hdr.set_xyzt_units("mm", "sec")
                img = nib.Nifti1Image(_brain(seed), AFFINE, hdr)
                img.set_qform(AFFINE, code=4)
                img.set_sform(AFFINE, code=4)
                (inp / rel_in).parent.mkdir(parents=True, exist_ok=True)
                img.to_filename(str(inp / rel_in))
                samples.append({"task": "task1", "case_id": cid, "modality": mod,
                                "source_field": src, "target_field": "7T", "pair": pair,
                                "input": rel_in,
                                "output": f"{mod}/{pair}/pred/P_{mod}_7T_{cid}.nii.gz"})
    manifest = {"challenge": "MRIxFields2026", "phase": "test", "task": "task1",
                "input_root": "/input", "output_root": "/output",
                "volume_shape": list(SHAPE), "samples": samples}
    (inp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return inp, out, inp / "manifest.json"


class _StandInSynth:
    calls: list = []

    def __init__(self, entry):
        self.entry = entry

    def predict(self, volume, mask=None, *, others=None, batch_size=4, tta=False, threads=None):
        _StandInSynth.calls.append((self.entry, sorted(others or {})))
        mask = volume > 0 if mask is None else mask
        return np.where(mask, np.sqrt(volume) * 1.2 - 0.05, 0.3).astype(np.float32)  # out of range on purpose


@pytest.fixture
def stand_in_registry(monkeypatch):
    """Tiny stand-ins for ``synth7t.registry.Registry`` and ``synth7t.inference.load_synthesizer``
    honouring the DEVELOPING.md contract."""
    mod = types.ModuleType("synth7t.registry")

    class Registry:
        @classmethod
        def load(cls, model_dir=None):
            return cls()

        def get(self, contrast, field_bin, name="default"):
            assert contrast in ("T1w", "T2w", "FLAIR") and field_bin in (0.1, 1.5, 3.0, 5.0)
            return (contrast, field_bin, name)

    def load_synthesizer(entry, *, device="cpu"):
        return _StandInSynth(entry)

    monkeypatch.setattr("synth7t.inference.load_synthesizer", load_synthesizer)
    mod.Registry = Registry
    monkeypatch.setitem(sys.modules, "synth7t.registry", mod)
    _StandInSynth.calls = []
    return _StandInSynth


@pytest.fixture
def challenge(tmp_path, monkeypatch):
    inp, out, man = make_challenge(tmp_path)
    monkeypatch.setenv("INPUT_DIR", str(inp))
    monkeypatch.setenv("OUTPUT_DIR", str(out))
    monkeypatch.setenv("MANIFEST", str(man))
    monkeypatch.setenv("SYNTH7T_TMPDIR", str(tmp_path / "tmp"))
    return inp, out, man


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _expected(man: Path) -> set[str]:
    return {s["output"] for s in json.loads(man.read_text())["samples"]}


def test_full_run_then_check(challenge, stand_in_registry, capsys):
    inp, out, man = challenge
    assert cmd.main([]) == 0
    assert _files(out) == _expected(man) and len(_expected(man)) == 12 * len(CASES)
    assert cmd.main(["--check", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    # all three modalities present for every case -> the other two are passed as `others`
    assert len(stand_in_registry.calls) == 12 * len(CASES)
    for (contrast, _, name), others in stand_in_registry.calls:
        assert name == "default"
        assert others == sorted({"T1w", "T2w", "FLAIR"} - {contrast})
    for s in json.loads(man.read_text())["samples"]:
        src = nib.load(str(inp / s["input"]))
        dst = nib.load(str(out / s["output"]))
        for key in KEPT_FIELDS:
            assert np.array_equal(np.asarray(src.header[key]), np.asarray(dst.header[key])), key
        assert np.array_equal(src.affine, dst.affine)
        assert dst.get_data_dtype() == np.float32
        assert np.isnan(dst.header["scl_slope"])
        data = np.asarray(dst.dataobj)
        assert data.dtype == np.float32 and np.isfinite(data).all()
        assert data.min() >= 0 and data.max() <= 1
        assert (data[np.asarray(src.dataobj) == 0] == 0).all()


def _edit(man: Path, fn):
    m = json.loads(man.read_text())
    fn(m)
    man.write_text(json.dumps(m))


BAD = {
    "malformed_json": (lambda man: man.write_text('{"samples": [ oops'), 65, "malformed JSON"),
    "missing_key": (lambda man: _edit(man, lambda m: m["samples"][3].pop("output")), 65,
                    "sample 3 "),
    "dotdot": (lambda man: _edit(man, lambda m: m["samples"][5].update(
        output="T1W/../../escape/P_T1W_7T_0022.nii.gz")), 65, "sample 5 "),
    "absolute_elsewhere": (lambda man: _edit(man, lambda m: m["samples"][2].update(
        input="/etc/passwd")), 65, "sample 2 "),
    "bad_modality": (lambda man: _edit(man, lambda m: m["samples"][7].update(modality="PD")),
                     65, "sample 7 "),
    "bad_field": (lambda man: _edit(man, lambda m: m["samples"][4].update(
        source_field="9.4T", pair="9.4T_to_7T")), 65, "sample 4 "),
    "bad_volume_shape": (lambda man: _edit(man, lambda m: m.update(volume_shape=[1, 2])), 65,
                         "volume_shape"),
    "missing_input": (lambda man: _edit(man, lambda m: m["samples"][6].update(
        input="T1W/3T_to_7T/src/P_T1W_3T_9999.nii.gz")), 66, "sample 6 "),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_manifest_rejected_before_any_work(kind, challenge, stand_in_registry, capsys):
    inp, out, man = challenge
    breaker, code, needle = BAD[kind]
    breaker(man)
    rc = cmd.main([])
    err = capsys.readouterr().err
    assert rc == code, err
    assert needle in err
    assert "nothing was written" in err
    assert _files(out) == set()
    assert stand_in_registry.calls == []


def test_usage_error_exit_64(challenge, capsys):
    assert cmd.main(["--no-such-flag"]) == 64
    assert cmd.main(["--threads", "0"]) == 64


def test_tmp_dir_inside_output_refused(challenge, stand_in_registry, monkeypatch):
    inp, out, man = challenge
    monkeypatch.setenv("SYNTH7T_TMPDIR", str(out / "tmp"))
    assert cmd.main([]) == 64
    assert _files(out) == set()


def test_corrupt_input_is_named_and_the_rest_written(challenge, stand_in_registry, capsys):
    inp, out, man = challenge
    samples = json.loads(man.read_text())["samples"]
    bad = samples[9]
    raw = (inp / bad["input"]).read_bytes()
    (inp / bad["input"]).write_bytes(raw[: len(raw) // 2])  # truncated gzip
    rc = cmd.main([])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"FAILED sample 9 ({bad['modality']} {bad['pair']} case {bad['case_id']})" in err
    assert _files(out) == _expected(man) - {bad["output"]}
    assert cmd.main(["--check", str(out)]) == 1
    assert f"missing {bad['output']}" in capsys.readouterr().out


def test_check_finds_problems(challenge, stand_in_registry, capsys):
    inp, out, man = challenge
    assert cmd.main([]) == 0
    samples = json.loads(man.read_text())["samples"]
    # wrong dtype, out of range, NaN, wrong shape, extra files
    p0 = out / samples[0]["output"]
    img = nib.load(str(p0))
    nib.Nifti1Image(np.asarray(img.dataobj).astype(np.float64) * 2, img.affine).to_filename(str(p0))
    p1 = out / samples[1]["output"]
    d = np.asarray(nib.load(str(p1)).dataobj).copy()
    d[0, 0, 0] = np.nan
    nib.Nifti1Image(d, AFFINE).to_filename(str(p1))
    p2 = out / samples[2]["output"]
    nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), AFFINE).to_filename(str(p2))
    (out / "T1W" / "notes.txt").write_text("x")
    (out / "T1W" / "0.1T_to_7T" / "pred" / ".hidden").write_text("x")
    capsys.readouterr()
    assert cmd.main(["--check", str(out)]) == 1
    text = capsys.readouterr().out
    assert "stored as float64" in text and "outside [0, 1]" in text
    assert "NaN/Inf" in text and "has shape (4, 4, 4)" in text
    assert "extra file T1W/notes.txt" in text and ".hidden" in text


def test_with_the_real_registry(tmp_path, monkeypatch):
    """The shipped registry's default models through the contract (a few samples)."""
    pytest.importorskip("synth7t.registry")
    inp, out, man = make_challenge(tmp_path, cases=("0031",))
    m = json.loads(man.read_text())
    m["samples"] = [s for s in m["samples"] if s["source_field"] in ("0.1T", "3T")]
    man.write_text(json.dumps(m))
    rc = cmd.main(["--input-dir", str(inp), "--output-dir", str(out), "--manifest", str(man),
                   "--threads", "1", "--tmp-dir", str(tmp_path / "tmp")])
    assert rc == 0
    assert _files(out) == _expected(man)
    assert cmd.main(["--input-dir", str(inp), "--manifest", str(man), "--check", str(out)]) == 0


def test_model_dir_and_name_from_environment(challenge, stand_in_registry, monkeypatch, tmp_path):
    """A derived image bakes in a trained model with SYNTH7T_MODEL_DIR / SYNTH7T_MODEL_NAME."""
    inp, out, man = challenge
    seen = {}
    real_load = stand_in_registry and sys.modules["synth7t.registry"].Registry.load

    def load(model_dir=None):
        seen["model_dir"] = model_dir
        return real_load(model_dir)

    monkeypatch.setattr(sys.modules["synth7t.registry"].Registry, "load", staticmethod(load))
    monkeypatch.setenv("SYNTH7T_MODEL_DIR", str(tmp_path / "baked"))
    monkeypatch.setenv("SYNTH7T_MODEL_NAME", "challenge")
    assert cmd.main([]) == 0
    assert Path(seen["model_dir"]) == tmp_path / "baked"
    assert {entry[2] for entry, _ in stand_in_registry.calls} == {"challenge"}


def test_validation_loop_prepare_run_check_eval(tmp_path, stand_in_registry, capsys):
    """Dataset split -> --prepare-from -> run -> --check -> synth7t-eval against its 7T volumes."""
    import csv

    from synth7t.commands import evaluate

    split = tmp_path / "Validating_prospective"
    seed = 100
    for mod in MODS:
        for field in SOURCES + ("7T",):
            for cid in ("0041", "0042"):
                seed += 1
                f = split / mod / field / f"P_{mod}_{field}_{cid}.nii.gz"
                f.parent.mkdir(parents=True, exist_ok=True)
                nib.Nifti1Image(_brain(seed), AFFINE).to_filename(str(f))
    inp, out = tmp_path / "input", tmp_path / "output"
    assert cmd.main(["--prepare-from", str(split), "--input-dir", str(inp)]) == 0
    man = inp / "manifest.json"
    assert len(json.loads(man.read_text())["samples"]) == 24
    args = ["--input-dir", str(inp), "--output-dir", str(out), "--tmp-dir", str(tmp_path / "t")]
    assert cmd.main(args) == 0
    assert cmd.main(["--input-dir", str(inp), "--check", str(out)]) == 0
    res = tmp_path / "res"
    assert evaluate.main([str(out), str(split), "-o", str(res), "--tissue-method", "none"]) == 0
    rows = list(csv.DictReader(open(res / "per_case.csv")))
    assert len(rows) == 24
    assert {(r["modality"], r["source_field"]) for r in rows} == {
        (m, s) for m in MODS for s in SOURCES}
    assert all(r["gt"].endswith(f"/7T/P_{r['modality']}_7T_{r['case']}.nii.gz") for r in rows)
