"""Derivatives: the DerivativesDataSink of synth7t and the ``init_ds_*_wf`` sink workflows.

File names follow BIDS-Derivatives 1.9 / NiPreps (``<ref>`` is ``MRIxFields``), per input image
(``<C>`` is its suffix, ``<A>`` the anatomical reference: T1w when present)::

    sub-01_desc-preproc_<C>.nii.gz                  native, conformed + N4
    sub-01_desc-brain_mask.nii.gz                   native mask of <A>
    sub-01_space-<C>_desc-brain_mask.nii.gz         native mask of <C> != <A>
    sub-01_from-<A>_to-<ref>_mode-image_xfm.h5      (+ from-<ref>_to-<A>)
    sub-01_from-<C>_to-<A>_mode-image_xfm.txt       (+ from-<A>_to-<C>)  for <C> != <A>
    sub-01_space-<ref>_desc-brain_mask.nii.gz
    sub-01_space-<ref>_desc-preproc_<C>.nii.gz      model input: brain, [0, 1]
    sub-01_space-<ref>_desc-synth7T_<C>.nii.gz      synthetic 7T, [0, 1], 0 outside the mask
    sub-01_desc-synth7T_<C>.nii.gz                  synthetic 7T back in native space

Every file has a JSON sidecar with ``Sources`` (BIDS URIs: ``bids:raw:`` for the input dataset,
``bids::`` for this one), ``SkullStripped``, ``SpatialReference`` where a ``space`` is named, and
the run provenance (software versions, command line, random seed).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from synth7t.reference import REF_SHAPE, REF_SPACE, REF_ZOOMS, setup_templateflow

setup_templateflow()  # before niworkflows imports templateflow

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.interfaces.base import (  # noqa: E402
    BaseInterfaceInputSpec,
    SimpleInterface,
    TraitedSpec,
    Undefined,
    isdefined,
    traits,
)
from nipype.pipeline import engine as pe  # noqa: E402
from niworkflows.interfaces.bids import DerivativesDataSink as _DerivativesDataSink  # noqa: E402

STAGING = ".synth7t-staging"
REF_RESOLUTION = (
    f"{REF_ZOOMS[0]:g} mm isotropic, {'x'.join(map(str, REF_SHAPE))} voxels "
    "(MRIxFields2026 grid: FSL MNI152 0.5 mm sform)"
)
#: ``SpatialReference`` of reference-space files: the shipped 1 mm template image (same MNI
#: coordinates; the 0.5 mm grid itself is never stored as a volume, ``Resolution`` describes it),
#: resolved through ``DatasetLinks.templateflow``.
REF_SPATIAL_REFERENCE = f"bids:templateflow:tpl-{REF_SPACE}/tpl-{REF_SPACE}_res-1_T1w.nii.gz"


def _listify(value):
    if value is None or not isdefined(value):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expected_relpath(source_files, in_exts, entities: dict, *, compress=None,
                     dismiss_entities=None, sink_cls=None) -> list[str]:
    """Derivative path(s) that :class:`DerivativesDataSink` will write (relative to its root).

    Same rules as niworkflows' DerivativesDataSink: entities common to all ``source_files``,
    minus ``dismiss_entities``, overridden by ``entities``; extension from ``in_exts`` and
    ``compress``.
    """
    from bids.layout import Config, parse_file_entities
    from bids.layout.writing import build_path
    from niworkflows.utils.bids import relative_to_root

    cls = sink_cls or DerivativesDataSink
    custom_config = Config(name="custom", entities=cls._config_entities_dict,
                           default_path_patterns=cls._file_patterns)
    in_entities = [
        parse_file_entities(str(relative_to_root(str(src))),
                            config=["bids", "derivatives", custom_config])
        for src in _listify(source_files)
    ]
    out = {k: v for k, v in in_entities[0].items()
           if all(ent.get(k) == v for ent in in_entities[1:])}
    for drop in _listify(dismiss_entities):
        if drop:
            out.pop(drop, None)
    exts = [e.lstrip(".") for e in _listify(in_exts)]
    comp = _listify(compress) or [None]
    if len(comp) == 1:
        comp = comp * len(exts)
    for i, ext in enumerate(exts):
        if comp[i] is not None:
            ext = ext[:-3] if ext.endswith(".gz") else ext
            exts[i] = f"{ext}.gz" if comp[i] else ext
    out["extension"] = exts[0] if len(set(exts)) == 1 else exts
    for key, value in entities.items():
        if value is not None and isdefined(value):
            out[key] = value
    if out.get("resolution") == "native" and out.get("space"):
        out.pop("resolution", None)
    patterns = cls._file_patterns
    custom = set(out) - set(cls._config_entities)
    if custom:
        custom_pat = "_".join(f"{key}-{{{key}}}" for key in sorted(custom))
        patterns = [pat.replace("_{suffix", f"_{custom_pat}_{{suffix") for pat in patterns]
    dest = build_path(out, path_patterns=patterns)
    if not dest:
        raise ValueError(f"could not build a derivative path from {out}")
    return [str(d) for d in _listify(dest)]


def _copy_bytes(src, dst):
    """Replacement of niworkflows' ``_copy_any`` while our sink runs.

    niworkflows decompresses and recompresses (gzip level 9) every ``.nii.gz`` it copies, ~10 s
    for one 0.5 mm volume, and hard-links other files to the work directory. Our inputs are
    already compressed deterministically (nibabel: no name, mtime 0), so a byte copy is
    identical and ~100x faster; a real copy also keeps derivatives independent of the cache.
    """
    import niworkflows.utils.misc as _misc

    if str(src).endswith(".gz") == str(dst).endswith(".gz"):
        if os.path.exists(dst):
            os.unlink(dst)
        shutil.copyfile(src, dst)
        return True
    return _misc._copy_any(src, dst)


def _at_destination(exc: OSError, staging: Path, base: Path) -> OSError:
    """``exc`` naming the derivative's final path instead of its copy in the staging folder.

    A full disk or an unwritable folder then reads "... : <out>/sub-01/anat/<name>", the file
    the user looks for, rather than a path inside the hidden staging folder. Errors that name
    no staged file come back unchanged.
    """
    for name in (exc.filename2, exc.filename):
        if name and Path(name).is_relative_to(staging):
            dest = base / Path(name).relative_to(staging)
            return OSError(exc.errno, exc.strerror or str(exc), str(dest))
    return exc


class DerivativesDataSink(_DerivativesDataSink):
    """niworkflows' DerivativesDataSink writing at the dataset root, atomically.

    * ``out_path_base = ""``: no ``niworkflows/`` subfolder.
    * The reference space counts as a standard (MNI) space: sform/qform code 4.
    * Files are written into ``<base_directory>/.synth7t-staging/<uuid>/`` and moved into
      place with ``os.replace``, so a reader never sees a half-written file and a crash never
      destroys a previous output.
    * Files are copied byte for byte (niworkflows recompresses every .nii.gz at gzip level 9
      and hard-links other files into the work directory).
    * Figures (``datatype="figures"``) may be PNG.
    * The node re-runs when its inputs change (hash) or when a destination file is missing;
      otherwise the Nipype cache is reused (niworkflows' sink always re-runs).
    """

    out_path_base = ""
    _standard_spaces = [*_DerivativesDataSink._standard_spaces, REF_SPACE]
    # reportlets are PNG (several times faster to draw than niworkflows' SVG at 0.5 mm)
    _file_patterns = tuple(
        p.replace("{extension<.html|.svg>|.svg}", "{extension<.html|.svg|.png>|.svg}")
        for p in _DerivativesDataSink._file_patterns)

    @property
    def always_run(self):
        try:
            return not all(p.exists() for p in self._destinations())
        except Exception:  # noqa: BLE001 - inputs not resolvable yet: run
            return True

    def _destinations(self) -> list[Path]:
        base = Path(self.inputs.base_directory).absolute()
        entities = {k: getattr(self.inputs, k) for k in self._allowed_entities}
        rels = expected_relpath(
            self.inputs.source_file,
            ["".join(Path(f).suffixes) for f in _listify(self.inputs.in_file)],
            entities, compress=self.inputs.compress,
            dismiss_entities=self.inputs.dismiss_entities, sink_cls=type(self),
        )
        files = [base / self.out_path_base / rel for rel in rels]
        has_meta = bool(self._metadata) or (isdefined(self.inputs.meta_dict)
                                            and bool(self.inputs.meta_dict))
        if has_meta and len(files) == 1:
            files.append(files[0].parent / f"{files[0].name.split('.', 1)[0]}.json")
        return files

    def _run_interface(self, runtime):
        base = Path(self.inputs.base_directory if isdefined(self.inputs.base_directory)
                    else runtime.cwd).absolute()
        staging = base / STAGING / uuid.uuid4().hex
        for attempt in range(5):  # a concurrent run may remove the (empty) parent meanwhile
            try:
                staging.mkdir(parents=True)
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
        self.inputs.base_directory = str(staging)
        import niworkflows.interfaces.bids as _nw_bids

        copy_any = _nw_bids._copy_any
        _nw_bids._copy_any = _copy_bytes
        try:
            runtime = super()._run_interface(runtime)
            for key in ("out_file", "out_meta"):
                value = self._results.get(key)
                if not value:
                    continue
                moved = []
                for staged in _listify(value):
                    dest = base / Path(staged).relative_to(staging)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, dest)
                    moved.append(str(dest))
                self._results[key] = moved if isinstance(value, list) else moved[0]
        except OSError as exc:  # the copy into staging or the move out of it
            named = _at_destination(exc, staging, base)
            if named is exc:
                raise
            raise named from exc
        finally:
            _nw_bids._copy_any = copy_any
            self.inputs.base_directory = str(base)
            shutil.rmtree(staging, ignore_errors=True)
            try:
                staging.parent.rmdir()
            except OSError:
                pass
        return runtime


class _SidecarMetadataInputSpec(BaseInterfaceInputSpec):
    metadata = traits.Dict(mandatory=True, desc="static sidecar content")
    skull_stripped = traits.Bool(desc="value of SkullStripped known only at run time")
    warnings = traits.List(traits.Str, desc="conform warnings to record")
    extra = traits.Dict(desc="further run-time keys (e.g. the uncertainty summary)")


class _SidecarMetadataOutputSpec(TraitedSpec):
    out_dict = traits.Dict()


class SidecarMetadata(SimpleInterface):
    """Complete a sidecar with values known only at run time."""

    input_spec = _SidecarMetadataInputSpec
    output_spec = _SidecarMetadataOutputSpec

    def _run_interface(self, runtime):
        meta = dict(self.inputs.metadata)
        if isdefined(self.inputs.skull_stripped):
            meta["SkullStripped"] = bool(self.inputs.skull_stripped)
        if isdefined(self.inputs.warnings) and self.inputs.warnings:
            meta["ConformWarnings"] = list(self.inputs.warnings)
        if isdefined(self.inputs.extra) and self.inputs.extra:
            meta.update(self.inputs.extra)
        self._results["out_dict"] = meta
        return runtime


# --------------------------------------------------------------------------- naming helpers
def deriv_relpath(source_relpath: str, **entities) -> str:
    """Relative path of a derivative of ``source_relpath`` (``extension`` defaults to .nii.gz)."""
    ext = entities.pop("extension", ".nii.gz")
    return expected_relpath([source_relpath], [ext], entities, compress=None)[0]


def deriv_uri(source_relpath: str, **entities) -> str:
    """BIDS URI (this dataset) of a derivative of ``source_relpath``."""
    return f"bids::{deriv_relpath(source_relpath, **entities)}"


def raw_uri(source_relpath: str) -> str:
    return f"bids:raw:{source_relpath}"


def xfm_entities(src: str, dst: str, ext: str) -> dict:
    return {"from": src, "to": dst, "mode": "image", "suffix": "xfm", "extension": ext}


def _sink(output_dir, name, meta=None, compress=True, **entities):
    """A DerivativesDataSink node (``compress=None`` keeps the extension, for transforms)."""
    node = pe.Node(
        DerivativesDataSink(base_directory=str(output_dir), compress=compress, **entities),
        name=name, run_without_submitting=True, mem_gb=0.1,
    )
    if meta is not None:
        node.inputs.meta_dict = meta
    return node


def _common(provenance: dict | None, sources: list[str], **extra) -> dict:
    meta = {"Sources": sources}
    meta.update(extra)
    meta.update(provenance or {})
    return meta


# --------------------------------------------------------------------------- ds_*_wf factories
def init_ds_anat_wf(*, output_dir, contrast: str, source_relpath: str, source_file: str,
                    anchor: str, anchor_relpath: str, field_strength=None,
                    provenance: dict | None = None, name: str | None = None):
    """Store the native preprocessed image and brain mask of one input.

    Parameters
    ----------
    output_dir : str
        Root of the derivatives dataset.
    contrast : str
        ``T1w``, ``T2w`` or ``FLAIR``.
    source_relpath, source_file : str
        The raw image, relative to the BIDS root and absolute.
    anchor, anchor_relpath : str
        The anatomical reference (contrast and raw relative path).
    field_strength : float, optional
        Raw ``MagneticFieldStrength`` of the input.
    provenance : dict, optional
        Keys added to every sidecar (software versions, command line, random seed).

    Inputs
    ------
    preproc
        Conformed, bias-corrected image (native grid).
    mask
        Brain mask on the same grid.
    input_stripped
        Whether the input was already brain-extracted.
    warnings
        Conform warnings.

    Outputs
    -------
    preproc_file, mask_file
        Written derivative paths.
    """
    wf = pe.Workflow(name=name or f"ds_anat_{contrast.lower()}_wf")
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "mask", "input_stripped", "warnings"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["preproc_file", "mask_file"]),
                         name="outputnode")
    raw = raw_uri(source_relpath)
    is_anchor = contrast == anchor
    preproc_meta = _common(
        provenance, [raw],
        Description=f"{contrast} conformed to RAS (float32) and N4 bias-field corrected, "
                    "native grid; whole head unless the input was brain-extracted",
    )
    if field_strength is not None:
        preproc_meta["MagneticFieldStrength"] = field_strength
    meta_node = pe.Node(SidecarMetadata(metadata=preproc_meta), name="preproc_meta",
                        run_without_submitting=True)
    ds_preproc = _sink(output_dir, "ds_preproc", desc="preproc")
    ds_preproc.inputs.source_file = source_file

    if is_anchor:
        mask_sources = [raw, deriv_uri(source_relpath, desc="preproc")]
        mask_entities = {"desc": "brain", "suffix": "mask"}
        spatial = {}
    else:
        mask_sources = [
            raw, deriv_uri(anchor_relpath, desc="brain", suffix="mask"),
            deriv_uri(source_relpath, **xfm_entities(anchor, contrast, ".txt")),
        ]
        mask_entities = {"space": contrast, "desc": "brain", "suffix": "mask"}
        spatial = {"SpatialReference": raw}
    mask_meta = _common(provenance, mask_sources, SkullStripped=True, Type="Brain",
                        Description=f"brain mask on the native {contrast} grid", **spatial)
    ds_mask = _sink(output_dir, "ds_mask", meta=mask_meta, **mask_entities)
    ds_mask.inputs.source_file = source_file

    wf.connect([
        (inputnode, meta_node, [("input_stripped", "skull_stripped"), ("warnings", "warnings")]),
        (inputnode, ds_preproc, [("preproc", "in_file")]),
        (meta_node, ds_preproc, [("out_dict", "meta_dict")]),
        (inputnode, ds_mask, [("mask", "in_file")]),
        (ds_preproc, outputnode, [("out_file", "preproc_file")]),
        (ds_mask, outputnode, [("out_file", "mask_file")]),
    ])
    return wf


def init_ds_registration_wf(*, output_dir, anchor: str, anchor_relpath: str,
                            anchor_file: str, others: dict[str, tuple[str, str]] | None = None,
                            provenance: dict | None = None, name: str = "ds_registration_wf"):
    """Store the transforms: anatomical reference <-> MRIxFields, other contrasts <-> reference.

    Parameters
    ----------
    output_dir : str
        Root of the derivatives dataset.
    anchor, anchor_relpath, anchor_file : str
        Contrast, BIDS-relative and absolute path of the anatomical reference.
    others : dict
        ``{contrast: (relpath, abs path)}`` of the images registered rigidly to the anchor.
    provenance : dict, optional
        Keys added to every sidecar.

    Inputs
    ------
    anchor2ref, ref2anchor
        ITK .h5 composite transforms.
    <c>2anchor, anchor2<c>
        ITK text rigid transforms per other contrast ``c`` (lower case).

    Outputs
    -------
    anchor2ref_file
        Written forward transform.
    """
    others = others or {}
    fields = ["anchor2ref", "ref2anchor"]
    for c in others:
        fields += [f"{c.lower()}2anchor", f"anchor2{c.lower()}"]
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["anchor2ref_file"]), name="outputnode")
    raw = raw_uri(anchor_relpath)
    reg_sources = [raw, deriv_uri(anchor_relpath, desc="preproc"),
                   deriv_uri(anchor_relpath, desc="brain", suffix="mask")]
    for src, dst, field in ((anchor, REF_SPACE, "anchor2ref"), (REF_SPACE, anchor, "ref2anchor")):
        meta = _common(provenance, reg_sources, SkullStripped=True,
                       Description=f"{src} -> {dst} (affine + SyN, ITK composite .h5); "
                                   "estimated on brain-extracted images",
                       SpatialReference=REF_SPATIAL_REFERENCE)
        ents = xfm_entities(src, dst, ".h5")
        ents.pop("extension")
        node = _sink(output_dir, f"ds_{field}", meta=meta, compress=None, **ents)
        node.inputs.source_file = anchor_file
        wf.connect(inputnode, field, node, "in_file")
        if field == "anchor2ref":
            wf.connect(node, "out_file", outputnode, "anchor2ref_file")
    for c, (relpath, path) in others.items():
        sources = [raw_uri(relpath), raw, deriv_uri(relpath, desc="preproc"),
                   deriv_uri(anchor_relpath, desc="preproc")]
        for src, dst, field in ((c, anchor, f"{c.lower()}2anchor"),
                                (anchor, c, f"anchor2{c.lower()}")):
            meta = _common(provenance, sources, SkullStripped=False,
                           Description=f"rigid {src} -> {dst} (ITK text)")
            ents = xfm_entities(src, dst, ".txt")
            ents.pop("extension")
            node = _sink(output_dir, f"ds_{field}", meta=meta, compress=None, **ents)
            node.inputs.source_file = path
            wf.connect(inputnode, field, node, "in_file")
    return wf


def synthesis_metadata(*, contrast: str, routing, model_provenance: dict,
                       source_protocol: dict | None = None, reads_protocol: bool = False) -> dict:
    """Sidecar keys of a synthetic 7T image; ``SourceProtocol`` (what a model with protocol
    conditioning was told: ms and degrees from the input's sidecar) when ``reads_protocol``."""
    meta = {
        "MagneticFieldStrength": 7,
        "SourceMagneticFieldStrength": routing.raw,
        "SourceFieldBin": routing.bin,
        "FieldStrengthSource": routing.source,
        "SynthesisModel": model_provenance,
        "IntensityScale": "[0, 1]; exactly 0 outside the brain mask",
    }
    if reads_protocol:
        meta["SourceProtocol"] = (dict(source_protocol) if source_protocol else
                                  "not stated in the input's sidecar (the model's 'not known')")
    return meta


def init_ds_synthesis_wf(*, output_dir, contrast: str, source_relpath: str, source_file: str,
                         anchor: str, anchor_relpath: str, anchor_file: str, routing,
                         model_provenance: dict, storage_dtype: str = "uint16",
                         write_ref_mask: bool = False, provenance: dict | None = None,
                         uncertainty: bool = False, source_protocol: dict | None = None,
                         reads_protocol: bool = False, name: str | None = None):
    """Store the reference-space input, the synthetic 7T image (reference and native space).

    Parameters
    ----------
    output_dir : str
        Root of the derivatives dataset.
    contrast, source_relpath, source_file : str
        The input image.
    anchor, anchor_relpath, anchor_file : str
        The anatomical reference image.
    routing : synth7t.fields.FieldRouting
        Field routing of the input.
    model_provenance : dict
        ``SynthesisModel`` (from ``ModelEntry.provenance()``).
    storage_dtype : str
        Storage of reference-space images (``uint16``/``int16`` scaled, or ``float32``).
    write_ref_mask : bool
        Also store the reference-space brain mask (once per participant/session).
    provenance : dict, optional
        Keys added to every sidecar.
    uncertainty : bool
        Also store the uncertainty maps (``desc-uncertainty``, reference and native grid) and
        put their summary into the synthetic images' sidecars.
    source_protocol : dict, optional
        The input's protocol (:func:`synth7t.io.protocol_from_sidecar`).
    reads_protocol : bool
        The model is conditioned on it: the sidecars record it (``SourceProtocol``).

    Inputs
    ------
    ref_preproc, ref_synth, native_synth, ref_mask
    ref_unc, native_unc, unc_summary
        With ``uncertainty``.

    Outputs
    -------
    ref_synth_file, native_synth_file
    """
    wf = pe.Workflow(name=name or f"ds_synthesis_{contrast.lower()}_wf")
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["ref_preproc", "ref_synth", "native_synth", "ref_mask", "ref_unc", "native_unc",
                "unc_summary"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["ref_synth_file", "native_synth_file"]),
                         name="outputnode")
    raw = raw_uri(source_relpath)
    is_anchor = contrast == anchor
    to_ref = [deriv_uri(anchor_relpath, **xfm_entities(anchor, REF_SPACE, ".h5"))]
    to_native = [deriv_uri(anchor_relpath, **xfm_entities(REF_SPACE, anchor, ".h5"))]
    if not is_anchor:
        to_ref.insert(0, deriv_uri(source_relpath, **xfm_entities(contrast, anchor, ".txt")))
        to_native.append(deriv_uri(source_relpath, **xfm_entities(anchor, contrast, ".txt")))
    ref_mask_uri = deriv_uri(anchor_relpath, space=REF_SPACE, desc="brain", suffix="mask")
    ref_preproc_uri = deriv_uri(source_relpath, space=REF_SPACE, desc="preproc")
    ref_synth_uri = deriv_uri(source_relpath, space=REF_SPACE, desc="synth7T")
    native_mask_uri = (deriv_uri(source_relpath, desc="brain", suffix="mask") if is_anchor else
                       deriv_uri(source_relpath, space=contrast, desc="brain", suffix="mask"))
    space_meta = {"SpatialReference": REF_SPATIAL_REFERENCE, "Resolution": REF_RESOLUTION,
                  "StorageDataType": storage_dtype}
    synth_meta = synthesis_metadata(contrast=contrast, routing=routing,
                                    model_provenance=model_provenance,
                                    source_protocol=source_protocol,
                                    reads_protocol=reads_protocol)

    ds_ref_preproc = _sink(
        output_dir, "ds_ref_preproc", space=REF_SPACE, desc="preproc",
        meta=_common(provenance, [raw, deriv_uri(source_relpath, desc="preproc"), *to_ref,
                                  ref_mask_uri],
                     SkullStripped=True, MagneticFieldStrength=routing.raw, **space_meta,
                     Description=f"{contrast} resampled (linear) to the {REF_SPACE} grid, "
                                 "brain-extracted and normalised to [0, 1] (model input)"))
    ds_ref_synth = _sink(
        output_dir, "ds_ref_synth", space=REF_SPACE, desc="synth7T",
        meta=_common(provenance, [raw, ref_preproc_uri, ref_mask_uri], SkullStripped=True,
                     **space_meta, **synth_meta,
                     Description=f"synthetic 7T {contrast} on the {REF_SPACE} grid"))
    ds_native_synth = _sink(
        output_dir, "ds_native_synth", desc="synth7T",
        meta=_common(provenance, [raw, ref_synth_uri, *to_native, native_mask_uri],
                     SkullStripped=True, **synth_meta,
                     Description=f"synthetic 7T {contrast} resampled (linear) to the native "
                                 f"{contrast} grid"))
    for node in (ds_ref_preproc, ds_ref_synth, ds_native_synth):
        node.inputs.source_file = source_file
    if uncertainty:
        _add_uncertainty_sinks(wf, inputnode, ds_ref_synth, ds_native_synth,
                               output_dir=output_dir, contrast=contrast, raw=raw,
                               source_file=source_file, provenance=provenance,
                               space_meta=space_meta, model_provenance=model_provenance,
                               ref_synth_uri=ref_synth_uri, ref_mask_uri=ref_mask_uri,
                               native_synth_uri=deriv_uri(source_relpath, desc="synth7T"),
                               to_native=to_native, native_mask_uri=native_mask_uri)
    wf.connect([
        (inputnode, ds_ref_preproc, [("ref_preproc", "in_file")]),
        (inputnode, ds_ref_synth, [("ref_synth", "in_file")]),
        (inputnode, ds_native_synth, [("native_synth", "in_file")]),
        (ds_ref_synth, outputnode, [("out_file", "ref_synth_file")]),
        (ds_native_synth, outputnode, [("out_file", "native_synth_file")]),
    ])
    if write_ref_mask:
        anchor_raw = raw_uri(anchor_relpath)
        ds_ref_mask = _sink(
            output_dir, "ds_ref_mask", space=REF_SPACE, desc="brain", suffix="mask",
            meta=_common(provenance, [anchor_raw,
                                      deriv_uri(anchor_relpath, desc="brain", suffix="mask"),
                                      deriv_uri(anchor_relpath,
                                                **xfm_entities(anchor, REF_SPACE, ".h5"))],
                         SkullStripped=True, Type="Brain",
                         SpatialReference=REF_SPATIAL_REFERENCE, Resolution=REF_RESOLUTION,
                         Description=f"brain mask on the {REF_SPACE} grid"))
        ds_ref_mask.inputs.source_file = anchor_file
        wf.connect(inputnode, "ref_mask", ds_ref_mask, "in_file")
    return wf


def _add_uncertainty_sinks(wf, inputnode, ds_ref_synth, ds_native_synth, *, output_dir,
                           contrast, raw, source_file, provenance, space_meta, model_provenance,
                           ref_synth_uri, ref_mask_uri, native_synth_uri, to_native,
                           native_mask_uri):
    """``desc-uncertainty`` maps beside the synthetic images, and the summary in their sidecars."""
    from synth7t.uncertainty import THRESHOLD, UNITS

    unc_meta = {"Units": UNITS, "UncertaintyThreshold": THRESHOLD,
                "SynthesisModel": model_provenance,
                "IntensityScale": "expected absolute error; exactly 0 outside the brain mask"}
    ds_ref_unc = _sink(
        output_dir, "ds_ref_unc", space=REF_SPACE, desc="uncertainty",
        meta=_common(provenance, [raw, ref_synth_uri, ref_mask_uri], SkullStripped=True,
                     **space_meta, **unc_meta,
                     Description=f"per-voxel uncertainty of the synthetic 7T {contrast} on the "
                                 f"{REF_SPACE} grid"))
    ds_native_unc = _sink(
        output_dir, "ds_native_unc", desc="uncertainty",
        meta=_common(provenance, [raw, deriv_uri_of(ref_synth_uri, "uncertainty"), *to_native,
                                  native_mask_uri, native_synth_uri],
                     SkullStripped=True, **unc_meta,
                     Description=f"per-voxel uncertainty of the synthetic 7T {contrast} resampled "
                                 f"(linear) to the native {contrast} grid"))
    for node in (ds_ref_unc, ds_native_unc):
        node.inputs.source_file = source_file
    wf.connect([
        (inputnode, ds_ref_unc, [("ref_unc", "in_file")]),
        (inputnode, ds_native_unc, [("native_unc", "in_file")]),
    ])
    # the synthetic images' sidecars gain the run-time summary (and the method used)
    for ds in (ds_ref_synth, ds_native_synth):
        meta = pe.Node(SidecarMetadata(metadata=dict(ds.inputs.meta_dict)),
                       name=f"meta_{ds.name}", run_without_submitting=True)
        ds.inputs.meta_dict = Undefined  # now set by the connection
        wf.connect([(inputnode, meta, [("unc_summary", "extra")]),
                    (meta, ds, [("out_dict", "meta_dict")])])


def deriv_uri_of(uri: str, desc: str) -> str:
    """The BIDS URI of a sibling derivative: ``desc-<old>`` replaced by ``desc-<desc>``."""
    import re

    return re.sub(r"_desc-[A-Za-z0-9]+_", f"_desc-{desc}_", uri, count=1)
