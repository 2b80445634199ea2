"""Quality indicators of one participant's outputs, measured once at the participant level.

They go into the run record (``logs/sub-<label>/run-<uuid>.json``, ``inputs[i]["qc"]``) so that
the ``group`` level only reads them. All are cheap (about a second per input, on native-grid
images and a 1 mm view of the reference-space mask) and never fatal: a value that cannot be
measured is left out and the reason is logged.

``BrainVolumeML``
    Volume of the native brain mask of the session's anatomical reference (T1w when present),
    in millilitres (voxel count x voxel volume).
``RegistrationDice``
    Dice between the brain mask in the 7T reference space (``space-MRIxFields_desc-brain_mask``)
    and the reference template's brain mask (``tpl-MRIxFields_res-1_desc-brain_mask``), on the
    template's 1 mm grid. Low values mean a poor registration (or an unusual brain).
``NoiseReduction``
    ``1 - noise(synthetic 7T) / noise(input)`` where ``noise`` is the median, over the eroded
    brain mask, of the standard deviation in 3 x 3 x 3 neighbourhoods, divided by the median
    intensity in the mask (both native, the input being the conformed, bias-corrected image).
    Positive: the synthetic image is locally smoother than its input.
``TissueAgreementDice``
    Mean Dice over CSF/GM/WM between 3-class intensity k-means segmentations of the synthetic
    image and of its input, inside the brain mask (``synth7t.metrics.tissue_dice``): does the
    synthetic image keep the tissue layout of the input?
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger("synth7t")

QC_DESCRIPTIONS = {
    "BrainVolumeML": ("Volume of the native brain mask of the session's anatomical reference "
                      "(T1w when present)", "mL"),
    "RegistrationDice": ("Dice of the reference-space brain mask with the MRIxFields template "
                         "brain mask (1 mm grid); registration quality", "1"),
    "NoiseReduction": ("1 - local noise of the synthetic image / local noise of the input "
                       "(median 3x3x3 standard deviation in the eroded brain mask over the "
                       "median intensity); positive = smoother", "1"),
    "TissueAgreementDice": ("Mean CSF/GM/WM Dice between k-means segmentations of the "
                            "synthetic image and of its input inside the brain mask", "1"),
}


def _load(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    return img, np.asanyarray(img.dataobj)


def brain_volume_ml(mask_path: Path) -> float:
    img, data = _load(mask_path)
    voxel = float(np.prod(img.header.get_zooms()[:3]))
    return float(np.count_nonzero(data > 0) * voxel / 1000.0)


def template_mask_path() -> Path:
    from synth7t.reference import REF_SPACE, TEMPLATEFLOW_HOME

    return (Path(TEMPLATEFLOW_HOME) / f"tpl-{REF_SPACE}"
            / f"tpl-{REF_SPACE}_res-1_desc-brain_mask.nii.gz")


def registration_dice(ref_mask_path: Path, template_mask: Path | None = None) -> float:
    """Dice of a reference-space mask with the template mask, on the template's grid."""
    from scipy import ndimage

    from synth7t.metrics import dice

    t_img, t_data = _load(template_mask or template_mask_path())
    m_img, m_data = _load(ref_mask_path)
    # template voxel -> mask voxel
    vox = np.linalg.inv(m_img.affine) @ t_img.affine
    step = np.diag(vox)[:3]
    offdiag = vox[:3, :3] - np.diag(step)
    if np.allclose(offdiag, 0) and np.allclose(step, np.round(step)) and \
            np.allclose(vox[:3, 3], np.round(vox[:3, 3])) and np.all(step > 0):
        s = [int(round(v)) for v in step]
        o = [int(round(v)) for v in vox[:3, 3]]
        view = m_data[o[0]::s[0], o[1]::s[1], o[2]::s[2]][:t_data.shape[0], :t_data.shape[1],
                                                         :t_data.shape[2]]
        if view.shape == t_data.shape:
            return dice(view > 0, t_data > 0)
    res = ndimage.affine_transform((m_data > 0).astype(np.uint8), vox, output_shape=t_data.shape,
                                   order=0)
    return dice(res > 0, t_data > 0)


def local_noise(data: np.ndarray, mask: np.ndarray) -> float:
    """Median 3x3x3 standard deviation in the eroded mask over the median intensity in it."""
    from scipy import ndimage

    x = np.asarray(data, dtype=np.float32)
    inner = ndimage.binary_erosion(mask, iterations=2)
    if inner.sum() < 100:
        inner = mask
    m1 = ndimage.uniform_filter(x, 3)
    m2 = ndimage.uniform_filter(x * x, 3)
    sd = np.sqrt(np.clip(m2 - m1 * m1, 0, None))
    level = float(np.median(x[mask]))
    return float(np.median(sd[inner]) / level) if level > 0 else float("nan")


def input_qc(out_dir: Path, item: dict) -> dict:
    """Per-input indicators from its native preproc, native synthetic image and mask."""
    from synth7t.metrics import tissue_dice

    der = item.get("derivatives") or {}
    paths = {k: Path(out_dir) / v for k, v in der.items()}
    if not all(k in paths for k in ("preproc", "synth_native", "mask")):
        return {}
    _, inp = _load(paths["preproc"])
    _, syn = _load(paths["synth_native"])
    _, msk = _load(paths["mask"])
    mask = np.asarray(msk) > 0
    if inp.shape != syn.shape or inp.shape != mask.shape or not mask.any():
        return {}
    inp = np.asarray(inp, dtype=np.float32)
    syn = np.asarray(syn, dtype=np.float32)
    out = {}
    n_in, n_syn = local_noise(inp, mask), local_noise(syn, mask)
    if np.isfinite(n_in) and np.isfinite(n_syn) and n_in > 0:
        out["NoiseReduction"] = round(1.0 - n_syn / n_in, 4)
    contrast = item.get("contrast", "T1w")
    if contrast in ("T1w", "T2w", "FLAIR"):
        out["TissueAgreementDice"] = round(tissue_dice(syn, inp, mask,
                                                       contrast=contrast)["mean"], 4)
    return out


def session_qc(out_dir: Path, items: list[dict]) -> dict:
    """Session-level indicators from the anchor's native mask and the reference-space mask."""
    out = {}
    anchor = items[0]
    der = anchor.get("derivatives") or {}
    if der.get("mask"):
        out["BrainVolumeML"] = round(brain_volume_ml(Path(out_dir) / der["mask"]), 2)
    ref_mask = next(((i.get("derivatives") or {}).get("ref_mask") for i in items
                     if (i.get("derivatives") or {}).get("ref_mask")), None)
    if ref_mask:
        out["RegistrationDice"] = round(registration_dice(Path(out_dir) / ref_mask), 4)
    return out


def add_qc(out_dir: Path, info: dict) -> None:
    """Fill ``info["inputs"][i]["qc"]`` in place (session values repeated on each input)."""
    inputs = info.get("inputs") or []
    sessions: dict = {}
    for item in inputs:
        sessions.setdefault(item.get("session"), []).append(item)
    for session, items in sessions.items():
        try:
            common = session_qc(out_dir, items)
        except Exception as exc:  # noqa: BLE001 - QC must never cost the run
            LOGGER.warning("sub-%s%s: QC (brain volume, registration) failed: %s: %s",
                           info.get("participant"), f"_ses-{session}" if session else "",
                           type(exc).__name__, exc)
            common = {}
        for item in items:
            try:
                own = input_qc(out_dir, item)
            except Exception as exc:  # noqa: BLE001
                LOGGER.warning("sub-%s: QC of %s failed: %s: %s", info.get("participant"),
                               item.get("source"), type(exc).__name__, exc)
                own = {}
            if common or own:
                item["qc"] = {**common, **own}
