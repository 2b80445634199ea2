"""Inference: apply a registered model to a volume on the 0.5 mm reference grid.

Small, type-hinted functions with an explicit device (MONAI style). The U-Net path slides over
axial slices (array axis 2) in batches; each input is the stack of ``n_slices`` neighbouring
slices (2.5D). Only the mask's bounding box (plus a margin, padded to a multiple of 16 in-plane)
is processed, which skips most of the background. Inference is deterministic (no dropout, no
random augmentation, deterministic algorithms requested while predicting) and memory bounded
(one batch of slices in flight; the output is the only volume-sized allocation).
"""
from __future__ import annotations

import contextlib
import json
from typing import Iterator

import numpy as np
import torch

from .baseline import tissue_map
from .intensity import source_gain
from .io import sha256_file
from .networks import DEFAULT_TTA, UNet25D, UNetConfig, condition_vector  # noqa: F401
from .registry import ModelEntry, ModelIntegrityError, read_verified, safetensors_metadata
from .shrinkage import wiener_shrink

#: In-plane sizes are padded to a multiple of this (4-level U-Net needs 8; 16 is safe for 5).
PAD_MULTIPLE = 16
#: Voxels of context kept around the mask's bounding box.
MARGIN = 8



def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"`` or ``"cuda"`` into a :class:`torch.device`.

    ``"auto"`` picks CUDA when available, else CPU. Asking for CUDA on a machine without it raises
    :class:`RuntimeError` rather than silently running on the CPU.
    """
    if isinstance(device, torch.device):
        return device
    spec = str(device).lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if spec == "cpu" or spec.startswith("cuda"):
        return torch.device(spec)
    raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")


def mask_bbox(mask: np.ndarray, *, margin: int = MARGIN,
              multiple: int = PAD_MULTIPLE) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``mask`` with a margin; in-plane extents rounded up to ``multiple``.

    The box may extend beyond the array (callers pad with zeros); ``None`` for an empty mask.
    """
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        if axis < 2:
            size = hi - lo
            extra = (-size) % multiple
            lo -= extra // 2
            hi += extra - extra // 2
        else:
            lo, hi = max(lo, 0), min(hi, mask.shape[2])
        box.append(slice(lo, hi))
    return tuple(box)  # type: ignore[return-value]


def _padded_extent(occupied: np.ndarray, margin: int, multiple: int) -> tuple[int, int]:
    """``[lo, hi)`` around the True run of a 1-D array, with margin, size a multiple, in bounds.

    The array's length is itself a multiple of ``multiple`` (see :func:`mask_bbox`).
    """
    n = occupied.size
    idx = np.flatnonzero(occupied)
    lo, hi = max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, n)
    size = min(n, -(-(hi - lo) // multiple) * multiple)
    lo = min(lo, n - size)
    return lo, lo + size


def crop_padded(volume: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Crop ``volume`` to ``box``, zero-filling where the box leaves the array."""
    shape = tuple(s.stop - s.start for s in box)
    out = np.zeros(shape, dtype=np.float32)
    src, dst = [], []
    for s, n in zip(box, volume.shape):
        a, b = max(s.start, 0), min(s.stop, n)
        src.append(slice(a, b))
        dst.append(slice(a - s.start, b - s.start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def paste_cropped(crop: np.ndarray, box: tuple[slice, slice, slice],
                  shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`crop_padded` into a zero volume of ``shape``."""
    out = np.zeros(shape, dtype=np.float32)
    src, dst = [], []
    for s, n in zip(box, shape):
        a, b = max(s.start, 0), min(s.stop, n)
        dst.append(slice(a, b))
        src.append(slice(a - s.start, b - s.start))
    out[tuple(dst)] = crop[tuple(src)]
    return out


def slice_stack(volume: np.ndarray, z: int, n_slices: int) -> np.ndarray:
    """``n_slices`` axial slices centred on ``z`` as channels ``(n_slices, X, Y)``.

    Out-of-range neighbours repeat the edge slice (the same rule as in training).
    """
    half = n_slices // 2
    idx = np.clip(np.arange(z - half, z + half + 1), 0, volume.shape[2] - 1)
    return np.moveaxis(volume[:, :, idx], 2, 0)


def iter_batches(zs: list[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive chunks of ``zs``."""
    for i in range(0, len(zs), batch_size):
        yield zs[i:i + batch_size]


@contextlib.contextmanager
def torch_runtime(threads: int | None = None) -> Iterator[None]:
    """Set the torch thread count and deterministic mode for a block, restoring both after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _prepare_mask(volume: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return volume > 0
    mask = np.asarray(mask).astype(bool)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from volume shape {volume.shape}")
    return mask


class Synthesizer:
    """A loaded model; :meth:`predict` maps a source volume to a 7T-like volume."""

    entry: ModelEntry | None = None

    def predict(self, volume: np.ndarray, mask: np.ndarray | None = None, *,
                others: dict[str, np.ndarray] | None = None, batch_size: int = 4,
                tta: bool = False, threads: int | None = None,
                return_uncertainty: bool = False, input_level: float | None = None,
                protocol: dict[str, float] | None = None, shrinkage: bool | None = None):
        """Synthesise a 7T-like volume.

        Parameters
        ----------
        volume
            Source image, float32 in [0, 1], on the reference grid (any 3D shape works).
        mask
            Brain mask; defaults to ``volume > 0``.
        others
            Other contrasts (name -> volume, same grid) for multi-contrast models; ignored by
            models that do not use them, missing ones are zero-filled.
        batch_size
            Axial slices per forward pass (memory bound).
        tta
            Average with the left-right flipped prediction.
        threads
            torch intra-op threads for this call (restored afterwards).
        return_uncertainty
            Also return the per-voxel uncertainty (see :mod:`synth7t.uncertainty`): expected
            absolute error in the image's [0, 1] units, exactly 0 outside ``mask``; ``None``
            for models that cannot estimate it.
        input_level
            Mean (:func:`synth7t.intensity.brain_level`) of the whole brain
            ``volume`` belongs to, for models with input scaling run on part of a volume (a
            simulated slab); ``None`` measures it on ``volume`` inside ``mask``.
        protocol
            The source's acquisition protocol (``{"TR": ms, "TE": ms, "TI": ms, "FA": deg}``,
            any subset; :func:`synth7t.io.protocol_from_sidecar`), read by models with protocol
            conditioning; ``None``: not known.
        shrinkage
            Shrink the image where its expected error explains its local variation
            (:func:`synth7t.shrinkage.wiener_shrink`, models with an uncertainty head); ``None``:
            as the model's config says. The uncertainty returned is the head's either way.

        Returns
        -------
        np.ndarray or (np.ndarray, np.ndarray | None)
            float32 in [0, 1], exactly 0 outside ``mask`` (and the uncertainty when asked).
        """
        raise NotImplementedError

    @property
    def has_uncertainty(self) -> bool:
        """Whether :meth:`predict` can return an uncertainty map."""
        return False


class BaselineSynthesizer(Synthesizer):
    """Non-deep per-tissue intensity mapping (:mod:`synth7t.baseline`)."""

    def __init__(self, params: dict, *, entry: ModelEntry | None = None,
                 contrast: str | None = None, field_bin: float | None = None) -> None:
        self.params = params
        self.entry = entry
        self.contrast = contrast or (entry.contrast if entry else None)
        self.field_bin = field_bin if field_bin is not None else (entry.field_bin if entry else None)
        if self.contrast is None or self.field_bin is None:
            raise ValueError("BaselineSynthesizer needs a contrast and a field bin")

    def predict(self, volume: np.ndarray, mask: np.ndarray | None = None, *,
                others: dict[str, np.ndarray] | None = None, batch_size: int = 4,
                tta: bool = False, threads: int | None = None, return_uncertainty: bool = False,
                input_level: float | None = None, protocol: dict[str, float] | None = None,
                shrinkage: bool | None = None):
        volume = np.asarray(volume, dtype=np.float32)
        mask = _prepare_mask(volume, mask)
        out = tissue_map(volume, mask, self.contrast, self.field_bin, self.params)
        return (out, None) if return_uncertainty else out


class UNetSynthesizer(Synthesizer):
    """Conditioned 2.5D U-Net (:class:`synth7t.networks.UNet25D`)."""

    def __init__(self, net: UNet25D, *, contrast: str, field_bin: float,
                 entry: ModelEntry | None = None, device: torch.device | str = "cpu") -> None:
        self.device = resolve_device(device)
        net = net.eval().to(self.device, memory_format=torch.channels_last)
        # a synthesiser serves one (contrast, field) pair: its FiLM affines become convolutions
        # (with level or protocol conditioning, refolded for each volume's: :meth:`_network`)
        per_volume = net.config.level_condition or net.config.protocol_condition
        self._unfolded = net if per_volume else None
        cond = net.condition(contrast, field_bin, level=None)
        # (conditioning, network folded with it), replaced as one pair, never mutated
        self._folded: tuple[torch.Tensor, UNet25D] = (cond, net.folded(cond))
        self.config: UNetConfig = net.config
        self.contrast = contrast
        self.field_bin = field_bin
        self.entry = entry

    @classmethod
    def from_bytes(cls, data: bytes, *, entry: ModelEntry,
                   device: torch.device | str = "cpu") -> "UNetSynthesizer":
        """Build from verified safetensors bytes (see :func:`synth7t.registry.read_verified`)."""
        from safetensors.torch import load as st_load

        meta = safetensors_metadata(data)
        if "config" not in meta:
            raise ModelIntegrityError(f"{entry.file}: safetensors metadata lacks the network config")
        net = UNet25D(UNetConfig.from_json(meta["config"]))
        try:
            net.load_state_dict(st_load(data), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ModelIntegrityError(f"{entry.file}: weights do not fit the network ({first})") from None
        return cls(net, contrast=entry.contrast, field_bin=entry.field_bin, entry=entry,
                   device=device)

    def _inputs(self, volume: np.ndarray, others: dict[str, np.ndarray], zs: list[int]) -> np.ndarray:
        n = self.config.n_slices
        chans = []
        for z in zs:
            stack = [slice_stack(volume, z, n)]
            for name in self.config.others:
                stack.append(others[name][None, :, :, z])
            chans.append(np.concatenate(stack, axis=0))
        return np.stack(chans)

    def predict(self, volume: np.ndarray, mask: np.ndarray | None = None, *,
                others: dict[str, np.ndarray] | None = None, batch_size: int = 4,
                tta: bool = False, threads: int | None = None, return_uncertainty: bool = False,
                input_level: float | None = None, protocol: dict[str, float] | None = None,
                shrinkage: bool | None = None):
        volume = np.asarray(volume, dtype=np.float32)
        mask = _prepare_mask(volume, mask)
        box = mask_bbox(mask)
        shrink = self.has_uncertainty and (self.config.shrinkage if shrinkage is None
                                           else bool(shrinkage))
        want_unc = shrink or (return_uncertainty and self.has_uncertainty)
        if box is None:
            zeros = np.zeros(volume.shape, dtype=np.float32)
            return (zeros, zeros.copy() if want_unc else None) if return_uncertainty else zeros
        src = crop_padded(volume * mask, box)
        if self.config.input_levels:
            src *= np.float32(source_gain(self.config.input_levels, self.contrast,
                                          self.field_bin, input_level, volume, mask))
        oth = {}
        for name in self.config.others:
            arr = (others or {}).get(name)
            oth[name] = (crop_padded(np.asarray(arr, dtype=np.float32) * mask, box)
                         if arr is not None else np.zeros_like(src))
        cmask = crop_padded(mask.astype(np.float32), box) > 0
        out = np.zeros(src.shape, dtype=np.float32)
        unc = np.zeros(src.shape, dtype=np.float32) if want_unc else None
        zs = [z for z in range(src.shape[2]) if cmask[:, :, z].any()]
        net, cond1 = self._network(input_level, volume, mask, protocol)
        cond1 = cond1.to(self.device)
        # Per batch, only the in-plane box holding every non-zero input of its slices (and of
        # their 2.5D neighbours) is run: the brain is round, so this skips ~1/3 of the pixels the
        # global box would cost. Inputs outside it are zeros, exactly what the crop pads with.
        occupied = cmask.any(axis=1), cmask.any(axis=0)  # (X, Z), (Y, Z)
        half = self.config.n_slices // 2
        with torch_runtime(threads), torch.inference_mode():
            for chunk in iter_batches(zs, max(1, int(batch_size))):
                zlo, zhi = max(chunk[0] - half, 0), min(chunk[-1] + half + 1, src.shape[2])
                (x0, x1), (y0, y1) = (_padded_extent(occ[:, zlo:zhi].any(axis=1), MARGIN,
                                                     PAD_MULTIPLE) for occ in occupied)
                x = torch.from_numpy(self._inputs(src, oth, chunk)[:, :, x0:x1, y0:y1])
                x = x.to(self.device).contiguous(memory_format=torch.channels_last)
                cond = cond1.expand(len(chunk), -1)
                y, u = _forward(net, x, cond, tta=tta, uncertainty=want_unc)
                y = y[:, 0].float().cpu().numpy()
                for i, z in enumerate(chunk):
                    out[x0:x1, y0:y1, z] = y[i]
                if u is not None:
                    u = u[:, 0].float().cpu().numpy()
                    for i, z in enumerate(chunk):
                        unc[x0:x1, y0:y1, z] = u[i]
        if shrink:
            out = wiener_shrink(out, unc, cmask, threads=threads)
        out = paste_cropped(out, box, volume.shape)
        out[~mask] = 0.0
        np.clip(out, 0.0, 1.0, out=out)
        if not return_uncertainty:
            return out
        if unc is not None:
            unc = paste_cropped(unc, box, volume.shape)
            unc[~mask] = 0.0
            np.clip(unc, 0.0, None, out=unc)
        return out, unc

    @property
    def has_uncertainty(self) -> bool:
        return bool(getattr(self.config, "uncertainty", False))

    @property
    def net(self) -> UNet25D:
        """The network folded with the conditioning of the last volume (or of none)."""
        return self._folded[1]

    def _network(self, level: float | None, volume: np.ndarray, mask: np.ndarray,
                 protocol: dict[str, float] | None = None) -> tuple[UNet25D, torch.Tensor]:
        """The folded network and conditioning for this volume (refolded when its level
        changes the conditioning). The call works on its own local pair, so threads sharing
        one synthesiser never run a network folded for another thread's volume."""
        cond, net = self._folded
        if self._unfolded is None:
            return net, cond
        new = self._unfolded.condition(self.contrast, self.field_bin, level, volume, mask,
                                       protocol)
        if not torch.equal(new, cond):
            net = self._unfolded.folded(new)
            self._folded = (new, net)
        return net, new


def _forward(net: UNet25D, x: torch.Tensor, cond: torch.Tensor, *, tta: bool,
             uncertainty: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prediction (and uncertainty) of one batch, optionally averaged with the LR flip.

    The uncertainty is the head's expected absolute error ``b`` (averaged over the flips)
    plus, with flips, half their absolute disagreement: the flips see the same anatomy
    mirrored, so where they disagree the network is unsure of its own answer.
    """
    def run(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if uncertainty:
            return net.forward_with_uncertainty(inp, cond)
        return net(inp, cond), None

    y, b = run(x)
    if not tta:
        return y, b
    # Left-right flip (array axis 0 -> tensor dim 2) is anatomically plausible.
    yf, bf = run(torch.flip(x, dims=(2,)))
    yf = yf.flip(dims=(2,))
    mean = 0.5 * (y + yf)
    if b is None:
        return mean, None
    return mean, 0.5 * (b + bf.flip(dims=(2,))) + 0.5 * (y - yf).abs()


def save_unet(net: UNet25D, path, *, extra_metadata: dict[str, str] | None = None) -> str:
    """Save ``net`` as safetensors with its config in the metadata; returns the SHA-256."""
    from safetensors.torch import save_file

    meta = {"config": net.config.to_json(), "format": "pt"}
    meta.update(extra_metadata or {})
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    _sort_header(path)
    return sha256_file(path)


def _sort_header(path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place.

    The writer serialises the metadata from a hash map whose order changes from one process to
    the next, so the same network gave a different file (and SHA-256) at every export; sorted,
    the bytes depend only on the tensors and the metadata. The header keeps its length (padded
    with spaces, as the writer pads it), so the tensors' offsets do not move.
    """
    import struct

    with open(path, "r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > size:  # pragma: no cover - the writer's own form is never shorter
            raise ValueError(f"{path}: sorted safetensors header does not fit")
        fh.seek(8)
        fh.write(text.ljust(size, b" "))


def load_synthesizer(entry: ModelEntry, *, device: str = "cpu") -> Synthesizer:
    """Verify and load the model of ``entry``.

    Parameters
    ----------
    entry
        From :meth:`Registry.get`.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (see :func:`resolve_device`).

    Raises
    ------
    ModelIntegrityError
        See :func:`read_verified`.
    """
    data = read_verified(entry)
    if entry.kind == "baseline":
        try:
            params = json.loads(data)
        except ValueError:
            raise ModelIntegrityError(f"{entry.file}: baseline parameters are not valid JSON") from None
        return BaselineSynthesizer(params, entry=entry)
    return UNetSynthesizer.from_bytes(data, entry=entry, device=resolve_device(device))


__all__ = ["resolve_device", "mask_bbox", "crop_padded", "paste_cropped", "slice_stack",
           "torch_runtime", "Synthesizer", "BaselineSynthesizer", "UNetSynthesizer", "save_unet",
           "load_synthesizer"]
