"""Self-supervised pretraining of the conditioned 2.5D U-Net on unpaired images.

Masked-image modelling on the network that is later fine-tuned: random square cells of a 2.5D
patch are hidden (set to 0, or to noise of the patch's brain intensities), either on the centre
slice only or through the whole slice stack ("tube" cells, so the neighbouring slices cannot
give the answer away), and the network reconstructs the *unmasked* centre slice. As in
supervised training it predicts a residual on its (masked) centre input slice, so inside a hole
it has to paint the missing anatomy from the context.

Objective: ``L1 + (1 - SSIM)`` over the hidden pixels inside the brain (SSIM map of the 7x7
window averaged over those pixels), plus ``visible_weight`` (default 1) x L1 over the visible
brain pixels, which keeps the network close to the identity where its input is intact -- the
starting point that supervised training from scratch has (zero head) and fine-tuning relies on.
Without it (or with 0.1) a network that fills zeroed holes adds the same large residual
everywhere (tiny-data runs: visible L1 0.36-0.40 after 120 steps, 0.05 with weight 1). The loss
is taken on the output before the network's clamp to [0, 1] (:func:`unclamped_output`).

Conditioning: the one-hot contrast always; the one-hot field bin when the image is at a
supported source field (MRIxFields names, BIDS ``MagneticFieldStrength``). 7 T images and images
of unknown field get an all-zero field part (the conditioning has no 7 T slot).

Data: :func:`synth7t.sources.unpaired_volumes` finds MRIxFields ``R_`` volumes and BIDS
T1w/T2w/FLAIR images; :class:`UnpairedSource` cuts axial slabs from them (read slab by slab
through nibabel's array proxy, canonical RAS orientation, resampled to 0.5 mm when the voxel
size differs, foreground mask, intensities scaled as :func:`synth7t.intensity.normalise`
scales the whole volume).

The loop, checkpoints, ``--resume``, EMA and progress bar are those of
:class:`synth7t.train.Trainer`; :class:`PretrainTrainer` only overrides the loss
(:meth:`~synth7t.train.Trainer.compute_loss`) and validation (masked reconstruction loss on fixed
batches, the best EMA weights kept in ``checkpoints/best.safetensors``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .fields import CONTRASTS, SUPPORTED_BINS
from .intensity import UPPER_PERCENTILE
from .networks import N_COND, UNet25D, condition_vector
from .sources import PatchSampler, Slab, UnpairedVolume, crop_to_mask
from .train import TrainConfig, Trainer, ssim_map


# ---------------------------------------------------------------------------------------------
# Objective

def masked_loss(pred: torch.Tensor, target: torch.Tensor, hole: torch.Tensor,
                brain: torch.Tensor, *, visible_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Masked-image-modelling loss.

    Parameters
    ----------
    pred, target
        ``(B, 1, H, W)``: the network's output and the unmasked centre slice.
    hole
        ``(B, 1, H, W)``, 1 where the centre slice was hidden from the network.
    brain
        ``(B, 1, H, W)`` brain (foreground) mask.

    Returns
    -------
    ``(loss, parts)``: ``L1 + (1 - SSIM)`` on hidden brain pixels + ``visible_weight`` x L1 on
    visible brain pixels; ``parts`` holds ``l1``/``ssim`` (hidden) and ``l1_visible``.
    """
    lm = hole * brain
    n = lm.sum().clamp_min(1.0)
    err = (pred - target).abs()
    l1 = (err * lm).sum() / n
    smap = ssim_map(pred, target)
    r = (lm.shape[-1] - smap.shape[-1]) // 2  # the 'valid' window crops (win - 1) / 2 a side
    lmc = lm[..., r:lm.shape[-2] - r, r:lm.shape[-1] - r]
    ssim = (smap * lmc).sum() / lmc.sum().clamp_min(1.0)
    loss = l1 + (1.0 - ssim)
    vis = (1.0 - hole) * brain
    l1v = (err * vis).sum() / vis.sum().clamp_min(1.0)
    if visible_weight:
        loss = loss + visible_weight * l1v
    return loss, {"l1": float(l1.detach()), "ssim": float(ssim.detach()),
                  "l1_visible": float(l1v.detach())}


def unclamped_output(net: UNet25D, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """``centre slice + residual`` before the network's clamp to [0, 1].

    Trained on, the clamp would stop every gradient at a saturated pixel: filling a zeroed hole
    needs a large residual, and a network that overshoots to 1 on the visible pixels too could
    never be pulled back (seen on tiny data: visible L1 stuck at 0.4). Inference and supervised
    training keep the clamp.
    """
    k = net.config.n_slices // 2
    _, feats, _ = net._run(x, cond)
    return x[:, k:k + 1] + net.head(feats)


def pretrain_condition(contrast: str, field_bin: float | None) -> torch.Tensor:
    """Conditioning of an unpaired image: :func:`synth7t.networks.condition_vector` when the
    field is a supported source bin, else the contrast one-hot with an all-zero field part."""
    if field_bin is not None and not math.isnan(field_bin) \
            and any(abs(field_bin - b) < 1e-3 for b in SUPPORTED_BINS):
        return condition_vector(contrast, field_bin)
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast {contrast!r} is not one of {CONTRASTS}")
    vec = torch.zeros(N_COND, dtype=torch.float32)
    vec[len(SUPPORTED_BINS) + CONTRASTS.index(contrast)] = 1.0
    return vec


# ---------------------------------------------------------------------------------------------
# Data

class _Reader:
    """Axial slabs of a NIfTI in canonical (RAS) voxel order, read through the array proxy."""

    def __init__(self, path: Path) -> None:
        import nibabel as nib

        self.img = nib.load(str(path))
        shape = self.img.shape
        if len(shape) == 4 and shape[3] == 1:
            self.extra: tuple = (0,)
        elif len(shape) == 3:
            self.extra = ()
        else:
            raise ValueError(f"{path}: not a 3D image (shape {shape})")
        self.ornt = nib.io_orientation(self.img.affine)
        self.zaxis = int(np.flatnonzero(self.ornt[:, 0] == 2)[0])
        self.flipz = bool(self.ornt[self.zaxis, 1] < 0)
        self.nz = int(shape[self.zaxis])
        zooms = self.img.header.get_zooms()[:3]
        self.zooms = tuple(float(zooms[int(np.flatnonzero(self.ornt[:, 0] == k)[0])])
                           for k in range(3))

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Canonical slices ``z0:z1`` (float32, non-finite and negative values set to 0)."""
        from nibabel.orientations import apply_orientation

        f0, f1 = (self.nz - z1, self.nz - z0) if self.flipz else (z0, z1)
        sl = [slice(None)] * 3
        sl[self.zaxis] = slice(f0, f1)
        data = np.asarray(self.img.dataobj[tuple(sl) + self.extra], dtype=np.float32)
        data = apply_orientation(data, self.ornt)
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        return np.ascontiguousarray(np.clip(data, 0.0, None), dtype=np.float32)


@dataclass
class _VolumeInfo:
    threshold: float  # foreground: intensity > threshold
    scale: float      # intensity that maps to 1.0 (UPPER_PERCENTILE of the foreground)
    z: tuple[int, int]
    xy: tuple[slice, slice]


class UnpairedSource:
    """Slabs of single images for :class:`MaskedPatchSampler` (source = target = the image).

    Parameters
    ----------
    volumes
        From :func:`synth7t.sources.unpaired_volumes`.
    depth
        Axial slices per slab (at ``voxel_mm``).
    voxel_mm
        Slabs are resampled (linear) to this isotropic voxel when a volume's voxel differs from it
        by more than 10 % on any axis (MRIxFields volumes are already 0.5 mm).

    Notes
    -----
    The first slab of a volume reads it whole once to find its foreground (``> 0`` for
    skull-stripped images with a zero background, else above 5 % of the 99th percentile), the
    brain's extent and the intensity scale; later slabs read only their slices. Whole-head BIDS
    images are used as they are (skull included; not registered to the reference grid).
    """

    def __init__(self, volumes: Sequence[UnpairedVolume], *, depth: int = 16,
                 voxel_mm: float = 0.5) -> None:
        if not volumes:
            raise ValueError("no unpaired volumes")
        self.volumes = list(volumes)
        self.depth = int(depth)
        self.voxel_mm = float(voxel_mm)
        self._info: dict[int, _VolumeInfo | None] = {}

    def info(self, i: int) -> _VolumeInfo | None:
        if i not in self._info:
            reader = _Reader(self.volumes[i].path)
            data = reader.read(0, reader.nz)
            pos = data > 0
            if not pos.any():
                self._info[i] = None
                return None
            thr = 0.0 if (~pos).mean() > 0.2 else 0.05 * float(np.percentile(data[pos], 99))
            mask = data > thr
            if mask.sum() < 200:
                self._info[i] = None
                return None
            scale = float(np.percentile(data[mask], UPPER_PERCENTILE)) or 1.0
            box = []
            for axis in range(3):
                other = tuple(a for a in range(3) if a != axis)
                idx = np.flatnonzero(mask.any(axis=other))
                box.append((int(idx[0]), int(idx[-1]) + 1))
            m = 4
            self._info[i] = _VolumeInfo(
                thr, scale, box[2],
                (slice(max(box[0][0] - m, 0), box[0][1] + m),
                 slice(max(box[1][0] - m, 0), box[1][1] + m)))
        return self._info[i]

    def make(self, rng: np.random.Generator) -> list[Slab]:
        i = int(rng.integers(len(self.volumes)))
        vol = self.volumes[i]
        info = self.info(i)
        if info is None:
            return []
        reader = _Reader(vol.path)
        factors = np.asarray(reader.zooms) / self.voxel_mm
        resample = bool(np.any(np.abs(factors - 1.0) > 0.1))
        nd = math.ceil(self.depth / factors[2]) + 1 if resample else self.depth
        nd = min(nd, reader.nz)
        lo, hi = info.z
        a = int(np.clip(lo - nd // 2, 0, reader.nz - nd))
        b = int(np.clip(hi - nd // 2, a, reader.nz - nd))
        z0 = int(rng.integers(a, b + 1))
        data = reader.read(z0, z0 + nd)[info.xy[0], info.xy[1]]
        mask = data > info.threshold
        data = np.clip(data / info.scale, 0.0, 1.0) * mask
        if resample:
            from scipy import ndimage

            data = ndimage.zoom(data, factors, order=1, prefilter=False)
            mask = ndimage.zoom(mask.astype(np.float32), factors, order=1, prefilter=False) > 0.5
            s = max((data.shape[2] - self.depth) // 2, 0)
            data, mask = data[:, :, s:s + self.depth], mask[:, :, s:s + self.depth]
            data = np.clip(data, 0.0, 1.0) * mask
        if mask.sum() < 200:
            return []
        fb = float("nan") if vol.field_bin is None else float(vol.field_bin)
        data = data.astype(np.float32)
        return [crop_to_mask(Slab(data, data, mask, vol.contrast, fb,
                                  tag=f"{vol.tag or vol.path.name}:z{z0}"))]


class MaskedPatchSampler(PatchSampler):
    """:class:`synth7t.sources.PatchSampler` whose batches are masked for pretraining.

    ``batch()`` returns ``(x_masked, y, brain, cond, hole)``: ``y`` is the unmasked centre slice,
    ``hole`` (B, 1, P, P) marks the hidden centre-slice pixels.

    Parameters
    ----------
    mask_ratio
        Fraction of the ``mask_patch`` x ``mask_patch`` cells hidden.
    tube_fraction
        Fraction of hidden cells hidden on every slice of the stack (else the centre slice only).
    fill
        ``"zero"`` or ``"noise"`` (Gaussian with the mean and standard deviation of the patch's
        brain intensities, clipped to [0, 1]).
    """

    def __init__(self, sources, rng: np.random.Generator, *, mask_ratio: float = 0.5,
                 mask_patch: int = 16, tube_fraction: float = 0.5, fill: str = "zero",
                 **kwargs) -> None:
        if fill not in ("zero", "noise"):
            raise ValueError(f"fill must be 'zero' or 'noise', not {fill!r}")
        self.mask_ratio = float(mask_ratio)
        self.mask_patch = max(1, int(mask_patch))
        self.tube_fraction = float(tube_fraction)
        self.fill = fill
        super().__init__(sources, rng, **kwargs)

    def mask_stack(self, x: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hide random cells of the ``(n_slices, P, P)`` stack ``x``; returns ``(x, hole)``."""
        S, H, W = x.shape
        c = self.mask_patch
        gh, gw = -(-H // c), -(-W // c)
        hidden = self.rng.random((gh, gw)) < self.mask_ratio
        tube = hidden & (self.rng.random((gh, gw)) < self.tube_fraction)
        hole, tube_px = (g.repeat(c, axis=0).repeat(c, axis=1)[:H, :W] for g in (hidden, tube))
        x = x.copy()
        centre = S // 2
        if self.fill == "noise":
            vals = x[centre][brain[0] > 0]
            mu, sd = (float(vals.mean()), float(vals.std())) if vals.size else (0.0, 0.0)
            noise = np.clip(self.rng.normal(mu, sd, x.shape), 0.0, 1.0).astype(np.float32)
        else:
            noise = np.zeros_like(x)
        x[centre][hole] = noise[centre][hole]
        for s in range(S):
            if s != centre:
                x[s][tube_px] = noise[s][tube_px]
        return x, hole[None].astype(np.float32)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        self._calls += 1
        if self.refresh_every and self._calls % self.refresh_every == 0:
            self._add()
        xs, ys, ms, cs, hs = [], [], [], [], []
        for _ in range(batch_size):
            slab = self.pool[int(self.rng.integers(len(self.pool)))]
            x, y, m = self._patch(slab)
            x, hole = self.mask_stack(x, m)
            xs.append(x)
            ys.append(y)
            ms.append(m)
            hs.append(hole)
            cs.append(pretrain_condition(slab.contrast, slab.field_bin))
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)),
                torch.from_numpy(np.stack(ms)), torch.stack(cs), torch.from_numpy(np.stack(hs)))


# ---------------------------------------------------------------------------------------------
# Engine

@dataclass
class PretrainConfig(TrainConfig):
    """:class:`synth7t.train.TrainConfig` plus the masking recipe (recorded in the card)."""

    mask_ratio: float = 0.5
    mask_patch: int = 16
    tube_fraction: float = 0.5
    fill: str = "zero"
    visible_weight: float = 1.0
    #: fixed validation batches (masked reconstruction loss), 0: none
    val_batches: int = 4
    voxel_mm: float = 0.5


def masked_sampler(sources, rng: np.random.Generator, cfg: PretrainConfig, *,
                   pool_size: int | None = None, refresh_every: int | None = None,
                   log: Callable[[str], None] | None = None) -> MaskedPatchSampler:
    """A :class:`MaskedPatchSampler` with the recipe of ``cfg``."""
    return MaskedPatchSampler(sources, rng, mask_ratio=cfg.mask_ratio, mask_patch=cfg.mask_patch,
                              tube_fraction=cfg.tube_fraction, fill=cfg.fill,
                              n_slices=cfg.n_slices, patch=cfg.patch,
                              pool_size=cfg.pool_size if pool_size is None else pool_size,
                              refresh_every=cfg.refresh_every if refresh_every is None
                              else refresh_every, log=log)


def split_volumes(volumes: Sequence[UnpairedVolume], *, every: int = 20,
                  min_volumes: int = 20) -> tuple[list[UnpairedVolume], list[UnpairedVolume]]:
    """``(train, held_out)``: every ``every``-th volume (in path order) is held out for
    validation once there are at least ``min_volumes``; below that nothing is held out and
    validation uses the training volumes (``held_out`` is then empty)."""
    volumes = list(volumes)
    if len(volumes) < min_volumes:
        return volumes, []
    held = volumes[every - 1::every]
    return [v for k, v in enumerate(volumes) if (k + 1) % every], held


def validation_batches(volumes: Sequence[UnpairedVolume], cfg: PretrainConfig, *,
                       seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``cfg.val_batches`` fixed masked batches (own seed, own pool)."""
    if not cfg.val_batches:
        return []
    src = UnpairedSource(volumes, depth=cfg.slab_depth, voxel_mm=cfg.voxel_mm)
    sampler = masked_sampler([(src, 1.0)], np.random.default_rng(seed), cfg,
                             pool_size=min(cfg.pool_size, max(2, 2 * cfg.val_batches)),
                             refresh_every=0)
    return [sampler.batch(cfg.batch_size) for _ in range(cfg.val_batches)]


class PretrainTrainer(Trainer):
    """:class:`synth7t.train.Trainer` with the masked-image-modelling loss.

    The sampler factory must make :class:`MaskedPatchSampler` batches. Validation is the masked
    loss of the EMA weights on ``val_batches`` (fixed); the best is kept as
    ``checkpoints/best.safetensors``.
    """

    def __init__(self, config: PretrainConfig, sampler_factory, out_dir: str | Path, *,
                 val_batches: list[tuple[torch.Tensor, ...]] | None = None,
                 init_net: UNet25D | None = None, log: Callable[[str], None] = print) -> None:
        super().__init__(config, sampler_factory, out_dir, val=None, init_net=init_net, log=log)
        self.val_batches = val_batches or []

    def compute_loss(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
        x, y, m, c, hole = batch
        x = x.contiguous(memory_format=torch.channels_last)
        return masked_loss(unclamped_output(self.net, x, c), y, hole, m,
                           visible_weight=self.cfg.visible_weight)

    def masked_eval(self, net: UNet25D | None = None,
                    batches: list[tuple[torch.Tensor, ...]] | None = None) -> dict:
        """Mean masked loss and parts of ``net`` (default: the EMA) over ``batches``."""
        net = net or self.eval_net
        batches = self.val_batches if batches is None else batches
        rows = []
        with torch.no_grad():
            for x, y, m, c, hole in batches:
                x, y, m, c, hole = (t.to(self.device) for t in (x, y, m, c, hole))
                loss, parts = masked_loss(net(x.contiguous(memory_format=torch.channels_last), c),
                                          y, hole, m, visible_weight=self.cfg.visible_weight)
                rows.append({"loss": float(loss), **parts})
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}

    def validate(self) -> dict:
        if not self.val_batches:
            return {}
        mean = self.masked_eval()
        self.val_history.append({"step": self.step, **{k: round(v, 5) for k, v in mean.items()}})
        score = -mean["loss"]
        if self.best is None or score > self.best["score"]:
            import os

            from .inference import save_unet

            self.best = {"step": self.step, "score": score, "metrics": {"mean": mean}}
            save_unet(self.eval_net, self.ckpt / "best.safetensors.tmp")
            os.replace(self.ckpt / "best.safetensors.tmp", self.ckpt / "best.safetensors")
        self.log(f"val step {self.step}: " + " ".join(f"{k}={v:.4f}" for k, v in mean.items()))
        return {"mean": mean}


def pretrain_card(trainer: PretrainTrainer, *, data: list[str], notes: list[str]) -> dict:
    """Model-card fields of a pretraining run (merged over :func:`synth7t.export.default_card`
    by the command)."""
    cfg = trainer.cfg
    best = trainer.best or {}
    return {
        "Description": (
            "self-supervised pretraining ONLY, not a 7T synthesis model: the conditioned 2.5D "
            "U-Net trained by masked-image modelling on unpaired images (reconstruct the hidden "
            "cells of the centre slice); fine-tune with `synth7t-train --init-from <name> "
            "--model-dir <this folder> ...` before use"),
        "Kind": "unet",
        "Pretraining": "masked-image modelling",
        "Loss": (f"L1 + (1 - SSIM, 7x7 uniform window) over hidden brain pixels + "
                 f"{cfg.visible_weight:g} x L1 over visible brain pixels; {cfg.mask_ratio:g} of "
                 f"{cfg.mask_patch}x{cfg.mask_patch} cells hidden ({cfg.fill} fill), "
                 f"{cfg.tube_fraction:g} of them through the whole slice stack"
                 + (f"; exported weights: EMA (decay {cfg.ema_decay:g})" if cfg.ema_decay else "")),
        "Metrics": {"masked_reconstruction": best.get("metrics", {})},
        "TrainingData": "; ".join(data),
        "Notes": notes,
    }
