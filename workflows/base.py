"""Top-level graph factories: the whole run and one participant/session."""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from synth7t import __version__
from synth7t.fields import CONTRASTS
from synth7t.io import protocol_from_sidecar

from .anatomical import init_anat_preproc_wf, looks_stripped
from .outputs import init_ds_anat_wf, init_ds_registration_wf, init_ds_synthesis_wf
from .registration import init_register_wf
from .reportlets import init_reportlets_wf
from .synthesis import (ModelChoice, has_uncertainty, init_synthesis_wf, select_model,
                        synthesis_provenance)


def workflow_name() -> str:
    """``synth7t_<major>_<minor>_wf``: a new minor version starts a fresh cache."""
    major, minor = __version__.split(".")[:2]
    return f"synth7t_{major}_{minor}_wf"


def subject_wf_name(subject_id: str, session_id: str | None = None) -> str:
    return f"sub_{subject_id}" + (f"_ses_{session_id}" if session_id else "") + "_wf"


def load_registry(model_dir=None):
    """:meth:`synth7t.registry.Registry.load` (shipped registry, extended by ``--model-dir``)."""
    from synth7t.registry import Registry

    return Registry.load(str(model_dir) if model_dir else None)


def init_synth7t_wf(*, sessions, output_dir, skull_strip: str = "auto",
                    brain_extraction: str = "deep", registry=None,
                    models: dict | None = None, model_dir=None, model_name: str = "default",
                    device: str = "auto", storage_dtype: str = "uint16", omp_nthreads: int = 1,
                    seed: int = 0, provenance: dict | None = None, uncertainty: bool = True,
                    tta: bool | None = None, shrinkage: bool = True, name: str | None = None):
    """Build the graph of a run: one :func:`init_single_subject_wf` per participant/session.

    Parameters
    ----------
    sessions : list
        Objects with ``subject``, ``session`` (or ``None``) and ``images``, a mapping
        ``contrast -> image`` where each image has ``path``, ``relpath`` (relative to the BIDS
        root) and ``routing`` (:class:`synth7t.fields.FieldRouting`); e.g.
        :class:`bids_app.query.SessionInputs`.
    output_dir : str or Path
        Root of the derivatives dataset.
    skull_strip : str
        ``auto``, ``force`` or ``skip``.
    brain_extraction : str
        ``deep`` (default) or ``template`` (``--brain-extraction``).
    registry : synth7t.registry.Registry, optional
        Model registry (loaded from ``model_dir`` when omitted and ``models`` is not given).
    models : dict, optional
        ``{(subject, session): {contrast: ModelChoice}}`` chosen beforehand.
    model_dir : str, optional
        ``--model-dir``.
    model_name : str
        Registry entry name to use (``default``; falls back to ``baseline``).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    storage_dtype : str
        Storage of reference-grid derivatives.
    omp_nthreads : int
        Torch threads per synthesis node (antspyx nodes run single-threaded for
        bit-reproducible registrations; see ``workflows.interfaces.ANTS_NTHREADS``).
    seed : int
        Random seed.
    provenance : dict, optional
        Keys added to every sidecar.
    uncertainty : bool
        Write ``desc-uncertainty`` maps for models with an uncertainty head.
    tta : bool, optional
        Left-right test-time flips (default ``synth7t.inference.DEFAULT_TTA``).
    shrinkage : bool
        Let models whose config asks for it shrink their output (``--no-shrinkage``: False).
    name : str, optional
        Workflow name (default :func:`workflow_name`).

    Inputs
    ------
    None (every input is fixed at build time).

    Outputs
    -------
    None (results are written by the ``ds_*`` sinks).
    """
    wf = pe.Workflow(name=name or workflow_name())
    if models is None and registry is None:
        needs = any(not img.routing.passthrough for s in sessions for img in s.images.values())
        registry = load_registry(model_dir) if needs else None
    for item in sessions:
        sub_models = (models or {}).get((item.subject, item.session))
        wf.add_nodes([init_single_subject_wf(
            subject_id=item.subject, session_id=item.session, images=item.images,
            output_dir=output_dir, skull_strip=skull_strip, brain_extraction=brain_extraction,
            registry=registry, models=sub_models, model_dir=model_dir, model_name=model_name, device=device,
            storage_dtype=storage_dtype, omp_nthreads=omp_nthreads, seed=seed,
            provenance=provenance, uncertainty=uncertainty, tta=tta, shrinkage=shrinkage,
        )])
    return wf


def init_single_subject_wf(*, subject_id: str, session_id: str | None = None, images: dict,
                           output_dir, skull_strip: str = "auto",
                           brain_extraction: str = "deep", registry=None,
                           models: dict[str, ModelChoice] | None = None, model_dir=None,
                           model_name: str = "default", device: str = "auto",
                           storage_dtype: str = "uint16", omp_nthreads: int = 1, seed: int = 0,
                           provenance: dict | None = None, uncertainty: bool = True,
                           tta: bool | None = None, shrinkage: bool = True,
                           name: str | None = None):
    """Build the graph of one participant (and session).

    The anatomical reference ("anchor") is the T1w when present, else the first of T2w, FLAIR.
    It is conformed, bias-corrected, brain-extracted (from its own contrast: a T2w- or
    FLAIR-only session gets its mask from that image) and registered to MRIxFields; the other
    contrasts are registered rigidly to it and inherit its brain mask. Every contrast is then
    synthesised on the reference grid and brought back to its native grid.

    Parameters
    ----------
    subject_id : str
        Participant label (without ``sub-``).
    session_id : str, optional
        Session label (without ``ses-``).
    images : dict
        ``{contrast: image}``, image with ``path``, ``relpath``, ``routing``.
    output_dir : str or Path
        Root of the derivatives dataset.
    skull_strip : str
        ``auto``, ``force`` or ``skip``.
    brain_extraction : str
        ``deep`` (default; any contrast) or ``template``.
    registry : synth7t.registry.Registry, optional
        Model registry; required unless ``models`` is given or every input is at 7 T.
    models : dict, optional
        ``{contrast: ModelChoice}``; chosen from ``registry`` when omitted.
    model_dir : str, optional
        ``--model-dir`` (passed to the synthesis nodes).
    model_name : str
        Registry entry name.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    storage_dtype : str
        Storage of reference-grid derivatives.
    omp_nthreads : int
        Torch threads per synthesis node (antspyx nodes run single-threaded for
        bit-reproducible registrations; see ``workflows.interfaces.ANTS_NTHREADS``).
    seed : int
        Random seed.
    provenance : dict, optional
        Keys added to every sidecar.
    uncertainty : bool
        Write ``desc-uncertainty`` maps for models with an uncertainty head.
    tta : bool, optional
        Left-right test-time flips (default ``synth7t.inference.DEFAULT_TTA``).
    shrinkage : bool
        Let models whose config asks for it shrink their output (``--no-shrinkage``: False).
    name : str, optional
        Workflow name (default ``sub_<label>[_ses_<label>]_wf``).

    Inputs
    ------
    None (inputs are fixed at build time).

    Outputs
    -------
    None (results are written by the ``ds_*`` sinks).
    """
    contrasts = [c for c in CONTRASTS if c in images]
    if not contrasts:
        raise ValueError(f"sub-{subject_id}: no T1w, T2w or FLAIR image to process")
    anchor = contrasts[0]
    others = contrasts[1:]
    if models is None:
        if registry is None and not all(images[c].routing.passthrough for c in contrasts):
            registry = load_registry(model_dir)
        models = {c: select_model(registry, c, images[c].routing, model_name=model_name)
                  for c in contrasts}
    output_dir = str(Path(output_dir).absolute())
    wf = pe.Workflow(name=name or subject_wf_name(subject_id, session_id))
    if skull_strip != "skip":
        # engine, version and weights SHA-256 in every sidecar (mask, preproc, synthetic images)
        from synth7t.brain_extraction import engine_provenance

        provenance = {**(provenance or {}), "BrainExtraction": engine_provenance(brain_extraction)}

    inputnode = pe.Node(niu.IdentityInterface(fields=[c.lower() for c in contrasts]),
                        name="inputnode")
    for c in contrasts:
        setattr(inputnode.inputs, c.lower(), str(images[c].path))

    anat_wfs = {}
    for c in contrasts:
        expect = c == anchor and skull_strip == "auto" and looks_stripped(images[c].path)
        anat_wfs[c] = init_anat_preproc_wf(contrast=c, skull_strip=skull_strip,
                                           is_anchor=c == anchor,
                                           brain_extraction=brain_extraction, device=device,
                                           omp_nthreads=omp_nthreads, seed=seed,
                                           expect_stripped=expect)
        wf.connect(inputnode, c.lower(), anat_wfs[c], "inputnode.in_file")

    register_wf = init_register_wf(anchor=anchor, others=others, seed=seed)
    protocols = {c: protocol_from_sidecar(images[c].metadata) for c in contrasts}
    synthesis_wf = init_synthesis_wf(
        contrasts=contrasts, anchor=anchor, models=models,
        field_bins={c: images[c].routing.bin for c in contrasts}, model_dir=model_dir,
        device=device, storage_dtype=storage_dtype, omp_nthreads=omp_nthreads,
        uncertainty=uncertainty, tta=tta, shrinkage=shrinkage,
        protocols=protocols)
    anchor_wf = anat_wfs[anchor]
    wf.connect([
        (anchor_wf, register_wf, [("outputnode.preproc", "inputnode.anchor_preproc"),
                                  ("outputnode.brain", "inputnode.anchor_brain"),
                                  ("outputnode.mask", "inputnode.anchor_mask")]),
        (register_wf, synthesis_wf, [("outputnode.anchor2ref", "inputnode.anchor2ref"),
                                     ("outputnode.ref2anchor", "inputnode.ref2anchor")]),
        (anchor_wf, synthesis_wf, [("outputnode.mask", "inputnode.anchor_mask"),
                                   ("outputnode.preproc", f"inputnode.{anchor.lower()}_preproc"),
                                   ("outputnode.mask", f"inputnode.{anchor.lower()}_mask")]),
    ])
    for c in others:
        lc = c.lower()
        wf.connect([
            (anat_wfs[c], register_wf, [("outputnode.preproc", f"inputnode.{lc}_preproc"),
                                        ("outputnode.input_stripped", f"inputnode.{lc}_stripped")]),
            (anat_wfs[c], synthesis_wf, [("outputnode.preproc", f"inputnode.{lc}_preproc")]),
            (register_wf, synthesis_wf, [(f"outputnode.{lc}_mask", f"inputnode.{lc}_mask"),
                                         (f"outputnode.{lc}2anchor", f"inputnode.{lc}2anchor"),
                                         (f"outputnode.anchor2{lc}", f"inputnode.anchor2{lc}")]),
        ])

    # ---- derivatives
    a_img = images[anchor]
    ds_reg = init_ds_registration_wf(
        output_dir=output_dir, anchor=anchor, anchor_relpath=a_img.relpath,
        anchor_file=str(a_img.path),
        others={c: (images[c].relpath, str(images[c].path)) for c in others},
        provenance=provenance)
    wf.connect(register_wf, "outputnode.anchor2ref", ds_reg, "inputnode.anchor2ref")
    wf.connect(register_wf, "outputnode.ref2anchor", ds_reg, "inputnode.ref2anchor")
    for c in others:
        lc = c.lower()
        wf.connect(register_wf, f"outputnode.{lc}2anchor", ds_reg, f"inputnode.{lc}2anchor")
        wf.connect(register_wf, f"outputnode.anchor2{lc}", ds_reg, f"inputnode.anchor2{lc}")

    for c in contrasts:
        lc = c.lower()
        img = images[c]
        ds_anat = init_ds_anat_wf(
            output_dir=output_dir, contrast=c, source_relpath=img.relpath,
            source_file=str(img.path), anchor=anchor, anchor_relpath=a_img.relpath,
            field_strength=img.routing.raw, provenance=provenance)
        wf.connect([
            (anat_wfs[c], ds_anat, [("outputnode.preproc", "inputnode.preproc"),
                                    ("outputnode.input_stripped", "inputnode.input_stripped"),
                                    ("outputnode.warnings", "inputnode.warnings")]),
        ])
        if c == anchor:
            wf.connect(anat_wfs[c], "outputnode.mask", ds_anat, "inputnode.mask")
        else:
            wf.connect(register_wf, f"outputnode.{lc}_mask", ds_anat, "inputnode.mask")

        ds_synth = init_ds_synthesis_wf(
            output_dir=output_dir, contrast=c, source_relpath=img.relpath,
            source_file=str(img.path), anchor=anchor, anchor_relpath=a_img.relpath,
            anchor_file=str(a_img.path), routing=img.routing,
            model_provenance=synthesis_provenance(models[c], shrinkage),
            storage_dtype=storage_dtype,
            write_ref_mask=c == anchor, provenance=provenance,
            uncertainty=has_uncertainty(models[c], uncertainty),
            source_protocol=protocols[c],
            reads_protocol=models[c].protocol)
        if has_uncertainty(models[c], uncertainty):
            wf.connect([
                (synthesis_wf, ds_synth, [(f"outputnode.{lc}_ref_unc", "inputnode.ref_unc"),
                                          (f"outputnode.{lc}_native_unc", "inputnode.native_unc"),
                                          (f"outputnode.{lc}_unc_summary",
                                           "inputnode.unc_summary")]),
            ])
        with_unc = has_uncertainty(models[c], uncertainty)
        rpt_wf = init_reportlets_wf(output_dir=output_dir, contrast=c, source_file=str(img.path),
                                    uncertainty=with_unc, name=f"reportlets_{lc}_wf")
        wf.connect([
            (anat_wfs[c], rpt_wf, [("outputnode.preproc", "inputnode.preproc")]),
            (anat_wfs[c] if c == anchor else register_wf, rpt_wf,
             [("outputnode.mask" if c == anchor else f"outputnode.{lc}_mask", "inputnode.mask")]),
            (synthesis_wf, rpt_wf, [(f"outputnode.{lc}_ref_resampled", "inputnode.ref_resampled"),
                                    (f"outputnode.{lc}_ref_preproc", "inputnode.ref_preproc"),
                                    (f"outputnode.{lc}_ref_synth", "inputnode.synth"),
                                    ("outputnode.ref_mask", "inputnode.ref_mask")]),
        ])
        if with_unc:
            wf.connect(synthesis_wf, f"outputnode.{lc}_ref_unc", rpt_wf, "inputnode.uncertainty")
        wf.connect([
            (synthesis_wf, ds_synth, [(f"outputnode.{lc}_ref_preproc", "inputnode.ref_preproc"),
                                      (f"outputnode.{lc}_ref_synth", "inputnode.ref_synth"),
                                      (f"outputnode.{lc}_native_synth", "inputnode.native_synth"),
                                      ("outputnode.ref_mask", "inputnode.ref_mask")]),
        ])
    return wf
