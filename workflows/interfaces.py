"""Nipype interfaces wrapping the ``synth7t`` science functions.

Every interface is a :class:`~nipype.interfaces.base.SimpleInterface` whose ``_run_interface``
imports the ``synth7t`` function it wraps (so importing this module stays cheap and worker
processes load torch/antspy only when they need them). Thread counts are ``nohash`` inputs:
changing ``--omp-nthreads`` never invalidates the cache.

Transform lists follow the ANTs convention (``antsApplyTransforms -t``): the *last* transform is
applied first to the moving image, e.g. ``[T1w->ref, T2w->T1w]`` maps a T2w image to the
reference grid and ``[T1w->T2w, ref->T1w]`` maps a reference-grid image to the T2w grid.
"""
from __future__ import annotations

import logging
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .storage import ALIGNED_CODE, MNI_CODE, SCANNER_CODE, save_image

LOGGER = logging.getLogger("nipype.interface")


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mat", ".h5", ".txt"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def _out(runtime, in_file: str, tag: str, ext: str = ".nii.gz") -> str:
    return str(Path(runtime.cwd) / f"{_stem(in_file)}_{tag}{ext}")


def _load(path):
    import nibabel as nb

    return nb.load(str(path))


def release_memory() -> None:
    """Hand the heap a node freed back to the operating system (glibc ``malloc_trim``).

    A Nipype worker process outlives its node, and glibc keeps freed blocks below its mmap
    threshold (up to 32 MB each: feature maps, slices) in the process: after synthesising a
    0.5 mm volume a worker stayed at 0.95 GB, 0.42 GB after trimming (0.06 s). Two such workers
    side by side took a three-contrast run over 4 GB. No-op where there is no glibc.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryReleasingInterface(SimpleInterface):
    """A :class:`SimpleInterface` that calls :func:`release_memory` when it has run."""

    def run(self, *args, **kwargs):
        try:
            return super().run(*args, **kwargs)
        finally:
            release_memory()


#: ITK threads for every antspyx node. ITK fixes its thread count when a process first uses it,
#: and antsRegistration's multithreaded metric sums vary from run to run with more than one
#: thread, so ANTs nodes run single-threaded and registrations are bit-reproducible for a seed
#: (N4 runs on a fixed two threads in a child process: synth7t.preprocess.n4_correct_isolated).
#: Parallelism comes from running nodes side by side (``--nprocs``); ``--omp-nthreads`` sets the
#: torch threads of the synthesis nodes.
ANTS_NTHREADS = 1


class _ThreadsInputSpec(BaseInterfaceInputSpec):
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True,
                              desc="threads for ITK/torch (does not affect the cache)")


# --------------------------------------------------------------------------- conform
class _ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw BIDS image")


class _ConformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="float32 RAS image with repaired header")
    warnings = traits.List(traits.Str, desc="header problems found and repaired")


class Conform(MemoryReleasingInterface):
    """Validate and conform an image (:func:`synth7t.io.conform`)."""

    input_spec = _ConformInputSpec
    output_spec = _ConformOutputSpec

    def _run_interface(self, runtime):
        from synth7t.io import atomic_write_nifti, conform, load_image

        img = load_image(self.inputs.in_file)
        out, warnings = conform(img, name=Path(self.inputs.in_file).name)
        name = Path(self.inputs.in_file).name
        for msg in warnings:
            LOGGER.warning("%s", msg if str(msg).startswith(name) else f"{name}: {msg}")
        out_file = _out(runtime, self.inputs.in_file, "conform")
        atomic_write_nifti(out, out_file)
        self._results["out_file"] = out_file
        self._results["warnings"] = [str(w) for w in warnings]
        return runtime


# --------------------------------------------------------------------------- N4
class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, desc="optional mask restricting the bias-field fit")
    # not the scheduler's omp_nthreads (which never enters the cache key): N4's result depends
    # on its thread count, so a work folder of another count must not be reused
    threads = traits.Int(desc="ITK threads of N4 in its own process (part of the cache key); "
                              "default synth7t.preprocess.N4_THREADS")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True)


class N4BiasFieldCorrection(MemoryReleasingInterface):
    """N4 bias-field correction at native resolution (:func:`synth7t.preprocess.n4_correct`)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from synth7t.preprocess import N4_THREADS, n4_correct_isolated

        mask = _load(self.inputs.mask_file) if isdefined(self.inputs.mask_file) else None
        threads = self.inputs.threads if isdefined(self.inputs.threads) else N4_THREADS
        # a process of its own, for its thread count (see n4_correct_isolated)
        out = n4_correct_isolated(_load(self.inputs.in_file), mask=mask, threads=threads)
        out_file = _out(runtime, self.inputs.in_file, "n4")
        # scanner xform codes and mm units: the header the derivatives sink wants for a native
        # image, so it copies the file instead of rewriting it (~40 s for a 1 mm head)
        save_image(np.asanyarray(out.dataobj, dtype=np.float32), out.affine, out_file,
                   dtype="float32", code=SCANNER_CODE)
        self._results["out_file"] = out_file
        return runtime


# --------------------------------------------------------------------------- skull stripping
def _mask_from_nonzero(img):
    """Brain mask of an already brain-extracted image: non-zero voxels, holes filled."""
    import numpy as np
    from scipy import ndimage

    data = np.asanyarray(img.dataobj)
    mask = np.nan_to_num(data) > 0
    mask = ndimage.binary_fill_holes(mask)
    return mask


def _is_stripped(img, mode: str) -> bool:
    if mode == "skip":
        return True
    if mode == "force":
        return False
    from synth7t.preprocess import detect_skull_stripped

    return bool(detect_skull_stripped(img))


class _SkullStripInputSpec(_ThreadsInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected image")
    mode = traits.Enum("auto", "force", "skip", usedefault=True,
                       desc="auto: detect brain-extracted input; force: always strip; "
                            "skip: trust the input is brain-extracted")
    method = traits.Enum("deep", "template", usedefault=True,
                         desc="deep: deep-learning engine (synth7t.brain_extraction); "
                              "template: Colin27 registration")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True, nohash=True,
                         desc="torch device of the deep engine (does not affect the cache)")
    ants_nthreads = traits.Int(ANTS_NTHREADS, usedefault=True, nohash=True,
                               desc="ITK threads of the template method")
    seed = traits.Int(0, usedefault=True, desc="random seed")


class _SkullStripOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="brain-extracted image")
    out_mask = File(exists=True, desc="brain mask (uint8)")
    input_stripped = traits.Bool(desc="the input was already brain-extracted")
    provenance = traits.Dict(desc="BrainExtraction sidecar entry of what ran")


class SkullStrip(MemoryReleasingInterface):
    """Brain extraction (:func:`synth7t.brain_extraction.extract_brain`), honouring
    ``--skull-strip`` and ``--brain-extraction``; ``omp_nthreads`` are the torch threads of the
    deep engine (ITK threads of the template method: ``ants_nthreads``)."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        import warnings

        import numpy as np

        from synth7t.brain_extraction import extract_brain, verify_engine

        if self.inputs.method == "deep":
            verify_engine()  # tampered weights are refused before any work
        img = _load(self.inputs.in_file)
        stripped = _is_stripped(img, self.inputs.mode)
        if stripped:
            mask = _mask_from_nonzero(img)
            prov = {"Method": "none", "Description": "input already brain-extracted: mask = "
                                                     "non-zero voxels, holes filled"}
        else:
            with warnings.catch_warnings():  # a fallback is logged below
                warnings.simplefilter("ignore", RuntimeWarning)
                res = extract_brain(img, method=self.inputs.method, device=self.inputs.device,
                                    threads=self.inputs.omp_nthreads, seed=self.inputs.seed,
                                    ants_threads=self.inputs.ants_nthreads)
            mask_img = res.mask
            mask = np.asanyarray(mask_img.dataobj) > 0
            if mask.shape != img.shape[:3] or not np.allclose(mask_img.affine, img.affine,
                                                              atol=1e-3):
                raise RuntimeError("brain extraction returned a mask on another grid than its "
                                   "input")
            prov = dict(res.provenance, Seconds=round(res.seconds, 1))
            if prov.get("Fallback"):
                LOGGER.warning("%s: brain extraction: %s; used the template method",
                               Path(self.inputs.in_file).name, prov["Fallback"])
            LOGGER.info("brain extraction (%s) of %s: %.1f s, %.0f mL", self.inputs.method,
                        Path(self.inputs.in_file).name, res.seconds,
                        mask.sum() * float(np.prod(img.header.get_zooms()[:3])) / 1000)
        brain_data = np.asanyarray(img.dataobj).astype(np.float32) * mask
        out_file = _out(runtime, self.inputs.in_file, "brain")
        out_mask = _out(runtime, self.inputs.in_file, "mask")
        save_image(brain_data, img.affine, out_file, dtype="float32", code=SCANNER_CODE)
        save_image(mask, img.affine, out_mask, dtype="uint8", code=SCANNER_CODE)
        self._results.update(out_file=out_file, out_mask=out_mask, input_stripped=stripped,
                             provenance=prov)
        return runtime


class _DetectInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mode = traits.Enum("auto", "force", "skip", usedefault=True)


class _DetectOutputSpec(TraitedSpec):
    stripped = traits.Bool(desc="the image is brain-extracted")


class DetectSkullStripped(SimpleInterface):
    """Whether an image is already brain-extracted (:func:`~synth7t.preprocess.detect_skull_stripped`)."""

    input_spec = _DetectInputSpec
    output_spec = _DetectOutputSpec

    def _run_interface(self, runtime):
        self._results["stripped"] = _is_stripped(_load(self.inputs.in_file), self.inputs.mode)
        return runtime


# --------------------------------------------------------------------------- registration
class _RegisterToReferenceInputSpec(_ThreadsInputSpec):
    in_file = File(exists=True, mandatory=True, desc="brain-extracted anatomical reference")
    in_mask = File(exists=True, mandatory=True, desc="its brain mask")
    seed = traits.Int(0, usedefault=True)


class _RegisterToReferenceOutputSpec(TraitedSpec):
    forward_transform = File(exists=True, desc="native -> reference (ITK .h5)")
    reverse_transform = File(exists=True, desc="reference -> native (ITK .h5)")


class RegisterToReference(MemoryReleasingInterface):
    """Register a brain to the MRIxFields reference (:func:`synth7t.preprocess.register_to_reference`)."""

    input_spec = _RegisterToReferenceInputSpec
    output_spec = _RegisterToReferenceOutputSpec

    def _run_interface(self, runtime):
        from synth7t.preprocess import register_to_reference

        xfms = register_to_reference(
            _load(self.inputs.in_file), _load(self.inputs.in_mask),
            out_prefix=str(Path(runtime.cwd) / "to_ref_"),
            threads=self.inputs.omp_nthreads, seed=self.inputs.seed,
        )
        self._results["forward_transform"] = str(xfms["forward"])
        self._results["reverse_transform"] = str(xfms["inverse"])
        return runtime


def _write_itk_affine(ras: "np.ndarray", out_file: str) -> str:
    """Write a RAS->RAS 4x4 affine as an ITK (LPS) text transform at full precision."""
    import numpy as np

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ ras @ flip
    params = [*lps[:3, :3].ravel(), *lps[:3, 3]]
    Path(out_file).write_text(
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
        "FixedParameters: 0 0 0\n")
    return out_file


def invert_linear_itk(in_file: str, out_file: str) -> str:
    """Write the exact inverse of an ITK linear transform (.mat/.txt) as ITK text."""
    import numpy as np
    from nitransforms.io.itk import ITKLinearTransform

    ras = ITKLinearTransform.from_filename(in_file).to_ras()
    return _write_itk_affine(np.linalg.inv(ras), out_file)


def linear_itk_to_txt(in_file: str, out_file: str) -> str:
    """Copy an ITK linear transform to the ITK text format (``*_xfm.txt`` derivatives)."""
    from nitransforms.io.itk import ITKLinearTransform

    return _write_itk_affine(ITKLinearTransform.from_filename(in_file).to_ras(), out_file)


class _RegisterRigidInputSpec(_ThreadsInputSpec):
    moving_file = File(exists=True, mandatory=True)
    fixed_file = File(exists=True, mandatory=True)
    seed = traits.Int(0, usedefault=True)


class _RegisterRigidOutputSpec(TraitedSpec):
    forward_transform = File(exists=True, desc="moving -> fixed (ITK text)")
    reverse_transform = File(exists=True, desc="fixed -> moving (ITK text)")


class RegisterRigid(MemoryReleasingInterface):
    """Rigid registration (:func:`synth7t.preprocess.register_rigid`) and its exact inverse."""

    input_spec = _RegisterRigidInputSpec
    output_spec = _RegisterRigidOutputSpec

    def _run_interface(self, runtime):
        from synth7t.preprocess import register_rigid

        xfm = register_rigid(
            _load(self.inputs.moving_file), _load(self.inputs.fixed_file),
            out_prefix=str(Path(runtime.cwd) / "rigid_"),
            threads=self.inputs.omp_nthreads, seed=self.inputs.seed,
        )
        cwd = Path(runtime.cwd)
        self._results["forward_transform"] = linear_itk_to_txt(str(xfm), str(cwd / "fwd_xfm.txt"))
        self._results["reverse_transform"] = invert_linear_itk(str(xfm), str(cwd / "inv_xfm.txt"))
        return runtime


# --------------------------------------------------------------------------- resampling
class _MaskToReferenceInputSpec(BaseInterfaceInputSpec):
    in_mask = File(exists=True, mandatory=True, desc="native brain mask")
    transforms = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="native -> reference (ANTs order)")


class _MaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True)


class MaskToReference(MemoryReleasingInterface):
    """Resample a brain mask into the 0.5 mm reference grid (uint8, MNI sform).

    Shape-based interpolation (:func:`synth7t.brain_extraction.resample_mask`): the mask's
    signed distance map is resampled linearly and its zero level taken, then the largest
    component kept and holes filled, so thick native slices leave no staircase on the 0.5 mm
    grid.
    """

    input_spec = _MaskToReferenceInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        from synth7t.brain_extraction import mask_to_reference
        from synth7t.reference import REF_AFFINE

        mask = mask_to_reference(_load(self.inputs.in_mask), list(self.inputs.transforms))
        out_mask = _out(runtime, self.inputs.in_mask, "ref")
        save_image(mask, REF_AFFINE, out_mask, dtype="uint8", code=MNI_CODE)
        self._results["out_mask"] = out_mask
        return runtime


class _MaskToNativeInputSpec(BaseInterfaceInputSpec):
    in_mask = File(exists=True, mandatory=True, desc="mask on another grid")
    reference_file = File(exists=True, mandatory=True, desc="image defining the target grid")
    transforms = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="source grid -> target grid (ANTs order)")


class MaskToNative(MemoryReleasingInterface):
    """Resample a mask onto another native grid (:func:`synth7t.preprocess.to_native`), by
    shape-based interpolation as :class:`MaskToReference`."""

    input_spec = _MaskToNativeInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        from synth7t.brain_extraction import resample_mask
        from synth7t.preprocess import to_native

        ref = _load(self.inputs.reference_file)
        tlist = list(self.inputs.transforms)
        mask = resample_mask(_load(self.inputs.in_mask),
                             lambda img: to_native(img, ref, tlist, interpolation="linear"))
        out_mask = _out(runtime, self.inputs.reference_file, "mask")
        save_image(mask, ref.affine, out_mask, dtype="uint8",
                   code=ALIGNED_CODE)  # stored as space-<contrast>: "aligned" xform code
        self._results["out_mask"] = out_mask
        return runtime


class _ResampleInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected native image")
    transforms = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="native -> reference (ANTs order)")


class _ResampleOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image on the reference grid (float32, uncompressed)")


class ResampleToReference(MemoryReleasingInterface):
    """Resample a native image onto the 0.5 mm reference grid (linear), nothing else.

    Apart from :class:`PrepareSynthesisInput` so that it needs no brain mask: in the graph it
    runs beside :class:`MaskToReference` instead of after it (~8 s of a T1w-only run on two
    cores). The file is an uncompressed float32 scratch file of the working directory (230 MB at
    0.5 mm; gzip would cost more than the resampling saves).
    """

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        from synth7t.preprocess import to_reference

        out = to_reference(_load(self.inputs.in_file), list(self.inputs.transforms),
                           interpolation="linear")
        out_file = _out(runtime, self.inputs.in_file, "ref", ext=".nii")
        save_image(out.dataobj, out.affine, out_file, dtype="float32", code=MNI_CODE)
        self._results["out_file"] = out_file
        return runtime


class _PrepareInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="bias-corrected image on the reference grid (ResampleToReference)")
    ref_mask = File(exists=True, mandatory=True, desc="brain mask on the reference grid")
    storage_dtype = traits.Enum("uint16", "int16", "float32", usedefault=True)


class _PrepareOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="reference-grid brain, [0, 1], 0 outside the mask")
    excess_file = File(exists=True, desc="what the clip at 1 removed, as flat indices and "
                                         "values (.npz; synth7t.uncertainty.add_saturation)")


def save_excess(excess, path: str) -> str:
    """The non-zero voxels of a clip excess (at most 0.2 % of the brain) as an ``.npz``."""
    import numpy as np

    flat = np.flatnonzero(excess)
    with open(path, "wb") as fh:
        np.savez(fh, shape=np.asarray(excess.shape), index=flat,
                 value=np.asarray(excess).ravel()[flat].astype(np.float32))
    return path


def load_excess(path: str):
    """Inverse of :func:`save_excess` (no pickle)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        out = np.zeros(tuple(int(n) for n in z["shape"]), dtype=np.float32)
        out.ravel()[z["index"]] = z["value"]
    return out


class PrepareSynthesisInput(MemoryReleasingInterface):
    """Skull-strip a reference-grid image with the reference mask and normalise it to [0, 1]
    (and keep what the clip at 1 removed, for the uncertainty map)."""

    input_spec = _PrepareInputSpec
    output_spec = _PrepareOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from synth7t.intensity import normalise

        img = _load(self.inputs.in_file)
        mask = np.asanyarray(_load(self.inputs.ref_mask).dataobj) > 0
        data, excess = normalise(np.asanyarray(img.dataobj, dtype=np.float32), mask,
                                 excess=True)
        out_file = _out(runtime, self.inputs.in_file, "preproc")
        save_image(data, img.affine, out_file, dtype=self.inputs.storage_dtype, code=MNI_CODE)
        self._results["out_file"] = out_file
        self._results["excess_file"] = save_excess(excess, str(Path(runtime.cwd) / "excess.npz"))
        return runtime


class _SynthesizeInputSpec(_ThreadsInputSpec):
    in_file = File(exists=True, mandatory=True, desc="reference-grid input in [0, 1]")
    mask_file = File(exists=True, mandatory=True, desc="reference-grid brain mask")
    contrast = traits.Enum("T1w", "T2w", "FLAIR", mandatory=True)
    field_bin = traits.Float(mandatory=True, desc="source field bin (T)")
    model_name = traits.Str("default", usedefault=True, desc="registry entry name")
    model_sha256 = traits.Str(desc="SHA-256 of the weights chosen at build time (cache key)")
    model_dir = traits.Str(desc="--model-dir (registry.json overriding the shipped one)")
    passthrough = traits.Bool(False, usedefault=True,
                              desc="7 T input: copy the normalised input, no synthesis")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    storage_dtype = traits.Enum("uint16", "int16", "float32", usedefault=True)
    other_files = InputMultiObject(File(exists=True),
                                   desc="other contrasts on the reference grid (multi-contrast "
                                        "models)")
    other_contrasts = traits.List(traits.Str, desc="contrast of each of other_files")
    uncertainty = traits.Bool(False, usedefault=True,
                              desc="also write the per-voxel uncertainty map (models with an "
                                   "uncertainty head)")
    tta = traits.Bool(False, usedefault=True, desc="average with the left-right flipped pass")
    shrinkage = traits.Bool(False, usedefault=True,
                            desc="shrink the output where the uncertainty head explains its local "
                                 "variation (synth7t.shrinkage; models whose config asks for it)")
    excess_file = File(exists=True, desc="the input's clip excess (PrepareSynthesisInput), added "
                                         "to the uncertainty map")
    protocol = traits.Dict(traits.Str, traits.Float,
                           desc="the input's acquisition protocol (synth7t.io."
                                "protocol_from_sidecar: TR/TE/TI in ms, FA in degrees), read by "
                                "models with protocol conditioning")


class _SynthesizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="synthetic 7T image on the reference grid")
    out_uncertainty = File(desc="uncertainty map on the reference grid (expected absolute "
                                "error, [0, 1] units; 0 outside the mask)")
    uncertainty_summary = traits.Dict(desc="sidecar summary (synth7t.uncertainty.summarise)")


class Synthesize(MemoryReleasingInterface):
    """Field-specific 7T synthesis (:mod:`synth7t.registry`, :mod:`synth7t.inference`)."""

    input_spec = _SynthesizeInputSpec
    output_spec = _SynthesizeOutputSpec

    def _run_interface(self, runtime):
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        from synth7t.intensity import normalise

        img = _load(self.inputs.in_file)
        volume = np.asanyarray(img.dataobj, dtype=np.float32)
        mask = np.asanyarray(_load(self.inputs.mask_file).dataobj) > 0
        unc = synth = None
        if self.inputs.passthrough:
            out = normalise(volume, mask)
        else:
            from synth7t.inference import load_synthesizer, resolve_device
            from synth7t.registry import Registry

            model_dir = self.inputs.model_dir if isdefined(self.inputs.model_dir) else None
            entry = Registry.load(model_dir or None).get(
                self.inputs.contrast, self.inputs.field_bin, name=self.inputs.model_name)
            sha = getattr(entry, "sha256", None)
            if isdefined(self.inputs.model_sha256) and sha and sha != self.inputs.model_sha256:
                raise RuntimeError(
                    f"model {self.inputs.model_name} for {self.inputs.contrast} at "
                    f"{self.inputs.field_bin:g} T changed since the graph was built "
                    f"(sha256 {sha} != {self.inputs.model_sha256})")
            device = str(resolve_device(self.inputs.device))
            synth = load_synthesizer(entry, device=device)
            others = None
            if isdefined(self.inputs.other_files) and self.inputs.other_files:
                others = {
                    c: np.asanyarray(_load(f).dataobj, dtype=np.float32)
                    for c, f in zip(self.inputs.other_contrasts, self.inputs.other_files)
                }
            protocol = (dict(self.inputs.protocol) if isdefined(self.inputs.protocol)
                        and self.inputs.protocol else None)
            res = synth.predict(volume, mask, others=others, threads=self.inputs.omp_nthreads,
                                tta=self.inputs.tta, return_uncertainty=self.inputs.uncertainty,
                                protocol=protocol, shrinkage=self.inputs.shrinkage)
            out, unc = res if self.inputs.uncertainty else (res, None)
        if self.inputs.uncertainty and unc is None:
            raise RuntimeError(f"model {self.inputs.model_name} for {self.inputs.contrast} "
                               "has no uncertainty head; run with --no-uncertainty")
        out = np.asarray(out, dtype=np.float32)
        np.clip(np.nan_to_num(out, copy=False), 0.0, 1.0, out=out)  # in place: 230 MB at 0.5 mm
        out[~mask] = 0.0
        out_file = str(Path(runtime.cwd) / f"synth7T_{self.inputs.contrast}.nii.gz")
        # the node holds omp_nthreads cores and gzip releases the GIL: the image is compressed
        # while the uncertainty map is (~2 s of a 0.5 mm volume)
        with ThreadPoolExecutor(max_workers=1) as pool:
            saved = pool.submit(save_image, out, img.affine, out_file,
                                dtype=self.inputs.storage_dtype, code=MNI_CODE)
            if self.inputs.uncertainty:
                self._save_uncertainty(runtime, unc, mask, img.affine, synth)
            saved.result()
        self._results["out_file"] = out_file
        return runtime

    def _save_uncertainty(self, runtime, unc, mask, affine, synth) -> None:
        import numpy as np

        from synth7t.uncertainty import (METHOD, METHOD_NO_TTA, NOVELTY, SATURATION,
                                         add_saturation, summarise)

        unc = np.asarray(unc, dtype=np.float32)
        excess = (load_excess(self.inputs.excess_file) if isdefined(self.inputs.excess_file)
                  else None)
        add_saturation(np.nan_to_num(unc, copy=False), excess)
        np.clip(unc, 0.0, 1.0, out=unc)
        unc[~mask] = 0.0
        unc_file = str(Path(runtime.cwd) / f"uncertainty_{self.inputs.contrast}.nii.gz")
        save_image(unc, affine, unc_file, dtype=self.inputs.storage_dtype, code=MNI_CODE)
        self._results["out_uncertainty"] = unc_file
        summary = summarise(unc, mask, reference=_uncertainty_reference(
            synth, self.inputs.contrast, self.inputs.field_bin))
        summary["UncertaintyMethod"] = METHOD if self.inputs.tta else METHOD_NO_TTA
        if getattr(getattr(synth, "config", None), "ood_clusters", 0):
            summary["UncertaintyMethod"] += NOVELTY
        if excess is not None:
            summary["UncertaintyMethod"] += SATURATION
        self._results["uncertainty_summary"] = summary


def _uncertainty_reference(synth, contrast: str, field_bin: float) -> float | None:
    """The model's 95th percentile of the map over normal brains for this pair, if it has one."""
    from synth7t.intensity import level_key

    refs = getattr(getattr(synth, "config", None), "uncertainty_reference", None) or {}
    return refs.get(level_key(contrast, field_bin))


def _crop_to_nonzero(img, margin: int = 2):
    """Crop an image to the bounding box of its non-zero voxels (+ margin), affine updated.

    Resampling a brain-only 0.5 mm volume back to native space costs ~2x less on its bounding
    box, and the result is the same: everything outside the box is 0.
    """
    import nibabel as nb
    import numpy as np

    data = np.asanyarray(img.dataobj, dtype=np.float32)
    nz = np.nonzero(data)
    if not nz[0].size:
        return nb.Nifti1Image(data, img.affine)
    lo = [max(int(a.min()) - margin, 0) for a in nz]
    hi = [min(int(a.max()) + margin + 1, n) for a, n in zip(nz, data.shape)]
    crop = np.ascontiguousarray(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array(lo, dtype=float) + img.affine[:3, 3]
    return nb.Nifti1Image(crop, affine)


class _ToNativeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="reference-grid image in [0, 1]")
    reference_file = File(exists=True, mandatory=True, desc="native image defining the grid")
    mask_file = File(exists=True, mandatory=True, desc="native brain mask")
    transforms = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="reference -> native (ANTs order)")


class _ToNativeOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ToNative(MemoryReleasingInterface):
    """Bring a synthetic image back to native space (:func:`synth7t.preprocess.to_native`)."""

    input_spec = _ToNativeInputSpec
    output_spec = _ToNativeOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from synth7t.preprocess import to_native

        ref = _load(self.inputs.reference_file)
        out = to_native(_crop_to_nonzero(_load(self.inputs.in_file)), ref,
                        list(self.inputs.transforms), interpolation="linear")
        data = np.clip(np.nan_to_num(np.asanyarray(out.dataobj, dtype=np.float32)), 0.0, 1.0)
        mask = np.asanyarray(_load(self.inputs.mask_file).dataobj) > 0
        data[~mask] = 0.0
        out_file = _out(runtime, self.inputs.in_file, "native")
        save_image(data, ref.affine, out_file, dtype="float32", code=SCANNER_CODE)
        self._results["out_file"] = out_file
        return runtime
