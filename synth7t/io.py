"""Image I/O and NIfTI header hygiene.

Every input image enters synth7t through :func:`load_image` (fail early, one-line errors that
the BIDS App turns into exit code 65) and :func:`conform` (one canonical in-memory form: 3D,
float32, RAS voxel order, consistent qform/sform, finite values). Every output goes through the
``atomic_write_*`` helpers so that an interrupted run never leaves a half-written file under a
final name (Nipype caching and BIDS indexing would otherwise pick it up).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import IO, Any, Callable

import nibabel as nib
import numpy as np
from nibabel.affines import obliquity
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

__all__ = [
    "ImageError",
    "load_image",
    "conform",
    "atomic_write_nifti",
    "atomic_write_json",
    "atomic_write_text",
    "sha256_file",
]

#: qform and sform are considered different when a corner of the volume moves more than this (mm).
XFORM_TOLERANCE_MM = 0.01
#: Obliquity (degrees) below which an affine counts as axis-aligned (float32 header round-off).
OBLIQUE_TOLERANCE_DEG = 0.01
#: nibabel's own default gzip level: level 9 is ~5x slower for ~10 % smaller files.
GZIP_LEVEL = 1


class ImageError(ValueError):
    """An input image that synth7t cannot use (exit code 65).

    The message is always one line, ``"<path>: <reason>"``.

    Parameters
    ----------
    path
        The offending file (or a display name).
    reason
        Why it cannot be used. If omitted, ``path`` is taken as the whole message.
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        msg = self.path if reason is None else f"{self.path}: {reason}"
        super().__init__(" ".join(msg.split()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_image(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI image and check that it is usable.

    The data are read (and cached on the image) here, so a truncated or corrupt file fails now
    rather than in the middle of a workflow. Header problems are left for :func:`conform`.

    Parameters
    ----------
    path
        ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2).

    Returns
    -------
    nibabel.Nifti1Image
        3D image (a 4D image with one volume is squeezed to 3D).

    Raises
    ------
    ImageError
        Missing file, not NIfTI, truncated/corrupt, not 3D (or 4D with more than one volume),
        zero-sized, no finite voxels, all voxels zero.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "no such file")
    try:
        img = nib.load(path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageError(path, f"truncated or corrupt compressed file ({_first_line(exc)})") from exc
    except Exception as exc:  # nibabel raises many types for non-images
        raise ImageError(path, f"not a NIfTI image ({_first_line(exc)})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageError(path, f"not a NIfTI image (read as {type(img).__name__})")
    if isinstance(img, nib.Nifti2Image):
        img = nib.Nifti1Image.from_image(img)

    shape = img.shape
    if len(shape) == 4 and shape[3] > 1:
        raise ImageError(path, f"4D image with {shape[3]} volumes; a single 3D volume is required")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        raise ImageError(path, f"{len(shape)}D image of shape {shape}; a 3D volume is required")
    if min(shape) == 0:
        raise ImageError(path, f"image has a zero-sized dimension {shape}")

    try:
        # float32 is what conform() asks for, so the cache is reused there.
        data = img.get_fdata(dtype=np.float32)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageError(path, f"truncated or corrupt compressed file ({_first_line(exc)})") from exc
    except (OSError, ValueError) as exc:
        raise ImageError(path, f"truncated or unreadable image data ({_first_line(exc)})") from exc

    finite = np.isfinite(data)
    if not finite.any():
        raise ImageError(path, "no finite voxel values (all NaN/Inf)")
    if not np.any(data[finite]):
        raise ImageError(path, "empty image (all voxels are zero)")

    if len(shape) == 4:
        hdr = img.header.copy()
        out = nib.Nifti1Image(data[..., 0], img.affine, hdr)
        # Keep the original xforms and codes so conform() sees what the file said.
        out.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
        out.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
        out.set_data_dtype(np.float32)
        return out
    return img


def _corner_shift(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between the two mappings of the volume's corners."""
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in shape[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))


def _has_shear(affine: np.ndarray) -> bool:
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return not np.allclose(cols.T @ cols, np.eye(3), atol=1e-4)


def _choose_affine(img: nib.Nifti1Image, label: str) -> tuple[np.ndarray, int, list[str]]:
    """Pick the voxel-to-world affine, reconciling qform and sform.

    The sform wins when valid (nibabel, FSL and ITK agree on that precedence); a missing or
    disagreeing qform is replaced by it, so downstream tools reading either field agree.
    """
    hdr = img.header
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    notes: list[str] = []
    if scode > 0 and qcode > 0:
        s, q = hdr.get_sform(), hdr.get_qform()
        shift = _corner_shift(s, q, img.shape)
        if shift > XFORM_TOLERANCE_MM:
            notes.append(f"{label}qform and sform disagree (up to {shift:.2f} mm); sform kept, "
                         "qform replaced by it")
        return s, scode, notes
    if scode > 0:
        notes.append(f"{label}qform_code is 0; qform set from the sform")
        return hdr.get_sform(), scode, notes
    if qcode > 0:
        notes.append(f"{label}sform_code is 0; sform set from the qform")
        return hdr.get_qform(), qcode, notes
    notes.append(f"{label}no valid qform or sform (both codes 0); using the voxel sizes only "
                 "(orientation and position unknown)")
    return hdr.get_base_affine(), 1, notes


def conform(img: nib.Nifti1Image, *, name: str = "") -> tuple[nib.Nifti1Image, list[str]]:
    """Bring an image into synth7t's canonical in-memory form.

    Parameters
    ----------
    img
        3D NIfTI (a 4D image with one volume is accepted).
    name
        Prefix for the warnings (e.g. the file name).

    Returns
    -------
    image : nibabel.Nifti1Image
        float32 data (``scl_slope``/``scl_inter`` applied), RAS voxel order (reoriented with
        :mod:`nibabel.orientations`, never resampled: an oblique affine stays oblique), NaN/Inf
        set to 0, negative values kept, qform = sform = the chosen affine.
    warnings : list of str
        Human-readable notes for the log and the report, one per repair.

    Raises
    ------
    ImageError
        The image has more than one volume or is not 3D.
    """
    label = f"{name}: " if name else ""
    warnings: list[str] = []
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        pass
    elif len(shape) != 3:
        raise ImageError(name or "<image>", f"{len(shape)}D image of shape {shape}; a single 3D "
                                            "volume is required")

    affine, code, notes = _choose_affine(img, label)
    warnings += notes

    # nibabel moves scl_slope/scl_inter from a loaded header onto the array proxy.
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    if slope != 1.0 or inter != 0.0:
        warnings.append(f"{label}scl_slope={slope:g}, scl_inter={inter:g} applied")
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 4:
        data = data[..., 0]

    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        data = np.where(bad, np.float32(0), data)
        warnings.append(f"{label}{n_bad} NaN/Inf voxel(s) replaced by 0")
    n_neg = int((data < 0).sum())
    if n_neg:
        warnings.append(f"{label}{n_neg} negative voxel(s) kept (minimum {float(data.min()):g})")

    if _has_shear(affine):
        warnings.append(f"{label}affine has shear; the qform stores the nearest rigid rotation")
    angle = float(np.degrees(obliquity(affine)).max())
    if angle > OBLIQUE_TOLERANCE_DEG:
        warnings.append(f"{label}oblique affine (up to {angle:.1f} degrees) kept; not resampled")

    start = io_orientation(affine)
    target = axcodes2ornt(("R", "A", "S"))
    if not np.array_equal(start, target):
        codes = "".join(aff2axcodes(affine))
        xfm = ornt_transform(start, target)
        data = apply_orientation(data, xfm)
        affine = affine @ inv_ornt_aff(xfm, shape[:3])
        warnings.append(f"{label}reoriented from {codes} to RAS")

    out = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    out.set_data_dtype(np.float32)
    out.set_qform(affine, code=code)
    out.set_sform(affine, code=code)
    out.header.set_xyzt_units("mm", "sec")
    return out, warnings


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Run ``write`` on a temp file next to ``path``, fsync it, then rename it into place.

    The temp file lives in the same folder so ``os.replace`` is an atomic rename on the same
    file system; on any failure it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno and exc.filename is None:
            # write() and fsync() name no file; a full disk should say which output it stopped
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)  # persist the rename itself
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def atomic_write_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write a NIfTI image atomically (``.nii`` or ``.nii.gz``, decided by the name).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    name = str(path)
    if name.endswith(".nii.gz"):
        def write(fh: IO[bytes]) -> None:
            # filename="" and mtime=0 keep the temp name and the time out of the gzip header.
            with gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=GZIP_LEVEL,
                               mtime=0) as gz:
                img.to_stream(gz)
    elif name.endswith(".nii"):
        def write(fh: IO[bytes]) -> None:
            img.to_stream(fh)
    else:
        raise ValueError(f"{path}: NIfTI output must end with .nii or .nii.gz")
    return _atomic_write(path, write)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(obj: Any, path: str | os.PathLike, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (numpy scalars/arrays and paths are converted).

    Serialisation happens before the temp file is created, so an unserialisable object leaves
    nothing behind.
    """
    text = json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False) + "\n"
    return atomic_write_text(text, path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write bytes atomically (figures, archives)."""
    return _atomic_write(path, lambda fh: fh.write(data))


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


#: BIDS sidecar fields of the acquisition protocol: (key of protocol conditioning, factor to the
#: simulator's units). BIDS times are seconds, the simulator's milliseconds; flip angles degrees.
SIDECAR_PROTOCOL = {"RepetitionTime": ("TR", 1000.0), "EchoTime": ("TE", 1000.0),
                    "InversionTime": ("TI", 1000.0), "FlipAngle": ("FA", 1.0)}
#: Units of :func:`protocol_from_sidecar`'s values.
PROTOCOL_UNITS = {"TR": "ms", "TE": "ms", "TI": "ms", "FA": "deg"}


def protocol_from_sidecar(metadata: dict[str, Any] | None) -> dict[str, float] | None:
    """The acquisition protocol a BIDS sidecar states, in milliseconds and degrees
    (``{"TR": ..., "TE": ..., "TI": ..., "FA": ...}``, the fields it has), for networks with
    protocol conditioning; ``None`` when it states none. A multi-echo ``EchoTime`` list gives
    its first echo; a value that is not a positive number is left out (the network then treats
    that parameter as nominal)."""
    out: dict[str, float] = {}
    for field, (key, factor) in SIDECAR_PROTOCOL.items():
        val = (metadata or {}).get(field)
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            continue
        if np.isfinite(val) and val > 0:
            out[key] = float(val) * factor
    return out or None
