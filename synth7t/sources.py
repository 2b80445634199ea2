"""Training data sources: simulated slabs, paired volumes, and the 2.5D patch sampler.

* :class:`SimulatorSource` -- pairs simulated on the fly by :mod:`synth7t.simulate`. With
  :class:`RandomAnatomies` every slab is rendered from a new brain: one of several base anatomies
  (ICBM152 from the nilearn wheel, real heads segmented by the simulator's ``t1w:`` path), with
  a random smooth deformation, a GM/WM label perturbation, a random partial-volume sharpness and
  CSF share, a new intensity texture and per-tissue relaxation jitter (SynthSeg-style domain
  randomisation), drawn from the widened training ranges of ``physics.json``
  (``training_widening``).
* :func:`mrixfields_pairs` -- paired ``P_`` volumes of an MRIxFields tree.
* :func:`bids_pairs` -- a BIDS dataset whose participants have sessions at different fields.
* :func:`unpaired_volumes` -- single images (MRIxFields ``R_`` volumes or BIDS T1w/T2w/FLAIR)
  for self-supervised pretraining (:mod:`synth7t.pretrain`).

:class:`PatchSampler` keeps a pool of slabs and cuts 2.5D patches from it. Nothing here imports
the trainer or the export code (one direction: ``sources -> train -> export``).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch

from .fields import CONTRASTS, SUPPORTED_BINS, bin_label
from .intensity import brain_level, normalise, source_gain
from .networks import level_conditioned

#: MRIxFields modality names -> BIDS suffixes.
MRIX_TO_BIDS = {"T1W": "T1w", "T2W": "T2w", "T2FLAIR": "FLAIR"}
BIDS_TO_MRIX = {v: k for k, v in MRIX_TO_BIDS.items()}


@dataclass
class Slab:
    """A paired block on (a box of) the reference grid; arrays are ``(X, Y, Z)`` float32."""

    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    contrast: str
    field_bin: float
    tag: str = ""
    #: mean of the whole normalised source brain the slab was cut from
    #: (:func:`synth7t.intensity.brain_level`); ``None``: measure it on the slab
    source_level: float | None = None
    #: the source's acquisition protocol (``{"TR": ms, "TE": ms, "TI": ms, "FA": deg}``, any
    #: subset; :func:`source_protocol`); ``None``: not known
    source_protocol: dict[str, float] | None = None


def source_protocol(params: dict | None) -> dict[str, float] | None:
    """The protocol values of a simulated pair's ``params`` (its ``"source"`` draw)."""
    from .physics import protocol_values

    return protocol_values(((params or {}).get("source") or {}).get("protocol")) or None


def tag_anatomy(tag: str) -> str:
    """Base anatomy a simulated slab's :attr:`Slab.tag` names
    (``"sim:t1w:bids_3t/sub-01+random:T1w:3:..."`` -> ``"t1w:bids_3t/sub-01"``; the names
    themselves may hold colons); ``""`` for a slab that was not simulated."""
    found = re.match(r"sim:(.+?)(?:\+random)?:(?:%s):" % "|".join(map(re.escape, CONTRASTS)),
                     tag)
    return found.group(1) if found else ""


class SlabSource(Protocol):
    """Anything that can make new training slabs."""

    def make(self, rng: np.random.Generator) -> list[Slab]:
        ...


def crop_to_mask(slab: Slab, margin: int = 4) -> Slab:
    """Drop all-background border of a slab (saves memory in the pool)."""
    if not slab.mask.any():
        return slab
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(slab.mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0),
                         min(int(idx[-1]) + 1 + margin, slab.mask.shape[axis])))
    b = tuple(box)
    return Slab(slab.source[b].copy(), slab.target[b].copy(), slab.mask[b].copy(),
                slab.contrast, slab.field_bin, slab.tag, slab.source_level, slab.source_protocol)


class SimulatorSource:
    """Random slabs simulated on the fly.

    Each call renders one (source, 7T) pair of a random contrast and field on a box of the
    reference grid: ``depth`` axial slices and, in-plane, a ``roi_size`` square placed at random
    over the brain (``None``: the whole plane). Small boxes keep the simulator's share of the
    training time low while the pool still sees the whole brain over a run.

    Parameters
    ----------
    simulator
        A :class:`synth7t.simulate.Simulator`; built from ICBM152 when ``None``.
    depth
        Axial slices per simulated slab.
    roi_size
        In-plane box edge (voxels) or ``None`` for the full 364 x 436 plane.
    fields, contrasts
        What to draw from.
    seed_offset
        Added to the drawn simulator seeds so held-out sets never share seeds with training.
    deform
        Random smooth deformation (shared by source and target).
    randomiser
        A :class:`RandomAnatomies`: each slab is rendered by a freshly drawn simulator (new
        anatomy, label perturbation, texture, relaxation jitter, widened protocol ranges);
        ``simulator`` is then only used for the brain extent.
    """

    def __init__(self, simulator=None, *, depth: int = 16, roi_size: int | None = 208,
                 fields: Iterable[float] = SUPPORTED_BINS,
                 contrasts: Iterable[str] = CONTRASTS,
                 extent: tuple[tuple[int, int], ...] | None = None, seed_offset: int = 0,
                 deform: bool = True, randomiser: "RandomAnatomies | None" = None) -> None:
        self.randomiser = randomiser
        if simulator is None and randomiser is not None:
            from .simulate import Simulator

            simulator = Simulator(randomiser.anatomies[0], randomiser.physics)
        if simulator is None:
            from .simulate import Simulator

            simulator = Simulator.from_icbm152()
        self.sim = simulator
        self.depth = int(depth)
        self.roi_size = roi_size
        self.fields = tuple(float(f) for f in fields)
        self.contrasts = tuple(contrasts)
        self.seed_offset = int(seed_offset)
        self.deform = deform
        self.extent = extent or self._brain_extent()
        self._cycle = 0

    def _brain_extent(self) -> tuple[tuple[int, int], ...]:
        """Voxel bounds ``[(lo, hi)] * 3`` of the (undeformed) brain on the reference grid."""
        mask = self.sim.brain_mask() if hasattr(self.sim, "brain_mask") else None
        if mask is None or not np.asarray(mask).any():
            return ((20, 344), (20, 416), (0, 330))
        mask = np.asarray(mask)
        out = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(mask.any(axis=other))
            out.append((int(idx[0]), int(idx[-1]) + 1))
        return tuple(out)

    def roi(self, rng: np.random.Generator) -> tuple[slice, slice, slice]:
        """A random box of the reference grid that overlaps the brain."""
        from .reference import REF_SHAPE

        box = []
        for axis in range(3):
            size = self.depth if axis == 2 else (self.roi_size or REF_SHAPE[axis])
            size = min(size, REF_SHAPE[axis])
            lo, hi = self.extent[axis]
            # a box start so that its centre falls inside the brain extent
            a = int(np.clip(lo - size // 2, 0, REF_SHAPE[axis] - size))
            b = int(np.clip(hi - size // 2, a, REF_SHAPE[axis] - size))
            start = int(rng.integers(a, b + 1))
            box.append(slice(start, start + size))
        return tuple(box)  # type: ignore[return-value]

    def make(self, rng: np.random.Generator, *, contrast: str | None = None,
             field_bin: float | None = None) -> list[Slab]:
        fb = float(field_bin if field_bin is not None else rng.choice(self.fields))
        c = contrast or str(rng.choice(self.contrasts))
        seed = int(rng.integers(0, 2 ** 31 - 1)) + self.seed_offset
        roi = self.roi(rng)
        sim = self.randomiser.draw(rng) if self.randomiser is not None else self.sim
        pair = sim.sample(contrast=c, field=fb, seed=seed, roi=roi, deform=self.deform)
        mask = np.asarray(pair["mask"]).astype(bool)
        if mask.sum() < 200:
            return []
        tag = f"sim:{sim.anatomy.name}:{c}:{fb:g}:seed{seed}:" + ",".join(f"{s.start}-{s.stop}" for s in roi)
        return [crop_to_mask(Slab(np.asarray(pair["source"], np.float32),
                                  np.asarray(pair["target"], np.float32), mask, c, fb, tag=tag,
                                  source_level=pair.get("source_level"),
                                  source_protocol=source_protocol(pair.get("params"))))]

    def make_pair(self, rng: np.random.Generator, contrast: str, field_bin: float) -> list[Slab]:
        """A slab of a given (contrast, field): used to build balanced held-out sets."""
        return self.make(rng, contrast=contrast, field_bin=field_bin)


class RandomAnatomies:
    """Domain randomisation over several base anatomies: every call gives a new brain.

    Parameters
    ----------
    anatomies
        Base :class:`synth7t.anatomy.Anatomy` objects (ICBM152, segmented real heads...).
    weights
        Sampling weight per anatomy (default equal).
    physics
        Table to render with; the source draws from ``physics.widened()`` (training ranges).
    label_perturbation
        Peak fraction of GM<->WM exchanged by a smooth random field (moves the boundary by
        about a voxel either way, thickening or thinning cortex locally).
    sharpness
        Range of the exponent ``gamma`` of :func:`sharpen_partial_volume` drawn per brain
        (``(1, 1)``: off). ICBM152 is an average of 152 brains: at 1 mm only 28 % of its
        white-matter-dominated voxels are > 98 % white matter and 0.8 % of its brain is pure CSF,
        against 70 % and 5.5 % for a single subject segmented the same way (Colin27); a 7 T
        image at 0.5 mm shows the crisp single brain, and the 99.8th-percentile normalisation of
        T2w rests on its pure CSF: ICBM152's 7 T T2w white matter sits at 0.128, single brains'
        (Colin27, sub-01, sub-02) at 0.107-0.113. ``gamma`` 3 brings ICBM152 to 65 % / 2.8 %
        and its white matter to 0.120.
    csf_change
        Range of the CSF change ``s`` of :func:`change_csf` drawn per brain (``(0, 0)``: off):
        sulci and ventricles widened (``s > 0``, atrophy) or narrowed (``s < 0``) by about a
        voxel, so that the share of pure CSF, and with it the intensity scale of T2w, varies
        between brains as it does between people.
    texture_std
        Standard deviation of the added random texture (relative intensity).
    jitter
        Per-tissue PD/T1/T2 jitter (one simulated subject's relaxation times).
    reuse
        Slabs rendered from one drawn brain before the next is drawn (each slab still has its
        own deformation, box, contrast, field, protocol and noise); drawing costs seconds.
    lesion_probability
        Chance that a brain gets 1-4 pathology-like blobs in its white matter: a ``lesion``
        tissue whose PD/T1/T2 are drawn per brain from wide ranges (rendered in source and 7T
        target, with a field dependence of its own), so the network learns to keep tissue it
        cannot name and its uncertainty head learns that such tissue is hard to predict.
    """

    def __init__(self, anatomies: Sequence, *, weights: Sequence[float] | None = None,
                 physics=None, label_perturbation: float = 0.5, texture_std: float = 0.04,
                 jitter: bool = True, reuse: int = 4, lesion_probability: float = 0.5,
                 sharpness: tuple[float, float] = (1.0, 1.0),
                 csf_change: tuple[float, float] = (0.0, 0.0)) -> None:
        from .physics import Physics

        if not anatomies:
            raise ValueError("RandomAnatomies needs at least one anatomy")
        self.anatomies = list(anatomies)
        w = np.ones(len(self.anatomies)) if weights is None else np.asarray(weights, float)
        self.weights = w / w.sum()
        self.physics = (physics or Physics.load()).widened()
        self.label_perturbation = float(label_perturbation)
        self.texture_std = float(texture_std)
        self.jitter = jitter
        self.reuse = max(1, int(reuse))
        self.lesion_probability = float(lesion_probability)
        self.sharpness = tuple(float(v) for v in sharpness)
        self.csf_change = tuple(float(v) for v in csf_change)
        self.names = [a.name for a in self.anatomies]
        self._current = None
        self._uses = 0

    def draw(self, rng: np.random.Generator):
        """The simulator for the next slab (a new brain every ``reuse`` calls)."""
        if self._current is None or self._uses >= self.reuse:
            self._current, self._uses = self.new_brain(rng), 0
        self._uses += 1
        return self._current

    def new_brain(self, rng: np.random.Generator):
        """A :class:`synth7t.simulate.Simulator` on a freshly perturbed anatomy."""
        from .anatomy import Anatomy
        from .simulate import Simulator

        i = int(rng.choice(len(self.anatomies), p=self.weights))
        base = self.anatomies[i]
        shape = base.shape
        fr = dict(base.fractions)
        if self.label_perturbation > 0 and "GM" in fr and "WM" in fr:
            r = _smooth_noise(rng, shape, spacing=8) * self.label_perturbation
            gm, wm = fr["GM"], fr["WM"]
            # exchange only where both are present (the boundary), bounded by what is there
            t = np.clip(r * 4.0 * gm * wm, -wm, gm)
            fr["GM"], fr["WM"] = gm - t, wm + t
        # drawn only when on, so that the other draws keep their stream when off
        if self.sharpness != (1.0, 1.0):
            fr = sharpen_partial_volume(fr, float(rng.uniform(*self.sharpness)))
        if self.csf_change != (0.0, 0.0) and "CSF" in fr:
            fr = change_csf(fr, float(rng.uniform(*self.csf_change)))
        tex = base.texture * np.float32(rng.uniform(0.6, 1.4))
        if self.texture_std > 0:
            tex = tex + _smooth_noise(rng, shape, spacing=2) * np.float32(self.texture_std)
        phys = self.physics
        if self.lesion_probability > 0 and rng.random() < self.lesion_probability and "WM" in fr:
            fr, phys = _add_lesions(rng, fr, base.affine, phys)
        anat = Anatomy(fr, tex, base.affine, name=f"{base.name}+random", meta=base.meta)
        phys = phys.jittered(rng) if self.jitter else phys
        return Simulator(anat, phys)


def sharpen_partial_volume(fractions: dict, gamma: float) -> dict:
    """Tissue fractions raised to ``gamma`` and renormalised to each voxel's total.

    ``gamma`` > 1 makes each voxel purer in its dominant tissue (a blurred population average
    looks more like one crisp brain), 1 changes nothing; the sum over tissues, and so the brain's
    outline, is kept.
    """
    if gamma == 1.0:
        return dict(fractions)
    names = list(fractions)
    total = sum(np.asarray(fractions[k], np.float32) for k in names)
    safe = np.maximum(total, np.float32(1e-6))
    powered = {k: np.power(np.asarray(fractions[k], np.float32) / safe, np.float32(gamma))
               for k in names}
    norm = sum(powered.values())
    scale = np.where(norm > 0, total / np.maximum(norm, np.float32(1e-12)), 0.0).astype(np.float32)
    return {k: (v * scale).astype(np.float32) for k, v in powered.items()}


def change_csf(fractions: dict, s: float, *, sigma_vox: float = 1.0) -> dict:
    """Widen (``s`` > 0) or narrow (``s`` < 0) the CSF spaces by partial volume at their edge.

    ``s`` > 0 moves a share ``min(s * blur(CSF), 1)`` of each voxel's GM and WM into CSF (the
    voxels beside CSF lose most: sulci and ventricles widen, as with atrophy); ``s`` < 0 moves
    a share ``min(-s * blur(GM + WM), 1)`` of each voxel's CSF into GM (CSF beside tissue
    shrinks). Other tissues and every voxel's total are unchanged.
    """
    from scipy import ndimage as ndi

    out = {k: np.asarray(v, np.float32).copy() for k, v in fractions.items()}
    if s == 0.0 or "CSF" not in out or "GM" not in out or "WM" not in out:
        return out
    csf, gm, wm = out["CSF"], out["GM"], out["WM"]
    if s > 0:
        share = np.clip(np.float32(s) * ndi.gaussian_filter(csf, sigma_vox), 0.0, 1.0)
        moved_gm, moved_wm = gm * share, wm * share
        out["GM"], out["WM"] = gm - moved_gm, wm - moved_wm
        out["CSF"] = csf + moved_gm + moved_wm
    else:
        share = np.clip(np.float32(-s) * ndi.gaussian_filter(gm + wm, sigma_vox), 0.0, 1.0)
        moved = csf * share
        out["CSF"], out["GM"] = csf - moved, gm + moved
    return out


def _add_lesions(rng: np.random.Generator, fractions: dict, affine: np.ndarray, physics):
    """1-4 soft ellipsoidal blobs of a ``lesion`` tissue inside the white matter.

    Each blob takes its fraction from WM (and GM at its rim); the lesion's PD and T1/T2
    weights (between WM and CSF) are drawn once per brain.
    """
    import copy

    from .physics import Physics

    wm = fractions["WM"]
    candidates = np.argwhere(wm > 0.95)
    if len(candidates) == 0:
        return fractions, physics
    vox = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    lesion = np.zeros(wm.shape, np.float32)
    for _ in range(int(rng.integers(1, 5))):
        c = candidates[int(rng.integers(len(candidates)))]
        radii = rng.uniform(2.0, 9.0, size=3) / vox  # mm -> voxels
        lo = np.maximum(c - np.ceil(radii).astype(int) - 2, 0)
        hi = np.minimum(c + np.ceil(radii).astype(int) + 3, wm.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.indices(tuple(hi - lo), dtype=np.float32)
        r = np.sqrt(sum(((grid[i] + lo[i] - c[i]) / radii[i]) ** 2 for i in range(3)))
        rough = 1.0 + 0.25 * rng.standard_normal(r.shape).astype(np.float32)
        blob = np.clip((1.0 - r * rough) * 3.0, 0.0, 1.0)
        lesion[box] = np.maximum(lesion[box], blob)
    out = dict(fractions)
    take_wm = np.minimum(lesion, out["WM"])
    out["WM"] = out["WM"] - take_wm
    rest = lesion - take_wm
    if "GM" in out:
        take_gm = np.minimum(rest, out["GM"])
        out["GM"] = out["GM"] - take_gm
        take_wm = take_wm + take_gm
    out["lesion"] = take_wm.astype(np.float32)
    tab = copy.deepcopy(physics.table)
    spec = tab["tissues"]["lesion"]
    spec["PD"]["value"] = float(rng.uniform(0.74, 0.95))
    # How a pathological tissue's relaxation changes with B0 is not known in general (its T1
    # dispersion differs from healthy tissue's), so the 7 T weights are drawn around the
    # low-field ones, not equal to them: the lesion's 7 T intensity is genuinely uncertain
    # given its low-field appearance, which is what the uncertainty head should learn.
    w1, w2 = float(rng.uniform(0.05, 0.6)), float(rng.uniform(0.01, 0.1))
    w1_7 = float(np.clip(w1 * rng.lognormal(0.0, 0.6), 0.02, 0.8))
    w2_7 = float(np.clip(w2 * rng.lognormal(0.0, 0.5), 0.005, 0.15))
    spec["T1"]["weights"] = [w1, w1_7]
    spec["T2"]["weights"] = [w2, w2_7]
    return out, Physics(tab)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], *, spacing: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a coarse Gaussian lattice (``spacing`` voxels), upsampled
    linearly one axis at a time (separable, so cheap on a whole 1 mm volume)."""
    from .simulate import _lin_interp_axis

    coarse = tuple(max(2, int(np.ceil(s / spacing)) + 1) for s in shape)
    out = rng.standard_normal(coarse).astype(np.float32)
    for ax, (s, c) in enumerate(zip(shape, coarse)):
        out = _lin_interp_axis(out, ax, np.linspace(0.0, c - 1.0, s))
    return np.clip(out / 2.0, -1.0, 1.0).astype(np.float32)


@dataclass
class PairSpec:
    """A paired volume on disk (or already in memory)."""

    source: Path | np.ndarray
    target: Path | np.ndarray
    contrast: str
    field_bin: float
    mask: Path | np.ndarray | None = None
    tag: str = ""
    #: the source's protocol from its BIDS sidecar (:func:`synth7t.io.protocol_from_sidecar`);
    #: ``None``: not known (MRIxFields ships no sidecars)
    protocol: dict[str, float] | None = None


def _load_array(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    import nibabel as nib

    return np.asarray(nib.as_closest_canonical(nib.load(str(x))).dataobj, dtype=np.float32)


class VolumePairSource:
    """Slabs cut from paired volumes (MRIxFields or registered BIDS pairs).

    Volumes are loaded on demand and normalised with :func:`synth7t.intensity.normalise`
    (a no-op for data already in [0, 1] with 0 background, as MRIxFields ships them).
    """

    def __init__(self, pairs: list[PairSpec], *, depth: int = 24, cache: int = 2) -> None:
        if not pairs:
            raise ValueError("no paired volumes found")
        self.pairs = pairs
        self.depth = depth
        self.cache_size = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, float]] = {}

    def _get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        if i not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            p = self.pairs[i]
            src, tgt = _load_array(p.source), _load_array(p.target)
            if src.shape != tgt.shape:
                raise ValueError(f"{p.tag}: source {src.shape} and target {tgt.shape} differ")
            mask = (_load_array(p.mask) > 0) if p.mask is not None else (tgt > 0)
            src = normalise(src, mask)
            self._cache[i] = (src, normalise(tgt, mask), mask, brain_level(src[mask]))
        return self._cache[i]

    def make(self, rng: np.random.Generator) -> list[Slab]:
        i = int(rng.integers(len(self.pairs)))
        src, tgt, mask, level = self._get(i)
        zs = np.flatnonzero(mask.any(axis=(0, 1)))
        if zs.size == 0:
            return []
        depth = min(self.depth, mask.shape[2])
        lo, hi = max(int(zs[0]) - depth // 2, 0), min(int(zs[-1]), mask.shape[2] - depth)
        z0 = int(rng.integers(lo, max(lo, hi) + 1))
        b = (slice(None), slice(None), slice(z0, z0 + depth))
        p = self.pairs[i]
        return [crop_to_mask(Slab(src[b], tgt[b], mask[b], p.contrast, p.field_bin,
                                  tag=f"{p.tag}:z{z0}", source_level=level,
                                  source_protocol=p.protocol))]


_MRIX_RE = re.compile(r"^P_(T1W|T2W|T2FLAIR)_([0-9.]+T)_(\w+?)\.nii(\.gz)?$")


def mrixfields_pairs(root: str | Path, *, splits: Iterable[str] = ("Training_prospective",),
                     contrasts: Iterable[str] = CONTRASTS,
                     fields: Iterable[float] = SUPPORTED_BINS) -> list[PairSpec]:
    """Paired ``P_`` volumes of an MRIxFields tree, 7T as target.

    ``{root}/{split}/{MOD}/{field}/P_{MOD}_{field}_{ID}.nii.gz``; a source is used when the 7T
    volume with the same modality and ID exists.
    """
    root = Path(root)
    out = []
    for split in splits:
        for c in contrasts:
            mod = BIDS_TO_MRIX[c]
            for fb in fields:
                folder = root / split / mod / bin_label(fb)
                for src in sorted(folder.glob(f"P_{mod}_{bin_label(fb)}_*.nii*")):
                    m = _MRIX_RE.match(src.name)
                    if not m:
                        continue
                    ident = m.group(3)
                    tgts = sorted((root / split / mod / "7T").glob(f"P_{mod}_7T_{ident}.nii*"))
                    if tgts:
                        out.append(PairSpec(src, tgts[0], c, float(fb),
                                            tag=f"mrixfields:{split}:{mod}:{bin_label(fb)}:{ident}"))
    return out


def bids_pairs(bids_dir: str | Path, work_dir: str | Path, *,
               contrasts: Iterable[str] = CONTRASTS, to_reference: bool = False,
               threads: int = 1, seed: int = 0) -> list[PairSpec]:
    """Lower-field/7T pairs from a BIDS dataset with sessions at different fields.

    For each participant and contrast, the session whose ``MagneticFieldStrength`` routes to
    7 T is the target; every other session routed to a supported bin is rigidly registered to it
    with antspyx and resampled onto its grid (linear). With ``to_reference`` the 7T image is then
    brought into the 0.5 mm reference grid with :mod:`synth7t.preprocess` (which must be
    available) and the source follows through the same transforms.

    Parameters
    ----------
    bids_dir
        BIDS root (read-only; nothing is written there).
    work_dir
        Where registered images are written.
    """
    import ants
    import nibabel as nib

    from .fields import FieldStrengthError, route_field
    from .io import protocol_from_sidecar
    from .preprocess import ants_register

    bids_dir, work_dir = Path(bids_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    contrasts = tuple(contrasts)
    found: dict[tuple[str, str], list[tuple[float, Path]]] = {}
    for img in sorted(bids_dir.glob("sub-*/**/anat/*.nii*")):
        suffix = img.name.split(".")[0].split("_")[-1]
        if suffix not in contrasts:
            continue
        sidecar = _inherited_sidecar(bids_dir, img)
        try:
            routing = route_field(sidecar.get("MagneticFieldStrength"), where=str(img))
        except FieldStrengthError:
            continue
        sub = img.name.split("_")[0]
        found.setdefault((sub, suffix), []).append(
            (7.0 if routing.passthrough else routing.bin, img, protocol_from_sidecar(sidecar)))
    out = []
    for (sub, suffix), items in sorted(found.items()):
        targets = [p for f, p, _ in items if f == 7.0]
        if not targets:
            continue
        fixed_path = targets[0]
        fixed = ants.image_read(str(fixed_path))
        for fb, mov_path, protocol in items:
            if fb == 7.0:
                continue
            stem = f"{sub}_{suffix}_{bin_label(fb)}"
            moving = ants.image_read(str(mov_path))
            reg = ants_register(fixed, moving, "Rigid", outprefix=str(work_dir / f"{stem}_"),
                                threads=threads, seed=seed)
            warped = ants.apply_transforms(fixed, moving, reg["fwdtransforms"],
                                           interpolator="linear")
            src_path = work_dir / f"{stem}_to7T.nii.gz"
            ants.image_write(warped, str(src_path))
            tgt_path = fixed_path
            if to_reference:
                src_path, tgt_path = _pair_to_reference(src_path, fixed_path, work_dir, stem,
                                                        threads=threads, seed=seed)
            # Mask from the 7T image: BIDS images may be whole-head; a positive-intensity mask
            # is what the challenge data (skull-stripped) would give.
            tgt = np.asarray(nib.as_closest_canonical(nib.load(str(tgt_path))).dataobj, np.float32)
            out.append(PairSpec(src_path, tgt_path, suffix, fb, mask=(tgt > 0),
                                tag=f"bids:{stem}", protocol=protocol))
    return out


def _inherited_sidecar(bids_dir: Path, img: Path) -> dict:
    """Merge sidecars from the dataset root down to the image (BIDS inheritance, simplified)."""
    entities = img.name.split(".")[0]
    suffix = entities.split("_")[-1]
    merged: dict = {}
    candidates = [bids_dir / f"{suffix}.json"]
    sub_dir = bids_dir / entities.split("_")[0]
    candidates += sorted(sub_dir.glob(f"*_{suffix}.json"))
    candidates += [img.parent / (entities + ".json")]
    for c in candidates:
        if c.is_file():
            try:
                merged.update(json.loads(c.read_text()))
            except ValueError:
                pass
    return merged


def _pair_to_reference(src_path: Path, tgt_path: Path, work_dir: Path, stem: str, *,
                       threads: int, seed: int) -> tuple[Path, Path]:
    import nibabel as nib

    try:
        from . import preprocess
    except ImportError as exc:  # pragma: no cover - depends on another module
        raise RuntimeError("to_reference needs synth7t.preprocess") from exc
    tgt = nib.load(str(tgt_path))
    brain, mask = preprocess.skull_strip(tgt, threads=threads, seed=seed)
    xfm = preprocess.register_to_reference(brain, mask, out_prefix=str(work_dir / f"{stem}_ref_"),
                                           threads=threads, seed=seed)
    out = []
    for p, name in ((src_path, "src"), (tgt_path, "tgt")):
        ref = preprocess.to_reference(nib.load(str(p)), [xfm["forward"]])
        ref_mask = preprocess.to_reference(mask, [xfm["forward"]], interpolation="nearestNeighbor")
        data = np.asarray(ref.dataobj, np.float32) * (np.asarray(ref_mask.dataobj) > 0.5)
        path = work_dir / f"{stem}_{name}_space-ref.nii.gz"
        nib.save(nib.Nifti1Image(data, ref.affine), str(path))
        out.append(path)
    return out[0], out[1]


class PatchSampler:
    """Draws 2.5D training patches from a pool of slabs, refreshed from the sources.

    Parameters
    ----------
    sources
        ``[(source, weight), ...]``.
    rng
        The only randomness (seeded by the caller).
    pool_size
        Slabs kept in memory.
    refresh_every
        Steps between replacing the oldest slab(s) with freshly made ones.
    input_gain
        ``(lo, hi)``: each patch's source is multiplied by a gain drawn log-uniformly from this
        range and clipped to [0, 1], as :func:`synth7t.intensity.normalise` clips (the target
        keeps its scale: the network must set the 7T level from the source's contrast, not from
        its normalisation; see :attr:`synth7t.train.TrainConfig.input_gain`). ``None``: no gain.
    input_levels
        The network's :attr:`synth7t.networks.UNetConfig.input_levels`: each patch's source is
        scaled by its slab's :attr:`Slab.source_level` exactly as
        :meth:`synth7t.inference.UNetSynthesizer.predict` scales a whole volume.
    level_condition
        The network's :attr:`synth7t.networks.UNetConfig.level_condition`: each patch's
        conditioning gets its slab's level offset (:func:`synth7t.intensity.level_offset` of
        :attr:`Slab.source_level`), as inference conditions on the whole volume's.
    protocol_condition
        The network's :attr:`synth7t.networks.UNetConfig.protocol_condition`: each patch's
        conditioning gets its slab's :attr:`Slab.source_protocol`, or "not known" with
        probability ``protocol_dropout`` (and always for a slab without one), so that the
        network also serves inputs without a sidecar (the challenge data).
    """

    def __init__(self, sources: list[tuple[SlabSource, float]], rng: np.random.Generator, *,
                 n_slices: int = 5, patch: int = 128, pool_size: int = 24,
                 refresh_every: int = 8, log: Callable[[str], None] | None = None,
                 input_gain: tuple[float, float] | None = None,
                 input_levels: dict[str, float] | None = None,
                 level_condition: dict[str, float] | None = None,
                 protocol_condition: dict[str, dict[str, float]] | None = None,
                 protocol_dropout: float = 0.3) -> None:
        self.input_levels = dict(input_levels or {})
        self.level_condition = dict(level_condition or {})
        self.protocol_condition = dict(protocol_condition or {})
        self.protocol_dropout = float(protocol_dropout)
        if input_gain is not None and not 0 < input_gain[0] <= input_gain[1]:
            raise ValueError(f"input_gain must be 0 < lo <= hi, got {input_gain}")
        self.input_gain = None if input_gain is None or input_gain[0] == input_gain[1] == 1 \
            else tuple(input_gain)
        self.sources = [s for s, _ in sources]
        w = np.array([wt for _, wt in sources], dtype=float)
        self.weights = w / w.sum()
        self.rng = rng
        self.n_slices = n_slices
        self.patch = patch
        self.pool_size = pool_size
        self.refresh_every = refresh_every
        self.pool: list[Slab] = []
        self.data_seconds = 0.0
        self.log = log
        self._calls = 0
        #: :attr:`Slab.tag` of each patch of the last :meth:`batch` (which brain it came from)
        self.last_tags: list[str] = []
        while len(self.pool) < pool_size:
            self._add()

    def _add(self) -> None:
        t = time.perf_counter()
        for _ in range(20):
            src = self.sources[int(self.rng.choice(len(self.sources), p=self.weights))]
            new = src.make(self.rng)
            if new:
                break
        else:
            raise RuntimeError("data sources produced no usable slabs")
        self.pool.extend(new)
        while len(self.pool) > self.pool_size:
            self.pool.pop(0)
        self.data_seconds += time.perf_counter() - t

    def _patch(self, slab: Slab) -> tuple[np.ndarray, ...]:
        X, Y, Z = slab.mask.shape
        P, h = self.patch, self.n_slices // 2
        zs = np.flatnonzero(slab.mask.any(axis=(0, 1)))
        z = int(self.rng.choice(zs))
        ii, jj = np.nonzero(slab.mask[:, :, z])
        k = int(self.rng.integers(ii.size))
        x0 = int(np.clip(ii[k] - P // 2, 0, max(X - P, 0)))
        y0 = int(np.clip(jj[k] - P // 2, 0, max(Y - P, 0)))
        zi = np.clip(np.arange(z - h, z + h + 1), 0, Z - 1)

        def cut(a: np.ndarray, zsel) -> np.ndarray:
            out = np.zeros((P, P) + np.shape(a[0, 0, zsel]), dtype=np.float32)
            part = a[x0:x0 + P, y0:y0 + P, zsel]
            out[:part.shape[0], :part.shape[1]] = part
            return out

        x = np.moveaxis(cut(slab.source * slab.mask, zi), 2, 0)
        y = cut(slab.target * slab.mask, z)[None]
        m = cut(slab.mask.astype(np.float32), z)[None]
        if self.rng.random() < 0.5:  # left-right flip: anatomy is roughly symmetric
            x, y, m = x[:, ::-1], y[:, ::-1], m[:, ::-1]
        if self.input_levels:
            x = x * np.float32(source_gain(self.input_levels, slab.contrast, slab.field_bin,
                                           slab.source_level, slab.source, slab.mask))
        if self.input_gain is not None:
            lo, hi = np.log(self.input_gain)
            x = np.clip(x * np.float32(np.exp(self.rng.uniform(lo, hi))), 0.0, 1.0)
        return np.ascontiguousarray(x), np.ascontiguousarray(y), np.ascontiguousarray(m)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``x (B, n_slices, P, P)``, ``y``, ``mask (B, 1, P, P)``, ``cond (B, N_COND)``."""
        self._calls += 1
        if self.refresh_every and self._calls % self.refresh_every == 0:
            self._add()
        xs, ys, ms, cs = [], [], [], []
        self.last_tags = []
        for _ in range(batch_size):
            slab = self.pool[int(self.rng.integers(len(self.pool)))]
            self.last_tags.append(slab.tag)
            x, y, m = self._patch(slab)
            xs.append(x)
            ys.append(y)
            ms.append(m)
            proto = slab.source_protocol
            if self.protocol_condition and self.rng.random() < self.protocol_dropout:
                proto = None
            cs.append(level_conditioned(self.level_condition, slab.contrast, slab.field_bin,
                                        slab.source_level, slab.source, slab.mask,
                                        protocols=self.protocol_condition, protocol=proto))
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)),
                torch.from_numpy(np.stack(ms)), torch.stack(cs))




# ---------------------------------------------------------------------------------------------
# Unpaired volumes (self-supervised pretraining, synth7t.pretrain)

@dataclass
class UnpairedVolume:
    """A single image for self-supervised pretraining.

    ``field_bin`` is a supported source bin, ``7.0`` for a 7 T image, or ``None`` when the field
    is not known (a BIDS image without ``MagneticFieldStrength``).
    """

    path: Path
    contrast: str
    field_bin: float | None
    tag: str = ""


_MRIX_R_RE = re.compile(r"^R_(T1W|T2W|T2FLAIR)_([0-9.]+)T_(\w+?)\.nii(\.gz)?$")


def _field_from_label(value: float) -> float | None:
    for b in (*SUPPORTED_BINS, 7.0):
        if abs(value - b) < 1e-3:
            return float(b)
    return None


def unpaired_volumes(root: str | Path, *, contrasts: Iterable[str] = CONTRASTS,
                     fields: Iterable[float] | None = None) -> list[UnpairedVolume]:
    """Single images under ``root`` for self-supervised pretraining, sorted by path.

    * MRIxFields: every unpaired ``R_{MOD}_{field}_{ID}.nii[.gz]`` at any depth (the
      ``{split}/{MOD}/{field}/`` tree of ``Training_retrospective``); modality and field come
      from the name. Paired ``P_`` volumes are never used (the validation and test splits hold
      only those).
    * BIDS: ``sub-*/[ses-*/]anat/*_{T1w,T2w,FLAIR}.nii[.gz]``; the field is the inherited
      sidecar's ``MagneticFieldStrength`` routed by :func:`synth7t.fields.route_field` (a source
      bin, 7.0 for 7 T), ``None`` when missing or not routable. ``derivatives/`` is not searched.

    Parameters
    ----------
    contrasts
        BIDS suffixes to keep.
    fields
        Field bins to keep (7.0 allowed); ``None`` keeps every volume, unknown fields included.
    """
    from .fields import FieldStrengthError, route_field

    root = Path(root)
    contrasts = tuple(contrasts)
    keep = None if fields is None else tuple(float(f) for f in fields)
    out: list[UnpairedVolume] = []
    for path in sorted(root.rglob("R_*.nii*")):
        m = _MRIX_R_RE.match(path.name)
        if not m or MRIX_TO_BIDS[m.group(1)] not in contrasts:
            continue
        fb = _field_from_label(float(m.group(2)))
        out.append(UnpairedVolume(path, MRIX_TO_BIDS[m.group(1)], fb,
                                  tag=f"mrixfields:{m.group(1)}:{m.group(2)}T:{m.group(3)}"))
    for img in sorted(root.glob("sub-*/**/anat/*.nii*")):
        stem = img.name.split(".")[0]
        suffix = stem.split("_")[-1]
        if suffix not in contrasts:
            continue
        try:
            routing = route_field(_inherited_sidecar(root, img).get("MagneticFieldStrength"),
                                  where=str(img))
            fb = 7.0 if routing.passthrough else float(routing.bin)
        except FieldStrengthError:
            fb = None
        out.append(UnpairedVolume(img, suffix, fb, tag=f"bids:{stem}"))
    if keep is not None:
        out = [v for v in out if v.field_bin is not None
               and any(abs(v.field_bin - f) < 1e-3 for f in keep)]
    return out
