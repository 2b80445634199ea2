"""Paired low-field / 7T image simulator (the forward model of FIELD_PHYSICS.md).

Usage (the API the training code calls)::

    from synth7t.simulate import Simulator
    sim = Simulator.from_icbm152()                     # or Simulator(anatomy)
    pair = sim.sample(contrast="T1w", field=1.5, seed=123, roi=None, deform=True)
    pair["source"], pair["target"]                     # float32 [0, 1], 0 outside pair["mask"]
    pair["mask"]                                       # bool brain mask (shared)
    pair["params"]                                     # JSON-able dict of every random draw
    pair["source_level"]                               # the whole source brain's [0, 1] mean
    pair["source_excess"]                              # what the clip at 1 removed (or None)
    multi = sim.sample_all_contrasts(field=3.0, seed=7, roi=(slice(None), slice(None),
                                                            slice(170, 190)))
    multi["FLAIR"]["source"], multi["T1w"]["target"]   # one sample()-style dict per contrast
    multi["mask"], multi["params"]                     # shared brain mask and shared draws

``roi`` is three step-1 slices into the 0.5 mm reference grid (``REF_SHAPE``, axial = axis 2);
only that box plus a margin for the blur is rendered. Arrays have the ROI's shape.

Forward model, per contrast, for the source (field < 7 T, randomised protocol) and the 7 T
target (fixed protocol): tissue signals from the physics table -> partial-volume mix of the
tissue fractions with texture (on the anatomy grid) -> random smooth deformation (shared by
source, target and all contrasts of one sample) while resampling to the 0.5 mm grid ->
optional smooth multiplicative bias -> blur (FWHM = effective voxel) and resampling to the
effective voxel -> Rician noise at that voxel (sigma = WM signal / WM SNR) -> back to 0.5 mm
(linear) -> skull strip (brain fraction > 0.5) -> normalisation to [0, 1], background 0.
An ROI is normalised as its whole volume would be: the volume's 99.8th percentile and brain mean
(``source_level``, the scale of networks with input levels, :func:`synth7t.intensity.source_gain`)
are estimated from a fixed random subset of the anatomy's brain voxels rendered without blur.

Determinism: everything is drawn from ``np.random.default_rng(seed)``; the same seed, ROI and
options give identical bytes. Per-contrast draws come from a child generator keyed by the
contrast and role, so ``sample(contrast=c, seed=s)`` and ``sample_all_contrasts(seed=s)[c]``
draw the same protocol, deformation and noise (equal up to float rounding), and the 7 T target
of a seed is the same whatever the source field (one "subject" per seed).
Deformation, bias fields and resampling phases are defined on the whole reference grid, so the
same seed gives the same anatomy whatever the ROI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from synth7t import anatomy as _anat
from synth7t.anatomy import Anatomy, Roi, roi_bounds
from synth7t.fields import CONTRASTS
from synth7t.intensity import UPPER_PERCENTILE, brain_level, normalise
from synth7t.physics import TARGET_FIELD, Physics, field_key
from synth7t.reference import REF_AFFINE, REF_SHAPE, REF_ZOOMS

#: Centre (MNI mm) of rotations/scaling and of the bright-centre bias term; near the brain centre.
BRAIN_CENTRE = np.array([0.0, -17.0, 10.0])
#: Half extents (mm) that map the brain to about [-1, 1] for the bias polynomials.
BRAIN_HALF_EXTENT = np.array([70.0, 90.0, 70.0])
#: Subsampling (reference voxels) at which smooth fields are evaluated before linear upsampling.
SMOOTH_STEP = 4
#: Slices of the reference grid rendered per chunk (bounds memory for full volumes).
CHUNK = 24
#: Voxel size of the reference grid (isotropic), mm.
REF_VOX = float(REF_ZOOMS[0])


# --- small numeric helpers ---------------------------------------------------------------------

def _lin_interp_axis(arr: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr`` along one axis at fractional positions (clamped)."""
    n = arr.shape[axis]
    pos = np.clip(np.asarray(pos, dtype=float), 0, n - 1)
    if len(pos) == n and np.array_equal(pos, np.arange(n)):
        return arr
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * arr.ndim
    shape[axis] = -1
    w = (pos - i0).astype(arr.dtype).reshape(shape)
    out = np.take(arr, i0, axis=axis)
    diff = np.take(arr, i1, axis=axis)
    diff -= out
    diff *= w
    out += diff
    return out


def _upsample(coarse: np.ndarray, steps: Sequence[float], shape: Sequence[int],
              offsets: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Separable linear upsampling: fine index i sits at coarse position (i - offset) / step."""
    out = coarse
    for ax in range(3):
        pos = (np.arange(shape[ax]) - offsets[ax]) / steps[ax]
        out = _lin_interp_axis(out, ax, pos)
    return out


def _coarse_axis(lo: int, hi: int, step: int) -> np.ndarray:
    """Multiples of ``step`` covering ``[lo, hi-1]``: a lattice anchored on the whole grid, so
    values interpolated from it do not depend on the box being rendered."""
    first = (lo // step) * step
    last = -(-(hi - 1) // step) * step
    return np.arange(first, last + 1, step, dtype=float)


def _coarse_positions(coarse_axis: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Fractional lattice index of every fine index in ``[lo, hi)``."""
    return np.interp(np.arange(lo, hi, dtype=float), coarse_axis, np.arange(len(coarse_axis)))


# --- random fields defined on the whole reference grid -----------------------------------------

@dataclass
class Deformation:
    """Affine about :data:`BRAIN_CENTRE` plus a smooth displacement on a control grid (MNI mm)."""

    matrix: np.ndarray          # 3x3, world -> world (about BRAIN_CENTRE)
    control: np.ndarray | None  # (3, nx, ny, nz) displacement in mm, or None
    control_origin: np.ndarray  # world coordinate of control node (0, 0, 0)
    spacing: float              # control node spacing in mm

    @classmethod
    def identity(cls) -> "Deformation":
        return cls(np.eye(3), None, np.zeros(3), 1.0)

    @classmethod
    def random(cls, rng: np.random.Generator, spec: dict[str, Any]) -> "Deformation":
        rot = np.radians(rng.uniform(-spec["rotation_deg"], spec["rotation_deg"], size=3))
        scale = 1.0 + rng.uniform(-spec["scale"], spec["scale"], size=3)
        cx, cy, cz = np.cos(rot)
        sx, sy, sz = np.sin(rot)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        matrix = rz @ ry @ rx @ np.diag(scale)
        spacing = float(spec["control_spacing_mm"])
        lo_w, hi_w = _ref_world_bounds()
        n = np.ceil((hi_w - lo_w) / spacing).astype(int) + 3
        field = rng.standard_normal((3, *n))
        field = np.stack([ndi.gaussian_filter(f, spec["smoothing_nodes"]) for f in field])
        peak = float(np.abs(field).max()) or 1.0
        amp = rng.uniform(0.0, spec["displacement_mm"])
        return cls(matrix, field * (amp / peak), lo_w - spacing, spacing)

    def displacement(self, world: np.ndarray) -> np.ndarray:
        """Displacement (mm) at world points ``(3, ...)`` (cubic spline on the control grid)."""
        if self.control is None:
            return np.zeros_like(world)
        idx = (world - self.control_origin.reshape(3, *([1] * (world.ndim - 1)))) / self.spacing
        return np.stack([ndi.map_coordinates(c, idx, order=3, mode="nearest")
                         for c in self.control])

    def params(self) -> dict[str, Any]:
        disp = 0.0 if self.control is None else float(np.abs(self.control).max())
        return {"matrix": np.round(self.matrix, 6).tolist(), "max_displacement_mm": disp,
                "control_spacing_mm": self.spacing}


@dataclass
class BiasField:
    """Smooth multiplicative field ``1 + amplitude * (mix of a random cubic and a centre bump)``."""

    coeffs: np.ndarray  # (20,) for monomials of degree <= 3 (constant unused)
    amplitude: float
    centre_weight: float
    norm: tuple[float, float]

    _POWERS = [(i, j, k) for i in range(4) for j in range(4) for k in range(4) if 0 < i + j + k <= 3]

    @classmethod
    def random(cls, rng: np.random.Generator, spec: dict[str, Any]) -> "BiasField":
        coeffs = rng.standard_normal(len(cls._POWERS))
        amp = float(rng.uniform(*spec["amplitude"]))
        field = cls(coeffs, amp, float(spec["centre_weight"]), (1.0, 1.0))
        # normalise on a fixed grid inside the unit ball so amplitude is the peak deviation
        g = np.linspace(-1, 1, 11)
        u, v, w = np.meshgrid(g, g, g, indexing="ij")
        inside = u ** 2 + v ** 2 + w ** 2 <= 1
        poly = field._poly(u, v, w)[inside]
        field.norm = (float(poly.mean()), float(np.abs(poly - poly.mean()).max()) or 1.0)
        return field

    def _poly(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        return sum(c * u ** i * v ** j * w ** k for c, (i, j, k) in zip(self.coeffs, self._POWERS))

    def __call__(self, world: np.ndarray) -> np.ndarray:
        """Field value at world points ``(3, ...)``."""
        rel = (world - BRAIN_CENTRE.reshape(3, *([1] * (world.ndim - 1)))) / \
            BRAIN_HALF_EXTENT.reshape(3, *([1] * (world.ndim - 1)))
        u, v, w = rel
        p = (self._poly(u, v, w) - self.norm[0]) / self.norm[1]
        centre = 2.0 * np.clip(1.0 - (u ** 2 + v ** 2 + w ** 2), 0.0, 1.0) - 1.0  # B1: bright centre
        mix = (1 - self.centre_weight) * p + self.centre_weight * centre
        return 1.0 + self.amplitude * np.clip(mix, -1.0, 1.0)

    def params(self) -> dict[str, Any]:
        return {"amplitude": self.amplitude, "centre_weight": self.centre_weight}


def _ref_world_bounds() -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k, 1.0] for i in (0, REF_SHAPE[0] - 1)
                        for j in (0, REF_SHAPE[1] - 1) for k in (0, REF_SHAPE[2] - 1)])
    w = (REF_AFFINE @ corners.T)[:3]
    return w.min(axis=1), w.max(axis=1)


def _ref_world(lo: Sequence[float], axes: Sequence[np.ndarray]) -> np.ndarray:
    """World coordinates ``(3, nx, ny, nz)`` of reference-grid positions (fractional allowed)."""
    grid = np.meshgrid(*axes, indexing="ij")
    ijk = np.stack(grid)
    return np.einsum("ij,j...->i...", REF_AFFINE[:3, :3], ijk) + \
        REF_AFFINE[:3, 3].reshape(3, 1, 1, 1)


# --- the simulator ------------------------------------------------------------------------------

@dataclass
class _Channel:
    """One image to render: a contrast at a field with drawn parameters."""

    contrast: str
    field: float
    protocol: dict[str, Any]
    voxel: tuple[float, float, float]
    snr: float
    phase: np.ndarray          # resampling phase (reference voxels) per axis
    texture_gain: float
    signals: dict[str, float]
    bias: BiasField | None
    noise_seed: int

    @property
    def sigma_vox(self) -> np.ndarray:
        # FWHM = effective voxel; the 0.5 mm grid itself needs no extra blur
        return np.array([v / 2.3548 / REF_VOX if v > REF_VOX + 1e-6 else 0.0
                         for v in self.voxel])

    @property
    def steps(self) -> np.ndarray:
        return np.maximum(np.asarray(self.voxel) / REF_VOX, 1.0)

    def margin(self) -> np.ndarray:
        return np.ceil(3 * self.sigma_vox + self.steps).astype(int) + 1

    def params(self) -> dict[str, Any]:
        return {"contrast": self.contrast, "field": self.field, "protocol": self.protocol,
                "effective_voxel_mm": list(self.voxel), "snr_wm": self.snr,
                "noise_sigma_rel_wm": 1.0 / self.snr, "resampling_phase_vox": self.phase.tolist(),
                "texture_gain": self.texture_gain,
                "tissue_signal": {k: float(v) for k, v in self.signals.items()},
                "bias": None if self.bias is None else self.bias.params()}


class Simulator:
    """Render paired (source field, 7 T) images from an :class:`~synth7t.anatomy.Anatomy`.

    Parameters
    ----------
    anatomy
        Tissue fractions and texture (see :mod:`synth7t.anatomy`).
    physics
        Parameter table; the shipped ``physics.json`` by default.
    """

    def __init__(self, anatomy: Anatomy, physics: Physics | None = None):
        self.anatomy = anatomy
        self.physics = physics or Physics.load()
        unknown = [t for t in anatomy.tissues if t not in self.physics.tissues]
        if unknown:
            raise ValueError(f"anatomy tissues {unknown} have no entry in the physics table")
        self._brain = anatomy.brain_fraction()
        self._support = sum(anatomy.fractions.values()).astype(np.float32)
        self._inv = np.linalg.inv(anatomy.affine)
        self._proxy = self._make_proxy()
        self._mask_cache: dict[Any, np.ndarray] = {}

    # constructors ----------------------------------------------------------------------------
    @classmethod
    def from_icbm152(cls, physics: Physics | None = None, **kwargs: Any) -> "Simulator":
        """Simulator on the ICBM152 2009a anatomy shipped in the nilearn wheel."""
        return cls(_anat.from_icbm152(**kwargs), physics)

    @classmethod
    def from_labels(cls, path: str, physics: Physics | None = None, **kwargs: Any) -> "Simulator":
        """Simulator on a crisp label map (BrainWeb labels: tests only, never training)."""
        return cls(_anat.from_labels(path, **kwargs), physics)

    @classmethod
    def from_t1w(cls, path: str, physics: Physics | None = None, **kwargs: Any) -> "Simulator":
        """Simulator on a T1w scan segmented with antspyx (see :func:`anatomy.from_t1w`)."""
        return cls(_anat.from_t1w(path, **kwargs), physics)

    # public API ------------------------------------------------------------------------------
    def sample(self, contrast: str = "T1w", field: float = 1.5,
               seed: int | np.random.Generator | None = None, roi: Roi | None = None,
               deform: bool = True, *, source_bias: bool = False, target_bias: bool = False,
               skull_strip: bool = True, roi_normalisation: str = "volume",
               noise: bool = True) -> dict[str, Any]:
        """Render one (source, 7 T target) pair.

        Parameters
        ----------
        contrast
            ``"T1w"``, ``"T2w"`` or ``"FLAIR"``.
        field
            Source field in tesla: 0.1, 1.5, 3 or 5 (7 gives a noisy, biased 7 T "source").
        seed
            Integer or ``numpy.random.Generator``; the same seed gives identical bytes.
        roi
            Three step-1 slices into the reference grid; ``None`` renders the whole grid.
        deform
            Apply the random smooth deformation (shared by source and target).
        source_bias, target_bias
            Multiply by a smooth bias field. Off by default: the BIDS App N4-corrects its
            inputs, and a random target bias cannot be predicted from the source.
        skull_strip
            Zero everything outside the brain (default). If False, head tissues present in the
            anatomy are kept (for skull-stripping tests); normalisation still uses the brain.
        roi_normalisation
            ``"volume"`` (default) scales an ROI by an estimate of its whole volume's 99.8th
            percentile, so slabs have the intensity scale of the full image the model sees at
            inference; ``"roi"`` applies :func:`synth7t.intensity.normalise` to the ROI itself.
            Whole volumes (``roi=None``) always use :func:`~synth7t.intensity.normalise`.
        noise
            Add Rician noise (default). ``False`` renders the same draws without noise, e.g. to
            measure the noise of a noisy render.

        Returns
        -------
        dict
            ``source``, ``target``: float32 arrays in [0, 1] with the ROI's shape, exactly 0
            outside ``mask`` (when skull-stripped); ``mask``: bool; ``params``: JSON-able dict.
        """
        return self._render((contrast,), field, seed, roi, deform, source_bias, target_bias,
                            skull_strip, roi_normalisation, noise)[contrast]

    def sample_all_contrasts(self, field: float = 1.5,
                             seed: int | np.random.Generator | None = None,
                             roi: Roi | None = None, deform: bool = True, *,
                             contrasts: Sequence[str] = CONTRASTS, source_bias: bool = False,
                             target_bias: bool = False, skull_strip: bool = True,
                             roi_normalisation: str = "volume",
                             noise: bool = True) -> dict[str, Any]:
        """Render sources and 7 T targets of several contrasts sharing anatomy and deformation.

        Same parameters as :meth:`sample`.

        Returns
        -------
        dict
            One entry per contrast, each exactly what :meth:`sample` returns for that contrast
            and seed (``{"T1w": {"source", "target", "mask", "params"}, "T2w": ..., ...}``),
            plus ``"mask"`` (the shared brain mask) and ``"params"`` (shared draws).
        """
        return self._render(tuple(contrasts), field, seed, roi, deform, source_bias,
                            target_bias, skull_strip, roi_normalisation, noise)

    def brain_mask(self, roi: Roi | None = None) -> np.ndarray:
        """Undeformed brain mask (brain fraction > 0.5) on the reference grid or an ROI of it.

        Cached per ROI. When the anatomy grid is axis-aligned with the reference grid (ICBM152,
        BrainWeb) the interpolation is separable and takes a fraction of a second.
        """
        key = None if roi is None else tuple(map(tuple, roi_bounds(roi)))
        if key not in self._mask_cache:
            lo, hi = roi_bounds(roi)
            m = np.linalg.inv(self.anatomy.affine) @ REF_AFFINE
            if np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3]))):
                # zero border so that positions outside the anatomy read 0 (like cval=0)
                vol = np.pad(self._brain, 1)
                for ax in range(3):
                    pos = m[ax, ax] * np.arange(lo[ax], hi[ax]) + m[ax, 3] + 1
                    vol = _lin_interp_axis(vol, ax, np.clip(pos, 0, vol.shape[ax] - 1))
                mask = vol > 0.5
            else:
                vox = _anat.ref_to_anatomy_voxels(self.anatomy.affine, lo, hi)
                mask = ndi.map_coordinates(self._brain, vox, order=1, cval=0.0,
                                           prefilter=False) > 0.5
            self._mask_cache[key] = mask
        return self._mask_cache[key].copy()

    # drawing ---------------------------------------------------------------------------------
    def _draw_channel(self, rng: np.random.Generator, contrast: str, field: float,
                      target: bool, bias: BiasField | None, gain: float) -> _Channel:
        phys = self.physics
        protocol = phys.protocol(contrast, field, None if target else rng)
        voxel = phys.effective_voxel(contrast, field, rng)
        snr_lo, snr_hi = phys.snr_range(field)
        snr = float(rng.uniform(snr_lo, snr_hi))
        steps = np.asarray(voxel) / REF_VOX
        # axes already at 0.5 mm are not resampled (phase 0): no needless half-voxel blur
        phase = np.where(steps > 1 + 1e-6, rng.uniform(0, 1, size=3) * steps, 0.0)
        signals = phys.tissue_signals(contrast, field, protocol, self.anatomy.tissues)
        return _Channel(contrast, float(field), protocol, voxel, snr, phase, gain, signals,
                        bias, int(rng.integers(2 ** 63)))

    # rendering -------------------------------------------------------------------------------
    def _render(self, contrasts: tuple[str, ...], field: float, seed: Any, roi: Roi | None,
                deform: bool, source_bias: bool, target_bias: bool, skull_strip: bool,
                roi_normalisation: str, noise: bool = True) -> dict[str, Any]:
        field_key(field)  # validates the field
        for c in contrasts:
            if c not in CONTRASTS:
                raise ValueError(f"unknown contrast {c!r}; expected one of {CONTRASTS}")
        if roi_normalisation not in ("volume", "roi"):
            raise ValueError("roi_normalisation must be 'volume' or 'roi'")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        phys = self.physics
        # shared draws, always in the same order whatever the options
        deformation = Deformation.random(rng, phys.table["deformation"])
        tgt_bias = BiasField.random(rng, phys.bias_spec(TARGET_FIELD))
        src_bias = BiasField.random(rng, phys.bias_spec(field))
        base = int(rng.integers(2 ** 63))
        if not deform:
            deformation = Deformation.identity()
        channels: list[tuple[str, str, _Channel]] = []
        for c in contrasts:
            # child generators keyed by contrast and role: a contrast's draws do not depend on
            # which other contrasts are rendered, and the 7 T target not on the source field
            ci = CONTRASTS.index(c)
            trng = np.random.default_rng([base, ci, 1])
            srng = np.random.default_rng([base, ci, 0])
            gain = float(trng.uniform(*phys.table["texture"]["gain"][c]))
            target = self._draw_channel(trng, c, TARGET_FIELD, True,
                                        tgt_bias if target_bias else None, gain)
            source = self._draw_channel(srng, c, field, False,
                                        src_bias if source_bias else None, gain)
            channels += [(c, "source", source), (c, "target", target)]

        lo, hi = roi_bounds(roi)
        shape_ref = np.asarray(REF_SHAPE)
        margin = np.max([ch.margin() for _, _, ch in channels], axis=0)
        elo, ehi = np.maximum(lo - margin, 0), np.minimum(hi + margin, shape_ref)
        images, brain = self._render_noiseless([ch for _, _, ch in channels], elo, ehi,
                                               deformation, skull_strip)
        mask = brain[tuple(slice(a - e, b - e) for a, b, e in zip(lo, hi, elo))] > 0.5

        shared = {
            "seed": None if isinstance(seed, np.random.Generator) else seed,
            "field": float(field), "target_field": TARGET_FIELD,
            "anatomy": self.anatomy.name, "roi": [[int(a), int(b)] for a, b in zip(lo, hi)],
            "deform": bool(deform), "deformation": deformation.params(),
            "source_bias": bool(source_bias), "target_bias": bool(target_bias),
            "skull_strip": bool(skull_strip), "noise": bool(noise),
            "normalisation": "normalise" if (roi is None or roi_normalisation == "roi")
            else "volume-scale",
        }
        out: dict[str, Any] = {c: {"mask": mask, "params": dict(shared, contrast=c)}
                               for c in contrasts}
        for (c, role, ch), img in zip(channels, images):
            # each channel is degraded in its own box (ROI + its own margin), so a contrast
            # rendered alone or with the others sees the same box and noise draws
            clo, chi = np.maximum(lo - ch.margin(), 0), np.minimum(hi + ch.margin(), shape_ref)
            img = img[tuple(slice(a - e, b - e) for a, b, e in zip(clo, chi, elo))]
            if ch.bias is not None:
                img = img * self._smooth_field(ch.bias, clo, chi)
            img = self._degrade(img, ch, clo, chi, noise)[
                tuple(slice(a - e, b - e) for a, b, e in zip(lo, hi, clo))]
            scale = over = None
            source = role == "source"
            if roi is None or roi_normalisation == "roi":
                norm = normalise(img, mask, excess=source)
                if source:
                    norm, over = norm
                level = brain_level(norm[mask]) if source else None
            else:
                scale, level = self._volume_stats(ch, noise)
                norm = np.where(mask, np.clip(img / scale, 0.0, 1.0), 0.0)
                if source:
                    over = np.where(mask, np.maximum(img / scale - 1.0, 0.0), 0.0)
            if not skull_strip:
                norm = np.clip(img / (scale or _percentile(img, mask)), 0.0, 1.0)
                over = None
            out[c][role] = np.ascontiguousarray(norm, dtype=np.float32)
            out[c]["params"][role] = ch.params()
            if source:
                # the mean of the whole normalised brain (synth7t.intensity.brain_level): what
                # a model with input scaling measures on the App's input
                out[c]["source_level"] = level
                # what the clip at 1 removed (synth7t.uncertainty.add_saturation)
                out[c]["source_excess"] = (None if over is None else
                                           np.ascontiguousarray(over, dtype=np.float32))
        out["mask"] = mask
        out["params"] = shared
        return out

    def _render_noiseless(self, channels: list[_Channel], elo: np.ndarray, ehi: np.ndarray,
                          deformation: Deformation, skull_strip: bool
                          ) -> tuple[list[np.ndarray], np.ndarray]:
        shape = tuple(int(b - a) for a, b in zip(elo, ehi))
        # Anatomy voxel coordinates on a coarse lattice (every SMOOTH_STEP voxels), then linear
        # upsampling: exact for the affine part, and the displacement is smooth on that scale.
        coarse_axes = [_coarse_axis(int(a), int(b), SMOOTH_STEP) for a, b in zip(elo, ehi)]
        cworld = _ref_world(elo, coarse_axes)
        moved = np.einsum("ij,j...->i...", deformation.matrix,
                          cworld - BRAIN_CENTRE.reshape(3, 1, 1, 1)) + \
            BRAIN_CENTRE.reshape(3, 1, 1, 1)
        if deformation.control is not None:
            moved = moved + deformation.displacement(cworld)
        cvox = np.einsum("ij,j...->i...", self._inv[:3, :3], moved) + \
            self._inv[:3, 3].reshape(3, 1, 1, 1)
        zeros = ([np.zeros(shape, np.float32) for _ in channels], np.zeros(shape, np.float32))
        # render only the sub-box that can hold tissue (most of the grid is background)
        support = self._brain if skull_strip else self._support
        inside = ndi.map_coordinates(support, cvox, order=1, cval=0.0, prefilter=False) > 1e-4
        if not inside.any():
            return zeros
        sub, node_sl = [], []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            hit = np.flatnonzero(inside.any(axis=other))
            n0, n1 = max(hit[0] - 1, 0), min(hit[-1] + 1, len(coarse_axes[ax]) - 1)
            f0 = max(int(coarse_axes[ax][n0] - elo[ax]), 0)
            f1 = min(int(math.ceil(coarse_axes[ax][n1] - elo[ax])) + 1, shape[ax])
            sub.append(slice(f0, f1))
            node_sl.append(slice(n0, n1 + 1))
        cvox = cvox[(slice(None), *node_sl)]
        coarse_axes = [c[n] for c, n in zip(coarse_axes, node_sl)]
        pad = 2
        alo = np.clip(np.floor(cvox.reshape(3, -1).min(axis=1)) - pad, 0, None).astype(int)
        ahi = np.minimum(np.ceil(cvox.reshape(3, -1).max(axis=1)) + pad + 1,
                         np.asarray(self.anatomy.shape)).astype(int)
        if np.any(ahi <= alo):
            return zeros
        box = tuple(slice(a, b) for a, b in zip(alo, ahi))
        cvox = (cvox - alo.reshape(3, 1, 1, 1)).astype(np.float32)
        # upsample x and y once; z per chunk
        pos = [_coarse_positions(coarse_axes[a], elo[a] + sl.start, elo[a] + sl.stop)
               for a, sl in enumerate(sub)]
        cvox = _lin_interp_axis(_lin_interp_axis(cvox, 1, pos[0]), 2, pos[1])
        sub_shape = tuple(sl.stop - sl.start for sl in sub)

        # mixing is linear, so mix on the (coarser) anatomy grid and interpolate once per image
        fr = {k: v[box] for k, v in self.anatomy.fractions.items()}
        tex = np.clip(self.anatomy.texture[box], -self._tex_clip, self._tex_clip)
        brain = self._brain[box]
        sources = []
        for ch in channels:
            sig = np.zeros(brain.shape, np.float32)
            for t, f in fr.items():
                if skull_strip and t not in _anat.BRAIN_TISSUES:
                    continue
                sig += np.float32(ch.signals[t]) * f
            sources.append(sig * (1.0 + np.float32(ch.texture_gain) * tex))
        sources.append(brain)

        outs = [np.zeros(shape, np.float32) for _ in sources]
        for z0 in range(0, sub_shape[2], CHUNK):
            z1 = min(z0 + CHUNK, sub_shape[2])
            coords = _lin_interp_axis(cvox, 3, pos[2][z0:z1])
            zsl = slice(sub[2].start + z0, sub[2].start + z1)
            for src, dst in zip(sources, outs):
                dst[sub[0], sub[1], zsl] = ndi.map_coordinates(src, coords, order=1, cval=0.0,
                                                               prefilter=False)
        return outs[:-1], outs[-1]

    @property
    def _tex_clip(self) -> float:
        return float(self.physics.table["texture"]["clip"])

    def _smooth_field(self, bias: BiasField, elo: np.ndarray, ehi: np.ndarray) -> np.ndarray:
        axes = [_coarse_axis(int(a), int(b), SMOOTH_STEP) for a, b in zip(elo, ehi)]
        out = bias(_ref_world(elo, axes)).astype(np.float32)
        for ax in range(3):
            out = _lin_interp_axis(out, ax, _coarse_positions(axes[ax], elo[ax], ehi[ax]))
        return out

    def _degrade(self, img: np.ndarray, ch: _Channel, elo: np.ndarray, ehi: np.ndarray,
                 noise: bool = True) -> np.ndarray:
        """Blur, sample at the effective voxel, add Rician noise there, and go back to 0.5 mm."""
        sig = ch.sigma_vox
        if np.any(sig > 0):
            img = ndi.gaussian_filter(img, sig, mode="nearest", truncate=3.0)
        steps = ch.steps
        # lattice of the effective voxel, anchored on the whole grid (ROI-independent)
        coarse_pos, offsets = [], []
        for ax in range(3):
            first = ch.phase[ax] + steps[ax] * math.ceil((elo[ax] - ch.phase[ax]) / steps[ax])
            pos = np.arange(first, ehi[ax] - 1e-9, steps[ax])
            if len(pos) == 0:
                pos = np.array([float(elo[ax])])
            coarse_pos.append(pos - elo[ax])
            offsets.append(pos[0] - elo[ax])
        coarse = img
        for ax in range(3):
            coarse = _lin_interp_axis(coarse, ax, coarse_pos[ax])
        if noise:
            sigma = ch.signals["WM"] / ch.snr
            nrng = np.random.default_rng(ch.noise_seed)
            re = coarse + nrng.normal(0.0, sigma, coarse.shape).astype(np.float32)
            im = nrng.normal(0.0, sigma, coarse.shape).astype(np.float32)
            noisy = np.sqrt(re * re + im * im)
        else:
            noisy = coarse
        return _upsample(noisy, steps, img.shape, offsets).astype(np.float32)

    # volume-level normalisation scale for ROIs -------------------------------------------------
    def _make_proxy(self, n: int = 200_000) -> dict[str, np.ndarray]:
        """A fixed random subset of brain voxels (fractions, texture, world position)."""
        idx = np.flatnonzero(self._brain.ravel() > 0.5)
        rng = np.random.default_rng(0)
        if len(idx) > n:
            idx = np.sort(rng.choice(idx, n, replace=False))
        ijk = np.stack(np.unravel_index(idx, self.anatomy.shape)).astype(float)
        world = self.anatomy.affine[:3, :3] @ ijk + self.anatomy.affine[:3, 3:4]
        return {"fractions": {k: v.ravel()[idx] for k, v in self.anatomy.fractions.items()},
                "texture": self.anatomy.texture.ravel()[idx], "world": world,
                "n1": rng.standard_normal(len(idx)), "n2": rng.standard_normal(len(idx))}

    def _volume_stats(self, ch: _Channel, noise: bool = True) -> tuple[float, float]:
        """Estimates of the whole volume's upper percentile (what normalise() would use) and of
        its normalised brain mean (what an input-scaling model measures)."""
        p = self._proxy
        sig = sum(ch.signals[t] * f for t, f in p["fractions"].items()
                  if t in _anat.BRAIN_TISSUES)
        tex = np.clip(p["texture"], -self._tex_clip, self._tex_clip)
        sig = sig * (1.0 + ch.texture_gain * tex)
        if ch.bias is not None:
            sig = sig * ch.bias(p["world"])
        # blur shrinks peaks and linear upsampling averages noise; about half the noise std
        # survives at the 0.5 mm grid for the voxel sizes used here
        sigma = 0.5 * ch.signals["WM"] / ch.snr if noise else 0.0
        noisy = np.sqrt((sig + sigma * p["n1"]) ** 2 + (sigma * p["n2"]) ** 2)
        scale = max(float(np.percentile(noisy, UPPER_PERCENTILE)), 1e-12)
        return scale, brain_level(np.clip(noisy / scale, 0.0, 1.0))


def _percentile(img: np.ndarray, mask: np.ndarray) -> float:
    vals = img[mask] if mask.any() else img.ravel()
    return max(float(np.percentile(vals, UPPER_PERCENTILE)), 1e-12)
