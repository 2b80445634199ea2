"""Structural preprocessing with antspyx, fully offline.

N4 bias-field correction, brain-extraction detection, template-based skull stripping (the
shipped Colin27 head registered to the subject), rigid within-subject registration, registration
of the T1w brain to the shipped MRIxFields template, and resampling into / out of the 0.5 mm
reference grid.

Design notes
------------
* Registrations run at 2 mm and their transforms (physical space) are applied to the
  full-resolution images: 2 mm affine/SyN costs seconds, 1 mm costs minutes (ARCHITECTURE.md).
* Images cross the nibabel/ANTs boundary through :func:`nib_to_ants` / :func:`ants_to_nib`
  (RAS <-> LPS handled explicitly); results are put back on the caller's exact affine.
* ``threads`` sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` for the call. ITK reads that variable
  **once per process**, when ITK is first used; later changes in the same process have no
  effect (measured with antspyx 0.6.3). Nipype runs each node in a worker process, so the first
  call there decides; in a long-lived process the first call's value sticks.
* ``seed`` is passed to antsRegistration as ``--random-seed seed+1`` (0 there means "use the
  clock"; antspyx 0.6.3 reads it from ``ants.config``, its ``registration()`` ignores a
  ``random_seed`` keyword). Registrations are then bit-for-bit repeatable **only with one ITK
  thread**: with 2 threads the multithreaded Mattes-MI accumulation still varies from run to run
  (measured: affine terms differ by ~0.003, translations by ~0.05 mm). This is why antspyx's own
  ``set_ants_deterministic`` forces one thread.
* ``ants`` is imported lazily: it costs ~2 s and graph-building code imports this module.
"""
from __future__ import annotations

import inspect
import os
import tempfile
from contextlib import contextmanager, nullcontext as _nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .reference import DATA_DIR, REF_AFFINE, REF_SHAPE, REF_SPACE, TEMPLATEFLOW_HOME

if TYPE_CHECKING:  # pragma: no cover
    import ants

__all__ = [
    "n4_correct",
    "n4_shrink_factor",
    "detect_skull_stripped",
    "skull_strip",
    "register_rigid",
    "register_to_reference",
    "to_reference",
    "reference_box",
    "to_reference_box",
    "to_native",
    "nib_to_ants",
    "ants_to_nib",
    "template_path",
    "COLIN27_HEAD",
    "COLIN27_BRAIN_MASK",
]

THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
#: Colin27 whole head, 2 mm, uint8 (moving image for template-based brain extraction).
COLIN27_HEAD = DATA_DIR / "colin27" / "colin27_res-2_T1w.nii.gz"
#: Colin27 brain mask, 1 mm (warped to the subject's native grid).
COLIN27_BRAIN_MASK = DATA_DIR / "colin27" / "colin27_res-1_desc-brain_mask.nii.gz"
#: Registration resolution (mm).
REG_ZOOM = 2.0
#: Iterations of the rigid stage of :func:`register_to_reference` per level (shrink 6, 4, 2, 1 as
#: antspyx's defaults): the two coarse levels only, as antspyx's ``AffineFast`` does.
RIGID_INIT_ITERATIONS = (2100, 1200, 0, 0)
#: Non-zero volume (mL) below which an image with a zero background counts as brain-only.
#: Adult brains incl. CSF are ~1.1-1.9 L; whole heads are 3-5 L.
SKULL_STRIPPED_MAX_ML = 2300.0
#: Fraction of exact-zero voxels needed before an image can count as brain-only.
SKULL_STRIPPED_MIN_ZERO_FRACTION = 0.3

_LPS = np.diag([-1.0, -1.0, 1.0])
_INTERPOLATORS = {
    "linear": "linear",
    "nearest": "nearestNeighbor",
    "nearestneighbor": "nearestNeighbor",
    "bspline": "bSpline",
    "lanczos": "lanczosWindowedSinc",
    "lanczoswindowedsinc": "lanczosWindowedSinc",
    "label": "genericLabel",
    "genericlabel": "genericLabel",
    "multilabel": "multiLabel",
    "gaussian": "gaussian",
}


# ---------------------------------------------------------------------------- plumbing


def _ants():
    import ants  # noqa: PLC0415  (lazy: see module docstring)

    return ants


@contextmanager
def _ants_session(threads: int, seed: int | None) -> Iterator[None]:
    """Set the ITK thread count and the antsRegistration seed for one call, then restore."""
    ants = _ants()
    prev_threads = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(max(1, int(threads)))
    prev_seed = ants.config._random_seed
    if seed is not None:
        ants.config._random_seed = _ants_seed(seed)
    try:
        yield
    finally:
        ants.config._random_seed = prev_seed
        if prev_threads is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = prev_threads


def _ants_seed(seed: int) -> int:
    """antsRegistration's ``--random-seed`` value for a user seed.

    antsRegistration treats 0 as "seed from the clock" (non-deterministic), and synth7t's
    default seed is 0, so seeds are shifted by one into ITK's positive int range.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed) % (2**31 - 2) + 1


def _registration(fixed, moving, type_of_transform: str, *, outprefix: str, seed: int,
                  **kwargs) -> dict:
    """``ants.registration`` with the seed passed however this antspyx version takes it."""
    ants = _ants()
    if "random_seed" in inspect.signature(ants.registration).parameters:
        kwargs["random_seed"] = _ants_seed(seed)
    return ants.registration(fixed=fixed, moving=moving, type_of_transform=type_of_transform,
                             outprefix=outprefix, **kwargs)


def ants_register(fixed, moving, type_of_transform: str, *, outprefix: str | None = None,
                  threads: int = 1, seed: int = 0, **kwargs) -> dict:
    """``ants.registration`` made repeatable: fixed ITK thread count and a non-clock seed.

    For callers outside this module that hold ANTs images already (training pairs, tissue
    models); see the module notes for why one thread is needed for bit-identical results.
    """
    if outprefix is None:  # antspyx's own default: a fresh temporary prefix
        outprefix = tempfile.mktemp()
    with _ants_session(threads, seed):
        return _registration(fixed, moving, type_of_transform, outprefix=outprefix, seed=seed,
                             **kwargs)


def nib_to_ants(img: nib.Nifti1Image, data: np.ndarray | None = None) -> "ants.ANTsImage":
    """Convert a 3D nibabel image (RAS affine) to a float32 ANTs image (LPS physical space).

    Parameters
    ----------
    img
        Source of the geometry (and of the data unless ``data`` is given).
    data
        Optional array on ``img``'s grid to use instead of ``img``'s data.
    """
    origin, spacing, direction = _itk_geometry(img.affine)
    arr = np.asarray(img.get_fdata(dtype=np.float32) if data is None else data, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    return _ants().from_numpy(np.ascontiguousarray(arr), origin=origin, spacing=spacing,
                              direction=direction)


def _itk_geometry(affine: np.ndarray) -> tuple[list[float], list[float], np.ndarray]:
    """(origin, spacing, direction) in ITK's LPS convention for a RAS voxel-to-world affine."""
    aff = np.asarray(affine, dtype=np.float64)
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    # Nearest orthonormal direction (polar decomposition): ITK rejects shear, and float32 header
    # round-off makes directions very slightly non-orthogonal.
    u, _, vt = np.linalg.svd(aff[:3, :3] / zooms)
    return (_LPS @ aff[:3, 3]).tolist(), zooms.tolist(), _LPS @ (u @ vt)


def ants_to_nib(image: "ants.ANTsImage", *, like: nib.Nifti1Image | None = None,
                dtype: type = np.float32) -> nib.Nifti1Image:
    """Convert an ANTs image back to nibabel (RAS).

    Parameters
    ----------
    image
        ANTs image.
    like
        If given (same grid), its affine and xform codes are reused exactly, so a round trip
        does not perturb the header.
    dtype
        On-disk and in-memory data type.
    """
    data = image.numpy().astype(dtype, copy=False)
    if like is not None:
        if tuple(like.shape[:3]) != data.shape:
            raise ValueError(f"grid mismatch: {like.shape[:3]} vs {data.shape}")
        return _on_grid(data, like, dtype)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ np.asarray(image.direction) @ np.diag(image.spacing)
    affine[:3, 3] = _LPS @ np.asarray(image.origin)
    return _on_grid(data, nib.Nifti1Image(np.empty((1, 1, 1), np.uint8), affine), dtype)


def _ref_like(shape: tuple[int, ...] = REF_SHAPE,
              affine: np.ndarray = REF_AFFINE) -> nib.Nifti1Image:
    """Header-only stand-in for the reference grid, or for a part or coarser copy of it (the
    data are a broadcast view, never materialised)."""
    img = nib.Nifti1Image(np.broadcast_to(np.float32(0), tuple(shape)), affine)
    img.set_qform(affine, code=4)  # 4 = MNI_152: the grid is in MNI coordinates
    img.set_sform(affine, code=4)
    return img


def _empty_grid(like: nib.Nifti1Image) -> "ants.ANTsImage":
    """Zero float32 ANTs image on ``like``'s grid (only its geometry is read).

    ``from_numpy`` copies ``data.T`` into C order; handing it the transpose of a C-ordered
    array makes that copy a straight one, and skipping ``make_image`` skips its extra clone:
    0.08 s instead of 1.6-3.3 s on the 0.5 mm grid.
    """
    origin, spacing, direction = _itk_geometry(like.affine)
    zeros = np.zeros(tuple(int(n) for n in like.shape[:3])[::-1], dtype=np.float32).T
    return _ants().from_numpy(zeros, origin=list(origin), spacing=list(spacing),
                              direction=direction)


def _resample_to_zoom(image: "ants.ANTsImage", zoom: float) -> "ants.ANTsImage":
    """Downsample to ``zoom`` mm (Gaussian anti-aliasing then linear); never upsample."""
    ants = _ants()
    spacing = np.asarray(image.spacing)
    if np.all(spacing >= zoom - 1e-3):
        return image
    sigma = [float(np.sqrt(max(zoom**2 - s**2, 0.0)) / 2.355) for s in spacing]  # FWHM -> sigma
    smoothed = ants.smooth_image(image, sigma, sigma_in_physical_coordinates=True)
    return ants.resample_image(smoothed, (zoom, zoom, zoom), use_voxels=False, interp_type=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest connected component with its holes filled."""
    return ndi.binary_fill_holes(_largest_component(mask))


def _on_grid(data: np.ndarray, like: nib.Nifti1Image, dtype: type = np.float32) -> nib.Nifti1Image:
    """Image holding ``data`` with ``like``'s grid and xforms (codes kept, 0 -> 1)."""
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype), like.affine)
    out.set_data_dtype(dtype)
    qcode = int(like.header["qform_code"]) or 1
    out.set_qform(like.affine, code=qcode)
    out.set_sform(like.affine, code=int(like.header["sform_code"]) or qcode)
    out.header.set_xyzt_units("mm", "sec")
    return out


def _as_list(transforms: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(transforms, (str, os.PathLike)):
        return [os.fspath(transforms)]
    return [os.fspath(t) for t in transforms]


def _interpolator(name: str) -> str:
    try:
        return _INTERPOLATORS[name.replace("_", "").lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; one of {sorted(_INTERPOLATORS)}") \
            from None


def template_path(resolution: int = 2, *, desc: str | None = None, suffix: str = "T1w") -> Path:
    """Path of a shipped MRIxFields template file (no TemplateFlow import needed).

    Parameters
    ----------
    resolution
        1 or 2 (mm). The 0.5 mm grid is never stored.
    desc, suffix
        E.g. ``desc=None, suffix="T1w"`` or ``desc="brain", suffix="mask"``.
    """
    parts = [f"tpl-{REF_SPACE}", f"res-{resolution}"] + ([f"desc-{desc}"] if desc else [])
    path = TEMPLATEFLOW_HOME / f"tpl-{REF_SPACE}" / ("_".join(parts + [suffix]) + ".nii.gz")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shipped template file missing")
    return path


# ---------------------------------------------------------------------------- public API


#: Most voxels N4 fits on after its internal shrink (see :func:`n4_shrink_factor`).
N4_MAX_FIT_VOXELS = 2**16


def n4_shrink_factor(shape: Sequence[int], *, minimum: int = 4,
                     max_voxels: int = N4_MAX_FIT_VOXELS) -> int:
    """N4's internal shrink factor for an image of ``shape``.

    4 (the ANTs and sMRIPrep setting for ~1 mm heads) unless the shrunk grid would still hold
    more than ``max_voxels`` voxels: N4's time is proportional to that grid (measured on a
    192 x 256 x 256 head: 65 s at 4, 37 s at 5, 23 s at 6, one thread). The larger factor
    loses nothing the field can show: with 200 mm knot spacing and 4 fitting levels the finest
    B-spline span is 25 mm, still sampled 4 times per axis at 6 mm. Measured on that head, the
    bias field at 6 differs from the one at 4 by 1.8 % (median, 9.6 % at the 99th percentile):
    as much as the factor-4 field itself changes when the field of view is cropped to the head
    (1.4 %, 12 % at most).
    """
    n = float(np.prod([int(v) for v in shape]))
    return max(int(minimum), int(np.ceil(np.cbrt(n / max_voxels) - 1e-9)))


def n4_correct(img: nib.Nifti1Image, *, mask: nib.Nifti1Image | None = None,
               threads: int = 1, shrink_factor: int | None = None,
               spline_distance: float = 200.0) -> nib.Nifti1Image:
    """N4 bias-field correction at the image's native resolution.

    Parameters
    ----------
    img
        3D image (e.g. the output of :func:`synth7t.io.conform`).
    mask
        Optional mask on the same grid; the bias field is fitted inside ``mask`` (default: the
        head, i.e. voxels above the image mean, largest component, holes filled) and on positive
        voxels only (N4 works on log intensities), then applied everywhere.
    threads
        ITK threads (see the module notes).
    shrink_factor
        N4 internal downsampling; default :func:`n4_shrink_factor` of the image's shape (4 for
        up to ~4.2 M voxels, e.g. 160^3; shrink 1 takes over 300 s on a 1 mm head).
    spline_distance
        B-spline knot spacing in mm (ANTs/fMRIPrep default 200).

    Returns
    -------
    nibabel.Nifti1Image
        float32, same grid and xforms as ``img``.
    """
    data = np.asarray(img.get_fdata(dtype=np.float32))
    fit = data > 0
    if mask is not None:
        fit &= np.asarray(mask.get_fdata()) > 0
    else:
        # Fitting on the head only (mean threshold, as ants.get_mask) rather than the whole
        # field of view (air, neck) cuts N4 from ~66 s to ~27 s CPU on a 1 mm head.
        fit &= _clean_mask(data > data[np.isfinite(data)].mean())
    if not fit.any():
        raise ValueError("n4_correct: no positive voxels inside the mask")
    if shrink_factor is None:
        shrink_factor = n4_shrink_factor(data.shape)
    with _ants_session(threads, None):
        ants = _ants()
        image = nib_to_ants(img, data)
        corrected = ants.n4_bias_field_correction(
            image, mask=nib_to_ants(img, fit.astype(np.float32)), shrink_factor=shrink_factor,
            convergence={"iters": [50, 50, 50, 50], "tol": 1e-7},
            spline_param=float(spline_distance))
        out = corrected.numpy().astype(np.float32)
    return _on_grid(out, img)


#: ITK threads of :func:`n4_correct_isolated`. Fixed, whatever the machine or ``--omp-nthreads``:
#: N4's result depends on its thread count (bit-identical from run to run at a given count).
N4_THREADS = 2


def n4_correct_isolated(img: nib.Nifti1Image, *, mask: nib.Nifti1Image | None = None,
                        threads: int = N4_THREADS) -> nib.Nifti1Image:
    """:func:`n4_correct` on ``threads`` ITK threads, in a fresh Python process.

    ITK reads its thread count once per process, so a multi-threaded N4 in a Nipype worker would
    leave that worker's later registrations multi-threaded, and those are not reproducible; a
    child process takes its thread count with it when it exits. On sub-01's 1 mm head: 18.8 s
    on two threads against 29.8 s on one, for ~3 s of starting the child. The child is a plain
    ``python -c`` (not multiprocessing's spawn, which re-imports the caller's ``__main__``).
    """
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="synth7t-n4-") as tmp:
        paths = [str(Path(tmp) / "in.nii"), str(Path(tmp) / "out.nii"), ""]
        # the same float32 values n4_correct reads (get_fdata); only the affine matters to it
        nib.save(nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine), paths[0])
        if mask is not None:
            paths[2] = str(Path(tmp) / "mask.nii")
            nib.save(nib.Nifti1Image((mask.get_fdata() > 0).astype(np.uint8), mask.affine),
                     paths[2])
        code = ("import sys; from synth7t.preprocess import _n4_child; "
                "_n4_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))")
        # ITK may read the variable before n4_correct sets it (at import): the child starts
        # with it (the App sets 1 for the whole run, see bids_app.workflow)
        env = {**os.environ, THREADS_ENV: str(int(threads))}
        done = subprocess.run([sys.executable, "-c", code, *paths, str(int(threads))],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise RuntimeError(f"N4 bias-field correction failed: {tail[0]}")
        out = nib.load(paths[1])
        return _on_grid(np.asanyarray(out.dataobj, dtype=np.float32), img)


def _n4_child(in_path: str, out_path: str, mask_path: str, threads: int) -> None:
    """Body of :func:`n4_correct_isolated`'s child process."""
    img = nib.load(in_path)
    mask = nib.load(mask_path) if mask_path else None
    out = n4_correct(img, mask=mask, threads=threads)
    nib.save(nib.Nifti1Image(np.asanyarray(out.dataobj, dtype=np.float32), out.affine),
             out_path)


def detect_skull_stripped(img: nib.Nifti1Image) -> bool:
    """Guess whether an image is already brain-extracted.

    Brain-only images have a large exact-zero background and a small non-zero volume; whole-head
    scans have noisy (non-zero) air or, if the background was zeroed, a head volume of 3-5 L.

    Returns
    -------
    bool
        True when at least 30 % of the voxels are exactly 0 and the non-zero volume is below
        2.3 L.
    """
    data = np.asarray(img.get_fdata(dtype=np.float32))
    nonzero = np.isfinite(data) & (data != 0)
    zero_fraction = 1.0 - nonzero.mean()
    voxel_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    volume_ml = float(nonzero.sum()) * voxel_ml
    return zero_fraction >= SKULL_STRIPPED_MIN_ZERO_FRACTION and volume_ml < SKULL_STRIPPED_MAX_ML


def skull_strip(img: nib.Nifti1Image, *, threads: int = 1,
                seed: int = 0) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Template-based brain extraction (offline).

    The shipped Colin27 whole head is registered to the subject at 2 mm (affine, then SyN) and
    the Colin27 brain mask (1 mm) is warped onto the subject's native grid, thresholded at 0.5,
    reduced to its largest component and hole-filled. An image that
    :func:`detect_skull_stripped` recognises as brain-only is not registered: its mask is the
    cleaned non-zero region.

    Parameters
    ----------
    img
        3D T1w (ideally N4-corrected), whole head or brain-only.
    threads, seed
        ITK threads and antsRegistration random seed.

    Returns
    -------
    brain : nibabel.Nifti1Image
        float32, ``img`` with 0 outside the mask.
    mask : nibabel.Nifti1Image
        uint8 0/1 on ``img``'s grid.
    """
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if detect_skull_stripped(img):
        mask = _clean_mask(np.isfinite(data) & (data != 0))
    else:
        mask = _template_brain_mask(img, data, threads=threads, seed=seed)
    brain = np.where(mask, data, np.float32(0))
    return _on_grid(brain, img), _on_grid(mask, img, np.uint8)


def _template_brain_mask(img: nib.Nifti1Image, data: np.ndarray, *, threads: int,
                         seed: int) -> np.ndarray:
    """Colin27 brain mask warped onto ``img``'s grid (Colin27 head -> subject, affine + SyN)."""
    with _ants_session(threads, seed), tempfile.TemporaryDirectory(prefix="synth7t-bet-") as tmp:
        ants = _ants()
        subject = nib_to_ants(img, np.clip(data, 0, None))
        fixed = _resample_to_zoom(subject, REG_ZOOM)
        moving = nib_to_ants(nib.load(COLIN27_HEAD))
        reg = _registration(fixed, moving, "SyN", outprefix=str(Path(tmp) / "colin_"), seed=seed)
        colin_mask = nib_to_ants(nib.load(COLIN27_BRAIN_MASK))
        warped = ants.apply_transforms(fixed=subject, moving=colin_mask,
                                       transformlist=reg["fwdtransforms"],
                                       interpolator="linear", singleprecision=True)
        prob = warped.numpy()
    return _clean_mask(prob >= 0.5)


def register_rigid(moving_img: nib.Nifti1Image, fixed_img: nib.Nifti1Image, *,
                   out_prefix: str | os.PathLike, threads: int = 1, seed: int = 0) -> str:
    """Rigid within-subject registration (e.g. T2w/FLAIR -> T1w) at 2 mm, Mattes MI.

    Parameters
    ----------
    moving_img, fixed_img
        Images of the same subject (any contrasts, whole head or brain-only).
    out_prefix
        Path prefix for the transform file (its folder must exist).
    threads, seed
        ITK threads and antsRegistration random seed.

    Returns
    -------
    str
        ``<out_prefix>0GenericAffine.mat`` (ITK). In ANTs convention it resamples ``moving``
        onto ``fixed``; as the last element of ``transforms`` in :func:`to_reference` it chains
        e.g. T2w -> T1w -> reference, and with ``invert=[True, ...]`` first in
        :func:`to_native` it goes back.
    """
    with _ants_session(threads, seed):
        fixed = _resample_to_zoom(nib_to_ants(fixed_img, _positive(fixed_img)), REG_ZOOM)
        moving = _resample_to_zoom(nib_to_ants(moving_img, _positive(moving_img)), REG_ZOOM)
        reg = _registration(fixed, moving, "Rigid", outprefix=str(out_prefix), seed=seed)
    (path,) = [p for p in _as_list(reg["fwdtransforms"]) if p.endswith(".mat")]
    return path


def _positive(img: nib.Nifti1Image) -> np.ndarray:
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return np.clip(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), 0, None)


def register_to_reference(brain_img: nib.Nifti1Image, mask_img: nib.Nifti1Image | None, *,
                          out_prefix: str | os.PathLike, threads: int = 1, seed: int = 0,
                          nonlinear: bool = False) -> dict[str, str]:
    """Register a T1w brain to the shipped MRIxFields template brain at 2 mm.

    Rigid, then affine (Mattes MI, centre-of-mass initialisation); with ``nonlinear=True`` a
    SyN stage follows (40x20x0 iterations at 8/4/2 mm). Transforms are written as ITK composite
    HDF5 files (~12 kB affine, ~9 MB with SyN).

    Parameters
    ----------
    brain_img
        Brain-extracted T1w in native space.
    mask_img
        Its brain mask (voxels outside are zeroed before registration), or None.
    out_prefix
        Path prefix; writes ``<out_prefix>Composite.h5`` and ``<out_prefix>InverseComposite.h5``.
    threads, seed
        ITK threads and antsRegistration random seed.
    nonlinear
        Add a SyN stage (slower; the default affine keeps the anatomy's shape).

    Returns
    -------
    dict
        ``forward``: native -> reference (use with :func:`to_reference`);
        ``inverse``: reference -> native (use with :func:`to_native`).
    """
    data = _positive(brain_img)
    if mask_img is not None:
        data = np.where(np.asarray(mask_img.get_fdata()) > 0, data, np.float32(0))

    prefix = str(out_prefix)
    with _ants_session(threads, seed), tempfile.TemporaryDirectory(prefix="synth7t-reg-") as tmp:
        moving = _resample_to_zoom(nib_to_ants(brain_img, data), REG_ZOOM)
        fixed = nib_to_ants(nib.load(template_path(2)))
        # One stage per call, each initialised with the previous result: antsRegistration folds
        # the initial transform into the composite it writes, so the last composite is the
        # whole chain. Intermediate files stay in ``tmp``.
        stages = ["Rigid", "Affine"] + (["SyNOnly"] if nonlinear else [])
        init = None
        for i, kind in enumerate(stages):
            last = i == len(stages) - 1
            # the rigid stage only starts the affine one, which runs the whole pyramid again:
            # its two coarse levels suffice (sub-01: 12.9 -> 6.8 s for the pair of stages, the
            # final transform within 0.48 mm, mean 0.32 mm, of the full rigid's over the brain)
            extra = {"aff_iterations": RIGID_INIT_ITERATIONS} if kind == "Rigid" else {}
            reg = _registration(fixed, moving, kind, outprefix=prefix if last else f"{tmp}/s{i}_",
                                seed=seed, initial_transform=init,
                                write_composite_transform=i > 0, **extra)
            init = reg["fwdtransforms"]
    fwd, inv = reg["fwdtransforms"], reg["invtransforms"]
    for path in (fwd, inv):
        if not Path(path).is_file():
            raise RuntimeError(f"{path}: antsRegistration did not write the transform")
    return {"forward": fwd, "inverse": inv}


def to_reference(img: nib.Nifti1Image, transforms: str | Sequence[str], *,
                 interpolation: str = "linear", invert: Sequence[bool] | None = None,
                 threads: int | None = None) -> nib.Nifti1Image:
    """Resample a native-space image onto the 0.5 mm reference grid.

    Parameters
    ----------
    img
        Native image (any resolution; full resolution is intended).
    transforms
        ITK transforms in ANTs order: the last one is applied to the image first, e.g.
        ``[forward_h5]`` for the T1w or ``[forward_h5, t2w_to_t1w_mat]`` for a T2w.
    interpolation
        ``linear`` (default), ``nearest``, ``bspline``, ``lanczos``, ``label``...
    invert
        Per-transform flags to use the inverse of a linear (``.mat``) transform.
    threads
        ITK threads, or None to leave the process setting alone.

    Returns
    -------
    nibabel.Nifti1Image
        float32 on ``REF_SHAPE`` with exactly ``REF_AFFINE`` (qform/sform code 4, MNI).
    """
    ref = _ref_like()
    return _apply(img, ref, _as_list(transforms), interpolation, invert, threads)


#: Coarse step (reference voxels) of :func:`reference_box`'s first look: 2 mm on the 0.5 mm grid.
BOX_STEP = 4


def reference_box(img: nib.Nifti1Image, transforms: str | Sequence[str], *, above: float,
                  margin: int = 1, invert: Sequence[bool] | None = None
                  ) -> tuple[slice, slice, slice] | None:
    """The part of the reference grid where ``img`` (native, resampled linearly) can exceed
    ``above``: found on a grid :data:`BOX_STEP` times coarser (1/64 of the voxels, ~0.1 s)
    and widened by ``margin`` coarse voxels. None when nothing exceeds it.

    For a quantity that changes by at most ~1 per mm (a signed distance map), ``above`` set a
    few mm below the level of interest makes the box hold every fine voxel above that level:
    a fine voxel is at most ``BOX_STEP * sqrt(3) / 2`` voxels (1.7 mm) from a coarse one.
    """
    step = BOX_STEP
    shape = tuple(-(-n // step) for n in REF_SHAPE)
    affine = REF_AFFINE @ np.diag([step, step, step, 1.0])
    coarse = _ref_like(shape, affine)
    # outside the native field of view counts as below the level, whatever ``above`` is
    data = np.asanyarray(_apply(img, coarse, _as_list(transforms), "linear", invert,
                                None, default=above - 1.0).dataobj)
    hit = data > above
    if not hit.any():
        return None
    box = []
    for ax in range(3):
        idx = np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != ax)))
        lo = max((int(idx[0]) - margin) * step, 0)
        hi = min((int(idx[-1]) + margin) * step + 1, REF_SHAPE[ax])
        box.append(slice(lo, hi))
    return tuple(box)


def to_reference_box(img: nib.Nifti1Image, transforms: str | Sequence[str],
                     box: tuple[slice, slice, slice], *, interpolation: str = "linear",
                     invert: Sequence[bool] | None = None) -> np.ndarray:
    """:func:`to_reference` computed only inside ``box`` of the reference grid (0 elsewhere),
    as a float32 array of ``REF_SHAPE``: the voxels inside hold the values the whole grid
    would, to float rounding (the same physical points; only the grid's origin moves by whole
    voxels)."""
    start = np.array([b.start for b in box], dtype=float)
    affine = REF_AFFINE.copy()
    affine[:3, 3] = REF_AFFINE[:3, :3] @ start + REF_AFFINE[:3, 3]
    shape = tuple(b.stop - b.start for b in box)
    sub = _ref_like(shape, affine)
    out = np.zeros(REF_SHAPE, dtype=np.float32)
    out[box] = np.asanyarray(_apply(img, sub, _as_list(transforms), interpolation, invert,
                                    None).dataobj, dtype=np.float32)
    return out


def to_native(ref_img: nib.Nifti1Image, native_img: nib.Nifti1Image,
              inverse_transforms: str | Sequence[str], *, interpolation: str = "linear",
              invert: Sequence[bool] | None = None,
              threads: int | None = None) -> nib.Nifti1Image:
    """Resample a reference-space image back onto a native grid.

    Parameters
    ----------
    ref_img
        Image on the reference grid (or any grid in reference space).
    native_img
        Defines the output grid (shape, affine, xform codes); its data are not read.
    inverse_transforms
        Reference -> native transforms in ANTs order, e.g. ``[inverse_h5]`` for the T1w or
        ``[t2w_to_t1w_mat, inverse_h5]`` with ``invert=[True, False]`` for a T2w.
    interpolation, invert, threads
        As in :func:`to_reference`.

    Returns
    -------
    nibabel.Nifti1Image
        float32 with ``native_img``'s shape, affine and xform codes.
    """
    return _apply(ref_img, native_img, _as_list(inverse_transforms), interpolation, invert,
                  threads)


def _apply(moving: nib.Nifti1Image, target: nib.Nifti1Image, tlist: list[str],
           interpolation: str, invert: Sequence[bool] | None,
           threads: int | None, default: float = 0.0) -> nib.Nifti1Image:
    """``ants.apply_transforms`` of ``moving`` onto ``target``'s grid, back to nibabel
    (``default``: the value of target voxels outside ``moving``'s field of view)."""
    interp = _interpolator(interpolation)
    if invert is not None and len(invert) != len(tlist):
        raise ValueError(f"invert has {len(invert)} flags for {len(tlist)} transforms")
    for t in tlist:
        if not Path(t).is_file():
            raise FileNotFoundError(f"{t}: transform file not found")
    session = _ants_session(threads, None) if threads else _nullcontext()
    with session:
        out = _ants().apply_transforms(
            fixed=_empty_grid(target), moving=nib_to_ants(moving), transformlist=tlist,
            interpolator=interp, whichtoinvert=list(invert) if invert is not None else None,
            singleprecision=True, defaultvalue=float(default))
        return ants_to_nib(out, like=target)
