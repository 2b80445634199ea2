"""Image-quality metrics of the MRIxFields2026 challenge, computed as the official scorer does.

Definitions (``../shared/design/MRIXFIELDS.md``; the test-phase scorer
``Submission/evaluation-2026/score.py`` of the official repository computes the same):

* both images are loaded with :func:`nibabel.as_closest_canonical` as float32 and converted to
  float64 for the arithmetic; axial slices are array axis 2;
* **nRMSE** ``= ||pred - gt||_2 / ||gt||_2`` over the whole volume, no brain mask (0 when the
  ground truth is all zero, as the scorer does);
* **SSIM** = mean over axial slices of ``skimage.metrics.structural_similarity(pred_slice,
  gt_slice, data_range=gt.max() - gt.min())`` with skimage defaults (7 x 7 uniform window);
  ``data_range`` comes once from the whole ground-truth volume; slices where the ground truth is
  constant are skipped (1.0 when every slice is constant, as the scorer does);
* **PSNR** (not a challenge metric; our definition) ``= 10 log10(data_range**2 / MSE)`` over the
  whole volume with the same ``data_range`` as SSIM (``inf`` for identical images);
* **LPIPS** (AlexNet, v0.1) per axial slice on ``x * 2 - 1`` repeated to 3 channels, all-zero
  ground-truth slices skipped, mean over slices. It needs pretrained weights that are never
  downloaded here: it is computed only when they are on disk (:func:`find_lpips_weights`);
* **tissue Dice (proxy)**: the challenge segments 14 deep grey-matter structures with SynthSeg 2.0,
  which is not available offline. The stand-in segments CSF / GM / WM independently in the
  prediction and in the ground truth, inside the ground-truth brain mask (3-class intensity
  k-means, or antspyx Atropos), and reports the Dice of each tissue. It is a *proxy*: it tells
  whether tissue contrast and boundaries are preserved, not what SynthSeg would say.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

#: Tissue classes in order of increasing intensity for each contrast (used to name k-means
#: classes, which are ranked by mean intensity).
TISSUE_ORDER: dict[str, tuple[str, str, str]] = {
    "T1w": ("CSF", "GM", "WM"),
    "T2w": ("WM", "GM", "CSF"),
    "FLAIR": ("CSF", "WM", "GM"),
}
TISSUES: tuple[str, ...] = ("CSF", "GM", "WM")
#: MRIxFields modality names -> BIDS suffixes used inside synth7t.
MRIX_TO_BIDS = {"T1W": "T1w", "T2W": "T2w", "T2FLAIR": "FLAIR"}

PSNR_DEFINITION = ("PSNR = 10*log10(data_range^2 / MSE) over the whole volume, "
                   "data_range = gt.max() - gt.min() (the SSIM data_range)")
TISSUE_PROXY_NOTE = ("proxy for the challenge's SynthSeg deep-grey-matter Dice: CSF/GM/WM "
                     "segmented independently in prediction and ground truth inside the "
                     "ground-truth mask, Dice per tissue")
LPIPS_ABSENT = "not computed: weights absent"


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_volume(path: str | Path) -> np.ndarray:
    """Load an image the way the official scorer does (closest canonical, float32)."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.get_fdata(dtype=np.float32))


def _slice(arr: np.ndarray, i: int, axis: int) -> np.ndarray:
    """A view of slice ``i`` along ``axis`` (``np.take`` copies and is slow on big volumes)."""
    idx = [slice(None)] * arr.ndim
    idx[axis] = i
    return arr[tuple(idx)]


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs ground truth {g.shape}")
    return p, g


# --------------------------------------------------------------------------------------------
# voxel metrics
# --------------------------------------------------------------------------------------------
def nrmse(pred, gt) -> float:
    """``||pred - gt||_2 / ||gt||_2`` over the whole array, in float64."""
    p, g = _pair(pred, gt)
    norm = np.linalg.norm(g.ravel())
    if norm < 1e-10:
        return 0.0
    return float(np.linalg.norm((p - g).ravel()) / norm)


def data_range_of(gt) -> float:
    g = np.asarray(gt, dtype=np.float64)
    return float(g.max() - g.min())


def ssim(pred, gt, *, axis: int = 2) -> float:
    """Mean SSIM over slices along ``axis`` with one ``data_range`` from the whole ``gt``."""
    from skimage.metrics import structural_similarity

    p, g = _pair(pred, gt)
    drange = data_range_of(g)
    if drange < 1e-10:
        return 1.0
    if p.ndim == 2:
        return float(structural_similarity(p, g, data_range=drange))
    vals = []
    for i in range(p.shape[axis]):
        ps = _slice(p, i, axis)
        gs = _slice(g, i, axis)
        if gs.max() - gs.min() < 1e-10:
            continue
        vals.append(structural_similarity(ps, gs, data_range=drange))
    return float(np.mean(vals)) if vals else 1.0


def psnr(pred, gt) -> float:
    """``10 log10(data_range^2 / MSE)``, ``data_range = gt.max() - gt.min()`` (whole volume)."""
    p, g = _pair(pred, gt)
    mse = float(np.mean((p - g) ** 2))
    drange = data_range_of(g)
    if mse == 0.0:
        return float("inf")
    if drange <= 0.0:
        return float("-inf")
    return float(10.0 * np.log10(drange ** 2 / mse))


# --------------------------------------------------------------------------------------------
# LPIPS (AlexNet, v0.1) without torchvision and without any download
# --------------------------------------------------------------------------------------------
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet checkpoint
LPIPS_LIN_FILE = "alex.pth"  # the lpips package's weights/v0.1/alex.pth


def find_lpips_weights(path: str | Path | None = None) -> tuple[Path, Path] | None:
    """Locate the AlexNet backbone and the LPIPS v0.1 linear weights on disk, or ``None``.

    Looked for, in order: ``path`` (a directory holding ``alexnet-owt-7be5be79.pth`` and
    ``alex.pth``), ``$SYNTH7T_LPIPS_WEIGHTS`` (same layout), then the caches of the ``lpips``
    package (``lpips/weights/v0.1/alex.pth``) and of torch hub
    (``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth``). Nothing is ever downloaded.
    """
    candidates = []
    if path:
        candidates.append(Path(path))
    if os.environ.get("SYNTH7T_LPIPS_WEIGHTS"):
        candidates.append(Path(os.environ["SYNTH7T_LPIPS_WEIGHTS"]))
    for d in candidates:
        if d.is_file() and d.name == LPIPS_LIN_FILE:
            d = d.parent
        alex, lin = d / ALEXNET_FILE, d / LPIPS_LIN_FILE
        if alex.is_file() and lin.is_file():
            return alex, lin
        if path and d == Path(path):
            return None  # an explicit path that does not hold the weights: do not guess
    try:  # the lpips package ships the linear layers; the backbone comes from torch hub's cache
        import importlib.util

        spec = importlib.util.find_spec("lpips")
        import torch.hub

        if spec is not None and spec.origin:
            lin = Path(spec.origin).parent / "weights" / "v0.1" / LPIPS_LIN_FILE
            alex = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
            if lin.is_file() and alex.is_file():
                return alex, lin
    except Exception:  # pragma: no cover - any import trouble means "absent"
        pass
    return None


def _build_lpips_net():
    import torch
    from torch import nn

    class _LPIPSAlex(nn.Module):
        """LPIPS v0.1 with an AlexNet backbone; layer layout of torchvision's ``alexnet``."""

        chns = (64, 192, 384, 256, 256)

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
                nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
                nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
            )
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.chns)
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

        def _taps(self, x):
            out = []
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in (1, 4, 7, 9, 11):  # after each ReLU, as lpips' slices 1-5
                    out.append(x)
            return out

        def forward(self, a, b):  # inputs in [-1, 1], N x 3 x H x W
            fa = self._taps((a - self.shift) / self.scale)
            fb = self._taps((b - self.shift) / self.scale)
            total = 0.0
            for k, (x, y) in enumerate(zip(fa, fb)):
                x = x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + 1e-10)
                y = y / (torch.sqrt(torch.sum(y ** 2, dim=1, keepdim=True)) + 1e-10)
                total = total + self.lins[k]((x - y) ** 2).mean(dim=(2, 3), keepdim=True)
            return total

    return _LPIPSAlex()


class LPIPS:
    """LPIPS (AlexNet, v0.1) loaded from local files only."""

    def __init__(self, alexnet_file: str | Path, lin_file: str | Path, *, device: str = "cpu"):
        import torch

        net = _build_lpips_net()
        alex = torch.load(str(alexnet_file), map_location="cpu", weights_only=True)
        lin = torch.load(str(lin_file), map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in alex.items() if k.startswith("features.")}
        net.features.load_state_dict(feats, strict=True)
        for k in range(5):
            net.lins[k].weight.data.copy_(lin[f"lin{k}.model.1.weight"])
        self.net = net.eval().to(device)
        self.device = device
        self.files = (str(alexnet_file), str(lin_file))

    @classmethod
    def from_local(cls, path: str | Path | None = None, *, device: str = "cpu") -> "LPIPS | None":
        found = find_lpips_weights(path)
        return None if found is None else cls(*found, device=device)

    def slice_distance(self, p2d: np.ndarray, g2d: np.ndarray) -> float:
        import torch

        def t(a):
            x = torch.from_numpy(np.asarray(a, dtype=np.float64) * 2.0 - 1.0).float()
            return x[None, None].repeat(1, 3, 1, 1).to(self.device)

        with torch.no_grad():
            return float(self.net(t(p2d), t(g2d)).item())

    def __call__(self, pred, gt, *, axis: int = 2) -> float:
        p, g = _pair(pred, gt)
        if p.ndim == 2:
            return self.slice_distance(p, g)
        vals = []
        for i in range(p.shape[axis]):
            gs = _slice(g, i, axis)
            # MRIXFIELDS.md: all-zero ground-truth slices are skipped. (The official score.py
            # tests |gt*2-1| instead, which skips no background slice; see docs/challenge.md.)
            if np.abs(gs).max() < 1e-10:
                continue
            vals.append(self.slice_distance(_slice(p, i, axis), gs))
        return float(np.mean(vals)) if vals else 0.0


# --------------------------------------------------------------------------------------------
# tissue segmentation agreement (offline proxy for SynthSeg Dice)
# --------------------------------------------------------------------------------------------
def _kmeans_1d(values: np.ndarray, k: int = 3, *, iters: int = 100, bins: int = 4096) -> np.ndarray:
    """Deterministic 1-D k-means on a histogram; returns ``k - 1`` ascending thresholds."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.full(k - 1, hi)
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    cdf = np.cumsum(hist) / hist.sum()
    cent = np.array([centres[np.searchsorted(cdf, (j + 0.5) / k)] for j in range(k)], float)
    for _ in range(iters):
        thr = 0.5 * (cent[:-1] + cent[1:])
        lab = np.digitize(centres, thr)
        new = cent.copy()
        for j in range(k):
            w = hist[lab == j]
            if w.sum() > 0:
                new[j] = float(np.sum(w * centres[lab == j]) / w.sum())
        if np.allclose(new, cent):
            break
        cent = np.sort(new)
    return 0.5 * (cent[:-1] + cent[1:])


def segment_tissues(volume, mask, *, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Three intensity classes inside ``mask``: 0 outside, 1..3 in order of increasing mean."""
    vol = np.asarray(volume, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(vol.shape, dtype=np.uint8)
    if not mask.any():
        return labels
    if method == "kmeans":
        thr = _kmeans_1d(vol[mask])
        labels[mask] = (np.digitize(vol[mask], thr) + 1).astype(np.uint8)
        return labels
    if method == "atropos":
        import ants

        os.environ.setdefault("ANTS_RANDOM_SEED", str(seed))
        img = ants.from_numpy(vol.astype(np.float32))
        msk = ants.from_numpy(mask.astype(np.float32))
        seg = ants.atropos(a=img, x=msk, i="kmeans[3]", m="[0.2,1x1x1]", c="[3,0]")
        lab = seg["segmentation"].numpy().astype(np.uint8)
        # Atropos' k-means initialisation already sorts classes by intensity; re-rank to be sure
        means = [vol[lab == j].mean() if (lab == j).any() else np.inf for j in (1, 2, 3)]
        rank = {old: new + 1 for new, old in enumerate(np.argsort(means) + 1)}
        for old, new in rank.items():
            labels[lab == old] = new
        labels[~mask] = 0
        return labels
    raise ValueError(f"unknown tissue segmentation method {method!r} (kmeans or atropos)")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def tissue_dice(pred, gt, mask=None, *, contrast: str = "T1w", method: str = "kmeans") -> dict:
    """Dice per tissue (CSF, GM, WM) of independent 3-class segmentations of ``pred`` and ``gt``.

    ``mask`` defaults to ``gt > 0`` (the challenge data are skull-stripped with background 0).
    ``contrast`` (T1w / T2w / FLAIR, or T1W / T2W / T2FLAIR) names the intensity classes. This is
    a proxy for the challenge's SynthSeg Dice (:data:`TISSUE_PROXY_NOTE`).
    """
    p, g = _pair(pred, gt)
    contrast = MRIX_TO_BIDS.get(contrast, contrast)
    if contrast not in TISSUE_ORDER:
        raise ValueError(f"unknown contrast {contrast!r}")
    mask = g > 0 if mask is None else np.asarray(mask, bool)
    sp = segment_tissues(p, mask, method=method)
    sg = segment_tissues(g, mask, method=method)
    order = TISSUE_ORDER[contrast]
    out = {name: dice(sp == j + 1, sg == j + 1) for j, name in enumerate(order)}
    out = {t: out[t] for t in TISSUES}
    out["mean"] = float(np.mean([out[t] for t in TISSUES]))
    return out


# --------------------------------------------------------------------------------------------
# one pair of files
# --------------------------------------------------------------------------------------------
METRIC_KEYS = ("nrmse", "ssim", "psnr", "lpips", "dice_csf", "dice_gm", "dice_wm", "dice_mean")


def guess_contrast(path: str | Path) -> str:
    name = Path(path).name
    for mrix, bids in (("T2FLAIR", "FLAIR"), ("T1W", "T1w"), ("T2W", "T2w")):
        if f"_{mrix}_" in name:
            return bids
    for bids in ("FLAIR", "T1w", "T2w"):
        if name.endswith(f"_{bids}.nii.gz") or name.endswith(f"_{bids}.nii"):
            return bids
    return "T1w"


def evaluate_pair(pred_path, gt_path, *, lpips_model: LPIPS | None = None,
                  contrast: str | None = None, tissue: bool = True,
                  tissue_method: str = "kmeans") -> dict:
    """All metrics for one prediction / ground-truth pair of files.

    Returns a dict with ``nrmse, ssim, psnr, lpips`` (``None`` when LPIPS is not computed,
    ``lpips_note`` says why), ``dice_csf, dice_gm, dice_wm, dice_mean`` (tissue proxy, ``None``
    when ``tissue=False``) and ``shape``.
    """
    pred = load_volume(pred_path)
    gt = load_volume(gt_path)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred_path}: shape {pred.shape} differs from ground truth "
                         f"{gt_path} {gt.shape}")
    res: dict = {"shape": list(gt.shape), "nrmse": nrmse(pred, gt), "ssim": ssim(pred, gt),
                 "psnr": psnr(pred, gt)}
    if lpips_model is not None:
        res["lpips"] = lpips_model(pred, gt)
        res["lpips_note"] = "computed"
    else:
        res["lpips"] = None
        res["lpips_note"] = LPIPS_ABSENT
    if tissue:
        td = tissue_dice(pred, gt, contrast=contrast or guess_contrast(gt_path),
                         method=tissue_method)
        res.update({"dice_csf": td["CSF"], "dice_gm": td["GM"], "dice_wm": td["WM"],
                    "dice_mean": td["mean"]})
    else:
        res.update({k: None for k in ("dice_csf", "dice_gm", "dice_wm", "dice_mean")})
    return res
