"""Training and fine-tuning of the conditioned 2.5D U-Net.

Data sources (mix freely):

* :class:`SimulatorSource` -- pairs simulated on the fly by :mod:`synth7t.simulate` from the
  ICBM152 anatomy (random fields, contrasts, protocols, deformations, seeded RNG). Only axial
  slabs (``roi``) are simulated, which is what a 2.5D model needs and much cheaper than volumes.
* :func:`mrixfields_pairs` -- paired ``P_`` volumes of an MRIxFields tree,
  ``{split}/{MOD}/{field}/P_{MOD}_{field}_{ID4}.nii.gz`` with the 7T volume as target.
  (TODO: unpaired ``R_`` volumes could pretrain with a CUT-style loss; not implemented.)
* :func:`bids_pairs` -- a BIDS dataset whose participants have sessions at different fields:
  each lower-field image is rigidly registered (antspyx) to the same participant's 7T image of
  the same contrast, optionally then both into the 0.5 mm reference grid.

Loss: ``L1 + (1 - SSIM)``, SSIM with a 7x7 uniform window and sample covariance, as
``skimage.metrics.structural_similarity`` (the challenge metric) computes it.

Checkpoints (every ``checkpoint_every`` steps) go to ``out/checkpoints``: ``last.safetensors``
(weights), ``optimizer.pt`` (optimizer + torch RNG; loaded with ``weights_only=True``) and
``state.json`` (step, numpy RNG state, loss history, best validation). ``best.safetensors`` keeps
the checkpoint with the best held-out score. :func:`export_model` writes ``model.safetensors``,
``model_card.json`` and a ``registry.json`` that ``--model-dir`` loads.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from .fields import CONTRASTS, SUPPORTED_BINS, bin_label
from .inference import UNetSynthesizer, save_unet
from .intensity import normalise
from .networks import UNet25D, UNetConfig, condition_vector, count_parameters
from .registry import (ModelIntegrityError, Registry, RegistryError, read_verified,
                       safetensors_metadata)

#: MRIxFields modality names -> BIDS suffixes.
MRIX_TO_BIDS = {"T1W": "T1w", "T2W": "T2w", "T2FLAIR": "FLAIR"}
BIDS_TO_MRIX = {v: k for k, v in MRIX_TO_BIDS.items()}


# ---------------------------------------------------------------------------------------------
# Loss

def ssim_map(x: torch.Tensor, y: torch.Tensor, *, win: int = 7,
             data_range: float = 1.0) -> torch.Tensor:
    """SSIM map with a ``win`` x ``win`` uniform window (skimage defaults, sample covariance).

    Parameters
    ----------
    x, y
        ``(B, 1, H, W)`` tensors.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win * win
    cov_norm = n / (n - 1)  # skimage use_sample_covariance=True
    mx = F.avg_pool2d(x, win, stride=1)
    my = F.avg_pool2d(y, win, stride=1)
    vx = cov_norm * (F.avg_pool2d(x * x, win, stride=1) - mx * mx)
    vy = cov_norm * (F.avg_pool2d(y * y, win, stride=1) - my * my)
    vxy = cov_norm * (F.avg_pool2d(x * y, win, stride=1) - mx * my)
    return ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def synthesis_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``L1 + (1 - SSIM)`` over whole patches (background included, as the challenge scores)."""
    l1 = F.l1_loss(pred, target)
    ssim = ssim_map(pred, target).mean()
    return l1 + (1.0 - ssim), {"l1": float(l1.detach()), "ssim": float(ssim.detach())}


# ---------------------------------------------------------------------------------------------
# Data

@dataclass
class Slab:
    """A paired block on (a box of) the reference grid; arrays are ``(X, Y, Z)`` float32."""

    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    contrast: str
    field_bin: float
    tag: str = ""


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
                slab.contrast, slab.field_bin, slab.tag)


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
    """

    def __init__(self, simulator=None, *, depth: int = 16, roi_size: int | None = 208,
                 fields: Iterable[float] = SUPPORTED_BINS,
                 contrasts: Iterable[str] = CONTRASTS,
                 extent: tuple[tuple[int, int], ...] | None = None, seed_offset: int = 0,
                 deform: bool = True) -> None:
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
        pair = self.sim.sample(contrast=c, field=fb, seed=seed, roi=roi, deform=self.deform)
        mask = np.asarray(pair["mask"]).astype(bool)
        if mask.sum() < 200:
            return []
        tag = f"sim:{c}:{fb:g}:seed{seed}:" + ",".join(f"{s.start}-{s.stop}" for s in roi)
        return [crop_to_mask(Slab(np.asarray(pair["source"], np.float32),
                                  np.asarray(pair["target"], np.float32), mask, c, fb, tag=tag))]

    def make_pair(self, rng: np.random.Generator, contrast: str, field_bin: float) -> list[Slab]:
        """A slab of a given (contrast, field): used to build balanced held-out sets."""
        return self.make(rng, contrast=contrast, field_bin=field_bin)


@dataclass
class PairSpec:
    """A paired volume on disk (or already in memory)."""

    source: Path | np.ndarray
    target: Path | np.ndarray
    contrast: str
    field_bin: float
    mask: Path | np.ndarray | None = None
    tag: str = ""


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
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if i not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            p = self.pairs[i]
            src, tgt = _load_array(p.source), _load_array(p.target)
            if src.shape != tgt.shape:
                raise ValueError(f"{p.tag}: source {src.shape} and target {tgt.shape} differ")
            mask = (_load_array(p.mask) > 0) if p.mask is not None else (tgt > 0)
            self._cache[i] = (normalise(src, mask), normalise(tgt, mask), mask)
        return self._cache[i]

    def make(self, rng: np.random.Generator) -> list[Slab]:
        i = int(rng.integers(len(self.pairs)))
        src, tgt, mask = self._get(i)
        zs = np.flatnonzero(mask.any(axis=(0, 1)))
        if zs.size == 0:
            return []
        depth = min(self.depth, mask.shape[2])
        lo, hi = max(int(zs[0]) - depth // 2, 0), min(int(zs[-1]), mask.shape[2] - depth)
        z0 = int(rng.integers(lo, max(lo, hi) + 1))
        b = (slice(None), slice(None), slice(z0, z0 + depth))
        p = self.pairs[i]
        return [crop_to_mask(Slab(src[b], tgt[b], mask[b], p.contrast, p.field_bin,
                                  tag=f"{p.tag}:z{z0}"))]


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
        found.setdefault((sub, suffix), []).append((7.0 if routing.passthrough else routing.bin, img))
    out = []
    for (sub, suffix), items in sorted(found.items()):
        targets = [p for f, p in items if f == 7.0]
        if not targets:
            continue
        fixed_path = targets[0]
        fixed = ants.image_read(str(fixed_path))
        for fb, mov_path in items:
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
                                tag=f"bids:{stem}"))
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
    """

    def __init__(self, sources: list[tuple[SlabSource, float]], rng: np.random.Generator, *,
                 n_slices: int = 5, patch: int = 128, pool_size: int = 24,
                 refresh_every: int = 8, log: Callable[[str], None] | None = None) -> None:
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
        return np.ascontiguousarray(x), np.ascontiguousarray(y), np.ascontiguousarray(m)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``x (B, n_slices, P, P)``, ``y``, ``mask (B, 1, P, P)``, ``cond (B, N_COND)``."""
        self._calls += 1
        if self.refresh_every and self._calls % self.refresh_every == 0:
            self._add()
        xs, ys, ms, cs = [], [], [], []
        for _ in range(batch_size):
            slab = self.pool[int(self.rng.integers(len(self.pool)))]
            x, y, m = self._patch(slab)
            xs.append(x)
            ys.append(y)
            ms.append(m)
            cs.append(condition_vector(slab.contrast, slab.field_bin))
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)),
                torch.from_numpy(np.stack(ms)), torch.stack(cs))


# ---------------------------------------------------------------------------------------------
# Evaluation

def evaluate(net: UNet25D, slabs: list[Slab], *, batch_size: int = 8) -> dict:
    """Challenge metrics (nRMSE, SSIM, PSNR) of ``net`` and of copy-input on held-out slabs.

    Returns ``{"T1w@1.5T": {"nrmse":, "ssim":, "psnr":, "copy_nrmse":, "copy_ssim":}, ...,
    "mean": {...}}`` (averaged over the slabs of each pair).
    """
    from . import metrics

    net.eval()
    per: dict[str, list[dict]] = {}
    for slab in slabs:
        syn = UNetSynthesizer(net, contrast=slab.contrast, field_bin=slab.field_bin)
        pred = syn.predict(slab.source * slab.mask, slab.mask, batch_size=batch_size)
        gt = slab.target * slab.mask
        src = slab.source * slab.mask
        key = f"{slab.contrast}@{bin_label(slab.field_bin)}"
        per.setdefault(key, []).append({
            "nrmse": metrics.nrmse(pred, gt), "ssim": metrics.ssim(pred, gt),
            "psnr": metrics.psnr(pred, gt),
            "copy_nrmse": metrics.nrmse(src, gt), "copy_ssim": metrics.ssim(src, gt)})
    out = {k: {m: float(np.mean([r[m] for r in v])) for m in v[0]} for k, v in sorted(per.items())}
    if out:
        out["mean"] = {m: float(np.mean([v[m] for v in out.values()])) for m in next(iter(out.values()))}
    net.train()
    return out


def validation_slabs(source: SlabSource, n: int, seed: int) -> list[Slab]:
    """A fixed held-out set (its own seed; simulator seeds offset away from training).

    For a simulator the set cycles through every (contrast, field) pair so each is scored.
    """
    rng = np.random.default_rng(seed)
    slabs: list[Slab] = []
    if isinstance(source, SimulatorSource):
        pairs = [(c, f) for c in source.contrasts for f in source.fields]
        i = 0
        while len(slabs) < n and i < 20 * n:
            c, f = pairs[len(slabs) % len(pairs)]
            slabs.extend(source.make_pair(rng, c, f))
            i += 1
        return slabs[:n]
    while len(slabs) < n:
        slabs.extend(source.make(rng))
    return slabs[:n]


# ---------------------------------------------------------------------------------------------
# Training loop

@dataclass
class TrainConfig:
    """Recipe; recorded verbatim in the model card."""

    steps: int = 4000
    batch_size: int = 16
    patch: int = 128
    lr: float = 1e-3
    lr_min: float = 2e-5
    warmup: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    n_slices: int = 5
    base: int = 16
    levels: int = 4
    pool_size: int = 32
    refresh_every: int = 4
    slab_depth: int = 16
    roi_size: int = 208
    checkpoint_every: int = 200
    val_every: int = 0  # 0: only at checkpoints
    val_slabs: int = 12
    threads: int = 1
    device: str = "cpu"
    max_minutes: float = 0.0  # 0: no wall-time limit
    data: list[str] = field(default_factory=list)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * t))


def load_registry_unet(name: str, *, model_dir: str | Path | None = None) -> UNet25D:
    """Weights of the registry model ``name`` (any pair; one conditioned net serves all)."""
    from safetensors.torch import load as st_load

    reg = Registry.load(model_dir)
    entries = [e for e in reg if e.name == name]
    if not entries:
        raise RegistryError(f"--init-from: no model named {name!r} in the registry")
    unets = [e for e in entries if e.kind == "unet"]
    if not unets:
        raise RegistryError(f"--init-from: model {name!r} is a {entries[0].kind}, not a network")
    data = read_verified(unets[0])
    meta = safetensors_metadata(data)
    if "config" not in meta:
        raise ModelIntegrityError(f"{unets[0].file}: safetensors metadata lacks the network config")
    net = UNet25D(UNetConfig.from_json(meta["config"]))
    net.load_state_dict(st_load(data))
    return net


class Trainer:
    """Owns the network, optimizer, sampler and checkpoints of one run."""

    def __init__(self, config: TrainConfig, sampler_factory: Callable[[np.random.Generator], PatchSampler],
                 out_dir: str | Path, *, val: list[Slab] | None = None,
                 init_net: UNet25D | None = None, log: Callable[[str], None] = print) -> None:
        from .inference import resolve_device

        self.cfg = config
        self.out = Path(out_dir)
        self.ckpt = self.out / "checkpoints"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.device = resolve_device(config.device)
        torch.set_num_threads(max(1, config.threads))
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        if init_net is not None:
            self.net = init_net
        else:
            self.net = UNet25D(UNetConfig(n_slices=config.n_slices, base=config.base,
                                          levels=config.levels))
        self.net.to(self.device, memory_format=torch.channels_last).train()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=config.lr,
                                     weight_decay=config.weight_decay)
        self.step = 0
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.best: dict | None = None
        self.wall = 0.0
        self.sampler_factory = sampler_factory
        self.sampler: PatchSampler | None = None
        self.val = val or []

    # checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        save_unet(self.net, self.ckpt / "last.safetensors.tmp")
        os.replace(self.ckpt / "last.safetensors.tmp", self.ckpt / "last.safetensors")
        torch.save({"optimizer": self.opt.state_dict(), "torch_rng": torch.get_rng_state()},
                   self.ckpt / "optimizer.pt.tmp")
        os.replace(self.ckpt / "optimizer.pt.tmp", self.ckpt / "optimizer.pt")
        state = {"step": self.step, "config": asdict(self.cfg), "history": self.history,
                 "val_history": self.val_history, "best": self.best, "wall_seconds": self.wall,
                 "numpy_rng": self.rng.bit_generator.state,
                 "data_seconds": self.sampler.data_seconds if self.sampler else 0.0}
        tmp = self.ckpt / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1, default=float))
        os.replace(tmp, self.ckpt / "state.json")

    def resume(self) -> bool:
        """Continue from ``out/checkpoints`` if present; returns whether it did."""
        from safetensors.torch import load_file

        state_path = self.ckpt / "state.json"
        if not state_path.is_file():
            return False
        state = json.loads(state_path.read_text())
        self.net.load_state_dict(load_file(str(self.ckpt / "last.safetensors")))
        blob = torch.load(self.ckpt / "optimizer.pt", weights_only=True)
        self.opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        self.rng.bit_generator.state = state["numpy_rng"]
        self.step = int(state["step"])
        self.history = state.get("history", [])
        self.val_history = state.get("val_history", [])
        self.best = state.get("best")
        self.wall = float(state.get("wall_seconds", 0.0))
        self.log(f"resumed at step {self.step}")
        return True

    # loop --------------------------------------------------------------------------------------
    def validate(self) -> dict:
        if not self.val:
            return {}
        res = evaluate(self.net, self.val)
        mean = res.get("mean", {})
        rec = {"step": self.step, **{k: round(v, 5) for k, v in mean.items()}}
        self.val_history.append(rec)
        # Selection score: SSIM up, nRMSE down, both as the challenge ranks on both.
        score = mean.get("ssim", 0.0) - mean.get("nrmse", 0.0)
        if self.best is None or score > self.best["score"]:
            self.best = {"step": self.step, "score": score, "metrics": res}
            save_unet(self.net, self.ckpt / "best.safetensors.tmp")
            os.replace(self.ckpt / "best.safetensors.tmp", self.ckpt / "best.safetensors")
        self.log(f"val step {self.step}: " + " ".join(f"{k}={v:.4f}" for k, v in mean.items()))
        return res

    def run(self, *, progress: bool = True) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.sampler = self.sampler_factory(self.rng)
        start = time.perf_counter()
        wall0 = self.wall
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, dynamic_ncols=True,
                   mininterval=5.0)
        running = None
        while self.step < cfg.steps:
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr_at(self.step)
            x, y, m, c = (t.to(self.device) for t in self.sampler.batch(cfg.batch_size))
            x = x.contiguous(memory_format=torch.channels_last)
            pred = self.net(x, c) * m
            loss, parts = synthesis_loss(pred, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            self.step += 1
            lv = float(loss.detach())
            running = lv if running is None else 0.98 * running + 0.02 * lv
            self.wall = wall0 + time.perf_counter() - start
            if self.step % 10 == 0 or self.step == 1:
                self.history.append({"step": self.step, "loss": round(lv, 5),
                                     "smooth": round(running, 5), "l1": round(parts["l1"], 5),
                                     "ssim": round(parts["ssim"], 5),
                                     "lr": cfg.lr_at(self.step - 1),
                                     "wall": round(self.wall, 1)})
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            bar.update(1)
            at_ckpt = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            if (cfg.val_every and self.step % cfg.val_every == 0) or at_ckpt:
                self.validate()
            if at_ckpt:
                self.save_checkpoint()
                self.log(f"step {self.step} loss(smoothed) {running:.4f} wall {self.wall:.0f}s "
                         f"data {self.sampler.data_seconds:.0f}s")
            if cfg.max_minutes and self.wall > cfg.max_minutes * 60:
                self.log(f"wall-time limit reached at step {self.step}")
                break
        bar.close()
        if not self.val_history or self.val_history[-1]["step"] != self.step:
            self.validate()
        self.save_checkpoint()
        return {"step": self.step, "wall_seconds": self.wall, "best": self.best}


# ---------------------------------------------------------------------------------------------
# Export

def export_model(weights: str | Path | UNet25D, out_dir: str | Path, *, name: str = "default",
                 version: str = "1.0.0", pairs: Iterable[tuple[str, float]] | None = None,
                 card: dict | None = None, file_name: str = "model.safetensors",
                 card_name: str = "model_card.json", merge: bool = False) -> dict:
    """Write ``model.safetensors``, ``model_card.json`` and ``registry.json`` into ``out_dir``.

    Parameters
    ----------
    weights
        A network or a safetensors checkpoint (e.g. ``checkpoints/best.safetensors``).
    pairs
        (contrast, field bin) pairs to register; all 12 by default.
    card
        Model-card fields (recipe, data, metrics, wall time...); SHA-256 and architecture are
        filled in here.
    merge
        Keep other entries already in ``out_dir/registry.json`` (used for ``synth7t/models``).
    """
    from safetensors.torch import load_file

    from .export import merge_entries, read_registry, write_registry

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, UNet25D):
        net = weights
    else:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            cfg = UNetConfig.from_json(fh.metadata()["config"])
        net = UNet25D(cfg)
        net.load_state_dict(load_file(str(weights)))
    path = out_dir / file_name
    sha = save_unet(net, path, extra_metadata={"name": name, "version": version})
    pairs = list(pairs) if pairs is not None else [(c, b) for c in CONTRASTS for b in SUPPORTED_BINS]
    full_card = {"Name": name, "Kind": "unet", "Version": version,
                 "Architecture": {"class": "synth7t.networks.UNet25D",
                                  "config": json.loads(net.config.to_json()),
                                  "parameters": count_parameters(net)},
                 "Pairs": [f"{c}@{bin_label(b)}" for c, b in pairs]}
    full_card.update(card or {})
    full_card["SHA256"] = sha
    full_card["File"] = file_name
    full_card["SizeBytes"] = path.stat().st_size
    (out_dir / card_name).write_text(json.dumps(full_card, indent=1, default=float) + "\n")
    entries = [{"name": name, "kind": "unet", "contrast": c, "field_bin": float(b),
                "version": version, "file": file_name, "sha256": sha, "card": card_name}
               for c, b in pairs]
    old = read_registry(out_dir) if merge else []
    write_registry(out_dir, merge_entries(old, entries))
    return full_card


def default_card(trainer: Trainer, *, data: list[str], notes: list[str] | None = None) -> dict:
    """Model-card fields of a finished run."""
    best = trainer.best or {}
    hist = trainer.history
    return {
        "Description": "conditioned 2.5D U-Net (one network for all (contrast, field) pairs, FiLM "
                       "conditioning on field bin and contrast, residual on the centre slice)",
        "TrainingData": "; ".join(data),
        "Recipe": asdict(trainer.cfg),
        "Loss": "L1 + (1 - SSIM), 7x7 uniform window",
        "Steps": trainer.step,
        "BestStep": best.get("step"),
        "WallTimeSeconds": round(trainer.wall, 1),
        "LossCurve": [h for h in hist if h["step"] in _curve_steps(hist)],
        "ValidationHistory": trainer.val_history,
        "Metrics": {"held_out_simulated": best.get("metrics", {})},
        "Notes": notes or [],
    }


def _curve_steps(hist: list[dict], n: int = 20) -> set[int]:
    if not hist:
        return set()
    idx = np.unique(np.linspace(0, len(hist) - 1, n).astype(int))
    return {hist[i]["step"] for i in idx}
