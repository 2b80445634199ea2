"""synth7t.train / synth7t-train on tiny generated fixtures (seconds, CPU, 1 thread)."""
from __future__ import annotations

import argparse
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from synth7t.commands.train import _cross_fit_net, main as train_main
from synth7t.inference import UNetSynthesizer, load_synthesizer
from synth7t.registry import Registry, sha256_file
from synth7t.sources import VolumePairSource
from synth7t.train import (PatchSampler, Slab, TrainConfig, Trainer, bids_pairs,
                           mrixfields_pairs, ssim_map, synthesis_loss)

SHAPE = (32, 32, 16)
TINY = ["--patch", "32", "--base", "4", "--n-slices", "3", "--batch-size", "2",
        "--slab-depth", "8", "--pool-size", "2", "--val-slabs", "1", "--no-progress",
        "--threads", "1"]


def _phantom(seed: int, shape=SHAPE, *, shift: int = 0):
    """(source-like, 7T-like, mask): blobs of three tissues; the 7T image has other contrast."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + (z * 0.9) ** 2) + 0.05 * np.sin(5 * x + seed) * np.cos(4 * y)
    mask = r < 0.85
    lab = np.where(r < 0.4, 2, np.where(r < 0.65, 1, 0))
    src = np.choose(lab, [0.15, 0.6, 0.8]) + rng.normal(0, 0.05, shape)
    tgt = np.choose(lab, [0.05, 0.45, 0.9])
    src, tgt = np.clip(src, 0, 1) * mask, np.clip(tgt, 0, 1) * mask
    if shift:
        src = np.roll(src, shift, axis=0)
    return src.astype(np.float32), tgt.astype(np.float32), mask


class _PhantomSource:
    def __init__(self, tag: str = ""):
        self.tag = tag

    def make(self, rng):
        s, t, m = _phantom(int(rng.integers(1000)))
        return [Slab(s, t, m, "T1w", 1.5, tag=self.tag)]


def _save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([0.5, 0.5, 0.5, 1.0])), str(path))



def test_input_levels_make_the_network_blind_to_the_input_scale():
    """A network with input levels sees the same input whatever the [0, 1] scale its source came
    at (noise moves the 99.8th percentile that sets it); one without them does not."""
    from synth7t.intensity import BRAIN_MEAN_LEVELS, brain_level
    from synth7t.networks import UNet25D, UNetConfig

    torch.manual_seed(0)
    src, _, mask = _phantom(3)
    src = np.clip(src * (0.6 / src[mask].mean()), 0, 1)  # a gain inside the [0.5, 2] bounds
    for levels, invariant in ((dict(BRAIN_MEAN_LEVELS), True), ({}, False)):
        net = UNet25D(UNetConfig(n_slices=3, base=4, levels=2, input_levels=levels))
        syn = UNetSynthesizer(net, contrast="T1w", field_bin=1.5)
        a = syn.predict(src, mask)
        b = syn.predict(src * 0.8, mask)
        assert np.allclose(a, b, atol=1e-5) == invariant
    # a part of a volume is scaled by the whole brain's level, when given
    half = (slice(None), slice(None), slice(0, SHAPE[2] // 2))
    part = UNetSynthesizer(UNet25D(UNetConfig(n_slices=3, base=4, levels=2,
                                              input_levels=dict(BRAIN_MEAN_LEVELS))),
                           contrast="T1w", field_bin=1.5)
    whole_level = 1.2 * brain_level(src[half][mask[half]])  # a brain brighter than this part
    own = part.predict(src[half], mask[half])
    given = part.predict(src[half], mask[half], input_level=whole_level)
    rescaled = part.predict(src[half] * 0.8, mask[half], input_level=whole_level * 0.8)
    assert np.allclose(given, rescaled, atol=1e-5)
    assert not np.allclose(own, given, atol=1e-3)


def test_sampler_scales_each_source_by_its_slabs_level():
    """Training patches get the gain inference gives the whole volume: the slab's level."""
    from synth7t.intensity import BRAIN_MEAN_LEVELS, brain_level

    nominal = BRAIN_MEAN_LEVELS["T1w@1.5"]
    s, t, m = _phantom(7)
    s = np.clip(s * (0.6 / s[m].mean()), 0, 1)  # a gain inside the [0.5, 2] bounds
    for level, gain in ((nominal / 2, 2.0), (nominal, 1.0), (None, nominal / brain_level(s[m]))):
        slab = Slab(s, t, m, "T1w", 1.5, source_level=level)
        draws = []
        for levels in (None, dict(BRAIN_MEAN_LEVELS)):
            sampler = PatchSampler([(_PhantomSource(), 1.0)], np.random.default_rng(5),
                                   n_slices=3, patch=32, pool_size=1, refresh_every=0,
                                   input_levels=levels)
            sampler.rng = np.random.default_rng(11)
            draws.append(sampler._patch(slab))
        (x0, y0, m0), (x1, y1, m1) = draws
        assert np.array_equal(y0, y1) and np.array_equal(m0, m1)
        assert np.allclose(x1, x0 * gain, rtol=1e-5, atol=1e-6)


def test_level_condition_starts_as_the_same_network_and_then_reads_the_level():
    """A network given level conditioning computes what it did until trained; once its level
    weights are not zero, inference conditions each volume on its own whole-brain level (the
    one given for a part of a volume), refolding its FiLM affines for each, with no state
    carried from one volume to the next."""
    from synth7t.intensity import BRAIN_MEAN_LEVELS, brain_level, level_offset
    from synth7t.networks import N_COND, UNet25D, UNetConfig, pair_index

    torch.manual_seed(0)
    net = UNet25D(UNetConfig(n_slices=3, base=4, levels=2)).eval()
    for prm in net.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    src, _, mask = _phantom(3)
    plain = UNetSynthesizer(net, contrast="T2w", field_bin=3.0).predict(src, mask)
    cond_net = net.with_level_condition(BRAIN_MEAN_LEVELS)
    assert cond_net.config.n_cond == N_COND + 1 and net.config.n_cond == N_COND
    syn = UNetSynthesizer(cond_net, contrast="T2w", field_bin=3.0)
    assert np.allclose(syn.predict(src, mask), plain, atol=1e-5)

    with torch.no_grad():  # as if trained: the level moves every FiLM affine
        for block in list(cond_net.down) + list(cond_net.up):
            block.film.weight[:, N_COND].normal_(0, 0.5)
    syn = UNetSynthesizer(cond_net, contrast="T2w", field_bin=3.0)
    own, dim = syn.predict(src, mask), syn.predict(src, mask, input_level=0.5 * brain_level(src[mask]))
    assert not np.allclose(own, dim, atol=1e-3)
    assert np.allclose(syn.predict(src, mask), own, atol=1e-6)  # refolded back, not stuck
    offset = level_offset(BRAIN_MEAN_LEVELS, "T2w", 3.0, None, src, mask)
    cond = cond_net.condition("T2w", 3.0, None, src, mask)
    assert cond.shape == (N_COND + 1,) and cond[N_COND] == pytest.approx(offset)
    assert int(pair_index(cond[None])[0]) == int(pair_index(net.condition("T2w", 3.0)[None])[0])
    fresh = UNetSynthesizer(cond_net, contrast="T2w", field_bin=3.0)
    assert np.array_equal(fresh.predict(src, mask, input_level=0.5 * brain_level(src[mask])), dim)


def test_level_conditioned_synthesiser_shared_between_threads_keeps_each_volume_its_level():
    """Two threads predicting volumes of different levels with one synthesiser each get the
    answer a lone call gives: a refold for one volume never reaches the other's forward pass."""
    from concurrent.futures import ThreadPoolExecutor

    from synth7t.intensity import BRAIN_MEAN_LEVELS, brain_level
    from synth7t.networks import N_COND, UNet25D, UNetConfig

    torch.manual_seed(1)
    net = UNet25D(UNetConfig(n_slices=3, base=4, levels=2)).eval().with_level_condition(
        BRAIN_MEAN_LEVELS)
    with torch.no_grad():
        for prm in net.parameters():
            torch.nn.init.normal_(prm, std=0.1)
        for block in list(net.down) + list(net.up):
            block.film.weight[:, N_COND].normal_(0, 0.5)
    src, _, mask = _phantom(4)
    levels = [brain_level(src[mask]) * f for f in (0.5, 1.5)]
    alone = [UNetSynthesizer(net, contrast="T1w", field_bin=1.5).predict(
        src, mask, input_level=lv, batch_size=1) for lv in levels]
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    shared = UNetSynthesizer(net, contrast="T1w", field_bin=1.5)
    jobs = [levels[i % 2] for i in range(8)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(lambda lv: shared.predict(src, mask, input_level=lv, batch_size=1),
                            jobs))
    for i, out in enumerate(got):
        assert np.array_equal(out, alone[i % 2])


def test_level_offset_is_a_bounded_log_ratio_and_zero_without_levels():
    from synth7t.intensity import BRAIN_MEAN_LEVELS, LEVEL_OFFSET_BOUND, level_offset

    nominal = BRAIN_MEAN_LEVELS["FLAIR@1.5"]
    assert level_offset(BRAIN_MEAN_LEVELS, "FLAIR", 1.5, nominal) == 0.0
    assert level_offset(BRAIN_MEAN_LEVELS, "FLAIR", 1.5, nominal * 0.8) == pytest.approx(np.log(0.8))
    assert level_offset(BRAIN_MEAN_LEVELS, "FLAIR", 1.5, nominal * 100) == LEVEL_OFFSET_BOUND
    assert level_offset({}, "FLAIR", 1.5, 0.1) == 0.0
    assert level_offset(BRAIN_MEAN_LEVELS, "FLAIR", 1.5, None, np.zeros((4, 4, 4))) == 0.0
    only_low = {k: v for k, v in BRAIN_MEAN_LEVELS.items() if k.endswith("@0.1")}
    assert level_offset(only_low, "FLAIR", 1.5, nominal * 0.8) == 0.0
    assert level_offset(only_low, "FLAIR", 0.1, BRAIN_MEAN_LEVELS["FLAIR@0.1"] * 0.8) != 0.0


def test_sampler_conditions_each_patch_on_its_slabs_level():
    """Training patches carry the level offset inference computes for the whole volume."""
    from synth7t.intensity import BRAIN_MEAN_LEVELS
    from synth7t.networks import N_COND

    s, t, m = _phantom(7)
    slab = Slab(s, t, m, "T1w", 0.1, source_level=0.5)
    for levels, size in ((None, N_COND), (dict(BRAIN_MEAN_LEVELS), N_COND + 1)):
        sampler = PatchSampler([(_PhantomSource(), 1.0)], np.random.default_rng(5), n_slices=3,
                               patch=32, pool_size=1, refresh_every=0, level_condition=levels)
        sampler.pool = [slab]
        x, y, msk, cond = sampler.batch(2)
        assert cond.shape == (2, size)
        if levels:
            expect = np.log(0.5 / BRAIN_MEAN_LEVELS["T1w@0.1"])
            assert torch.allclose(cond[:, N_COND], torch.tensor([expect] * 2, dtype=torch.float32))


def test_protocol_features_are_bounded_log_ratios_with_a_known_flag():
    from synth7t.networks import N_PROTOCOL, PROTOCOL_BOUND, protocol_features
    from synth7t.physics import Physics

    nominal = Physics.load().nominal_protocols()["T1w@3"]
    assert protocol_features(nominal, None) == [0.0] * N_PROTOCOL  # not known
    assert protocol_features(None, {"TR": 2300.0}) == [0.0] * N_PROTOCOL
    assert protocol_features(nominal, dict(nominal)) == [0.0] * (N_PROTOCOL - 1) + [1.0]
    got = protocol_features(nominal, {"TR": nominal["TR"] * 1.2, "TE": -1.0,
                                      "TI": nominal["TI"] * 1000})
    assert got[0] == pytest.approx(np.log(1.2))
    assert got[1] == 0.0 and got[3] == 0.0  # a bad value and a missing one count as nominal
    assert got[2] == PROTOCOL_BOUND and got[-1] == 1.0  # a wrong unit is bounded
    # T2w has no inversion or flip angle: those stay 0 whatever the sidecar says
    t2 = protocol_features(Physics.load().nominal_protocols()["T2w@5"],
                           {"TR": 3200.0, "TE": 80.0, "TI": 900.0, "FA": 90.0})
    assert t2[0] == 0.0 and t2[1] == pytest.approx(np.log(0.8)) and t2[2:4] == [0.0, 0.0]


def test_protocol_condition_starts_as_the_same_network_and_then_reads_the_protocol():
    """A network given protocol conditioning (after level conditioning) computes what it did
    until trained; then each volume is conditioned on its own protocol, and "not known" is the
    same as not giving one."""
    from synth7t.intensity import BRAIN_MEAN_LEVELS
    from synth7t.networks import N_COND, N_PROTOCOL, UNet25D, UNetConfig
    from synth7t.physics import Physics

    torch.manual_seed(0)
    net = UNet25D(UNetConfig(n_slices=3, base=4, levels=2)).eval()
    with torch.no_grad():
        for prm in net.parameters():
            torch.nn.init.normal_(prm, std=0.1)
    net = net.with_level_condition(BRAIN_MEAN_LEVELS)
    with torch.no_grad():
        for block in list(net.down) + list(net.up):
            block.film.weight[:, N_COND].normal_(0, 0.5)
    src, _, mask = _phantom(3)
    proto = {"TR": 2000.0, "TE": 4.5, "TI": 1100.0, "FA": 8.0}
    plain = UNetSynthesizer(net, contrast="T1w", field_bin=1.5).predict(src, mask)
    pnet = net.with_protocol_condition(Physics.load().nominal_protocols())
    assert pnet.config.n_cond == N_COND + 1 + N_PROTOCOL
    syn = UNetSynthesizer(pnet, contrast="T1w", field_bin=1.5)
    assert np.allclose(syn.predict(src, mask, protocol=proto), plain, atol=1e-5)
    cond = pnet.condition("T1w", 1.5, None, src, mask, proto)
    # the level keeps its slot (its trained weights stay with it), the protocol follows
    assert cond[N_COND] == net.condition("T1w", 1.5, None, src, mask)[N_COND]
    assert cond[N_COND + 2] == pytest.approx(np.log(4.5 / 3.5)) and cond[-1] == 1.0

    with torch.no_grad():  # as if trained
        for block in list(pnet.down) + list(pnet.up):
            block.film.weight[:, N_COND + 1:].normal_(0, 0.5)
    syn = UNetSynthesizer(pnet, contrast="T1w", field_bin=1.5)
    known, unknown = syn.predict(src, mask, protocol=proto), syn.predict(src, mask)
    assert not np.allclose(known, unknown, atol=1e-3)
    assert np.array_equal(syn.predict(src, mask, protocol=None), unknown)
    assert np.array_equal(UNetSynthesizer(pnet, contrast="T1w", field_bin=1.5).predict(
        src, mask, protocol=proto), known)


@pytest.mark.parametrize("dropout, known", [(0.0, 1.0), (1.0, 0.0)])
def test_sampler_gives_each_patch_its_slabs_protocol_or_not_known(dropout, known):
    from synth7t.networks import N_COND, N_PROTOCOL
    from synth7t.physics import Physics

    nominals = Physics.load().nominal_protocols()
    s, t, m = _phantom(7)
    with_proto = Slab(s, t, m, "T2w", 3.0, source_protocol={"TR": 3200.0, "TE": 120.0})
    without = Slab(s, t, m, "T2w", 3.0)
    sampler = PatchSampler([(_PhantomSource(), 1.0)], np.random.default_rng(5), n_slices=3,
                           patch=32, pool_size=1, refresh_every=0,
                           protocol_condition=nominals, protocol_dropout=dropout)
    sampler.pool = [with_proto]
    cond = sampler.batch(3)[3]
    assert cond.shape == (3, N_COND + N_PROTOCOL)
    assert torch.all(cond[:, -1] == known)
    if known:
        assert torch.allclose(cond[:, N_COND + 1], torch.tensor(float(np.log(1.2))))
    sampler.pool = [without]
    assert torch.all(sampler.batch(2)[3][:, N_COND:] == 0)


def test_simulated_slabs_carry_their_source_protocol():
    from synth7t.sources import SimulatorSource, source_protocol
    from synth7t.simulate import Simulator

    sim = Simulator.from_icbm152()
    src = SimulatorSource(sim, depth=4, roi_size=64, fields=[3.0], contrasts=["T1w"])
    slab = src.make(np.random.default_rng(0))[0]
    assert set(slab.source_protocol) == {"TR", "TE", "TI", "FA"}
    assert source_protocol({"source": {"protocol": {"sequence": "tse", "TR": 3000.0}}}) == \
        {"TR": 3000.0}
    assert source_protocol({}) is None


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((40, 40)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    ours = float(ssim_map(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]).mean())
    ref = structural_similarity(a, b, data_range=1.0)
    # skimage crops a border of 3 before averaging; avg_pool 'valid' does the same
    assert abs(ours - ref) < 1e-4


def test_input_gain_scales_the_source_only():
    """Each patch's source gets its own gain; its target and mask keep their scale."""
    one = PatchSampler([(_PhantomSource(), 1.0)], np.random.default_rng(5), n_slices=3, patch=32,
                       pool_size=2, refresh_every=0, input_gain=(1.0, 1.0))
    assert one.input_gain is None  # (1, 1) is no gain: the draws stay those of older runs
    sampler = PatchSampler([(_PhantomSource(), 1.0)], np.random.default_rng(5), n_slices=3,
                           patch=32, pool_size=2, refresh_every=0, input_gain=(0.7, 1.1))
    ratios = []
    for _ in range(6):
        state = sampler.rng.bit_generator.state
        x2, y2, m2 = sampler._patch(sampler.pool[0])
        # the same patch without the gain (the gain is the patch's last draw)
        sampler.rng.bit_generator.state, sampler.input_gain = state, None
        x0, y0, m0 = sampler._patch(sampler.pool[0])
        sampler.input_gain = (0.7, 1.1)
        assert np.array_equal(y0, y2) and np.array_equal(m0, m2)
        assert x2.min() >= 0 and x2.max() <= 1
        inside = (x0 > 0) & (x0 < 0.9)  # not clipped at either gain
        ratios.append(float(np.median(x2[inside] / x0[inside])))
    assert all(0.7 - 1e-6 <= r <= 1.1 + 1e-6 for r in ratios)
    assert max(ratios) - min(ratios) > 0.05  # one gain per patch, not one for all
    with pytest.raises(ValueError):
        PatchSampler([(_PhantomSource(), 1.0)], np.random.default_rng(5), pool_size=1,
                     input_gain=(1.2, 0.8))


def test_few_steps_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(steps=40, batch_size=4, patch=32, n_slices=3, base=8, lr=3e-3, warmup=1,
                      pool_size=4, refresh_every=0, checkpoint_every=20, val_slabs=0, seed=0)

    def factory(rng):
        return PatchSampler([(_PhantomSource(), 1.0)], rng, n_slices=3, patch=32, pool_size=4,
                            refresh_every=0)

    fixed = factory(np.random.default_rng(99)).batch(8)
    trainer = Trainer(cfg, factory, tmp_path, log=lambda m: None)

    def loss_now():
        with torch.no_grad():
            x, y, m, c = fixed
            return float(synthesis_loss(trainer.net(x, c) * m, y)[0])

    before = loss_now()
    trainer.run(progress=False)
    after = loss_now()
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "checkpoints" / "state.json").is_file()
    state = json.loads((tmp_path / "checkpoints" / "state.json").read_text())
    assert state["step"] == 40


def test_cross_fit_head_learns_the_other_networks_error(tmp_path):
    from synth7t.networks import UNet25D, UNetConfig
    from synth7t.train import laplace_nll

    torch.manual_seed(0)
    cfg = TrainConfig(steps=1, batch_size=4, patch=32, n_slices=3, base=4, lr=1e-2, warmup=1,
                      pool_size=2, refresh_every=0, checkpoint_every=0, val_slabs=0, seed=0,
                      head_only=True, cross_fit="other")

    def factory(rng):
        return PatchSampler([(_PhantomSource(), 1.0)], rng, n_slices=3, patch=32, pool_size=2,
                            refresh_every=0)

    net = UNet25D(UNetConfig(n_slices=3, base=4, uncertainty=True))
    other = UNet25D(UNetConfig(n_slices=3, base=4))  # another network: other errors
    with torch.no_grad():  # (a new U-Net starts as the identity; move it off it)
        for prm in other.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    trainer = Trainer(cfg, factory, tmp_path, init_net=net, error_net=other, log=lambda m: None)
    x, y, m, c = factory(np.random.default_rng(3)).batch(4)
    _, parts = trainer.compute_loss((x, y, m, c))
    with torch.no_grad():
        pred, b = trainer.net.forward_with_uncertainty(x, c)
        theirs = float(laplace_nll(other(x, c) * m, b, y, m))
        own = float(laplace_nll(pred * m, b, y, m))
    assert parts["nll"] == pytest.approx(theirs, rel=1e-5)
    assert abs(theirs - own) > 1e-3 * abs(own)
    with pytest.raises(ValueError, match="head"):  # cross-fitting trains the head alone
        Trainer(TrainConfig(**{**cfg.__dict__, "head_only": False}), factory, tmp_path,
                init_net=net, error_net=other, log=lambda m: None)
    with pytest.raises(ValueError, match="conditions"):  # it must read the same input
        Trainer(cfg, factory, tmp_path, init_net=net,
                error_net=UNet25D(UNetConfig(n_slices=5, base=4)), log=lambda m: None)


def test_cross_fit_per_brain_takes_each_patch_from_the_fold_that_never_saw_it(tmp_path):
    """With one network per base anatomy, each patch's reference is its own brain's fold
    (anatomy names may hold colons, as ``t1w:bids_3t/sub-01`` does)."""
    from synth7t.networks import UNet25D, UNetConfig
    from synth7t.sources import tag_anatomy
    from synth7t.train import laplace_nll

    torch.manual_seed(0)
    cfg = TrainConfig(steps=1, batch_size=6, patch=32, n_slices=3, base=4, lr=1e-2, warmup=1,
                      pool_size=4, refresh_every=0, checkpoint_every=0, val_slabs=0, seed=0,
                      head_only=True, cross_fit="fold")
    tags = ["sim:t1w:bids_3t/sub-01+random:T1w:1.5:seed1:0-8", "sim:brain-b:T1w:1.5:seed2:0-8"]
    assert [tag_anatomy(t) for t in tags] == ["t1w:bids_3t/sub-01", "brain-b"]

    def factory(rng):
        return PatchSampler([(_PhantomSource(t), 1.0) for t in tags], rng, n_slices=3,
                            patch=32, pool_size=4, refresh_every=0)

    folds = {}
    for name in ("t1w:bids_3t/sub-01", "brain-b"):
        folds[name] = UNet25D(UNetConfig(n_slices=3, base=4))
        with torch.no_grad():
            for prm in folds[name].parameters():
                prm.add_(0.2 * torch.randn_like(prm))
    net = UNet25D(UNetConfig(n_slices=3, base=4, uncertainty=True))
    trainer = Trainer(cfg, factory, tmp_path, init_net=net, error_net=folds, log=lambda m: None)
    sampler = factory(np.random.default_rng(3))
    x, y, m, c = sampler.batch(6)
    names = [tag_anatomy(t) for t in sampler.last_tags]
    assert len(set(names)) == 2  # both brains in the batch
    _, parts = trainer.compute_loss((x, y, m, c), tags=sampler.last_tags)
    with torch.no_grad():
        _, b = trainer.net.forward_with_uncertainty(x, c)
        ref = torch.cat([folds[n](x[i:i + 1], c[i:i + 1]) for i, n in enumerate(names)]) * m
        swapped = {n: folds[names[0]] for n in names}  # every patch from one fold
        wrong = torch.cat([swapped[n](x[i:i + 1], c[i:i + 1]) for i, n in enumerate(names)]) * m
        expected = float(laplace_nll(ref, b, y, m))
        mixed = float(laplace_nll(wrong, b, y, m))
    assert parts["nll"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - mixed) > 1e-4 * abs(expected)  # the pairing is what is checked
    with pytest.raises(RuntimeError, match="brain-b"):  # a brain without its fold
        Trainer(cfg, factory, tmp_path / "x", init_net=net,
                error_net={"t1w:bids_3t/sub-01": folds["t1w:bids_3t/sub-01"]},
                log=lambda m: None).compute_loss((x, y, m, c), tags=sampler.last_tags)


def test_icbm_weight_must_leave_a_brain_to_draw(tmp_path):
    for w in ("0", "-1"):  # no --anatomies: ICBM152 is the only brain
        assert train_main(["--simulated", "--icbm-weight", w, "--out", str(tmp_path / w),
                           "--steps", "1", *TINY]) == 64


def _saved_optimizer_state(ckpt_dir) -> dict:
    """The optimizer ``state_dict`` saved in a run's checkpoint folder (any ``*.pt`` holding a
    dict with ``state`` and ``param_groups``, at top level or under one key; extra keys and
    files are ignored)."""
    found = []
    for f in sorted(ckpt_dir.glob("*.pt")):
        blob = torch.load(f, weights_only=True, map_location="cpu")
        for cand in [blob, *(blob.values() if isinstance(blob, dict) else [])]:
            if isinstance(cand, dict) and {"state", "param_groups"} <= set(cand):
                found.append(cand)
    assert len(found) == 1, f"expected one optimizer state in {ckpt_dir}, found {len(found)}"
    return found[0]


def _adam_steps(opt_state: dict) -> set[int]:
    return {int(float(st["step"])) for st in opt_state["state"].values() if "step" in st}


def check_resume_continues(out, args: list[str], *, done: int, total: int) -> None:
    """``synth7t-train ... --resume --steps total`` on a run checkpointed at step ``done`` must
    continue that run, not start a new one (a fresh ``total``-step run also ends at ``total``):

    * it performs exactly ``total - done`` optimizer steps;
    * its first step starts from the checkpoint: every parameter equals a tensor of
      ``last.safetensors`` and the optimizer's moments and step counts are those saved;
    * ``state.json``'s step counter goes on from ``done`` to ``total``, the saved optimizer state
      then counts ``total`` steps, and the loss history of the first part is kept unchanged.
    """
    from safetensors.torch import load_file
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    ckpt = out / "checkpoints"
    state0 = json.loads((ckpt / "state.json").read_text())
    assert state0["step"] == done, state0["step"]
    opt0 = _saved_optimizer_state(ckpt)
    assert _adam_steps(opt0) == {done}, _adam_steps(opt0)
    weights0 = [t.float() for t in load_file(str(ckpt / "last.safetensors")).values()]
    seen = {"steps": 0, "first": None}

    def pre(optimizer, *_):
        if seen["first"] is not None:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        seen["first"] = {
            "params_from_checkpoint": all(
                any(t.shape == p.shape and torch.equal(t, p.detach().float().cpu())
                    for t in weights0) for p in params),
            "steps": {int(float(optimizer.state[p]["step"])) for p in params
                      if "step" in optimizer.state.get(p, {})},
            "moments_from_checkpoint": all(
                k in optimizer.state.get(p, {})
                and torch.equal(optimizer.state[p][k].cpu(), opt0["state"][i][k])
                for i, p in enumerate(params) for k in ("exp_avg", "exp_avg_sq")
                if k in opt0["state"].get(i, {})),
        }

    def post(optimizer, *_):
        seen["steps"] += 1

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        assert train_main([*args, "--steps", str(total), "--resume"]) == 0
    finally:
        for h in handles:
            h.remove()
    assert seen["steps"] == total - done, \
        f"the resumed run made {seen['steps']} optimizer steps, not {total - done}"
    first = seen["first"]
    assert first["params_from_checkpoint"], "the resumed run did not start from last.safetensors"
    assert first["steps"] == {done}, f"optimizer step counts at resume: {first['steps']}"
    assert first["moments_from_checkpoint"], "optimizer moments not restored from the checkpoint"
    state1 = json.loads((ckpt / "state.json").read_text())
    assert state1["step"] == total, state1["step"]
    assert _adam_steps(_saved_optimizer_state(ckpt)) == {total}
    hist0, hist1 = state0.get("history", []), state1.get("history", [])
    assert hist0, "state.json of the first part holds no loss history"
    assert hist1[:len(hist0)] == hist0, "the loss history of the first part was lost"
    assert state1.get("wall_seconds", 0) >= state0.get("wall_seconds", 0)


@pytest.fixture()
def mrix_tree(tmp_path):
    root = tmp_path / "mrix"
    for ident in ("0001", "0002"):
        src, tgt, _ = _phantom(int(ident))
        _save(src, root / "Training_prospective" / "T1W" / "1.5T" / f"P_T1W_1.5T_{ident}.nii.gz")
        _save(tgt, root / "Training_prospective" / "T1W" / "7T" / f"P_T1W_7T_{ident}.nii.gz")
    # an unpaired retrospective volume and a source without a 7T partner are ignored
    _save(src, root / "Training_retrospective" / "T1W" / "3T" / "R_T1W_3T_0100.nii.gz")
    _save(src, root / "Training_prospective" / "T1W" / "3T" / "P_T1W_3T_0009.nii.gz")
    return root


def test_train_export_load_and_finetune_on_mrixfields(tmp_path, mrix_tree, capsys):
    pairs = mrixfields_pairs(mrix_tree)
    assert len(pairs) == 2 and {p.field_bin for p in pairs} == {1.5}

    first = tmp_path / "first"
    assert train_main(["--mrixfields", str(mrix_tree), "--out", str(first), "--steps", "6",
                       "--checkpoint-every", "3", "--name", "mine", *TINY]) == 0
    for f in ("model.safetensors", "model_card.json", "registry.json"):
        assert (first / f).is_file()
    card = json.loads((first / "model_card.json").read_text())
    assert card["SHA256"] == sha256_file(first / "model.safetensors")
    assert card["Steps"] == 6 and "WallTimeSeconds" in card and card["Architecture"]["parameters"] > 0

    reg = Registry.load(first)
    entry = reg.get("T1w", 1.5, "mine")
    syn = load_synthesizer(entry)  # SHA-256 verified
    assert isinstance(syn, UNetSynthesizer)
    src, _, mask = _phantom(5)
    out = syn.predict(src, mask)
    assert out.min() >= 0 and out.max() <= 1 and not out[~mask].any()

    # resume continues from the checkpoint: weights, optimizer state, step counter, loss history
    check_resume_continues(first, ["--mrixfields", str(mrix_tree), "--out", str(first),
                                   "--checkpoint-every", "4", "--name", "mine", *TINY],
                           done=6, total=8)
    assert json.loads((first / "model_card.json").read_text())["Steps"] == 8

    # a run exports like the shipped default does (card from the run's state, pair metrics)
    from synth7t.export import export_from_run

    ship = tmp_path / "ship"
    card = export_from_run(first, ship, version="t")
    assert card["Steps"] == 8 and card["SHA256"] == sha256_file(ship / "model.safetensors")
    prov = Registry.load(ship).get("T1w", 1.5).provenance()
    assert prov["Kind"] == "unet" and "nrmse" in prov["Metrics"]["held_out_simulated_icbm152"]

    # fine-tune from the registry model through --model-dir
    ft = tmp_path / "ft"
    assert train_main(["--mrixfields", str(mrix_tree), "--out", str(ft), "--steps", "4",
                       "--checkpoint-every", "2", "--init-from", "mine", "--model-dir",
                       str(first), *TINY]) == 0
    ft_card = json.loads((ft / "model_card.json").read_text())
    assert any("initialised from" in d for d in ft_card["TrainingData"].split("; "))
    load_synthesizer(Registry.load(ft).get("T1w", 1.5))

    # --head-only: the uncertainty head learns, every other weight stays to the bit
    from safetensors.torch import load_file

    head = tmp_path / "head"
    assert train_main(["--mrixfields", str(mrix_tree), "--out", str(head), "--steps", "4",
                       "--checkpoint-every", "2", "--init-from", "mine", "--model-dir",
                       str(first), "--head-only", "--lr", "1e-2", *TINY]) == 0
    before, after = load_file(first / "model.safetensors"), load_file(head / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("unc_head.") for k in moved), moved
    assert "uncertainty head" in json.loads((head / "model_card.json").read_text())["TrainingData"]
    assert train_main(["--mrixfields", str(mrix_tree), "--out", str(tmp_path / "x"),
                       "--steps", "2", "--head-only", *TINY]) == 64  # nothing to freeze
    # --cross-fit: the head learns another registry network's errors; the rest stays frozen
    cross = tmp_path / "cross"
    assert train_main(["--mrixfields", str(mrix_tree), "--out", str(cross), "--steps", "2",
                       "--checkpoint-every", "2", "--init-from", "mine", "--model-dir",
                       str(first), "--head-only", "--cross-fit", "default", "--cross-fit-dir",
                       str(ft), *TINY]) == 0
    after = load_file(cross / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("unc_head.") for k in moved), moved
    assert "cross-fitting" in json.loads((cross / "model_card.json").read_text())["TrainingData"]
    assert train_main(["--mrixfields", str(mrix_tree), "--out", str(tmp_path / "y"),
                       "--steps", "2", "--init-from", "mine", "--model-dir", str(first),
                       "--cross-fit", "mine", *TINY]) == 64  # cross-fitting trains the head
    five = tmp_path / "five"  # a network reading 5 slices cannot teach one that reads 3
    assert train_main(["--mrixfields", str(mrix_tree), "--out", str(five), "--steps", "1",
                       "--checkpoint-every", "1", *TINY, "--n-slices", "5"]) == 0
    assert train_main(["--mrixfields", str(mrix_tree), "--out", str(tmp_path / "z"),
                       "--steps", "2", "--init-from", "mine", "--model-dir", str(first),
                       "--head-only", "--cross-fit", "default", "--cross-fit-dir", str(five),
                       *TINY]) == 65
    assert "--cross-fit default: error_net reads other inputs" in capsys.readouterr().err
    # one fold per --anatomies brain: read each brain's name, load each folder's network
    npz = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for path, name in zip(npz, ("t1w:x/sub-a", "brain-b")):
        np.savez(path, name=name)
    desc: list[str] = []
    nets = _cross_fit_net(argparse.Namespace(cross_fit="default", cross_fit_dir=[first, five],
                                             anatomies=npz), desc)
    from synth7t.train import load_registry_unet

    want = {n: load_registry_unet("default", model_dir=d).config
            for n, d in (("t1w:x/sub-a", first), ("brain-b", five))}
    assert want["t1w:x/sub-a"] != want["brain-b"]  # two different networks, each where it belongs
    assert {k: v.config for k, v in nets.items()} == want
    assert f"brain-b <- {five}" in desc[0]
    for extra in ([], ["--icbm-weight", "1", "--anatomies", *map(str, npz)]):
        assert train_main(["--simulated", "--out", str(tmp_path / "w"), "--steps", "1",
                           "--init-from", "mine", "--model-dir", str(first), "--head-only",
                           "--cross-fit", "default", "--cross-fit-dir", str(first), str(five),
                           "--icbm-weight", "0", "--anatomies", str(npz[0]), *extra,
                           *TINY]) == 64  # a folder per brain, and no ICBM152 patches
    assert "one --anatomies brain" in capsys.readouterr().err


def test_finetune_on_bids_sessions(tmp_path):
    bids = tmp_path / "bids"
    (bids / "dataset_description.json").parent.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    src, tgt, _ = _phantom(7, shift=1)
    for ses, arr, b0 in (("lo", src * 900, 1.5), ("hi", tgt * 1200, 7.0)):
        img = bids / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_T1w.nii.gz"
        _save(arr, img)
        img.with_name(img.name.replace(".nii.gz", ".json")).write_text(
            json.dumps({"MagneticFieldStrength": b0, "RepetitionTime": 1.9 if b0 < 7 else 3.0,
                        "EchoTime": 0.0025}))
    pairs = bids_pairs(bids, tmp_path / "work")
    assert len(pairs) == 1 and pairs[0].field_bin == 1.5 and pairs[0].contrast == "T1w"
    # the source's own protocol (its sidecar, ms), for protocol-conditioned training
    assert pairs[0].protocol == pytest.approx({"TR": 1900.0, "TE": 2.5})
    slab = VolumePairSource(pairs, depth=4).make(np.random.default_rng(0))[0]
    assert slab.source_protocol == pairs[0].protocol
    reg = nib.load(str(pairs[0].source)).get_fdata()
    # the rigid registration undid the 1-voxel shift: correlation with the 7T image improves
    before = np.corrcoef(src.ravel(), tgt.ravel())[0, 1]
    after = np.corrcoef(reg.ravel(), tgt.ravel())[0, 1]
    assert after > before

    out = tmp_path / "bids_model"
    assert train_main(["--bids", str(bids), "--out", str(out), "--steps", "4",
                       "--checkpoint-every", "2", "--contrasts", "T1w", "--fields", "1.5",
                       *TINY]) == 0
    entry = Registry.load(out).get("T1w", 1.5)
    assert entry.sha256 == sha256_file(out / "model.safetensors")
    load_synthesizer(entry)


def _blurred_fractions(shape=(40, 40, 20), sigma=2.0) -> dict:
    """CSF ball in GM shell in WM: crisp labels blurred, like a population average."""
    from scipy import ndimage as ndi

    idx = np.indices(shape, dtype=np.float32)
    r = np.sqrt(((idx[0] - 20) ** 2 + (idx[1] - 20) ** 2) + (idx[2] - 10) ** 2 * 4)
    crisp = {"CSF": r < 6, "GM": (r >= 6) & (r < 10), "WM": r >= 10}
    return {k: ndi.gaussian_filter(v.astype(np.float32), sigma) for k, v in crisp.items()}


def test_partial_volume_sharpening_makes_voxels_purer_and_keeps_totals():
    from synth7t.sources import sharpen_partial_volume

    fr = _blurred_fractions()
    total = sum(fr.values())
    np.testing.assert_array_equal(sharpen_partial_volume(fr, 1.0)["GM"], fr["GM"])
    pure = lambda f: np.mean(np.maximum.reduce([f[k] for k in f]) / total > 0.98)  # noqa: E731
    out = sharpen_partial_volume(fr, 3.0)
    np.testing.assert_allclose(sum(out.values()), total, atol=1e-5)
    assert all(v.min() >= 0 for v in out.values())
    assert pure(out) > pure(fr) + 0.1
    # the dominant tissue of each voxel stays dominant
    dom = lambda f: np.argmax(np.stack([f[k] for k in ("CSF", "GM", "WM")]), axis=0)  # noqa: E731
    np.testing.assert_array_equal(dom(out), dom(fr))


def test_csf_change_widens_or_narrows_the_csf_and_keeps_totals():
    from synth7t.sources import change_csf

    fr = _blurred_fractions(sigma=1.0)
    total = sum(fr.values())
    csf0 = float(fr["CSF"].sum())
    wide, narrow = change_csf(fr, 1.0), change_csf(fr, -0.5)
    for out in (wide, narrow):
        np.testing.assert_allclose(sum(out.values()), total, atol=1e-5)
        assert all(v.min() >= -1e-7 for v in out.values())
    assert wide["CSF"].sum() > 1.05 * csf0 and np.mean(wide["CSF"] > 0.9) > np.mean(fr["CSF"] > 0.9)
    assert narrow["CSF"].sum() < 0.95 * csf0
    # WM far from any CSF is untouched
    far = fr["CSF"] < 1e-6
    np.testing.assert_allclose(wide["WM"][far & (fr["WM"] > 0.999)], fr["WM"][far & (fr["WM"] > 0.999)],
                               atol=1e-3)


def test_random_anatomies_draw_sharpness_and_csf_only_when_asked():
    from synth7t.anatomy import Anatomy
    from synth7t.sources import RandomAnatomies

    fr = _blurred_fractions()
    base = Anatomy(fr, np.ones_like(fr["WM"]), np.eye(4), name="ball")
    kw = dict(label_perturbation=0.0, texture_std=0.0, jitter=False, lesion_probability=0.0)
    plain = RandomAnatomies([base], **kw).new_brain(np.random.default_rng(1))
    for k in fr:
        np.testing.assert_array_equal(plain.anatomy.fractions[k], fr[k])
    drawn = RandomAnatomies([base], sharpness=(2.0, 3.0), csf_change=(0.5, 1.0), **kw)
    a1 = drawn.new_brain(np.random.default_rng(1)).anatomy.fractions
    a2 = drawn.new_brain(np.random.default_rng(1)).anatomy.fractions
    np.testing.assert_array_equal(a1["CSF"], a2["CSF"])  # seeded
    assert not np.array_equal(a1["GM"], fr["GM"])
    np.testing.assert_allclose(sum(a1.values()), sum(fr.values()), atol=1e-5)
    # widened after sharpening: more pure CSF than sharpening alone at the strongest exponent
    from synth7t.sources import sharpen_partial_volume

    assert np.mean(a1["CSF"] > 0.9) > np.mean(sharpen_partial_volume(fr, 3.0)["CSF"] > 0.9)


def test_level_loss_sees_a_dark_tissue_level_error_that_l1_hardly_does():
    from synth7t.train import level_loss, synthesis_loss

    rng = np.random.default_rng(0)
    y = torch.full((2, 1, 32, 32), 0.1) + 0.01 * torch.from_numpy(
        rng.standard_normal((2, 1, 32, 32)).astype(np.float32))
    m = torch.zeros_like(y)
    m[..., 4:28, 4:28] = 1.0
    y = y * m
    same, brighter = y.clone(), (y + 0.015) * m  # a white matter 15 % too bright
    assert float(level_loss(same, y, m)) == 0.0
    lev = float(level_loss(brighter, y, m))
    assert lev == pytest.approx(0.015 / 0.2, rel=0.05)  # relative to level + floor
    l1 = float(synthesis_loss(brighter, y)[1]["l1"])
    assert lev > 5 * l1
    # blocks crossing the mask's edge do not count: an error outside them changes nothing
    edge = y.clone()
    edge[..., 0:4, :] += 0.5
    assert float(level_loss(edge, y, m)) == 0.0
    # gradient flows to the prediction
    p = brighter.clone().requires_grad_(True)
    level_loss(p, y, m).backward()
    assert float(p.grad.abs().sum()) > 0
