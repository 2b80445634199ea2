"""Training and fine-tuning of the conditioned 2.5D U-Net (the engine).

Data come from :mod:`synth7t.sources` (simulated slabs with domain randomisation, paired
volumes); export of a run into a model folder is :mod:`synth7t.export`. One direction of
import: ``sources -> train -> export``.

Loss: ``L1 + (1 - SSIM)``, SSIM with a 7x7 uniform window and sample covariance, as
``skimage.metrics.structural_similarity`` (the challenge metric) computes it. A network with
an uncertainty head (``UNetConfig(uncertainty=True)``) adds ``unc_weight`` x the Laplace
negative log-likelihood of the target given the (detached) prediction and the predicted scale
``b`` inside the brain, so ``b`` learns the expected absolute error without pulling the
prediction itself. ``level_weight`` > 0 adds :func:`level_loss`, the relative error of 4 mm
block means inside the brain: the tissue levels, which L1 and SSIM weigh by their absolute
size, so that dark tissue (T2w white matter at 0.1 of the scale) is not left at the source's
level.

An exponential moving average (EMA) of the weights is kept from ``ema_start`` on; validation,
``best.safetensors`` and export use the EMA weights (they generalise better than the last
iterate of a noisy CPU-sized batch).

Checkpoints (every ``checkpoint_every`` steps) go to ``out/checkpoints``: ``last.safetensors``
(weights), ``ema.safetensors``, ``optimizer.pt`` (optimizer + torch RNG; loaded with
``weights_only=True``) and ``state.json`` (step, numpy RNG state, loss history, best
validation). ``best.safetensors`` keeps the checkpoint with the best held-out score.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .fields import CONTRASTS, bin_label
from .intensity import BRAIN_MEAN_LEVELS, level_key
from .inference import UNetSynthesizer, save_unet
from .networks import UNet25D, UNetConfig
from .registry import (ModelIntegrityError, Registry, RegistryError, read_verified,
                       safetensors_metadata)
# re-exported: the training API has always offered its data sources from here
from .sources import (BIDS_TO_MRIX, MRIX_TO_BIDS, PairSpec, PatchSampler,  # noqa: F401
                      RandomAnatomies, SimulatorSource, Slab, SlabSource,  # noqa: F401
                      VolumePairSource, bids_pairs, crop_to_mask, mrixfields_pairs)  # noqa: F401
from .sources import tag_anatomy


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



def level_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
               block: int = 8, floor: float = 0.1) -> torch.Tensor:
    """Mean relative error ``|mean(pred) - mean(y)| / (mean(y) + floor)`` of ``block`` x
    ``block`` pixel blocks lying wholly inside ``mask`` (8 px = 4 mm on the 0.5 mm grid).

    Why: block means average noise and texture away and leave the tissue's level. L1 and SSIM
    weigh a level error by its absolute size, so a whole white matter 0.015 too bright on a T2w
    (15 % of its 0.1 level, the one error left there) costs them little, and the network,
    shipped 2.1.0, kept T2w 5 T white matter at the source's level on its own training
    anatomies (0.12-0.14 for targets 0.10-0.12). ``floor`` keeps near-black blocks (nulled
    FLAIR CSF) from dominating.
    """
    inside = F.avg_pool2d(mask, block) > 0.999
    if not bool(inside.any()):
        return pred.sum() * 0.0
    mp, my = F.avg_pool2d(pred, block), F.avg_pool2d(target, block)
    rel = (mp - my).abs() / (my + floor)
    return rel[inside].mean()


def laplace_nll(pred: torch.Tensor, b: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Laplace negative log-likelihood ``|y - pred| / b + log b`` inside ``mask`` (mean).

    ``pred`` is detached: the scale head learns the expected absolute error of the prediction
    as it is, and the likelihood cannot trade image quality for a smaller loss.
    """
    err = (target - pred.detach()).abs()
    nll = err / b + torch.log(b)
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


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
        pred = syn.predict(slab.source * slab.mask, slab.mask, batch_size=batch_size,
                           input_level=slab.source_level, protocol=slab.source_protocol)
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
    #: second output head for the per-voxel expected absolute error (Laplace NLL)
    uncertainty: bool = True
    unc_weight: float = 0.1
    #: weight of :func:`level_loss` (0: off; 2.1.0 and earlier were trained without it)
    level_weight: float = 0.0
    #: EMA of the weights (0 disables); validation and export use the EMA weights
    ema_decay: float = 0.999
    #: range of a random gain on each training patch's source (log-uniform; ``(1, 1)``: none).
    #: The source's [0, 1] scale is set by an upper percentile of a noisy image, which rises
    #: with the noise (and with vessels or hot voxels) and moves with whoever normalised it;
    #: without this the network let the input's scale set the output's: rendered at WM SNR 3-5
    #: (below the training range), 0.1 T T1w arrived with WM at 0.73-0.79 instead of 0.88-0.90
    #: and the synthetic 7T WM came out at 0.62-0.67 for a target of 0.94. Off by default: a
    #: fine-tune with (0.7, 1.1) halved that pair's loss to copy-input but, with the absolute
    #: level gone as a cue, missed the Colin27 quality target on T1w 3 T / 5 T and FLAIR 5 T,
    #: where copy-input is already within a few percent (models/TRAINING.md, "not shipped").
    input_gain: tuple[float, float] = (1.0, 1.0)
    #: ``"brain-mean"``: the network scales every source by its whole brain's mean (a level the
    #: noise hardly moves; the cure input_gain was not) to :data:`synth7t.intensity
    #: .BRAIN_MEAN_LEVELS` (:attr:`synth7t.networks.UNetConfig.input_levels`; a network that
    #: already scales keeps its own levels)
    input_scaling: str = "none"
    #: Source field bins whose networks are also conditioned on the source's whole-brain level
    #: (:attr:`synth7t.networks.UNetConfig.level_condition`, nominal levels :data:`synth7t.
    #: intensity.BRAIN_MEAN_LEVELS`; a network initialised without it starts computing exactly
    #: what it did). Empty: none.
    level_condition: tuple[float, ...] = ()
    #: Condition the network on the source protocol too (:attr:`synth7t.networks.UNetConfig
    #: .protocol_condition`, nominal protocols from ``physics.json``; a network initialised
    #: without it starts computing exactly what it did).
    protocol_condition: bool = False
    #: Share of training patches whose protocol is given as "not known" (inputs without a
    #: sidecar, e.g. the challenge data, get what the network learned from these).
    protocol_dropout: float = 0.3
    #: Train only the uncertainty head; every other weight stays byte for byte what it was (the
    #: synthetic images do not change): recalibrates the map on new data, e.g. after a
    #: fine-tune (the shipped 2.3.1 map averaged 0.0076 for an error of 0.0127 on new T2w 5 T
    #: training-like slabs, 0.0122 after 1,000 head-only steps; synth7t/models/TRAINING.md).
    head_only: bool = False
    #: With ``head_only``: the head learns the absolute error of *another* network (named here,
    #: for the card), one that was never trained on the anatomies the patches come from. The
    #: shipped network has fitted every training anatomy, so its own residuals there lack the
    #: error it makes on a new brain; a network that never saw them makes that error
    #: (cross-fitting; synth7t/models/TRAINING.md).
    cross_fit: str = ""

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
                 init_net: UNet25D | None = None,
                 error_net: "UNet25D | Mapping[str, UNet25D] | None" = None,
                 log: Callable[[str], None] = print) -> None:
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
            self.net = _with_uncertainty_head(init_net, config.uncertainty)
        else:
            self.net = UNet25D(UNetConfig(n_slices=config.n_slices, base=config.base,
                                          levels=config.levels, uncertainty=config.uncertainty))
        # the scaling is a property of the input, not of any weight: a network learns under the
        # levels it is given (recorded in its metadata, which inference reads); one that already
        # scales keeps its own, so fine-tuning never moves a model's input scale
        if config.input_scaling == "brain-mean" and not self.net.config.input_levels:
            self.net.config.input_levels = dict(BRAIN_MEAN_LEVELS)
        if config.level_condition:
            keys = {level_key(c, f) for c in CONTRASTS for f in config.level_condition}
            self.net = self.net.with_level_condition(
                {k: v for k, v in BRAIN_MEAN_LEVELS.items() if k in keys})
        if config.protocol_condition:
            from .physics import Physics

            self.net = self.net.with_protocol_condition(Physics.load().nominal_protocols())
        if config.head_only:
            if not self.net.config.uncertainty:
                raise ValueError("head_only needs a network with an uncertainty head")
            for name, prm in self.net.named_parameters():
                prm.requires_grad_(name.startswith("unc_head."))
        # one network for every patch, or one per base anatomy (a fold that never saw it)
        folds = dict(error_net) if isinstance(error_net, Mapping) else (
            {} if error_net is None else {"": error_net})
        if folds and not config.head_only:
            raise ValueError("error_net (cross-fitting) trains only the head: set head_only")
        for other in folds.values():
            if (other.config.n_cond != self.net.config.n_cond
                    or other.config.level_condition != self.net.config.level_condition
                    or other.config.input_levels != self.net.config.input_levels
                    or other.config.n_slices != self.net.config.n_slices):
                raise ValueError("error_net reads other inputs or conditions than the trained "
                                 "network")
        self.net.to(self.device, memory_format=torch.channels_last).train()
        self.error_nets = {k: v.to(self.device, memory_format=torch.channels_last).eval()
                           for k, v in folds.items()}
        self.ema = copy.deepcopy(self.net).eval() if config.ema_decay > 0 else None
        self.opt = torch.optim.AdamW([q for q in self.net.parameters() if q.requires_grad],
                                     lr=config.lr, weight_decay=config.weight_decay)
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
        if self.ema is not None:
            save_unet(self.ema, self.ckpt / "ema.safetensors.tmp")
            os.replace(self.ckpt / "ema.safetensors.tmp", self.ckpt / "ema.safetensors")
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
        if self.ema is not None:
            ema_path = self.ckpt / "ema.safetensors"
            self.ema.load_state_dict(load_file(str(ema_path if ema_path.is_file()
                                                   else self.ckpt / "last.safetensors")))
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
    @property
    def eval_net(self) -> UNet25D:
        """The weights that are validated and exported (the EMA when kept)."""
        return self.ema if self.ema is not None else self.net

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # short warm-up so early checkpoints are not dominated by the random start
        d = min(self.cfg.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            for pe, pn in zip(self.ema.parameters(), self.net.parameters()):
                if pn.requires_grad:  # a frozen weight's average is itself, to the bit
                    pe.mul_(d).add_(pn.detach(), alpha=1.0 - d)
            for be, bn in zip(self.ema.buffers(), self.net.buffers()):
                be.copy_(bn)

    def validate(self) -> dict:
        if not self.val:
            return {}
        res = evaluate(self.eval_net, self.val)
        mean = res.get("mean", {})
        rec = {"step": self.step, **{k: round(v, 5) for k, v in mean.items()}}
        self.val_history.append(rec)
        # Selection score: SSIM up, nRMSE down, both as the challenge ranks on both.
        score = mean.get("ssim", 0.0) - mean.get("nrmse", 0.0)
        if self.best is None or score > self.best["score"]:
            self.best = {"step": self.step, "score": score, "metrics": res}
            save_unet(self.eval_net, self.ckpt / "best.safetensors.tmp")
            os.replace(self.ckpt / "best.safetensors.tmp", self.ckpt / "best.safetensors")
        self.log(f"val step {self.step}: " + " ".join(f"{k}={v:.4f}" for k, v in mean.items()))
        return res

    def _cross_fit_reference(self, x: torch.Tensor, c: torch.Tensor,
                             tags: list[str] | None) -> torch.Tensor:
        """The cross-fit networks' prediction of the batch: each patch from the network that
        never saw its base anatomy (``tags``: the patches' :attr:`Slab.tag`)."""
        if "" in self.error_nets:
            return self.error_nets[""](x, c)
        names = [tag_anatomy(t) for t in (tags or [])]
        if len(names) != x.shape[0] or any(n not in self.error_nets for n in names):
            missing = sorted({n for n in names if n not in self.error_nets}) or ["(no tags)"]
            raise RuntimeError(f"no cross-fit network for the anatomies {missing}")
        ref = torch.empty_like(x[:, :1])
        for name, other in self.error_nets.items():
            idx = [i for i, n in enumerate(names) if n == name]
            if idx:
                ref[idx] = other(x[idx], c[idx])
        return ref

    def compute_loss(self, batch: tuple[torch.Tensor, ...], *,
                     tags: list[str] | None = None) -> tuple[torch.Tensor, dict]:
        """Loss of one sampler batch ``(x, y, mask, cond)`` and its logged parts (``l1``,
        ``ssim``, ``nll``); ``tags``, the patches' :attr:`Slab.tag`, pick each patch's
        cross-fit network. A hook: :mod:`synth7t.pretrain` overrides it with its
        masked-image-modelling objective."""
        x, y, m, c = batch
        x = x.contiguous(memory_format=torch.channels_last)
        if self.net.config.uncertainty:
            pred, b = self.net.forward_with_uncertainty(x, c)
            pred = pred * m
            loss, parts = synthesis_loss(pred, y)
            if self.error_nets:
                with torch.no_grad():
                    ref = self._cross_fit_reference(x, c, tags) * m
                nll = laplace_nll(ref, b, y, m)
            else:
                nll = laplace_nll(pred, b, y, m)
            loss = loss + self.cfg.unc_weight * nll
            parts["nll"] = float(nll.detach())
        else:
            pred = self.net(x, c) * m
            loss, parts = synthesis_loss(pred, y)
        if self.cfg.level_weight > 0:
            lev = level_loss(pred, y, m)
            loss = loss + self.cfg.level_weight * lev
            parts["level"] = float(lev.detach())
        return loss, parts

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
            batch = tuple(t.to(self.device) for t in self.sampler.batch(cfg.batch_size))
            loss, parts = (self.compute_loss(batch, tags=self.sampler.last_tags)
                           if self.error_nets else self.compute_loss(batch))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            self.step += 1
            self._update_ema()
            lv = float(loss.detach())
            running = lv if running is None else 0.98 * running + 0.02 * lv
            self.wall = wall0 + time.perf_counter() - start
            if self.step % 10 == 0 or self.step == 1:
                self.history.append({"step": self.step, "loss": round(lv, 5),
                                     "smooth": round(running, 5), "l1": round(parts["l1"], 5),
                                     "ssim": round(parts["ssim"], 5),
                                     **({"nll": round(parts["nll"], 4)} if "nll" in parts else {}),
                                     **({"level": round(parts["level"], 5)}
                                        if "level" in parts else {}),
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




def _with_uncertainty_head(net: UNet25D, uncertainty: bool) -> UNet25D:
    """``net`` itself, or a copy with a freshly initialised uncertainty head (fine-tuning an
    older model that has none)."""
    if not uncertainty or net.config.uncertainty:
        return net
    cfg = UNetConfig.from_json(net.config.to_json())
    cfg.uncertainty = True
    out = UNet25D(cfg)
    missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("unc_head.") for k in missing):
        raise ModelIntegrityError(f"cannot add an uncertainty head: {missing} {unexpected}")
    return out
