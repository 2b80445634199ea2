"""Networks for field-to-7T synthesis.

Two architectures live here:

* :class:`UNet25D`, the shipped model: a compact 2.5D U-Net (4 levels, base 16 channels,
  ~0.5 M parameters). Its input is ``n_slices`` neighbouring axial slices of the source
  contrast (plus, optionally, the centre slices of other contrasts); it is conditioned on the
  source field bin and the contrast with FiLM so that **one** network serves all 12
  (contrast, field) pairs. It predicts a residual that is added to the centre slice and clamped
  to [0, 1].
* :class:`ResnetGenerator`, the architecture of the official MRIxFields2026 CUT/CycleGAN
  baseline generator (reflection-padded 7x7 stem, two stride-2 downsamplings, 9 residual blocks,
  64 filters, instance norm, two transposed-convolution upsamplings, tanh). It is used only as a
  peer in benchmarks; written here from the published description, not copied.

Both take ``(B, C, H, W)`` tensors and work in ``channels_last`` memory format.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .fields import CONTRASTS, SUPPORTED_BINS
from .intensity import level_key, level_offset
from .physics import PROTOCOL_KEYS  # the conditioning reads these, in this order

#: Size of the conditioning vector: one-hot field bin + one-hot contrast (networks with level
#: conditioning append one value, :func:`synth7t.intensity.level_offset`, then networks with
#: protocol conditioning :data:`N_PROTOCOL` more, :func:`protocol_features`).
N_COND_FIELDS, N_COND_CONTRASTS = len(SUPPORTED_BINS), len(CONTRASTS)
N_COND = N_COND_FIELDS + N_COND_CONTRASTS


def pair_index(cond: torch.Tensor) -> torch.Tensor:
    """Index (field bin x contrast) of each conditioning vector of a batch ``(B, N_COND)``."""
    field = cond[:, :N_COND_FIELDS].argmax(dim=1)
    contrast = cond[:, N_COND_FIELDS:N_COND].argmax(dim=1)
    return field * N_COND_CONTRASTS + contrast
#: Left-right test-time flips by default (BIDS App and challenge command): off, because they
#: double the inference time for a change below 0.003 in nRMSE/SSIM (README, Benchmarks).
DEFAULT_TTA = False
#: Bounds and start of the uncertainty head's log-scale (b from 1e-4 to 0.5 intensity units).
UNC_LOG_B_MIN, UNC_LOG_B_MAX, UNC_INIT_LOG_B = -9.2, -0.7, -4.0


def condition_vector(contrast: str, field_bin: float, level_offset: float | None = None,
                     protocol: Sequence[float] | None = None) -> torch.Tensor:
    """One-hot conditioning for ``(contrast, field_bin)``, shape ``(N_COND,)``, or
    ``(N_COND + 1,)`` with ``level_offset`` appended (networks with level conditioning), then
    the :data:`N_PROTOCOL` values of ``protocol`` (networks with protocol conditioning).

    Parameters
    ----------
    contrast
        BIDS suffix, one of :data:`synth7t.fields.CONTRASTS`.
    field_bin
        Source field bin, one of :data:`synth7t.fields.SUPPORTED_BINS`.
    level_offset
        :func:`synth7t.intensity.level_offset` of the source's whole brain.
    protocol
        :func:`protocol_features` of the source's acquisition.
    """
    extra = [] if level_offset is None else [float(level_offset)]
    extra += [] if protocol is None else [float(v) for v in protocol]
    vec = torch.zeros(N_COND + len(extra), dtype=torch.float32)
    vec[N_COND:] = torch.tensor(extra, dtype=torch.float32)
    fidx = min(range(len(SUPPORTED_BINS)), key=lambda i: abs(SUPPORTED_BINS[i] - float(field_bin)))
    if abs(SUPPORTED_BINS[fidx] - float(field_bin)) > 1e-3:
        raise ValueError(f"field bin {field_bin!r} is not one of {SUPPORTED_BINS}")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast {contrast!r} is not one of {CONTRASTS}")
    vec[fidx] = 1.0
    vec[len(SUPPORTED_BINS) + CONTRASTS.index(contrast)] = 1.0
    return vec


def level_conditioned(levels: dict[str, float] | None, contrast: str, field_bin: float,
                      level: float | None = None, image=None, mask=None, *,
                      protocols: dict[str, dict[str, float]] | None = None,
                      protocol: dict[str, float] | None = None) -> torch.Tensor:
    """The conditioning of a network with level conditioning ``levels`` (:attr:`UNetConfig.
    level_condition`; empty or ``None``: no level value) for a source whose whole brain has
    :func:`synth7t.intensity.brain_level` ``level`` (``None``: measured on ``image`` inside
    ``mask``), and with protocol conditioning ``protocols`` (:attr:`UNetConfig.
    protocol_condition`; empty or ``None``: no protocol values) for a source acquired with
    ``protocol`` (``None``: not known)."""
    offset = level_offset(levels, contrast, field_bin, level, image, mask) if levels else None
    feats = None
    if protocols:
        feats = protocol_features(protocols.get(level_key(contrast, field_bin)), protocol)
    return condition_vector(contrast, field_bin, offset, feats)


#: Values protocol conditioning adds: one per :data:`PROTOCOL_KEYS`, then "known" (1 or 0).
N_PROTOCOL = len(PROTOCOL_KEYS) + 1
#: Bound of each protocol value, ``log(value / nominal)``: a factor e either way, beyond any
#: protocol of the pair's field (a wrong unit in a sidecar is not taken as a real protocol).
PROTOCOL_BOUND = 1.0


def protocol_features(nominal: dict[str, float] | None,
                      protocol: dict[str, float] | None) -> list[float]:
    """Protocol conditioning values of a source acquired with ``protocol`` (``{"TR": ms, "TE":
    ms, "TI": ms, "FA": deg}``, any subset; ``None``: not known) for a pair whose training
    protocol has ``nominal`` values: ``log(value / nominal)`` per :data:`PROTOCOL_KEYS`
    (bounded to +-:data:`PROTOCOL_BOUND`; 0 for a parameter the pair or the source does not
    have), then 1. All zeros when the protocol is not known, which the network is trained to
    read as "the pair's usual protocol, exact values unknown" (``TrainConfig.protocol_dropout``).
    """
    if not protocol or not nominal:
        return [0.0] * N_PROTOCOL
    out = []
    for key in PROTOCOL_KEYS:
        val, nom = protocol.get(key), nominal.get(key)
        ok = val is not None and nom is not None and np.isfinite(val) and val > 0 and nom > 0
        out.append(float(np.clip(np.log(val / nom), -PROTOCOL_BOUND, PROTOCOL_BOUND))
                   if ok else 0.0)
    return out + [1.0]


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet25D`; stored in the weights' metadata and model card."""

    arch: str = "unet25d"
    n_slices: int = 5
    #: Other contrasts fed as extra channels (centre slice only); empty for single-contrast models.
    others: list[str] = field(default_factory=list)
    base: int = 16
    levels: int = 4
    n_cond: int = N_COND
    #: A second output channel: per-voxel expected absolute error (Laplace scale ``b``).
    uncertainty: bool = False
    #: Feature-space novelty detector on top of the uncertainty head: Gaussian clusters of the
    #: last decoder features per (contrast, field) pair, fitted on normal simulated anatomy
    #: (:mod:`synth7t.ood`); 0 = none.
    ood_clusters: int = 0
    #: Input scaling (:func:`synth7t.intensity.source_gain`): per ``"T1w@1.5"``-style pair, the
    #: level the whole brain's mean is scaled to before the network (a scale that does not rise
    #: with the noise, as the 99.8th percentile does); empty: the [0, 1] input as it is.
    input_levels: dict[str, float] = field(default_factory=dict)
    #: Level conditioning (:func:`synth7t.intensity.level_offset`): per pair, the nominal brain
    #: mean; the conditioning gets ``log(mean / nominal)`` of the source's whole brain as one
    #: more value (``n_cond = N_COND + 1``). Empty: one-hot conditioning only.
    level_condition: dict[str, float] = field(default_factory=dict)
    #: Protocol conditioning (:func:`protocol_features`): per pair, the nominal source protocol
    #: (``{"TR": ms, "TE": ms, ...}``); the conditioning gets :data:`N_PROTOCOL` more values
    #: (after the level's). Empty: none. BIDS sidecars state the protocol
    #: (:func:`synth7t.io.protocol_from_sidecar`), and it sets how 7 T tissue levels follow the
    #: source's (T2w at 5 T: a volume's level error SD 11 % with the protocol unknown, 3 % with
    #: it fixed, on the training distribution).
    protocol_condition: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Per pair, the 95th percentile of the uncertainty map over the brain of normal simulated
    #: anatomy (:func:`synth7t.ood.reference_levels`): where the out-of-distribution flag of
    #: :func:`synth7t.uncertainty.summarise` starts. Empty: the fixed threshold alone.
    uncertainty_reference: dict[str, float] = field(default_factory=dict)
    #: Shrink the image toward its local mean by the share of its local variance that the
    #: uncertainty head's expected error explains (:func:`synth7t.shrinkage.wiener_shrink`);
    #: needs ``uncertainty``. False: the network's output as it is.
    shrinkage: bool = False

    @property
    def in_channels(self) -> int:
        return self.n_slices + len(self.others)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UNetConfig":
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class _FiLMBlock(nn.Module):
    """conv-act-conv-act with a per-channel FiLM affine (from the conditioning) after the first conv.

    No normalisation layer: batch/instance statistics would differ between 128x128 training
    patches and whole cropped slices at inference, while plain convolutions are crop-invariant.
    """

    def __init__(self, cin: int, cout: int, n_cond: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.film = nn.Linear(n_cond, 2 * cout)
        # Start as identity FiLM so conditioning is learned as a perturbation.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    #: Set by :meth:`UNet25D.folded`: the FiLM affine of one condition is inside ``conv1``.
    folded = False

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        if not self.folded:
            gamma, beta = self.film(cond).chunk(2, dim=1)
            h = h * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]
        # in place when no graph is recorded: one pass over the feature map instead of two
        inplace = not torch.is_grad_enabled()
        h = F.leaky_relu(h, 0.1, inplace=inplace)
        return F.leaky_relu(self.conv2(h), 0.1, inplace=inplace)

    def fold(self, cond: torch.Tensor) -> None:
        """Put the FiLM affine of ``cond`` (1, n_cond) into ``conv1``'s weights and bias."""
        with torch.no_grad():
            gamma, beta = self.film(cond).chunk(2, dim=1)
            scale = 1.0 + gamma[0]
            self.conv1.weight.mul_(scale[:, None, None, None])
            self.conv1.bias.mul_(scale).add_(beta[0])
        self.folded = True


class UNet25D(nn.Module):
    """Conditioned 2.5D U-Net predicting a residual on the centre slice.

    Parameters
    ----------
    config
        :class:`UNetConfig`.

    Notes
    -----
    ``forward(x, cond)``: ``x`` is ``(B, in_channels, H, W)`` with the ``n_slices`` source slices
    first (centre slice at index ``n_slices // 2``), ``cond`` is ``(B, N_COND)``. ``H`` and ``W``
    must be multiples of ``2 ** (levels - 1)``. Output ``(B, 1, H, W)`` in [0, 1].

    With ``config.uncertainty`` a second head predicts, per voxel, the scale ``b`` of a Laplace
    distribution of the target around the prediction, i.e. the expected absolute error in the
    image's [0, 1] units (trained with the Laplace negative log-likelihood, see
    :func:`synth7t.train.laplace_nll`); :meth:`forward_with_uncertainty` returns both.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        c = self.config
        widths = [c.base * 2 ** i for i in range(c.levels)]
        self.down = nn.ModuleList()
        cin = c.in_channels
        for w in widths:
            self.down.append(_FiLMBlock(cin, w, c.n_cond))
            cin = w
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.upconv.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.up.append(_FiLMBlock(2 * w, w, c.n_cond))
            cin = w
        self.head = nn.Conv2d(cin, 1, 1)
        # A zero head makes the untrained network the identity map (copy-input), a sane start.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if c.uncertainty:
            # its own small conv so the error estimate can use local context (edges, texture)
            self.unc_head = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.LeakyReLU(0.1),
                                          nn.Conv2d(cin, 1, 1))
            nn.init.zeros_(self.unc_head[2].weight)
            nn.init.constant_(self.unc_head[2].bias, UNC_INIT_LOG_B)
        if c.ood_clusters:
            n_pairs, k = N_COND_FIELDS * N_COND_CONTRASTS, c.ood_clusters
            dim = self.ood_dim
            self.register_buffer("ood_mean", torch.zeros(n_pairs, k, dim))
            self.register_buffer("ood_prec", torch.eye(dim).repeat(n_pairs, 1, 1))
            self.register_buffer("ood_q", torch.ones(n_pairs))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._run(x, cond)[0]

    def condition(self, contrast: str, field_bin: float, level: float | None = None,
                  image=None, mask=None, protocol: dict[str, float] | None = None
                  ) -> torch.Tensor:
        """This network's conditioning vector for a source of ``contrast`` at ``field_bin``
        whose whole brain has :func:`synth7t.intensity.brain_level` ``level`` (``None``:
        measured on ``image`` inside ``mask``; only read with level conditioning), acquired
        with ``protocol`` (``None``: not known; only read with protocol conditioning)."""
        return level_conditioned(self.config.level_condition, contrast, field_bin, level,
                                 image, mask, protocols=self.config.protocol_condition,
                                 protocol=protocol)

    def with_level_condition(self, levels: dict[str, float]) -> "UNet25D":
        """A copy conditioned on the brain level too, computing exactly what this network does
        (the new FiLM input's weights are zero) until it is trained; itself if it already is."""
        if self.config.level_condition:
            return self
        cfg = UNetConfig.from_json(self.config.to_json())
        cfg.level_condition = dict(levels)
        # the level value sits right after the one-hot part, before any protocol values
        return self._with_film_inputs(cfg, at=N_COND, count=1)

    def with_protocol_condition(self, nominals: dict[str, dict[str, float]]) -> "UNet25D":
        """A copy conditioned on the source protocol too (:func:`protocol_features`; nominal
        protocol per pair in ``nominals``), computing exactly what this network does (the new
        FiLM inputs' weights are zero) until it is trained; itself if it already is."""
        if self.config.protocol_condition:
            return self
        cfg = UNetConfig.from_json(self.config.to_json())
        cfg.protocol_condition = {k: dict(v) for k, v in nominals.items()}
        return self._with_film_inputs(cfg, at=self.config.n_cond, count=N_PROTOCOL)

    def _with_film_inputs(self, cfg: UNetConfig, *, at: int, count: int) -> "UNet25D":
        """A copy with ``count`` zero-weight FiLM inputs inserted at index ``at``."""
        import copy

        cfg.n_cond = self.config.n_cond + count
        net = UNet25D(cfg)
        state = copy.deepcopy(self.state_dict())
        for key, val in list(state.items()):
            if key.endswith("film.weight"):
                zeros = torch.zeros(val.shape[0], count, dtype=val.dtype)
                state[key] = torch.cat([val[:, :at], zeros, val[:, at:]], 1)
        net.load_state_dict(state, strict=True)
        return net

    def folded(self, cond: torch.Tensor) -> "UNet25D":
        """A copy for inference under one condition only, its FiLM affines folded into the
        convolutions they follow (``conv * (1 + gamma) + beta`` is a convolution): the same
        function of the image for ``cond`` (to float rounding) without two elementwise passes
        over every block's feature map. ``cond`` is still passed to it (the novelty detector
        reads the pair from it); any other condition gives wrong results.
        """
        import copy

        net = copy.deepcopy(self).eval()
        cond = cond.reshape(1, -1).to(next(net.parameters()).device)
        for block in list(net.down) + list(net.up):
            block.fold(cond)
        return net

    def forward_with_uncertainty(self, x: torch.Tensor,
                                 cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, b)``: ``b`` (B, 1, H, W) > 0 is the expected absolute error.

        Raises
        ------
        ValueError
            If the network was built without the uncertainty head.
        """
        if not self.config.uncertainty:
            raise ValueError("this network has no uncertainty head (config.uncertainty=False)")
        pred, feats, decoder = self._run(x, cond, keep_decoder=bool(self.config.ood_clusters))
        log_b = torch.clamp(self.unc_head(feats), UNC_LOG_B_MIN, UNC_LOG_B_MAX)
        b = torch.exp(log_b)
        if self.config.ood_clusters:
            # novel features (beyond the q-quantile of normal anatomy) scale the expected error
            # up in proportion: the head was never shown such input, so its b is not to be trusted
            d2 = self.novelty(_pooled_multiscale(decoder), cond, size=tuple(b.shape[-2:]))
            ratio = d2 / self.ood_q[pair_index(cond)].view(-1, 1, 1, 1)
            b = b * (1.0 + torch.clamp(ratio - 1.0, min=0.0))
        return pred, b

    @property
    def ood_dim(self) -> int:
        """Length of the multi-scale feature vector the novelty detector reads."""
        c = self.config
        return sum(c.base * 2 ** i for i in range(c.levels - 1))

    def novelty(self, pooled: torch.Tensor, cond: torch.Tensor, *,
                size: tuple[int, int]) -> torch.Tensor:
        """Squared Mahalanobis distance (B, 1, H, W) of each pixel's features to the nearest
        cluster of normal anatomy for the item's (contrast, field) pair.

        Computed on 2 x 2 average-pooled features (:meth:`pooled_features`) and taken back to
        ``size`` (nearest): novelty is a property of a neighbourhood, and this keeps its cost a
        fraction of the network's. With ``prec = L L^T``, ``d2 = |(f - mu) L|^2``: one matrix
        product per pixel.
        """
        idx = pair_index(cond)
        b, ch, ph, pw = pooled.shape
        f = pooled.permute(0, 2, 3, 1).reshape(b, ph * pw, ch)
        chol = torch.linalg.cholesky(self.ood_prec[idx])                  # (B, C, C)
        g = torch.bmm(f, chol)                                            # (B, P, C)
        m = torch.bmm(self.ood_mean[idx], chol)                           # (B, K, C)
        d2 = ((g * g).sum(-1, keepdim=True) - 2.0 * torch.bmm(g, m.transpose(1, 2))
              + (m * m).sum(-1)[:, None, :])                              # (B, P, K)
        d2 = d2.min(dim=2).values.clamp_min(0.0).reshape(b, 1, ph, pw)
        return F.interpolate(d2, scale_factor=2, mode="nearest")[..., :size[0], :size[1]]

    def pooled_features(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Multi-scale decoder features (B, :attr:`ood_dim`, H/2, W/2), see
        :func:`_pooled_multiscale`: what the novelty detector reads and :mod:`synth7t.ood` fits."""
        return _pooled_multiscale(self._run(x, cond, keep_decoder=True)[2])

    def _run(self, x: torch.Tensor, cond: torch.Tensor, *, keep_decoder: bool = False):
        centre = x[:, self.config.n_slices // 2: self.config.n_slices // 2 + 1]
        skips = []
        h = x
        for i, block in enumerate(self.down):
            if i > 0:
                h = F.max_pool2d(h, 2)
            h = block(h, cond)
            skips.append(h)
        skips.pop()
        decoder = []
        for upconv, block in zip(self.upconv, self.up):
            h = upconv(h)
            h = block(torch.cat([h, skips.pop()], dim=1), cond)
            if keep_decoder:
                decoder.append(h)
        return torch.clamp(centre + self.head(h), 0.0, 1.0), h, decoder


def _pooled_multiscale(decoder: list[torch.Tensor]) -> torch.Tensor:
    """Every decoder level's output at half the finest resolution, concatenated (the finest
    level first, then the others from coarse to fine: the channel order the novelty clusters were
    fitted in): the finest level averaged over 2 x 2 pixels, the next one as it is, coarser ones
    upsampled (nearest) to it, so a pixel's vector also describes its context. The same numbers as
    upsampling every level to full resolution and averaging (four equal values average to
    themselves), without making the full-resolution copies."""
    fine = F.avg_pool2d(decoder[-1], 2, ceil_mode=True)
    size = fine.shape[-2:]
    return torch.cat([fine] + [d if d.shape[-2:] == size else
                               F.interpolate(d, size=size, mode="nearest")
                               for d in decoder[:-1]], dim=1)


class _ResnetBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """ResNet image-to-image generator as in the MRIxFields2026 CUT/CycleGAN baseline.

    Parameters
    ----------
    in_channels, out_channels
        Image channels (1 for single-slice 2D translation).
    ngf
        Filters in the first layer (64 in the baseline).
    n_blocks
        Residual blocks at the bottleneck (9 in the baseline).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 64,
                 n_blocks: int = 9) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7),
                                   nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        mult = 1
        for _ in range(2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                       nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
            mult *= 2
        layers += [_ResnetBlock(ngf * mult) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                          output_padding=1),
                       nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU(True)]
            mult //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # The baseline works in [-1, 1]; map in and out so it is a drop-in peer of UNet25D.
        return (self.model(x * 2.0 - 1.0) + 1.0) / 2.0


def build_network(config: UNetConfig) -> nn.Module:
    """Instantiate the network described by ``config``."""
    if config.arch != "unet25d":
        raise ValueError(f"unknown architecture {config.arch!r}")
    return UNet25D(config)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
