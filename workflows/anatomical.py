"""Anatomical preprocessing: conform, N4 bias-field correction, brain extraction."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from synth7t.preprocess import N4_THREADS

from .interfaces import (ANTS_NTHREADS, Conform, DetectSkullStripped, N4BiasFieldCorrection,
                         SkullStrip)


def looks_stripped(path) -> bool:
    """Whether the image at ``path`` looks brain-extracted
    (:func:`synth7t.preprocess.detect_skull_stripped`), for scheduling only; False when it
    cannot be read (the graph's own nodes report that)."""
    import nibabel as nib

    from synth7t.preprocess import detect_skull_stripped

    try:
        return bool(detect_skull_stripped(nib.load(str(path))))
    except Exception:  # noqa: BLE001 - unreadable or absent: decided (and reported) at run time
        return False


def init_anat_preproc_wf(*, contrast: str, skull_strip: str = "auto", is_anchor: bool = True,
                         brain_extraction: str = "deep", device: str = "auto",
                         omp_nthreads: int = 1, seed: int = 0, expect_stripped: bool = False,
                         name: str | None = None):
    """Conform, bias-correct and (for the anatomical reference) brain-extract one image.

    The anatomical reference (``is_anchor``; T1w when present) is skull-stripped here; the
    other contrasts get their mask from the reference through their rigid registration
    (:func:`workflows.registration.init_register_wf`), and only need to know whether they are
    already brain-extracted (to pick the registration target).

    Parameters
    ----------
    contrast : str
        ``T1w``, ``T2w`` or ``FLAIR``.
    skull_strip : str
        ``auto`` (detect brain-extracted input), ``force`` or ``skip``.
    is_anchor : bool
        Whether this image is the anatomical reference.
    brain_extraction : str
        ``deep`` (default; :mod:`synth7t.brain_extraction`, any contrast) or ``template``
        (Colin27 registration).
    device : str
        Torch device of the deep engine (``auto``, ``cpu``, ``cuda``), as for synthesis.
    omp_nthreads : int
        Torch threads of the deep engine (the node reserves that many CPUs).
    seed : int
        Random seed for brain extraction.
    expect_stripped : bool
        The input looked brain-extracted when the graph was built (:func:`looks_stripped`):
        with ``skull_strip="auto"`` the brain-extraction node still decides at run time, but
        reserves one scheduler slot instead of ``omp_nthreads``, since it will only detect.
        (On sub-02 it otherwise waited 13.6 s for another contrast's N4 to free a second slot,
        holding back registration and everything after it.)
    name : str, optional
        Workflow name (default ``anat_preproc_<contrast>_wf``).

    Inputs
    ------
    in_file
        Raw BIDS image.

    Outputs
    -------
    preproc
        Conformed (RAS, float32) and N4-corrected image.
    brain
        Brain-extracted ``preproc`` (reference only).
    mask
        Brain mask (reference only).
    input_stripped
        Whether the input was already brain-extracted.
    bet_provenance
        ``BrainExtraction`` entry of what ran (reference only).
    warnings
        Header repairs made by conform.
    """
    wf = pe.Workflow(name=name or f"anat_preproc_{contrast.lower()}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "brain", "mask", "input_stripped", "warnings", "bet_provenance"]),
        name="outputnode")

    conform = pe.Node(Conform(), name="conform", mem_gb=0.5)
    # threads: N4's own fixed thread count (part of the cache key: a work folder of an older
    # single-threaded N4 is not reused). One scheduler slot all the same: three N4s of a
    # three-contrast session side by side on two cores took 38 s, one after the other ~60 s.
    n4 = pe.Node(N4BiasFieldCorrection(threads=N4_THREADS), name="n4",
                 n_procs=ANTS_NTHREADS, mem_gb=1.0)
    wf.connect([
        (inputnode, conform, [("in_file", "in_file")]),
        (conform, n4, [("out_file", "in_file")]),
        (conform, outputnode, [("warnings", "warnings")]),
        (n4, outputnode, [("out_file", "preproc")]),
    ])
    if is_anchor:
        deep = brain_extraction == "deep"
        threads = max(1, int(omp_nthreads)) if deep else ANTS_NTHREADS
        detect_only = skull_strip == "skip" or (skull_strip == "auto" and expect_stripped)
        strip = pe.Node(SkullStrip(mode=skull_strip, method=brain_extraction, device=device,
                                   omp_nthreads=threads, ants_nthreads=ANTS_NTHREADS, seed=seed),
                        name="skull_strip", n_procs=1 if detect_only else threads,
                        mem_gb=2.5 if deep else 1.5)
        wf.connect([
            (n4, strip, [("out_file", "in_file")]),
            (strip, outputnode, [("out_file", "brain"), ("out_mask", "mask"),
                                 ("input_stripped", "input_stripped"),
                                 ("provenance", "bet_provenance")]),
        ])
    else:
        detect = pe.Node(DetectSkullStripped(mode=skull_strip), name="detect_skull_stripped",
                         mem_gb=0.5)
        wf.connect([
            (conform, detect, [("out_file", "in_file")]),
            (detect, outputnode, [("stripped", "input_stripped")]),
        ])
    return wf
