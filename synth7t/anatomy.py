"""Anatomy sources for the field-physics simulator: tissue fraction maps plus a texture map.

An :class:`Anatomy` holds, on one grid with a voxel-to-MNI-mm affine, the fraction (0..1) of
each tissue named in ``synth7t/data/physics.json`` (``CSF``, ``GM``, ``WM``, optionally the deep
nuclei ``caudate``/``putamen``/``thalamus``/``pallidum`` and the head tissues) and a relative
``texture`` map (within-tissue variation, 0 = tissue mean). Three sources:

* :func:`from_icbm152` - ICBM152 2009a sym GM/WM probability maps and T1 inside the nilearn
  wheel (the default training anatomy);
* :func:`from_labels` - a crisp label map such as the BrainWeb phantom in ``../shared/data``
  (that phantom is Colin27, reserved for validation: tests only, never training);
* :func:`from_t1w` - any T1w image, segmented with antspyx Atropos and registered (affine) to
  ICBM152, so users can simulate from their own scans.

:meth:`Anatomy.resample` brings the maps to the 0.5 mm reference grid or any box of it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from synth7t.reference import REF_AFFINE, REF_SHAPE

#: ``synth7t-train``'s (and ``python -m synth7t.ood``'s) default per-brain ranges of the
#: partial-volume sharpening and the CSF change (``synth7t.sources.RandomAnatomies``'
#: ``sharpness`` and ``csf_change``): the shipped models' training randomisation.
TRAINING_PV_SHARPNESS = (1.0, 3.0)
TRAINING_CSF_CHANGE = (-0.5, 1.5)

LOG = logging.getLogger(__name__)

Roi = tuple[slice, slice, slice]

#: ``lesion``: random pathology-like blobs added by training-time domain randomisation only.
BRAIN_TISSUES: tuple[str, ...] = ("CSF", "GM", "WM", "caudate", "putamen", "thalamus", "pallidum",
                                  "lesion")
HEAD_TISSUES: tuple[str, ...] = ("fat", "muscle", "skin", "skull", "connective")

#: BrainWeb crisp labels (see ../shared/data/README.md) -> simulator tissue. Glial matter (8) is
#: tiny and has no entry in the physics table, so it is rendered as WM.
BRAINWEB_LABELS: dict[int, str] = {1: "CSF", 2: "GM", 3: "WM", 4: "fat", 5: "muscle", 6: "skin",
                                   7: "skull", 8: "WM", 9: "connective"}

#: Deep nuclei as soft ellipsoids in MNI mm (centre of the right-hemisphere structure, mirrored
#: for the left; semi-axes x, y, z), approximate values for ICBM152 2009 sym. The tissue maps of
#: ICBM152 have no deep-nuclei labels; this gives the 7 T iron/T1 contrast a place to show.
#: ``takes`` lists which tissue fractions inside the ellipsoid become the nucleus: the pallidum
#: is classified as WM in the ICBM maps.
DEEP_NUCLEI: dict[str, dict] = {
    "caudate": {"centre": (13.0, 12.0, 10.0), "axes": (5.0, 11.0, 8.0), "takes": ("GM",)},
    "putamen": {"centre": (25.0, 2.0, 1.0), "axes": (5.5, 14.0, 9.0), "takes": ("GM",)},
    "pallidum": {"centre": (19.0, -3.0, -1.0), "axes": (3.5, 7.0, 4.5), "takes": ("GM", "WM")},
    "thalamus": {"centre": (11.0, -18.0, 7.0), "axes": (7.0, 11.0, 7.5), "takes": ("GM",)},
}


@dataclass
class Anatomy:
    """Tissue fractions and texture on one grid.

    Attributes
    ----------
    fractions
        Tissue name -> float32 array in [0, 1]; all arrays share ``shape``.
    texture
        float32 relative within-tissue variation (signal is multiplied by ``1 + gain*texture``).
    affine
        Voxel -> world (MNI mm, RAS) affine of the arrays.
    name
        Short description for provenance.
    """

    fractions: dict[str, np.ndarray]
    texture: np.ndarray
    affine: np.ndarray
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {a.shape for a in self.fractions.values()} | {self.texture.shape}
        if len(shapes) != 1:
            raise ValueError(f"anatomy maps differ in shape: {sorted(shapes)}")
        self.fractions = {k: np.ascontiguousarray(v, dtype=np.float32)
                          for k, v in self.fractions.items()}
        self.texture = np.ascontiguousarray(self.texture, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=float)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.texture.shape  # type: ignore[return-value]

    @property
    def tissues(self) -> tuple[str, ...]:
        return tuple(self.fractions)

    def brain_fraction(self) -> np.ndarray:
        """Sum of the brain-tissue fractions (the skull-stripping mask is this > 0.5)."""
        out = np.zeros(self.shape, np.float32)
        for t in BRAIN_TISSUES:
            if t in self.fractions:
                out += self.fractions[t]
        return out

    def resample(self, roi: Roi | None = None, *, order: int = 1) -> dict[str, np.ndarray]:
        """Fractions, texture and brain mask on the 0.5 mm reference grid (or a box of it).

        Parameters
        ----------
        roi
            Three slices into ``REF_SHAPE`` (step 1); ``None`` for the whole grid.
        order
            Spline order of the interpolation.

        Returns
        -------
        dict
            Tissue name -> float32 array, plus ``"texture"`` and ``"mask"`` (bool).
        """
        lo, hi = roi_bounds(roi)
        vox = ref_to_anatomy_voxels(self.affine, lo, hi)
        out = {k: ndi.map_coordinates(v, vox, order=order, cval=0.0, prefilter=order > 1)
               for k, v in self.fractions.items()}
        out["texture"] = ndi.map_coordinates(self.texture, vox, order=order, cval=0.0,
                                             prefilter=order > 1)
        out["mask"] = sum(out[t] for t in BRAIN_TISSUES if t in out) > 0.5
        return out


# --- grid helpers -----------------------------------------------------------------------------

def roi_bounds(roi: Roi | None, shape: Sequence[int] = REF_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` voxel bounds (hi exclusive) of an ROI of the reference grid.

    Raises
    ------
    ValueError
        If ``roi`` is not three step-1 slices giving a non-empty box.
    """
    if roi is None:
        return np.zeros(3, int), np.asarray(shape, int)
    if len(roi) != 3 or not all(isinstance(s, slice) for s in roi):
        raise ValueError(f"roi must be a tuple of 3 slices, got {roi!r}")
    lo, hi = [], []
    for s, n in zip(roi, shape):
        start, stop, step = s.indices(n)
        if step != 1 or stop <= start:
            raise ValueError(f"roi slices must have step 1 and be non-empty, got {roi!r}")
        lo.append(start)
        hi.append(stop)
    return np.asarray(lo), np.asarray(hi)


def ref_to_anatomy_voxels(anat_affine: np.ndarray, lo: Sequence[int],
                          hi: Sequence[int]) -> np.ndarray:
    """Anatomy voxel coordinates ``(3, *box)`` of the reference-grid box ``[lo, hi)``."""
    m = np.linalg.inv(anat_affine) @ REF_AFFINE
    axes = [np.arange(a, b, dtype=float) for a, b in zip(lo, hi)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.einsum("ij,j...->i...", m[:3, :3], np.stack(grid)) + m[:3, 3, None, None, None]


def _world_grid(affine: np.ndarray, shape: Sequence[int]) -> list[np.ndarray]:
    """World coordinates (x, y, z arrays) of every voxel centre of an axis-aligned grid."""
    ijk = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    return [affine[r, 0] * ijk[0] + affine[r, 1] * ijk[1] + affine[r, 2] * ijk[2] + affine[r, 3]
            for r in range(3)]


# --- deep nuclei ---------------------------------------------------------------------------------

def add_deep_nuclei(anat: Anatomy, nuclei: Mapping[str, dict] = DEEP_NUCLEI) -> Anatomy:
    """Split GM (and for the pallidum WM) inside soft MNI ellipsoids into deep-nuclei fractions.

    Fractions still sum to what they summed to before; only the tissue assignment changes.
    """
    inv = np.linalg.inv(anat.affine)
    weights: dict[str, np.ndarray] = {}
    for name, spec in nuclei.items():
        w = np.zeros(anat.shape, np.float32)
        centre, axes = np.asarray(spec["centre"], float), np.asarray(spec["axes"], float)
        for sx in (1.0, -1.0):
            c = centre * np.array([sx, 1.0, 1.0])
            # evaluate only in the voxel box around the ellipsoid (1.5 semi-axes is ~0 weight)
            corners = np.array([[c[0] + i * 1.5 * axes[0], c[1] + j * 1.5 * axes[1],
                                 c[2] + k * 1.5 * axes[2], 1.0]
                                for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
            vox = (inv @ corners.T)[:3]
            lo = np.clip(np.floor(vox.min(axis=1)).astype(int), 0, None)
            hi = np.minimum(np.ceil(vox.max(axis=1)).astype(int) + 1, anat.shape)
            if np.any(hi <= lo):
                continue
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            sub_aff = anat.affine.copy()
            sub_aff[:3, 3] = (anat.affine @ np.array([*lo, 1.0]))[:3]
            x, y, z = _world_grid(sub_aff, hi - lo)
            r = np.sqrt(((x - c[0]) / axes[0]) ** 2 + ((y - c[1]) / axes[1]) ** 2
                        + ((z - c[2]) / axes[2]) ** 2)
            # logistic edge about 1 mm wide so nuclei have partial-volume borders
            w[box] = np.maximum(w[box], 1.0 / (1.0 + np.exp((r - 1.0) / 0.08)))
        weights[name] = w
    total = sum(weights.values())
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    fractions = dict(anat.fractions)
    for name, spec in nuclei.items():
        w = weights[name] * scale
        frac = np.zeros(anat.shape, np.float32)
        for t in spec["takes"]:
            if t in fractions:
                part = w * anat.fractions[t]
                frac += part
                fractions[t] = fractions[t] - part
        fractions[name] = frac
    return replace(anat, fractions=fractions, name=anat.name + "+deep_nuclei")


# --- texture -------------------------------------------------------------------------------------

def texture_from_image(image: np.ndarray, fractions: Mapping[str, np.ndarray], mask: np.ndarray,
                       *, smooth_vox: float = 0.5, reference: str = "WM") -> np.ndarray:
    """Relative residual of an image after removing per-tissue means (least squares).

    ``image ~ sum_k f_k mu_k``; the texture is ``(image - fit) / mu_reference`` inside ``mask``,
    lightly smoothed so that acquisition noise of the source image is not carried over.
    """
    names = list(fractions)
    sel = mask > 0
    design = np.stack([fractions[k][sel] for k in names], axis=1).astype(float)
    mu, *_ = np.linalg.lstsq(design, image[sel].astype(float), rcond=None)
    fit = np.zeros(image.shape, np.float32)
    for k, m in zip(names, mu):
        fit += np.float32(m) * fractions[k]
    ref = float(mu[names.index(reference)]) if reference in names else float(image[sel].mean())
    tex = np.where(sel, (image - fit) / max(ref, 1e-6), 0.0).astype(np.float32)
    if smooth_vox > 0:
        tex = ndi.gaussian_filter(tex, smooth_vox)
    return tex.astype(np.float32)


def random_texture(shape: Sequence[int], *, seed: int = 0, sigma_vox: float = 1.5,
                   std: float = 0.03) -> np.ndarray:
    """Fixed smooth Gaussian random texture (for sources with no intensity image)."""
    rng = np.random.default_rng(seed)
    tex = ndi.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32), sigma_vox)
    return (tex * (std / max(float(tex.std()), 1e-9))).astype(np.float32)


# --- sources ---------------------------------------------------------------------------------------

def icbm152_paths() -> dict[str, Path]:
    """Paths of the ICBM152 2009a sym T1/GM/WM 1 mm maps inside the nilearn wheel."""
    import nilearn

    base = Path(nilearn.__file__).parent / "datasets" / "data"
    paths = {k: base / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz"
             for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"ICBM152 maps not found in the nilearn wheel: {missing}")
    return paths


def from_icbm152(*, deep_nuclei: bool = True, mask_threshold: float = 0.02) -> Anatomy:
    """ICBM152 2009a sym anatomy (1 mm) from the nilearn wheel.

    No CSF map ships, so CSF = brain mask - GM - WM, with the brain mask = T1 above
    ``mask_threshold`` of its maximum, holes filled and edges softened by half a voxel (so the
    brain surface has partial volume). Texture = residual of the T1 after the per-tissue means.
    """
    paths = icbm152_paths()
    imgs = {k: nib.load(p) for k, p in paths.items()}
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    hard = ndi.binary_fill_holes(t1 > mask_threshold * float(t1.max()))
    soft = np.clip(ndi.gaussian_filter(hard.astype(np.float32), 0.5), 0, 1)
    parenchyma = np.clip(gm + wm, 0, 1)
    scale = np.where(gm + wm > 1, 1.0 / np.maximum(gm + wm, 1e-6), 1.0)
    gm, wm = (gm * scale * soft).astype(np.float32), (wm * scale * soft).astype(np.float32)
    csf = np.clip(soft - gm - wm, 0, 1).astype(np.float32)
    fractions = {"CSF": csf, "GM": gm, "WM": wm}
    tex = texture_from_image(t1, fractions, hard & (parenchyma > 0.05))
    anat = Anatomy(fractions, tex, imgs["t1"].affine, name="ICBM152-2009a-sym",
                   meta={"source": str(paths["t1"].parent)})
    return add_deep_nuclei(anat) if deep_nuclei else anat


def from_labels(path: str | Path, *, labels: Mapping[int, str] = BRAINWEB_LABELS,
                deep_nuclei: bool = True, texture_seed: int = 0) -> Anatomy:
    """Anatomy from a crisp label map (default: BrainWeb labels).

    Partial volume comes from interpolating the one-hot maps onto the 0.5 mm grid. There is no
    intensity image, so the texture is a fixed smooth random field (``texture_seed``).
    The image is reoriented to RAS with nibabel so the affine is axis-aligned.
    """
    img = nib.as_closest_canonical(nib.load(str(path)))
    lab = np.asarray(img.dataobj).astype(np.int32)
    fractions: dict[str, np.ndarray] = {}
    for value, tissue in labels.items():
        sel = lab == value
        if sel.any():
            fractions[tissue] = fractions.get(tissue, np.zeros(lab.shape, np.float32)) + sel
    if not any(t in fractions for t in BRAIN_TISSUES):
        raise ValueError(f"{path}: no brain labels ({labels}) found")
    anat = Anatomy(fractions, random_texture(lab.shape, seed=texture_seed), img.affine,
                   name=f"labels:{Path(path).name}", meta={"source": str(path)})
    return add_deep_nuclei(anat) if deep_nuclei else anat


def from_t1w(path: str | Path, *, mask: str | Path | None = None, register: bool = True,
             n4: bool = True, deep_nuclei: bool = True, seed: int = 0) -> Anatomy:
    """Anatomy from a T1w image: Atropos (k-means init, MRF) CSF/GM/WM inside a brain mask.

    Parameters
    ----------
    path
        T1w NIfTI. Should be skull-stripped unless ``mask`` is given (a threshold mask of a
        whole-head image would include the scalp).
    mask
        Optional brain mask NIfTI on the same grid.
    register
        Affine-register the T1w to ICBM152 (2 mm) and resample the maps to the ICBM 1 mm grid;
        set False if the image is already in MNI space.
    n4
        N4 bias correction (shrink 4) before segmentation.
    seed
        ANTs random seed (for reproducible Atropos/registration).
    """
    import os

    import ants

    os.environ.setdefault("ANTS_RANDOM_SEED", str(seed))
    img = ants.image_read(str(path))
    msk = ants.image_read(str(mask)) if mask is not None else ants.get_mask(img)
    msk = ants.threshold_image(msk, 0.5, 1e9)
    if n4:
        img = ants.n4_bias_field_correction(img, mask=msk, shrink_factor=4)
    seg = ants.atropos(a=img, x=msk, i="kmeans[3]", m="[0.2,1x1x1]", c="[3,0]")
    # Atropos k-means classes are ordered by mean intensity: CSF < GM < WM on a T1w
    probs = dict(zip(("CSF", "GM", "WM"), seg["probabilityimages"]))
    t1 = img * msk
    if register:
        fixed = ants.image_read(str(icbm152_paths()["t1"]))
        fixed2 = ants.resample_image(fixed, (2, 2, 2), False, 0)
        moving2 = ants.resample_image(t1, (2, 2, 2), False, 0)
        from .preprocess import ants_register

        reg = ants_register(fixed2, moving2, "Affine", seed=seed)
        xfm = reg["fwdtransforms"]

        def warp(im: "ants.ANTsImage") -> np.ndarray:
            return ants.apply_transforms(fixed, im, xfm, interpolator="linear").numpy()

        affine = nib.load(str(icbm152_paths()["t1"])).affine
    else:
        def warp(im: "ants.ANTsImage") -> np.ndarray:
            return im.numpy()

        affine = nib.load(str(path)).affine
    fractions = {k: np.clip(warp(v * msk), 0, 1).astype(np.float32) for k, v in probs.items()}
    t1_arr = warp(t1).astype(np.float32)
    brain = sum(fractions.values()) > 0.5
    tex = texture_from_image(t1_arr, fractions, brain)
    anat = Anatomy(fractions, tex, affine, name=f"t1w:{Path(path).name}",
                   meta={"source": str(path), "registered": register})
    return add_deep_nuclei(anat) if deep_nuclei else anat


# --- storage ---------------------------------------------------------------------------------------

def save_anatomy(anat: Anatomy, path: str | Path) -> Path:
    """Write an anatomy as one compressed ``.npz`` (fractions as float16 to keep it small)."""
    path = Path(path)
    arrays = {f"fraction_{k}": v.astype(np.float16) for k, v in anat.fractions.items()}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, texture=anat.texture.astype(np.float16), affine=anat.affine,
                        name=np.array(anat.name), **arrays)
    tmp.replace(path)
    return path


def load_anatomy(path: str | Path) -> Anatomy:
    """Read an anatomy written by :func:`save_anatomy`."""
    with np.load(str(path), allow_pickle=False) as z:
        fractions = {k[len("fraction_"):]: z[k].astype(np.float32)
                     for k in z.files if k.startswith("fraction_")}
        return Anatomy(fractions, z["texture"].astype(np.float32), z["affine"],
                       name=str(z["name"]), meta={"source": str(path)})
