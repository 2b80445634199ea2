"""Reportlets: the figures of the visual report that the graph draws as soon as their inputs
exist (sMRIPrep's ``seg_rpt`` / ``norm_rpt`` + ``ds_report_*`` pattern), and the figure helpers
:mod:`bids_app.report` shares with them.

Drawn as nodes, the brain-mask contour (after skull stripping) and the registration contour
(after the input reaches the reference grid) run beside registration and synthesis on a second
core instead of after the whole graph: ~10 s of a T1w-only run's serial tail, ~30 s of a
three-contrast one. The report then links the sunk PNGs instead of drawing them again.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec, traits

from synth7t.io import atomic_write_bytes

from .interfaces import MemoryReleasingInterface

LOGGER = logging.getLogger("synth7t")

#: Number of slices per mosaic row.
N_CUTS = 7
#: Raster resolution of the figures.
DPI = 100

#: The input/synthetic mosaics: (nilearn display axis, name in the figure's ``desc``).
MOSAICS = (("z", "axial"), ("y", "coronal"), ("x", "sagittal"))

#: Images finer than this (mm) are block-averaged 2x2x2 for display: a mosaic shows ~1 mm per
#: pixel anyway, and it makes a 0.5 mm report several times faster.
DISPLAY_MIN_ZOOM = 0.9


def _load3d(path: Path, *, mask: bool = False):
    """The image as float32, already halved once when its voxels are below the display size.

    The first halving runs on the stored integers and the scaling (slope, intercept) on the 8x
    smaller result: the same numbers (the block mean is linear), without scaling every voxel of
    a 0.5 mm volume first (~1 s each).
    """
    import nibabel as nb

    img = nb.load(str(path))
    if img.ndim > 3:
        img = img.slicer[..., 0]
    slope, inter = (img.dataobj.slope, img.dataobj.inter) if nb.is_proxy(img.dataobj) else (1, 0)
    if min(img.header.get_zooms()[:3]) < DISPLAY_MIN_ZOOM and min(img.shape[:3]) > 8:
        raw = img.dataobj.get_unscaled() if nb.is_proxy(img.dataobj) else img.dataobj
        half = _halve(nb.Nifti1Image(np.asanyarray(raw), img.affine), mask=False)
        data = np.asanyarray(half.dataobj) * np.float32(slope) + np.float32(inter)
        if mask:
            data = (data >= 0.5).astype(np.float32)
        return nb.Nifti1Image(data.astype(np.float32, copy=False), half.affine)
    return nb.Nifti1Image(np.asanyarray(img.dataobj, dtype=np.float32), img.affine)


def _halve(img, *, mask: bool):
    """2x2x2 block mean (a mask is re-binarised); the affine keeps world positions."""
    import nibabel as nb

    data = np.asanyarray(img.dataobj)
    sx, sy, sz = (d - d % 2 for d in data.shape)
    # pairwise sums along each axis, ~7x faster than a float32 mean over a 6-D reshape (0.08 s
    # vs 0.62 s on a 0.5 mm volume); exactly the same numbers on stored integers
    data = data[:sx:2].astype(np.float32) + data[1:sx:2]
    data = data[:, :sy:2] + data[:, 1:sy:2]
    data = data[:, :, :sz:2] + data[:, :, 1:sz:2]
    data *= np.float32(0.125)
    if mask:
        data = (data >= 0.5).astype(np.float32)
    scale = np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
    return nb.Nifti1Image(data, img.affine @ scale)


def _on_voxel_axes(img):
    """An oblique image shown on its own voxel axes (the closest RAS orientation, no
    interpolation), as MRIQC shows native data: the slices as acquired, and no resampling of a
    whole native volume for every figure (~2.5 s each on a 1 mm head). Images on the same grid
    (an image and its mask) get the same display affine, so overlays stay exact; the affine
    keeps the centre voxel's world position. Axis-aligned images are returned as they are."""
    import nibabel as nb

    lin = img.affine[:3, :3]
    if np.count_nonzero(np.abs(lin) > 1e-6 * np.abs(lin).max()) <= 3:
        return img
    img = nb.as_closest_canonical(img)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    centre = (np.asarray(img.shape[:3], dtype=float) - 1) / 2
    affine = np.diag(np.append(zooms, 1.0))
    affine[:3, 3] = img.affine[:3, :3] @ centre + img.affine[:3, 3] - zooms * centre
    return nb.Nifti1Image(np.asanyarray(img.dataobj), affine)


class _Images:
    """Loads each derivative once, at display resolution."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._img: dict = {}

    def get(self, path, *, mask: bool = False):
        key = (str(path), mask)
        if key not in self._img:
            from nilearn.image import reorder_img

            img = _load3d(Path(path), mask=mask)
            while min(img.header.get_zooms()[:3]) < DISPLAY_MIN_ZOOM and min(img.shape) > 8:
                img = _halve(img, mask=mask)
            img = _on_voxel_axes(img)
            # nilearn plots on an axis-aligned RAS grid and resamples an oblique image for every
            # row of every figure; doing it once here (linear; nearest for masks) saves ~8 s.
            self._img[key] = reorder_img(img, resample="nearest" if mask else "linear")
        return self._img[key]



def _cuts(mask_img) -> dict:
    """niworkflows' cut placement (``cuts_from_bbox``) over the mask's bounding box.

    ``cuts_from_bbox`` keeps the slices whose masked area exceeds a fraction of the whole slice,
    so on a whole-head or reference-grid field of view only a few central slices qualify and the
    seven cuts bunch together; cropped to the mask first, they span the brain.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        from niworkflows.viz.utils import cuts_from_bbox

    occupied = np.argwhere(np.asanyarray(mask_img.dataobj) > 0)
    if len(occupied):
        lo, hi = occupied.min(axis=0), occupied.max(axis=0) + 1
        mask_img = mask_img.slicer[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return cuts_from_bbox(mask_img, cuts=N_CUTS)


def _fig_contour(image, mask, path: Path, *, title: str = "") -> None:
    """A mask's contour (red) over an image: axial, sagittal and coronal rows of 7 cuts.

    The sMRIPrep brain-mask / normalisation reportlet, drawn with nilearn ``plot_anat`` +
    ``add_contours``; cuts and window from niworkflows (``cuts_from_bbox`` over the mask,
    ``robust_set_limits``: 15th-99.8th percentile). Written as PNG, which is ~5x faster than
    niworkflows' 300 dpi SVG on the 0.5 mm grid.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn.plotting import plot_anat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        from niworkflows.viz.utils import robust_set_limits

    data = np.asanyarray(image.dataobj)
    limits = robust_set_limits(data.ravel(), {})
    cuts = _cuts(mask)
    fig = plt.figure(figsize=(14, 7.2), facecolor="k")
    for i, axis in enumerate(("z", "x", "y")):
        ax = fig.add_axes([0, 1 - (i + 1) / 3, 1, 1 / 3])
        display = plot_anat(image, display_mode=axis, cut_coords=cuts[axis], figure=fig, axes=ax,
                            dim=0, colorbar=False, draw_cross=False, black_bg=True,
                            title=title if i == 0 else None, **limits)
        display.add_contours(mask, levels=[0.5], colors="r", linewidths=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="k")
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def _window_pair(input_img, synth_img, mask_img):
    """Put input and synthetic image on one [0, 1] window (robust max inside the mask)."""
    import nibabel as nb

    from synth7t.intensity import UPPER_PERCENTILE

    def scaled(img):
        data = np.nan_to_num(np.asanyarray(img.dataobj, dtype=np.float32))
        msk = (np.asanyarray(mask_img.dataobj) > 0) if mask_img is not None and \
            mask_img.shape == img.shape else data > 0
        vals = data[msk] if msk.any() else data[data > 0]
        hi = float(np.percentile(vals, UPPER_PERCENTILE)) if vals.size else 1.0
        return nb.Nifti1Image(np.clip(data / (hi or 1.0), 0, 1).astype(np.float32), img.affine)

    return scaled(input_img), scaled(synth_img) if synth_img is not None else None


def _fig_mosaic(input_img, synth_img, cuts: dict, axis: str, path: Path, labels: tuple[str, str]):
    """Input (top) next to the synthetic 7T image (bottom), same cuts, same [0, 1] window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn.plotting import plot_anat

    rows = [(input_img, labels[0])] + ([(synth_img, labels[1])] if synth_img is not None else [])
    fig = plt.figure(figsize=(14, 2.4 * len(rows)), facecolor="k")
    for i, (img, label) in enumerate(rows):
        ax = fig.add_axes([0, 1 - (i + 1) / len(rows), 1, 1 / len(rows)])
        plot_anat(img, display_mode=axis, cut_coords=cuts[axis], figure=fig, axes=ax,
                  vmin=0.0, vmax=1.0, dim=0, colorbar=False, draw_cross=False, black_bg=True,
                  annotate=True, title=label)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="k")
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def _fig_uncertainty(synth_img, unc_img, cuts: dict, path: Path, *, vmax: float) -> None:
    """The synthetic image with its uncertainty map as a heat overlay (axial and coronal)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn.plotting import plot_anat

    fig = plt.figure(figsize=(14, 4.8), facecolor="k")
    for i, axis in enumerate(("z", "y")):
        ax = fig.add_axes([0, 1 - (i + 1) / 2, 0.94, 1 / 2])
        display = plot_anat(synth_img, display_mode=axis, cut_coords=cuts[axis], figure=fig,
                            axes=ax, vmin=0.0, vmax=1.0, dim=0, colorbar=False,
                            draw_cross=False, black_bg=True, annotate=i == 0,
                            title="uncertainty (expected absolute error)" if i == 0 else None)
        display.add_overlay(unc_img, cmap="hot", vmin=0.0, vmax=vmax, threshold=0.2 * vmax,
                            alpha=0.7, colorbar=False)
    cax = fig.add_axes([0.955, 0.1, 0.015, 0.8])
    sm = plt.cm.ScalarMappable(cmap="hot", norm=plt.Normalize(0.0, vmax))
    cb = fig.colorbar(sm, cax=cax)
    cb.ax.tick_params(colors="w", labelsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="k")
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def _draw_uncertainty(images: "_Images", synth_file, unc_file, path: Path) -> None:
    """:func:`_fig_uncertainty` of a synthetic image and its map, on the synthetic image's own
    window and cuts; the colour scale tops at the map's 99.5th percentile in the brain, at least
    twice the documented threshold (so a confident image looks confident)."""
    from synth7t.uncertainty import THRESHOLD

    syn, unc = images.get(synth_file), images.get(unc_file)
    vals = np.asanyarray(unc.dataobj)[np.asanyarray(syn.dataobj) > 0]
    vmax = max(2 * THRESHOLD, float(np.percentile(vals, 99.5)) if vals.size else 0.0)
    _fig_uncertainty(_window_pair(syn, None, None)[0], unc, _cuts(syn), path, vmax=vmax)


def template_brain_mask() -> str | None:
    """The shipped reference template's brain mask (TemplateFlow layout), or None."""
    try:
        from synth7t.reference import REF_SPACE, TEMPLATEFLOW_HOME
    except ImportError:  # pragma: no cover - synth7t is always installed with workflows
        return None
    hits = sorted((Path(TEMPLATEFLOW_HOME) / f"tpl-{REF_SPACE}").glob(
        f"tpl-{REF_SPACE}*_desc-brain_mask.nii*"))
    return str(hits[0]) if hits else None


class _ContourInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image shown")
    mask_file = File(exists=True, mandatory=True, desc="mask drawn as a red contour")
    out_name = traits.Str("contour.png", usedefault=True, desc="file name of the PNG")


class _ContourOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the reportlet (PNG)")


class ContourReportlet(MemoryReleasingInterface):
    """A mask's contour over an image (:func:`_fig_contour`), as the report draws it."""

    input_spec = _ContourInputSpec
    output_spec = _ContourOutputSpec

    def _run_interface(self, runtime):
        images = _Images(Path(runtime.cwd))
        out = Path(runtime.cwd) / self.inputs.out_name
        _draw_or_leave_empty(out, lambda path: _fig_contour(
            images.get(self.inputs.in_file), images.get(self.inputs.mask_file, mask=True), path))
        self._results["out_report"] = str(out)
        return runtime


class _SynthesisInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the input on the reference grid")
    synth_file = File(exists=True, mandatory=True, desc="the synthetic 7T image (same grid)")
    mask_file = File(exists=True, mandatory=True, desc="the reference-grid brain mask")
    uncertainty_file = File(exists=True, desc="its uncertainty map (same grid), if written")
    contrast = traits.Str(mandatory=True, desc="T1w, T2w or FLAIR (figure labels)")


class _SynthesisOutputSpec(TraitedSpec):
    out_axial = File(exists=True, desc="input above synthetic image, axial (PNG)")
    out_coronal = File(exists=True, desc="... coronal")
    out_sagittal = File(exists=True, desc="... sagittal")
    out_uncertainty = File(desc="the synthetic image with its uncertainty overlay (PNG)")


class SynthesisReportlet(MemoryReleasingInterface):
    """The report's input/synthetic mosaics (:func:`_fig_mosaic`) and uncertainty overlay
    (:func:`_fig_uncertainty`), drawn as soon as the synthetic image exists."""

    input_spec = _SynthesisInputSpec
    output_spec = _SynthesisOutputSpec

    def _run_interface(self, runtime):
        cwd = Path(runtime.cwd)
        c = self.inputs.contrast
        outs = {name: cwd / f"{name}.png" for _, name in MOSAICS}
        want_unc = bool(self.inputs.uncertainty_file)
        if want_unc:
            outs["uncertainty"] = cwd / "uncertainty.png"
        images = _Images(cwd)
        try:
            syn = images.get(self.inputs.synth_file)
            mask = images.get(self.inputs.mask_file, mask=True)
            inp, syn_w = _window_pair(images.get(self.inputs.in_file), syn, mask)
            cuts = _cuts(mask)
        except Exception as exc:  # noqa: BLE001 - a figure must never fail the participant
            LOGGER.warning("synthesis reportlets not drawn: %s: %s", type(exc).__name__, exc)
            inp = None
        for axis, name in MOSAICS:
            _draw_or_leave_empty(outs[name], lambda out: inp is not None and _fig_mosaic(
                inp, syn_w, cuts, axis, out, (f"input {c} ({name})", f"synthetic 7T ({name})")))
        if want_unc:
            _draw_or_leave_empty(outs["uncertainty"], lambda out: inp is not None and
                                 _draw_uncertainty(images, self.inputs.synth_file,
                                                   self.inputs.uncertainty_file, out))
        for key, path in outs.items():
            self._results[f"out_{key}"] = str(path)
        return runtime


def _draw_or_leave_empty(out: Path, draw) -> None:
    """Draw a reportlet; when it cannot be drawn, an empty file: the report then sees no
    reportlet and draws (or reports) the figure itself. A file left by an earlier run of the
    node is removed first, so a failed drawing never passes an old figure off as new."""
    out.unlink(missing_ok=True)
    try:
        draw(out)
    except Exception as exc:  # noqa: BLE001 - a figure must never fail the participant
        LOGGER.warning("reportlet %s not drawn: %s: %s", out.name, type(exc).__name__, exc)
    if not out.is_file():
        out.write_bytes(b"")


def init_reportlets_wf(*, output_dir, contrast: str, source_file: str,
                       template_mask: str | None = None, uncertainty: bool = False,
                       name: str | None = None):
    """Draw and store the brain-mask and registration reportlets of one input.

    Parameters
    ----------
    output_dir
        Root of the derivatives dataset (figures go to ``sub-<label>/figures/``).
    contrast
        T1w, T2w or FLAIR (names the workflow).
    source_file
        The raw input (names the figures).
    template_mask
        Reference template brain mask drawn over the registered input (default: the shipped
        one, :func:`template_brain_mask`); no registration reportlet when there is none.
    uncertainty
        Whether an uncertainty map comes with the synthetic image (its overlay is drawn).

    Inputs
    ------
    preproc, mask
        Native bias-corrected image and its brain mask.
    ref_resampled
        The bias-corrected image on the reference grid, unmasked: the registration reportlet
        draws the template's brain outline over the whole head, as sMRIPrep's does, and can
        start as soon as the image is resampled (in a T1w-only run, while the reference mask is
        still being made, instead of waiting for synthesis to free both scheduler slots).
    ref_preproc, ref_mask
        The input on the reference grid, and that grid's brain mask.
    synth, uncertainty
        The synthetic 7T image on the reference grid (and its uncertainty map).

    Outputs
    -------
    brain_report, reg_report
        The stored PNGs (``desc-brain`` and ``space-<ref>_desc-reg``); the mosaics are stored
        as ``desc-synth7T{axial,coronal,sagittal}`` and the overlay as ``desc-uncertainty``.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from synth7t.reference import REF_SPACE

    from .outputs import _sink

    lc = contrast.lower()
    template_mask = template_mask or template_brain_mask()
    wf = pe.Workflow(name=name or f"reportlets_{lc}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=["preproc", "mask", "ref_resampled",
                                                      "ref_preproc", "ref_mask", "synth",
                                                      "uncertainty"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["brain_report", "reg_report"]),
                         name="outputnode")
    brain_rpt = pe.Node(ContourReportlet(out_name="brain.png"), name="brain_rpt", mem_gb=0.5)
    ds_brain = _sink(output_dir, "ds_report_brain", compress=None, datatype="figures",
                     desc="brain")
    ds_brain.inputs.source_file = source_file
    wf.connect([
        (inputnode, brain_rpt, [("preproc", "in_file"), ("mask", "mask_file")]),
        (brain_rpt, ds_brain, [("out_report", "in_file")]),
        (ds_brain, outputnode, [("out_file", "brain_report")]),
    ])
    if template_mask:
        reg_rpt = pe.Node(ContourReportlet(mask_file=template_mask, out_name="reg.png"),
                          name="reg_rpt", mem_gb=0.5)
        ds_reg = _sink(output_dir, "ds_report_reg", compress=None, datatype="figures",
                       space=REF_SPACE, desc="reg")
        ds_reg.inputs.source_file = source_file
        wf.connect([
            (inputnode, reg_rpt, [("ref_resampled", "in_file")]),
            (reg_rpt, ds_reg, [("out_report", "in_file")]),
            (ds_reg, outputnode, [("out_file", "reg_report")]),
        ])
    synth_rpt = pe.Node(SynthesisReportlet(contrast=contrast), name="synth_rpt", mem_gb=1.0)
    wf.connect(inputnode, "ref_preproc", synth_rpt, "in_file")
    wf.connect(inputnode, "synth", synth_rpt, "synth_file")
    wf.connect(inputnode, "ref_mask", synth_rpt, "mask_file")
    figures = [name for _, name in MOSAICS]
    if uncertainty:
        wf.connect(inputnode, "uncertainty", synth_rpt, "uncertainty_file")
        figures.append("uncertainty")
    for fig in figures:
        ds = _sink(output_dir, f"ds_report_{fig}", compress=None, datatype="figures",
                   desc=fig if fig == "uncertainty" else f"synth7T{fig}")
        ds.inputs.source_file = source_file
        wf.connect(synth_rpt, f"out_{fig}", ds, "in_file")
    return wf
