"""Field-specific 7T synthesis on the MRIxFields grid, and back to native space."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from synth7t.fields import bin_label

from .interfaces import (MaskToReference, PrepareSynthesisInput, ResampleToReference, Synthesize,
                         ToNative)

LOGGER = logging.getLogger("synth7t")


class ModelNotFoundError(LookupError):
    """No model in the registry for a (contrast, field bin)."""


@dataclass(frozen=True)
class ModelChoice:
    """The model picked at graph-build time for one input."""

    name: str
    sha256: str
    provenance: dict = field(default_factory=dict)
    passthrough: bool = False
    fallback: bool = False  # True when the baseline replaced a missing default model
    others: tuple[str, ...] = ()  # other contrasts a multi-contrast model takes as input
    uncertainty: bool = False  # the network has an uncertainty head
    protocol: bool = False  # the network is conditioned on the source protocol (sidecar)
    shrinkage: bool = False  # the network's config shrinks its output (synth7t.shrinkage)


PASSTHROUGH_PROVENANCE = {
    "Name": "passthrough",
    "Kind": "none",
    "Description": "input acquired at 7 T: brain-extracted and normalised to [0, 1], "
                   "no synthesis model applied",
}


def _json_safe(obj) -> dict:
    return json.loads(json.dumps(obj, default=str))


def _unet_config(entry) -> dict | None:
    """The U-Net config of a registry entry (the JSON of its safetensors metadata, the fields of
    :class:`synth7t.networks.UNetConfig`), else ``None``.

    Read as plain JSON: importing :mod:`synth7t.networks` would import torch (~1.4 s of the
    App's start-up) only to build a graph whose nodes import it themselves.
    """
    if getattr(entry, "kind", None) != "unet":
        return None
    try:
        from synth7t.registry import read_verified, safetensors_metadata

        return dict(json.loads(safetensors_metadata(read_verified(entry))["config"]))
    except Exception:  # noqa: BLE001 - integrity problems are reported by the caller
        return None


def _model_others(cfg: dict | None) -> tuple[str, ...]:
    """Contrasts a multi-contrast U-Net (config ``cfg``) takes besides its own."""
    from synth7t.registry import canonical_contrast

    return tuple(canonical_contrast(c) for c in (cfg or {}).get("others", []))


#: What the ``Shrinkage`` key of a synthetic image's ``SynthesisModel`` sidecar says.
SHRINKAGE_APPLIED = ("applied: the network's output shrunk toward its local mean by the share "
                     "of its local variance that the uncertainty head's error variance (2 b^2) "
                     "explains (Lee's local-statistics filter, Gaussian neighbourhood of 1 "
                     "voxel; synth7t.shrinkage)")
SHRINKAGE_OFF = "not applied (--no-shrinkage): the network's output as it is"


def applies_shrinkage(choice: ModelChoice, shrinkage: bool = True) -> bool:
    """Whether the synthesis node shrinks this model's output (its config and the run's
    ``--no-shrinkage``)."""
    return choice.shrinkage and bool(shrinkage)


def synthesis_provenance(choice: ModelChoice, shrinkage: bool = True) -> dict:
    """``SynthesisModel`` sidecar value: the model's provenance, plus ``Shrinkage`` for models
    whose config shrinks their output (applied, or turned off by the run)."""
    prov = dict(choice.provenance)
    if choice.shrinkage:
        prov["Shrinkage"] = (SHRINKAGE_APPLIED if applies_shrinkage(choice, shrinkage)
                             else SHRINKAGE_OFF)
    return prov


def select_model(registry, contrast: str, routing, *, model_name: str = "default") -> ModelChoice:
    """Choose the model for ``contrast`` at the routed field bin (graph-build time).

    A missing ``default`` model falls back to the ``baseline`` entry with a warning; 7 T inputs
    are passed through.

    Raises
    ------
    ModelNotFoundError
        Neither the requested nor the baseline model exists.
    """
    if routing.passthrough:
        return ModelChoice(name="passthrough", sha256="", provenance=dict(PASSTHROUGH_PROVENANCE),
                           passthrough=True)
    names = [model_name] + (["baseline"] if model_name == "default" else [])
    errors = []
    for i, name in enumerate(names):
        try:
            entry = registry.get(contrast, routing.bin, name=name)
        except Exception as exc:  # noqa: BLE001 - registry lookups raise KeyError/LookupError
            errors.append(f"{name}: {exc}")
            continue
        if i:
            LOGGER.warning("no '%s' model for %s at %s; using '%s'", model_name, contrast,
                           bin_label(routing.bin), name)
        prov = entry.provenance() if hasattr(entry, "provenance") else {"Name": name}
        cfg = _unet_config(entry) or {}
        return ModelChoice(name=getattr(entry, "name", name) or name,
                           sha256=str(getattr(entry, "sha256", "") or ""),
                           provenance=_json_safe(prov), fallback=bool(i),
                           others=_model_others(cfg),
                           uncertainty=bool(cfg.get("uncertainty", False)),
                           protocol=bool(cfg.get("protocol_condition")),
                           shrinkage=bool(cfg.get("uncertainty") and cfg.get("shrinkage")))
    raise ModelNotFoundError(
        f"no synthesis model for {contrast} at {bin_label(routing.bin)} "
        f"({'; '.join(errors)}); add one with --model-dir"
    )


def init_synthesis_wf(*, contrasts: list[str], anchor: str, models: dict[str, ModelChoice],
                      field_bins: dict[str, float], model_dir: str | None = None,
                      device: str = "auto", storage_dtype: str = "uint16",
                      omp_nthreads: int = 1, uncertainty: bool = True, tta: bool | None = None,
                      protocols: dict[str, dict[str, float] | None] | None = None,
                      shrinkage: bool = True, name: str = "synthesis_wf"):
    """Synthesise 7T images: one synthesis node per contrast, models fixed at build time.

    Parameters
    ----------
    contrasts : list of str
        Contrasts to synthesise (the anchor first).
    anchor : str
        Contrast of the anatomical reference.
    models : dict
        ``{contrast: ModelChoice}`` from :func:`select_model`.
    field_bins : dict
        ``{contrast: field bin in T}``.
    model_dir : str, optional
        ``--model-dir``.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    storage_dtype : str
        Storage of reference-grid images (``uint16``/``int16`` scaled, or ``float32``).
    omp_nthreads : int
        Threads per node.
    uncertainty : bool
        Write an uncertainty map for every contrast whose model has an uncertainty head
        (:mod:`synth7t.uncertainty`).
    tta : bool, optional
        Left-right test-time flips (default :data:`synth7t.inference.DEFAULT_TTA`).
    protocols : dict, optional
        ``{contrast: protocol}`` of :func:`synth7t.io.protocol_from_sidecar` (``None``: the
        sidecar states none), given to the models with protocol conditioning.
    shrinkage : bool
        Let models whose config asks for it shrink their output where their uncertainty map
        explains its local variation (:func:`applies_shrinkage`); ``False``: never.
    name : str
        Workflow name.

    Inputs
    ------
    anchor2ref, ref2anchor, anchor_mask
        Reference transforms and the anchor's native brain mask.
    <c>_preproc, <c>_mask
        Per contrast ``c`` (lower case): native bias-corrected image and brain mask.
    <c>2anchor, anchor2<c>
        Rigid transforms, for contrasts other than the anchor.

    Outputs
    -------
    ref_mask
        Brain mask on the reference grid.
    <c>_ref_resampled
        The bias-corrected image on the reference grid, unmasked (the registration reportlet
        draws it: it exists before the reference mask does).
    <c>_ref_preproc
        Model input on the reference grid ([0, 1], 0 outside the mask).
    <c>_ref_synth
        Synthetic 7T image on the reference grid.
    <c>_native_synth
        Synthetic 7T image on the native grid of ``c``.
    <c>_ref_unc, <c>_native_unc, <c>_unc_summary
        Uncertainty map (reference and native grid) and its sidecar summary (contrasts with
        :func:`has_uncertainty`).
    """
    from synth7t.inference import DEFAULT_TTA

    tta = DEFAULT_TTA if tta is None else bool(tta)
    wf = pe.Workflow(name=name)
    in_fields = ["anchor2ref", "ref2anchor", "anchor_mask"]
    out_fields = ["ref_mask"]
    for c in contrasts:
        lc = c.lower()
        in_fields += [f"{lc}_preproc", f"{lc}_mask"]
        if c != anchor:
            in_fields += [f"{lc}2anchor", f"anchor2{lc}"]
        out_fields += [f"{lc}_ref_resampled", f"{lc}_ref_preproc", f"{lc}_ref_synth",
                       f"{lc}_native_synth", f"{lc}_ref_unc", f"{lc}_native_unc",
                       f"{lc}_unc_summary"]
    inputnode = pe.Node(niu.IdentityInterface(fields=in_fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=out_fields), name="outputnode")

    ref_mask = pe.Node(MaskToReference(), name="ref_mask", mem_gb=1.5)
    wf.connect([
        (inputnode, ref_mask, [("anchor_mask", "in_mask"), ("anchor2ref", "transforms")]),
        (ref_mask, outputnode, [("out_mask", "ref_mask")]),
    ])
    # resampling needs no mask, so it runs beside ref_mask; prep then masks and normalises
    resamples = {c: pe.Node(ResampleToReference(), name=f"resample_{c.lower()}", mem_gb=1.5)
                 for c in contrasts}
    preps = {c: pe.Node(PrepareSynthesisInput(storage_dtype=storage_dtype),
                        name=f"prep_{c.lower()}", mem_gb=2.0) for c in contrasts}
    for c in contrasts:
        lc = c.lower()
        choice = models[c]
        prep, resample = preps[c], resamples[c]
        synth = pe.Node(
            Synthesize(contrast=c, field_bin=float(field_bins[c]), model_name=choice.name,
                       model_sha256=choice.sha256, passthrough=choice.passthrough,
                       device=device, storage_dtype=storage_dtype, omp_nthreads=omp_nthreads,
                       uncertainty=has_uncertainty(choice, uncertainty), tta=tta,
                       shrinkage=applies_shrinkage(choice, shrinkage)),
            name=f"synthesize_{lc}", n_procs=omp_nthreads, mem_gb=3.0)
        if model_dir:
            synth.inputs.model_dir = str(model_dir)
        if choice.protocol and (protocols or {}).get(c):
            # only a model that reads it gets it: the node's cache key stays the sidecar-free
            # one for every other model
            synth.inputs.protocol = dict(protocols[c])
        others = [o for o in choice.others if o in contrasts and o != c]
        if others:
            synth.inputs.other_contrasts = others
            merge = pe.Node(niu.Merge(len(others)), name=f"others_{lc}",
                            run_without_submitting=True)
            for i, o in enumerate(others, start=1):
                wf.connect(preps[o], "out_file", merge, f"in{i}")
            wf.connect(merge, "out", synth, "other_files")
        native = pe.Node(ToNative(), name=f"to_native_{lc}", mem_gb=2.0)
        wf.connect([
            (inputnode, resample, [(f"{lc}_preproc", "in_file")]),
            (resample, prep, [("out_file", "in_file")]),
            (resample, outputnode, [("out_file", f"{lc}_ref_resampled")]),
            (ref_mask, prep, [("out_mask", "ref_mask")]),
            (prep, synth, [("out_file", "in_file"), ("excess_file", "excess_file")]),
            (ref_mask, synth, [("out_mask", "mask_file")]),
            (synth, native, [("out_file", "in_file")]),
            (inputnode, native, [(f"{lc}_preproc", "reference_file"), (f"{lc}_mask", "mask_file")]),
            (prep, outputnode, [("out_file", f"{lc}_ref_preproc")]),
            (synth, outputnode, [("out_file", f"{lc}_ref_synth")]),
            (native, outputnode, [("out_file", f"{lc}_native_synth")]),
        ])
        unc_native = None
        if has_uncertainty(choice, uncertainty):
            unc_native = pe.Node(ToNative(), name=f"unc_to_native_{lc}", mem_gb=2.0)
            wf.connect([
                (synth, unc_native, [("out_uncertainty", "in_file")]),
                (inputnode, unc_native, [(f"{lc}_preproc", "reference_file"),
                                         (f"{lc}_mask", "mask_file")]),
                (synth, outputnode, [("out_uncertainty", f"{lc}_ref_unc"),
                                     ("uncertainty_summary", f"{lc}_unc_summary")]),
                (unc_native, outputnode, [("out_file", f"{lc}_native_unc")]),
            ])
        if c == anchor:
            wf.connect([
                (inputnode, resample, [("anchor2ref", "transforms")]),
                (inputnode, native, [("ref2anchor", "transforms")]),
            ])
            if unc_native is not None:
                wf.connect(inputnode, "ref2anchor", unc_native, "transforms")
        else:
            fwd = pe.Node(niu.Merge(2), name=f"xfms_to_ref_{lc}", run_without_submitting=True)
            inv = pe.Node(niu.Merge(2), name=f"xfms_to_native_{lc}", run_without_submitting=True)
            wf.connect([
                (inputnode, fwd, [("anchor2ref", "in1"), (f"{lc}2anchor", "in2")]),
                (inputnode, inv, [(f"anchor2{lc}", "in1"), ("ref2anchor", "in2")]),
                (fwd, resample, [("out", "transforms")]),
                (inv, native, [("out", "transforms")]),
            ])
            if unc_native is not None:
                wf.connect(inv, "out", unc_native, "transforms")
    return wf


def has_uncertainty(choice: ModelChoice, requested: bool = True) -> bool:
    """Whether an uncertainty map is written for this model choice."""
    return bool(requested and choice.uncertainty and not choice.passthrough)
