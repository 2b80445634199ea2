"""Unit tests for synth7t.io on tiny synthetic images."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import from_matvec, obliquity

from synth7t import io as sio
from synth7t.io import ImageError, atomic_write_json, atomic_write_nifti, atomic_write_text, \
    conform, load_image, sha256_file

SHAPE = (5, 6, 7)


def _rng_data(dtype=np.float32, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.integers(1, 200, size=shape)).astype(dtype)


def _img(data: np.ndarray, affine: np.ndarray, *, qcode: int = 1, scode: int = 1,
         qform: np.ndarray | None = None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=scode)
    img.set_qform(affine if qform is None else qform, code=qcode)
    return img


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, path)
    return path


def _rot_x(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def assert_same_world_values(src: nib.Nifti1Image, out: nib.Nifti1Image) -> None:
    """Every output voxel holds the input value found at the same world coordinate."""
    src_data = np.asarray(src.get_fdata())
    out_data = np.asarray(out.get_fdata())
    assert sorted(out_data.shape) == sorted(src_data.shape)
    ijk = np.indices(out_data.shape).reshape(3, -1)
    world = out.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    src_ijk = np.linalg.inv(src.affine) @ world
    src_idx = np.rint(src_ijk[:3]).astype(int)
    np.testing.assert_allclose(src_ijk[:3], src_idx, atol=1e-4)
    np.testing.assert_array_equal(out_data.reshape(-1), src_data[tuple(src_idx)])


# ---------------------------------------------------------------- conform: orientation


@pytest.mark.parametrize("affine, codes", [
    (np.diag([-1.0, -1.0, 1.0, 1.0]), "LPS"),
    (np.diag([2.0, 1.0, 1.5, 1.0]), "RAS"),
    # Permuted voxel axes, as in sagittal or coronal acquisitions.
    (np.array([[0, 0, 1.0, -3], [-1.0, 0, 0, 4], [0, 1.0, 0, -2], [0, 0, 0, 1]]), "PSR"),
    (np.array([[0, -1.2, 0, 3], [0, 0, -1.0, 4], [1.0, 0, 0, -2], [0, 0, 0, 1]]), "SLP"),
])
def test_conform_reorients_to_ras(affine, codes):
    src = _img(_rng_data(), affine)
    assert "".join(nib.aff2axcodes(src.affine)) == codes
    out, warns = conform(src, name="x.nii.gz")
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert out.get_data_dtype() == np.float32
    assert_same_world_values(src, out)
    if codes != "RAS":
        assert any(f"reoriented from {codes} to RAS" in w for w in warns)
        assert all(w.startswith("x.nii.gz: ") for w in warns)
    else:
        assert warns == []
    # zooms follow the axes
    np.testing.assert_allclose(sorted(out.header.get_zooms()), sorted(src.header.get_zooms()))


def test_conform_keeps_oblique_affine_and_warns():
    aff = from_matvec(_rot_x(20) @ np.diag([-1.0, -1.0, 1.0]), [10, -5, 3])
    src = _img(_rng_data(), aff)
    out, warns = conform(src)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert np.degrees(obliquity(out.affine)).max() == pytest.approx(20, abs=1e-3)
    assert out.shape == SHAPE  # reordering only, no resampling
    assert_same_world_values(src, out)
    assert any("oblique" in w and "20.0 degrees" in w for w in warns)


def test_conform_axis_aligned_has_no_oblique_warning():
    out, warns = conform(_img(_rng_data(), np.eye(4)))
    assert not any("oblique" in w for w in warns)


# ---------------------------------------------------------------- conform: xforms


def test_conform_repairs_qform_sform_disagreement():
    sform = from_matvec(np.eye(3), [1, 2, 3])
    qform = from_matvec(np.eye(3), [6, 2, 3])  # 5 mm off
    src = _img(_rng_data(), sform, qcode=1, scode=4, qform=qform)
    out, warns = conform(src)
    assert any("qform and sform disagree" in w and "5.00 mm" in w for w in warns)
    np.testing.assert_allclose(out.get_qform(), sform, atol=1e-5)
    np.testing.assert_allclose(out.get_sform(), sform, atol=1e-5)
    assert int(out.header["qform_code"]) == int(out.header["sform_code"]) == 4


def test_conform_repairs_qform_code_zero():
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])
    src = _img(_rng_data(), aff, qcode=0, scode=2)
    out, warns = conform(src)
    assert any("qform_code is 0" in w for w in warns)
    assert int(out.header["qform_code"]) == 2
    np.testing.assert_allclose(out.get_qform(), out.get_sform(), atol=1e-5)
    assert_same_world_values(src, out)


def test_conform_repairs_sform_code_zero():
    aff = from_matvec(np.eye(3), [4, 5, 6])
    src = _img(_rng_data(), aff, qcode=1, scode=0)
    out, warns = conform(src)
    assert any("sform_code is 0" in w for w in warns)
    assert int(out.header["sform_code"]) == 1
    np.testing.assert_allclose(out.get_sform(), aff, atol=1e-5)


def test_conform_both_codes_zero_warns():
    src = _img(_rng_data(), np.eye(4), qcode=0, scode=0)
    out, warns = conform(src)
    assert any("no valid qform or sform" in w for w in warns)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")


def test_conform_agreeing_xforms_round_trip_through_file(tmp_path):
    aff = from_matvec(_rot_x(3) @ np.diag([1.0, 1.0, 1.0]), [-90, -120, -70])
    path = _save(_img(_rng_data(np.int16), aff), tmp_path / "a.nii.gz")
    _, warns = conform(load_image(path))
    # float32 round-off between quaternion and srow must not count as a disagreement
    assert not any("disagree" in w for w in warns)


# ---------------------------------------------------------------- conform: values


def test_conform_applies_scl_slope_and_inter(tmp_path):
    raw = _rng_data(np.int16)
    plain = _save(_img(raw, np.eye(4)), tmp_path / "plain.nii")
    blob = bytearray(plain.read_bytes())
    # Patch scl_slope/scl_inter (header bytes 112-119) so the file stores raw int16 + scaling.
    blob[112:120] = struct.pack("<ff", 2.5, -1.0)
    path = tmp_path / "scaled.nii.gz"
    path.write_bytes(gzip.compress(bytes(blob)))
    loaded = load_image(path)
    assert loaded.get_data_dtype() == np.int16
    out, warns = conform(loaded)
    np.testing.assert_allclose(out.get_fdata(), raw * 2.5 - 1.0, rtol=1e-6)
    assert out.get_data_dtype() == np.float32
    assert any("scl_slope=2.5" in w and "scl_inter=-1" in w for w in warns)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64])
def test_conform_casts_to_float32(tmp_path, dtype):
    raw = _rng_data(dtype)
    path = _save(_img(raw, np.eye(4)), tmp_path / f"{np.dtype(dtype).name}.nii")
    out, _ = conform(load_image(path))
    assert out.get_data_dtype() == np.float32
    assert np.asarray(out.dataobj).dtype == np.float32
    np.testing.assert_array_equal(out.get_fdata(), raw.astype(np.float32))


def test_conform_replaces_nan_inf_with_count():
    data = _rng_data()
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    data[2, 2, 2] = -np.inf
    out, warns = conform(_img(data, np.eye(4)))
    arr = out.get_fdata()
    assert np.isfinite(arr).all()
    assert arr[0, 0, 0] == arr[1, 1, 1] == arr[2, 2, 2] == 0
    assert any("3 NaN/Inf voxel(s) replaced by 0" in w for w in warns)


def test_conform_keeps_negative_values_with_warning():
    data = _rng_data()
    data[0, 0, :2] = [-5, -1]
    out, warns = conform(_img(data, np.eye(4)))
    assert out.get_fdata()[0, 0, 0] == -5
    assert any("2 negative voxel(s) kept" in w and "-5" in w for w in warns)


def test_conform_rejects_multi_volume():
    with pytest.raises(ImageError):
        conform(_img(_rng_data(shape=SHAPE + (2,)), np.eye(4)), name="v.nii")


# ---------------------------------------------------------------- load_image


def test_load_image_squeezes_single_volume_4d(tmp_path):
    data = _rng_data(np.int16, SHAPE + (1,))
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])
    path = _save(_img(data, aff, qcode=0, scode=2), tmp_path / "one.nii.gz")
    img = load_image(path)
    assert img.shape == SHAPE
    np.testing.assert_array_equal(img.get_fdata(), data[..., 0])
    assert int(img.header["qform_code"]) == 0  # left for conform() to repair and report
    out, warns = conform(img)
    assert out.shape == SHAPE and any("qform_code is 0" in w for w in warns)


def _assert_one_line(err: ImageError, path: Path, fragment: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert fragment in msg


def test_load_image_rejects_multi_volume_4d(tmp_path):
    path = _save(_img(_rng_data(shape=SHAPE + (3,)), np.eye(4)), tmp_path / "bold.nii.gz")
    with pytest.raises(ImageError) as exc:
        load_image(path)
    _assert_one_line(exc.value, path, "4D image with 3 volumes")


def test_load_image_rejects_empty(tmp_path):
    path = _save(_img(np.zeros(SHAPE, np.int16), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(ImageError) as exc:
        load_image(path)
    _assert_one_line(exc.value, path, "all voxels are zero")


def test_load_image_rejects_no_finite(tmp_path):
    path = _save(_img(np.full(SHAPE, np.nan, np.float32), np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(ImageError) as exc:
        load_image(path)
    _assert_one_line(exc.value, path, "no finite voxel")


def test_load_image_zeros_and_nans_is_empty(tmp_path):
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, 0] = np.nan
    path = _save(_img(data, np.eye(4)), tmp_path / "zn.nii")
    with pytest.raises(ImageError, match="all voxels are zero"):
        load_image(path)


@pytest.mark.parametrize("name, content", [
    ("notes.txt", b"hello"),
    ("fake.nii.gz", b"this is not gzip at all"),
    ("fake.nii", b"x" * 400),
    ("text.nii.gz", gzip.compress(b"plain text, gzipped", mtime=0)),
], ids=["txt", "not-gzip", "not-nifti", "gzipped-text"])  # stable ids: xdist workers must agree
def test_load_image_rejects_non_nifti(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as exc:
        load_image(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")


def test_load_image_rejects_truncated_gz(tmp_path):
    good = _save(_img(_rng_data(np.float32, (20, 20, 20)), np.eye(4)), tmp_path / "good.nii.gz")
    blob = good.read_bytes()
    path = tmp_path / "trunc.nii.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageError) as exc:
        load_image(path)
    _assert_one_line(exc.value, path, "truncated")


def test_load_image_rejects_truncated_nii(tmp_path):
    good = _save(_img(_rng_data(np.float32, (20, 20, 20)), np.eye(4)), tmp_path / "good.nii")
    path = tmp_path / "trunc.nii"
    path.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ImageError) as exc:
        load_image(path)
    _assert_one_line(exc.value, path, "truncated")


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.nii.gz")


def test_image_error_is_value_error_and_one_line():
    err = ImageError("/a/b.nii.gz", "bad\nthing")
    assert isinstance(err, ValueError)
    assert str(err) == "/a/b.nii.gz: bad thing"


# ---------------------------------------------------------------- atomic writes


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_atomic_write_nifti_round_trip(tmp_path, suffix):
    img, _ = conform(_img(_rng_data(), np.diag([-1.0, 1.0, 1.0, 1.0])))
    path = atomic_write_nifti(img, tmp_path / f"out{suffix}")
    assert _leftovers(tmp_path) == [f"out{suffix}"]
    back = nib.load(path)
    np.testing.assert_array_equal(back.get_fdata(), img.get_fdata())
    np.testing.assert_allclose(back.affine, img.affine)
    if suffix == ".nii.gz":
        with gzip.open(path) as fh:
            fh.read(10)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_write_nifti_failure_leaves_no_file(tmp_path, monkeypatch):
    img = _img(_rng_data(), np.eye(4))

    def broken(self, io_obj):
        io_obj.write(b"partial" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_nifti(img, tmp_path / "out.nii.gz")
    assert _leftovers(tmp_path) == []


def test_atomic_write_error_names_the_output(tmp_path, monkeypatch):
    """ENOSPC from write() carries no file name: the error names the output it was writing."""
    import errno

    def full(self, io_obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", full)
    path = tmp_path / "sub-01_desc-synth7T_T1w.nii.gz"
    with pytest.raises(OSError) as err:
        atomic_write_nifti(_img(_rng_data(), np.eye(4)), path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert str(path) in str(err.value) and "No space left on device" in str(err.value)
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "d.json"
    atomic_write_json({"v": 1}, path)

    def no_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(sio.os, "fsync", no_fsync)
    with pytest.raises(OSError):
        atomic_write_json({"v": 2}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == ["d.json"]


def test_atomic_write_json_unserialisable_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, tmp_path / "x.json")
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_numpy_and_text(tmp_path):
    p = atomic_write_json({"a": np.float32(1.5), "b": np.arange(3), "c": tmp_path}, tmp_path / "j.json")
    assert json.loads(p.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": str(tmp_path)}
    t = atomic_write_text("héllo\n", tmp_path / "sub" / "t.txt")
    assert t.read_text(encoding="utf-8") == "héllo\n"


def test_atomic_write_nifti_rejects_bad_suffix(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_nifti(_img(_rng_data(), np.eye(4)), tmp_path / "x.img")


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    assert sha256_file(p) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_protocol_from_sidecar_converts_bids_units_and_skips_what_is_not_a_number():
    from synth7t.io import protocol_from_sidecar

    meta = {"RepetitionTime": 2.3, "EchoTime": [0.00411, 0.008], "InversionTime": 0.925,
            "FlipAngle": 9, "MagneticFieldStrength": 3}
    got = protocol_from_sidecar(meta)
    assert got == pytest.approx({"TR": 2300.0, "TE": 4.11, "TI": 925.0, "FA": 9.0})
    assert protocol_from_sidecar({"EchoTime": "0.1", "RepetitionTime": -1, "FlipAngle": True,
                                  "InversionTime": float("nan")}) is None
    assert protocol_from_sidecar({}) is None and protocol_from_sidecar(None) is None
