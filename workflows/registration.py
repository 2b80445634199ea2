"""Registration: other contrasts rigidly to the anatomical reference, reference to MRIxFields."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from .interfaces import ANTS_NTHREADS, MaskToNative, RegisterRigid, RegisterToReference


def _pick_fixed(stripped, brain, head):
    """Registration target: the reference brain for brain-extracted moving images."""
    return brain if stripped else head


def init_register_wf(*, anchor: str = "T1w", others: list[str] | tuple[str, ...] = (),
                     seed: int = 0, name: str = "register_wf"):
    """Register the anatomical reference to MRIxFields and the other contrasts to it.

    Parameters
    ----------
    anchor : str
        Contrast of the anatomical reference (T1w when present).
    others : list of str
        Contrasts registered rigidly to the anchor (T2w, FLAIR).
    seed : int
        Random seed for the registrations (single-threaded, see ``ANTS_NTHREADS``).
    name : str
        Workflow name.

    Inputs
    ------
    anchor_preproc, anchor_brain, anchor_mask
        Bias-corrected reference image, its brain and mask.
    <c>_preproc, <c>_stripped
        Per other contrast ``c`` (lower case): bias-corrected image and whether it is
        brain-extracted.

    Outputs
    -------
    anchor2ref, ref2anchor
        Reference <-> MRIxFields transforms (ITK .h5).
    <c>2anchor, anchor2<c>
        Rigid transforms (ITK text) per other contrast.
    <c>_mask
        Brain mask on the native grid of ``c``.
    """
    wf = pe.Workflow(name=name)
    in_fields = ["anchor_preproc", "anchor_brain", "anchor_mask"]
    out_fields = ["anchor2ref", "ref2anchor"]
    for c in others:
        lc = c.lower()
        in_fields += [f"{lc}_preproc", f"{lc}_stripped"]
        out_fields += [f"{lc}2anchor", f"anchor2{lc}", f"{lc}_mask"]
    inputnode = pe.Node(niu.IdentityInterface(fields=in_fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=out_fields), name="outputnode")

    to_ref = pe.Node(RegisterToReference(omp_nthreads=ANTS_NTHREADS, seed=seed),
                     name=f"{anchor.lower()}_to_ref", n_procs=ANTS_NTHREADS, mem_gb=2.0)
    wf.connect([
        (inputnode, to_ref, [("anchor_brain", "in_file"), ("anchor_mask", "in_mask")]),
        (to_ref, outputnode, [("forward_transform", "anchor2ref"),
                              ("reverse_transform", "ref2anchor")]),
    ])
    for c in others:
        lc = c.lower()
        pick = pe.Node(niu.Function(function=_pick_fixed, input_names=["stripped", "brain", "head"],
                                    output_names=["fixed"]),
                       name=f"pick_fixed_{lc}", run_without_submitting=True)
        rigid = pe.Node(RegisterRigid(omp_nthreads=ANTS_NTHREADS, seed=seed),
                        name=f"{lc}_to_{anchor.lower()}", n_procs=ANTS_NTHREADS, mem_gb=1.0)
        mask = pe.Node(MaskToNative(), name=f"mask_{lc}", mem_gb=0.5)
        wf.connect([
            (inputnode, pick, [(f"{lc}_stripped", "stripped"), ("anchor_brain", "brain"),
                               ("anchor_preproc", "head")]),
            (inputnode, rigid, [(f"{lc}_preproc", "moving_file")]),
            (pick, rigid, [("fixed", "fixed_file")]),
            (inputnode, mask, [("anchor_mask", "in_mask"), (f"{lc}_preproc", "reference_file")]),
            (rigid, mask, [("reverse_transform", "transforms")]),
            (rigid, outputnode, [("forward_transform", f"{lc}2anchor"),
                                 ("reverse_transform", f"anchor2{lc}")]),
            (mask, outputnode, [("out_mask", f"{lc}_mask")]),
        ])
    return wf
