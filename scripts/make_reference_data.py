#!/usr/bin/env python
"""Build the reference data shipped in ``synth7t/data/`` (reproducible, byte for byte).

Inputs (all offline)
--------------------
1. ICBM152 2009a nonlinear symmetric T1/GM/WM maps (1 mm, 197x233x189, brain-only, uint8) from
   inside the ``nilearn`` wheel (tested with nilearn 0.14.1):
   ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``.
2. Colin27 ``ch2.nii.gz`` (whole head) and ``ch2bet.nii.gz`` (brain) plus the package copyright
   file, from the Debian package ``mricron-data`` (1.2.20211006+dfsg-4)::

       apt-get download mricron-data && dpkg -x mricron-data_*.deb /tmp/mricron

   i.e. ``/tmp/mricron/usr/share/mricron/templates/ch2{,bet}.nii.gz`` and
   ``/tmp/mricron/usr/share/doc/mricron-data/copyright`` (``--mricron-root`` changes the root).

Outputs
-------
``synth7t/data/templateflow/tpl-MRIxFields/`` (TemplateFlow layout, custom template id)
    ``tpl-MRIxFields_res-{1,2}_T1w.nii.gz`` (ICBM152 2009a T1, brain-only, uint8) and
    ``tpl-MRIxFields_res-{1,2}_desc-brain_mask.nii.gz`` on the FSL MNI152 boxes (1 mm:
    182x218x182, 2 mm: 91x109x91, LAS, origin (90, -126, -72)), ``template_description.json``
    (also describes ``res-05``, the 0.5 mm 364x436x364 grid, which is never stored) and ``NOTICE``.
``synth7t/data/colin27/``
    ``colin27_res-2_T1w.nii.gz`` (whole head, 2 mm, uint8), ``colin27_res-1_desc-brain_mask.nii.gz``
    and ``colin27_res-2_desc-brain_mask.nii.gz``, ``copyright`` (verbatim Debian copyright file),
    ``NOTICE``.

Gzip streams are written with mtime 0 so that reruns give identical bytes; ``SHA256SUMS`` in each
folder lists the results.

Usage::

    python scripts/make_reference_data.py [--mricron-root /tmp/mricron] [--out synth7t/data]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
NILEARN_DATA = Path(nilearn.__file__).parent / "datasets" / "data"
ICBM = {t: NILEARN_DATA / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz"
        for t in ("t1", "gm", "wm")}

# FSL MNI152 boxes (LAS). The 0.5 mm one is synth7t.reference.REF_AFFINE / REF_SHAPE.
BOXES = {
    "1": ((182, 218, 182), 1.0),
    "2": ((91, 109, 91), 2.0),
    "05": ((364, 436, 364), 0.5),
}
BOX_ORIGIN = (90.0, -126.0, -72.0)


def box_affine(zoom: float) -> np.ndarray:
    """FSL MNI152 sform at ``zoom`` mm (x flipped: LAS voxel order)."""
    aff = np.diag([-zoom, zoom, zoom, 1.0])
    aff[:3, 3] = BOX_ORIGIN
    return aff


def _smooth_for(zoom_in: float, zoom_out: float, data: np.ndarray) -> np.ndarray:
    """Gaussian anti-aliasing before downsampling (FWHM grows from zoom_in to zoom_out)."""
    if zoom_out <= zoom_in:
        return data
    fwhm_vox = np.sqrt(zoom_out**2 - zoom_in**2) / zoom_in
    return ndi.gaussian_filter(data, sigma=fwhm_vox / np.sqrt(8 * np.log(2)), mode="constant")


def resample(img: nib.Nifti1Image, shape: tuple[int, int, int], affine: np.ndarray,
             *, mask: bool = False) -> np.ndarray:
    """Resample ``img`` (linear, anti-aliased) onto (shape, affine); masks threshold at 0.5."""
    zoom_in = float(np.mean(img.header.get_zooms()[:3]))
    zoom_out = float(np.mean(np.linalg.norm(affine[:3, :3], axis=0)))
    data = _smooth_for(zoom_in, zoom_out, np.asarray(img.dataobj, dtype=np.float64))
    src = nib.Nifti1Image(data, img.affine)
    out = resample_from_to(src, (shape, affine), order=1, mode="constant", cval=0.0).get_fdata()
    return (out >= 0.5) if mask else out


def clean_mask(mask: np.ndarray, closing_radius: int = 2) -> np.ndarray:
    """Largest connected component, closed, holes filled."""
    lab, n = ndi.label(mask)
    if n > 1:
        mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    ball = ndi.generate_binary_structure(3, 1)
    ball = ndi.iterate_structure(ball, closing_radius)
    # Pad so closing does not eat voxels at the array border.
    pad = closing_radius + 1
    closed = ndi.binary_closing(np.pad(mask, pad), structure=ball)[pad:-pad, pad:-pad, pad:-pad]
    return ndi.binary_fill_holes(closed | mask)


def to_img(data: np.ndarray, affine: np.ndarray, dtype: type, code: int) -> nib.Nifti1Image:
    """NIfTI with qform = sform = ``affine`` and the given xform code."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_gz(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``.nii.gz`` with gzip mtime 0 (byte-reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def write_sums(folder: Path) -> None:
    """``SHA256SUMS`` for every other file in ``folder``."""
    lines = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != "SHA256SUMS":
            lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n")
    (folder / "SHA256SUMS").write_text("".join(lines))


def icbm_brain_mask(t1: nib.Nifti1Image, gm: nib.Nifti1Image, wm: nib.Nifti1Image) -> np.ndarray:
    """Brain mask on the native ICBM grid.

    nilearn's own mask is T1 > 0.2 (of max); adding GM+WM > 0.5 keeps dark deep grey matter, and
    hole filling closes the ventricles.
    """
    t = np.asarray(t1.dataobj, dtype=np.float64)
    tissue = (np.asarray(gm.dataobj, dtype=np.float64) + np.asarray(wm.dataobj, dtype=np.float64))
    return clean_mask((t > 0.2 * t.max()) | (tissue / 255.0 > 0.5))


def make_templateflow(out: Path) -> dict[str, str]:
    """Write ``tpl-MRIxFields``; returns file -> sha256."""
    tpl = out / "templateflow" / "tpl-MRIxFields"
    if tpl.exists():
        shutil.rmtree(tpl)
    tpl.mkdir(parents=True)
    t1, gm, wm = (nib.load(ICBM[k]) for k in ("t1", "gm", "wm"))
    mask_native = nib.Nifti1Image(icbm_brain_mask(t1, gm, wm).astype(np.float64), t1.affine)
    for res in ("1", "2"):
        shape, zoom = BOXES[res]
        aff = box_affine(zoom)
        t1_box = resample(t1, shape, aff)
        mask_box = resample(mask_native, shape, aff, mask=True)
        # The T1 is brain-only already; zero what lies outside the mask so both agree exactly.
        t1_box[~mask_box] = 0
        write_gz(to_img(t1_box, aff, np.uint8, 4), tpl / f"tpl-MRIxFields_res-{res}_T1w.nii.gz")
        write_gz(to_img(mask_box, aff, np.uint8, 4),
                 tpl / f"tpl-MRIxFields_res-{res}_desc-brain_mask.nii.gz")
    desc = {
        "Name": "MRIxFields reference space: ICBM152 2009a nonlinear symmetric on the FSL MNI152 "
                "box (182 x 218 x 182 mm)",
        "Identifier": "MRIxFields",
        "TemplateFlowVersion": "1.0.0",
        "BIDSVersion": "1.9.0",
        "Authors": ["synth7t developers (resampling)",
                    "Vladimir Fonov", "Alan C. Evans", "Robert C. McKinstry", "C. Robert Almli",
                    "D. Louis Collins (ICBM152 2009 template)"],
        "License": "See NOTICE: ICBM152 2009 copyright notice of the McConnell Brain Imaging "
                   "Centre (MNI, McGill University), which permits use, copying, modification "
                   "and distribution provided the notice appears in all copies.",
        "ReferencesAndLinks": [
            "https://doi.org/10.1016/j.neuroimage.2010.07.033",
            "https://doi.org/10.1016/S1053-8119(09)70884-5",
            "http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009",
        ],
        "Description": (
            "T1w is the ICBM152 2009a nonlinear symmetric T1 as shipped inside the nilearn wheel "
            f"(nilearn {nilearn.__version__}); it is brain-extracted (SkullStripped: true). It was "
            "resampled (Gaussian anti-aliasing + linear) onto the FSL MNI152 boxes; at 1 mm the "
            "grids are aligned, so the values are copied. desc-brain_mask: (T1 > 0.2 max) | "
            "(GM + WM > 0.5), largest component, closed, holes filled. res-05 is the synth7t/"
            "MRIxFields2026 0.5 mm grid (synth7t.reference.REF_SHAPE/REF_AFFINE): a shape and an "
            "affine only, never stored as a volume. Built by scripts/make_reference_data.py."),
        "SkullStripped": True,
        "res": {
            res: {"shape": list(shape), "zooms": [zoom] * 3, "origin": list(BOX_ORIGIN),
                  "affine": box_affine(zoom).tolist(), "stored": res != "05"}
            for res, (shape, zoom) in BOXES.items()
        },
    }
    (tpl / "template_description.json").write_text(json.dumps(desc, indent=2) + "\n")
    (tpl / "NOTICE").write_text(ICBM_NOTICE)
    write_sums(tpl)
    return {f.name: f.stat().st_size for f in tpl.iterdir()}


def make_colin27(out: Path, mricron_root: Path) -> dict[str, str]:
    """Write ``colin27/``; returns file -> size."""
    tdir = mricron_root / "usr" / "share" / "mricron" / "templates"
    col = out / "colin27"
    if col.exists():
        shutil.rmtree(col)
    col.mkdir(parents=True)
    head = nib.load(tdir / "ch2.nii.gz")
    brain = nib.load(tdir / "ch2bet.nii.gz")
    # ch2bet (BET output) has a few detached islands and an open interhemispheric fissure.
    mask1 = clean_mask(np.asarray(brain.dataobj) > 0)
    shape2 = tuple(int(np.ceil(s / 2)) for s in head.shape[:3])
    aff2 = head.affine.copy()
    aff2[:3, :3] *= 2
    write_gz(to_img(resample(head, shape2, aff2), aff2, np.uint8, 4),
             col / "colin27_res-2_T1w.nii.gz")
    write_gz(to_img(mask1, head.affine, np.uint8, 4), col / "colin27_res-1_desc-brain_mask.nii.gz")
    mask2 = resample(nib.Nifti1Image(mask1.astype(np.float64), head.affine), shape2, aff2, mask=True)
    write_gz(to_img(mask2, aff2, np.uint8, 4), col / "colin27_res-2_desc-brain_mask.nii.gz")
    shutil.copyfile(mricron_root / "usr" / "share" / "doc" / "mricron-data" / "copyright",
                    col / "copyright")
    (col / "NOTICE").write_text(COLIN_NOTICE)
    write_sums(col)
    return {f.name: f.stat().st_size for f in col.iterdir()}


ICBM_NOTICE = """\
tpl-MRIxFields: derived from the ICBM 2009a Nonlinear Symmetric template
=======================================================================

The T1w images and brain masks in this folder are resampled from the ICBM152 2009a nonlinear
symmetric T1, GM and WM maps that ship inside the nilearn wheel
(nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz; nilearn is BSD-3-Clause,
Copyright (c) The nilearn developers). The template itself is copyright of the McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University, and is distributed under the
MNI notice below, which must appear in all copies:

    Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
    Institute, McGill University. Permission to use, copy, modify, and distribute this software
    and its documentation for any purpose and without fee is hereby granted, provided that the
    above copyright notice appear in all copies. The authors and McGill University make no
    representations about the suitability of this software for any purpose. It is provided
    "as is" without express or implied warranty. The authors are not responsible for any data
    loss, equipment damage, property loss, or injury to subjects or patients resulting from the
    use or misuse of this software package.

References
----------
VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and BDCG. Unbiased average
age-appropriate atlases for pediatric studies. NeuroImage 54(1), 2011.
doi:10.1016/j.neuroimage.2010.07.033

VS Fonov, AC Evans, RC McKinstry, CR Almli and DL Collins. Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood. NeuroImage 47 Suppl 1, S102, 2009.
doi:10.1016/S1053-8119(09)70884-5

DL Collins, AP Zijdenbos, WFC Baare and AC Evans. ANIMAL+INSECT: Improved Cortical Structure
Segmentation. IPMI 1999.

Made by scripts/make_reference_data.py in the synth7t repository.
"""

COLIN_NOTICE = """\
Colin27 (MNI Colin 27 average brain) registration template
==========================================================

colin27_res-2_T1w.nii.gz (whole head, resampled to 2 mm) and colin27_res-*_desc-brain_mask.nii.gz
(binarised and cleaned) are derived from ch2.nii.gz and ch2bet.nii.gz of the Debian package
mricron-data 1.2.20211006+dfsg-4 (MRIcron by Chris Rorden). The Debian copyright file of that
package is reproduced verbatim in ./copyright (BSD-3-Clause for the package files).

The Colin27 images originate from the Montreal Neurological Institute:

    Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
    Institute, McGill University. Permission to use, copy, modify, and distribute this software
    and its documentation for any purpose and without fee is hereby granted, provided that the
    above copyright notice appear in all copies. The authors and McGill University make no
    representations about the suitability of this software for any purpose. It is provided
    "as is" without express or implied warranty.

Reference: CJ Holmes, R Hoge, L Collins, R Woods, AW Toga and AC Evans. Enhancement of MR images
using registration for signal averaging. J Comput Assist Tomogr 22(2):324-333, 1998.

synth7t uses Colin27 only as a registration template for brain extraction, never as training
anatomy for synthesis. Made by scripts/make_reference_data.py in the synth7t repository.
"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mricron-root", type=Path, default=Path("/tmp/mricron"),
                    help="folder where mricron-data_*.deb was extracted (dpkg -x)")
    ap.add_argument("--out", type=Path, default=REPO / "synth7t" / "data")
    args = ap.parse_args(argv)
    sizes = make_templateflow(args.out)
    sizes.update({f"colin27/{k}": v for k, v in make_colin27(args.out, args.mricron_root).items()})
    for name, size in sorted(sizes.items()):
        print(f"{size:>10,d}  {name}")
    print(f"{sum(sizes.values()):>10,d}  total bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
