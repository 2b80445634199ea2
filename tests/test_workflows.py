"""Nipype graph factories, interfaces and the derivatives sink (fast: graphs are built, not run).

The option matrix builds :func:`workflows.base.init_synth7t_wf` for every combination of
contrasts present, sessions and ``--skull-strip`` mode and checks the nodes and the derivative
names the sinks will write. Small interfaces run on tiny images.
"""
from __future__ import annotations

import inspect
import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from synth7t.fields import route_field
from synth7t.reference import REF_SPACE

from workflows import anatomical, base, outputs, registration, synthesis
from workflows.interfaces import (
    Conform,
    N4BiasFieldCorrection,
    RegisterRigid,
    RegisterToReference,
    SkullStrip,
    Synthesize,
    ToNative,
    invert_linear_itk,
)
from workflows.outputs import DerivativesDataSink, expected_relpath
from workflows.storage import encode, save_image
from workflows.synthesis import ModelChoice, ModelNotFoundError, select_model

from conftest import tiny_image

CONTRAST_SETS = [("T1w",), ("T1w", "T2w"), ("T1w", "T2w", "FLAIR"), ("T2w", "FLAIR"),
                 ("FLAIR",)]


class FakeRegistry:
    """Tiny stand-in for synth7t.registry.Registry (only ``get``)."""

    def __init__(self, names=("default", "baseline")):
        self.names = names

    def get(self, contrast, field_bin, name="default"):
        if name not in self.names:
            raise KeyError(f"no model {name!r} for {contrast} at {field_bin:g} T")
        return SimpleNamespace(
            name=name, kind="baseline" if name == "baseline" else "unet", sha256="ab" * 32,
            provenance=lambda: {"Name": name, "Kind": "x", "SHA256": "ab" * 32,
                                "Description": "baseline: non-deep" if name == "baseline"
                                else "unet"})


def _images(contrasts, session=None, field=3.0):
    ses = f"ses-{session}/" if session else ""
    pre = f"sub-01_ses-{session}" if session else "sub-01"
    return {c: SimpleNamespace(path=Path(f"/data/bids/sub-01/{ses}anat/{pre}_{c}.nii.gz"),
                               relpath=f"sub-01/{ses}anat/{pre}_{c}.nii.gz",
                               metadata={}, routing=route_field(field, where=c))
            for c in contrasts}


def _sink_paths(wf) -> dict[str, str]:
    """Derivative path (relative) each DerivativesDataSink of ``wf`` will write."""
    paths = {}
    for name in wf.list_node_names():
        node = wf.get_node(name)
        if not isinstance(node.interface, DerivativesDataSink):
            continue
        assert node.name.startswith("ds_"), name
        sink = node.interface
        ents = {k: getattr(sink.inputs, k) for k in sink._allowed_entities}
        ext = ".h5" if ents.get("suffix") == "xfm" and ents.get("to") in (REF_SPACE,) or \
            ents.get("from") == REF_SPACE else (".txt" if ents.get("suffix") == "xfm"
                                                else ".png" if ents.get("datatype") == "figures"
                                                else ".nii.gz")
        (rel,) = expected_relpath(sink.inputs.source_file, [ext], ents,
                                  compress=sink.inputs.compress)
        paths[name] = rel
        assert sink.inputs.base_directory == "/out"
    return paths


def _expected_names(contrasts, session=None):
    pre = "sub-01" + (f"_ses-{session}" if session else "")
    folder = "sub-01/" + (f"ses-{session}/" if session else "") + "anat/"
    a = contrasts[0]
    names = {f"{pre}_from-{a}_to-{REF_SPACE}_mode-image_xfm.h5",
             f"{pre}_from-{REF_SPACE}_to-{a}_mode-image_xfm.h5",
             f"{pre}_desc-brain_mask.nii.gz",
             f"{pre}_space-{REF_SPACE}_desc-brain_mask.nii.gz"}
    for c in contrasts:
        names |= {f"{pre}_desc-preproc_{c}.nii.gz",
                  f"{pre}_space-{REF_SPACE}_desc-preproc_{c}.nii.gz",
                  f"{pre}_space-{REF_SPACE}_desc-synth7T_{c}.nii.gz",
                  f"{pre}_desc-synth7T_{c}.nii.gz"}
        if c != a:
            names |= {f"{pre}_space-{c}_desc-brain_mask.nii.gz",
                      f"{pre}_from-{c}_to-{a}_mode-image_xfm.txt",
                      f"{pre}_from-{a}_to-{c}_mode-image_xfm.txt"}
    # reportlets drawn by the graph: sub-<label>/figures/, session in the name only (NiPreps)
    figures = {f"sub-01/figures/{pre}_desc-brain_{c}.png" for c in contrasts}
    figures |= {f"sub-01/figures/{pre}_space-{REF_SPACE}_desc-reg_{c}.png" for c in contrasts}
    figures |= {f"sub-01/figures/{pre}_desc-synth7T{v}_{c}.png" for c in contrasts
                for v in ("axial", "coronal", "sagittal")}
    return {folder + n for n in names} | figures


def test_template_brain_extraction_is_single_threaded():
    item = SimpleNamespace(subject="01", session=None, images=_images(["T2w"], None))
    wf = base.init_synth7t_wf(sessions=[item], output_dir="/out", brain_extraction="template",
                              registry=FakeRegistry(), omp_nthreads=2, device="cpu")
    strip = wf.get_node("sub_01_wf.anat_preproc_t2w_wf.skull_strip")
    assert strip.interface.inputs.method == "template"
    assert strip.n_procs == 1 and strip.interface.inputs.omp_nthreads == 1


def test_synthesis_nodes_get_the_protocol_their_sidecar_states(monkeypatch):
    """Models with protocol conditioning read TR/TE/TI/FA (ms, degrees) from the sidecar; an
    image whose sidecar states none, or a model that does not read it, leaves the node's input
    undefined ("not known", and the node's cache key free of the sidecar)."""
    from nipype.interfaces.base import isdefined

    from workflows import synthesis

    images = _images(["T1w", "T2w"], None)
    sidecar = {"RepetitionTime": 2.3, "EchoTime": 0.003, "InversionTime": 0.9, "FlipAngle": 9,
               "MagneticFieldStrength": 3}
    images["T1w"].metadata = dict(sidecar)
    item = SimpleNamespace(subject="01", session=None, images=images)

    def protocol_of(node):
        return wf.get_node(f"sub_01_wf.synthesis_wf.synthesize_{node}").interface.inputs.protocol

    wf = base.init_synth7t_wf(sessions=[item], output_dir="/out", registry=FakeRegistry(),
                              omp_nthreads=1, device="cpu")
    assert not isdefined(protocol_of("t1w"))  # the fake models do not read it
    monkeypatch.setattr(synthesis, "_unet_config",
                        lambda entry: {"protocol_condition": {"T1w@3": {"TR": 2300.0}}})
    wf = base.init_synth7t_wf(sessions=[item], output_dir="/out", registry=FakeRegistry(),
                              omp_nthreads=1, device="cpu")
    t1 = protocol_of("t1w")
    assert t1 == {"TR": 2300.0, "TE": 3.0, "TI": 900.0, "FA": 9.0}
    assert not isdefined(protocol_of("t2w"))
    # the synthetic image's sidecar says what a protocol-conditioned model was told
    from workflows.outputs import synthesis_metadata

    routing = images["T1w"].routing
    meta = synthesis_metadata(contrast="T1w", routing=routing, model_provenance={},
                              source_protocol=t1, reads_protocol=True)
    assert meta["SourceProtocol"] == t1
    assert "not stated" in synthesis_metadata(contrast="T1w", routing=routing,
                                              model_provenance={}, reads_protocol=True
                                              )["SourceProtocol"]
    assert "SourceProtocol" not in synthesis_metadata(contrast="T1w", routing=routing,
                                                      model_provenance={}, source_protocol=t1)


def test_shrinkage_follows_the_model_config_and_the_flag(monkeypatch):
    """A model whose config asks for the shrinkage gets it in its synthesis node unless the run
    says --no-shrinkage; the synthetic image's sidecar says which; other models get neither."""
    from workflows import synthesis

    item = SimpleNamespace(subject="01", session=None, images=_images(["T1w"], None))

    def built(shrinkage: bool):
        # (maps off: with them the sidecar's summary arrives at run time, through a node)
        wf = base.init_synth7t_wf(sessions=[item], output_dir="/out", registry=FakeRegistry(),
                                  omp_nthreads=1, device="cpu", shrinkage=shrinkage,
                                  uncertainty=False)
        node = wf.get_node("sub_01_wf.synthesis_wf.synthesize_t1w").interface.inputs
        meta = wf.get_node("sub_01_wf.ds_synthesis_t1w_wf.ds_ref_synth").interface.inputs
        return node.shrinkage, meta.meta_dict["SynthesisModel"]

    on, prov = built(True)
    assert on is False and "Shrinkage" not in prov  # the fake models do not ask for it
    monkeypatch.setattr(synthesis, "_unet_config",
                        lambda entry: {"uncertainty": True, "shrinkage": True})
    on, prov = built(True)
    assert on is True and prov["Shrinkage"] == synthesis.SHRINKAGE_APPLIED
    on, prov = built(False)
    assert on is False and prov["Shrinkage"] == synthesis.SHRINKAGE_OFF
    # without an uncertainty head there is no map to shrink by
    monkeypatch.setattr(synthesis, "_unet_config", lambda entry: {"shrinkage": True})
    assert built(True)[0] is False


def test_parser_no_shrinkage():
    from bids_app.parser import parse_args

    args = [str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bids_3t"), "/tmp/o",
            "participant"]
    assert parse_args(args).shrinkage is True
    assert parse_args(args + ["--no-shrinkage"]).shrinkage is False


# --------------------------------------------------------------------------- option matrix
@pytest.mark.parametrize("contrasts, session, mode", list(itertools.product(
    CONTRAST_SETS, [None, "pre"], ["auto", "force", "skip"])))
def test_build_matrix(contrasts, session, mode):
    item = SimpleNamespace(subject="01", session=session, images=_images(contrasts, session))
    wf = base.init_synth7t_wf(sessions=[item], output_dir="/out", skull_strip=mode,
                              registry=FakeRegistry(), omp_nthreads=2, seed=3,
                              provenance={"RandomSeed": 3})
    sub = f"sub_01_ses_{session}_wf" if session else "sub_01_wf"
    assert wf.name == base.workflow_name()
    names = set(wf.list_node_names())
    anchor = contrasts[0].lower()
    strip = wf.get_node(f"{sub}.anat_preproc_{anchor}_wf.skull_strip")
    assert strip.interface.inputs.mode == mode and strip.interface.inputs.seed == 3
    # antspyx nodes stay single-threaded (reproducible registrations); torch gets omp_nthreads,
    # also for the deep brain extraction (default), whose template fallback runs ITK with 1
    assert strip.interface.inputs.method == "deep" and strip.interface.inputs.device == "auto"
    # ... and reserves that many slots, unless it will only detect (skip; auto on input that
    # looks brain-extracted: these paths do not exist, so not here)
    assert strip.n_procs == (1 if mode == "skip" else 2)
    assert strip.interface.inputs.omp_nthreads == 2
    assert strip.interface.inputs.ants_nthreads == 1
    assert wf.get_node(f"{sub}.anat_preproc_{anchor}_wf.n4").n_procs == 1
    to_ref = wf.get_node(f"{sub}.register_wf.{anchor}_to_ref")
    assert to_ref.n_procs == 1 and to_ref.interface.inputs.omp_nthreads == 1
    assert f"{sub}.register_wf.{anchor}_to_ref" in names
    for c in contrasts:
        lc = c.lower()
        assert f"{sub}.anat_preproc_{lc}_wf.conform" in names
        assert f"{sub}.anat_preproc_{lc}_wf.n4" in names
        synth = wf.get_node(f"{sub}.synthesis_wf.synthesize_{lc}")
        assert synth.interface.inputs.contrast == c
        assert synth.n_procs == 2 and synth.interface.inputs.omp_nthreads == 2
        assert synth.interface.inputs.field_bin == 3.0
        assert synth.interface.inputs.model_name == "default"
        if lc != anchor:
            assert f"{sub}.register_wf.{lc}_to_{anchor}" in names
            detect = wf.get_node(f"{sub}.anat_preproc_{lc}_wf.detect_skull_stripped")
            assert detect.interface.inputs.mode == mode
    # one synthesis node per contrast, sinks named ds_*, exactly the listed derivatives
    assert sum(".synthesize_" in n for n in names) == len(contrasts)
    paths = _sink_paths(wf)
    assert set(paths.values()) == _expected_names(contrasts, session)
    assert len(paths) == len(set(paths.values()))


def test_two_participants_one_graph():
    items = [SimpleNamespace(subject=s, session=None, images=_images(("T1w",)))
             for s in ("01", "02")]
    items[1].images = {c: SimpleNamespace(path=Path(str(i.path).replace("01", "02")),
                                          relpath=i.relpath.replace("01", "02"),
                                          metadata={}, routing=i.routing)
                       for c, i in items[1].images.items()}
    wf = base.init_synth7t_wf(sessions=items, output_dir="/out", registry=FakeRegistry())
    subs = {n.split(".")[0] for n in wf.list_node_names()}
    assert subs == {"sub_01_wf", "sub_02_wf"}


def test_passthrough_needs_no_registry():
    item = SimpleNamespace(subject="01", session=None, images=_images(("T1w",), field=7.0))
    wf = base.init_synth7t_wf(sessions=[item], output_dir="/out")
    node = wf.get_node("sub_01_wf.synthesis_wf.synthesize_t1w")
    assert node.interface.inputs.passthrough


def test_multi_contrast_model_gets_others():
    imgs = _images(("T1w", "T2w", "FLAIR"))
    models = {c: ModelChoice("default", "x", {}, others=("T1w", "T2w", "FLAIR")) for c in imgs}
    wf = base.init_single_subject_wf(subject_id="01", images=imgs, output_dir="/out",
                                     models=models)
    synth = wf.get_node("synthesis_wf.synthesize_t2w")
    assert synth.interface.inputs.other_contrasts == ["T1w", "FLAIR"]
    assert "synthesis_wf.others_t2w" in wf.list_node_names()


def test_sidecar_metadata_at_build_time():
    imgs = _images(("T1w", "T2w"), field=2.89)
    wf = base.init_single_subject_wf(subject_id="01", images=imgs, output_dir="/out",
                                     registry=FakeRegistry(("baseline",)),
                                     provenance={"RandomSeed": 0, "CommandLine": "synth7t x"})
    meta = wf.get_node("ds_synthesis_t2w_wf.ds_ref_synth").interface.inputs.meta_dict
    assert meta["MagneticFieldStrength"] == 7
    assert meta["SourceMagneticFieldStrength"] == 2.89 and meta["SourceFieldBin"] == 3.0
    assert meta["SynthesisModel"]["Description"].startswith("baseline: non-deep")
    assert meta["SpatialReference"] and meta["SkullStripped"] is True
    assert "Unknown" not in json.dumps(meta) and meta["Resolution"].startswith("0.5 mm")
    assert meta["Sources"][0] == "bids:raw:sub-01/anat/sub-01_T2w.nii.gz"
    assert all(re.match(r"^bids:(raw)?:sub-01/anat/", s) for s in meta["Sources"])
    native = wf.get_node("ds_synthesis_t2w_wf.ds_native_synth").interface.inputs.meta_dict
    assert "bids::sub-01/anat/sub-01_from-T1w_to-T2w_mode-image_xfm.txt" in native["Sources"]
    assert "SpatialReference" not in native
    mask = wf.get_node("ds_anat_t2w_wf.ds_mask").interface.inputs.meta_dict
    assert mask["SpatialReference"] == "bids:raw:sub-01/anat/sub-01_T2w.nii.gz"


# --------------------------------------------------------------------------- conventions
FACTORIES = [base.init_synth7t_wf, base.init_single_subject_wf,
             anatomical.init_anat_preproc_wf, registration.init_register_wf,
             synthesis.init_synthesis_wf, outputs.init_ds_anat_wf,
             outputs.init_ds_registration_wf, outputs.init_ds_synthesis_wf]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_factory_conventions(factory):
    params = inspect.signature(factory).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), factory.__name__
    doc = inspect.getdoc(factory)
    for section in ("Parameters", "Inputs", "Outputs"):
        assert re.search(rf"^{section}\n-+$", doc, re.M), f"{factory.__name__}: {section}"


@pytest.mark.parametrize("iface", [Conform, N4BiasFieldCorrection, SkullStrip,
                                   RegisterToReference, RegisterRigid, Synthesize, ToNative])
def test_interface_conventions(iface):
    assert iface.input_spec.__name__.startswith("_")
    spec = iface.input_spec()
    if "omp_nthreads" in spec.trait_names():
        assert spec.trait("omp_nthreads").nohash
    # changing the thread count does not change the hash
    a, b = iface(), iface()
    if "omp_nthreads" in spec.trait_names():
        a.inputs.omp_nthreads, b.inputs.omp_nthreads = 1, 8
        assert a.inputs.get_hashval()[1] == b.inputs.get_hashval()[1]



def test_n4_thread_count_is_part_of_its_cache_key():
    """N4's result depends on its ITK thread count, so a work folder cached at another count
    is never reused (the scheduler's omp_nthreads stays out of every cache key)."""
    from synth7t.preprocess import N4_THREADS
    from workflows.anatomical import init_anat_preproc_wf

    n4 = init_anat_preproc_wf(contrast="T1w").get_node("n4")
    assert n4.interface.inputs.threads == N4_THREADS
    other = N4BiasFieldCorrection(threads=1 if N4_THREADS != 1 else 2)
    assert other.inputs.get_hashval()[1] != n4.interface.inputs.get_hashval()[1]

# --------------------------------------------------------------------------- model choice
def test_select_model():
    routing = route_field(3.0, where="x")
    choice = select_model(FakeRegistry(), "T1w", routing)
    assert choice.name == "default" and not choice.fallback
    choice = select_model(FakeRegistry(("baseline",)), "T1w", routing)
    assert choice.name == "baseline" and choice.fallback
    with pytest.raises(ModelNotFoundError, match="--model-dir"):
        select_model(FakeRegistry(()), "T1w", routing)
    passthrough = select_model(None, "T1w", route_field(7.0, where="x"))
    assert passthrough.passthrough and passthrough.provenance["Name"] == "passthrough"


def test_select_model_shipped_registry():
    choice = select_model(base.load_registry(), "FLAIR", route_field(0.064, where="x"))
    prov = choice.provenance
    assert prov["SourceFieldBin"] == 0.1 and prov["SHA256"] == choice.sha256
    for key in ("Name", "Version", "SHA256"):
        assert key in prov
    if prov.get("Kind") == "baseline":
        assert prov["Description"].startswith("baseline: non-deep")
    json.dumps(prov)
    # the shipped default shrinks its output (model 2.7.0 on)
    t1 = select_model(base.load_registry(), "T1w", route_field(3.0, where="x"))
    assert t1.shrinkage == (t1.provenance.get("Kind") == "unet")


# --------------------------------------------------------------------------- sink
def _raw_source(tmp_path) -> Path:
    src = tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    src.parent.mkdir(parents=True)
    tiny_image().to_filename(src)
    return src


def test_sink_writes_atomically_and_caches(tmp_path):
    src = _raw_source(tmp_path)
    in_file = tmp_path / "synth.nii.gz"
    save_image(np.random.default_rng(0).random((8, 9, 10)), np.diag([.5, .5, .5, 1]), in_file,
               dtype="uint16", code=4)
    out = tmp_path / "out"
    sink = DerivativesDataSink(base_directory=str(out), space=REF_SPACE, desc="synth7T",
                               compress=True)
    sink.inputs.in_file = str(in_file)
    sink.inputs.source_file = str(src)
    sink.inputs.meta_dict = {"Sources": ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"],
                             "SkullStripped": True}
    assert sink.always_run  # nothing written yet
    res = sink.run()
    dest = out / "sub-01" / "anat" / f"sub-01_space-{REF_SPACE}_desc-synth7T_T1w.nii.gz"
    assert res.outputs.out_file == str(dest) and dest.is_file()
    assert not (out / "niworkflows").exists() and not (out / ".synth7t-staging").exists()
    meta = json.loads(dest.with_name(dest.name.replace(".nii.gz", ".json")).read_text())
    assert meta["SkullStripped"] is True and "Resolution" not in meta
    img = nib.load(dest)
    assert img.get_data_dtype() == np.uint16 and int(img.header["sform_code"]) == 4
    assert not sink.always_run  # outputs exist: the Nipype cache may be reused
    dest.unlink()
    assert sink.always_run


def test_sink_error_names_the_destination(tmp_path, monkeypatch):
    """A copy that fails in the staging folder (a full disk) names the derivative's final path."""
    import errno
    import shutil as _shutil

    src = _raw_source(tmp_path)
    in_file = tmp_path / "synth.nii.gz"
    save_image(np.zeros((8, 9, 10)), np.diag([.5, .5, .5, 1]), in_file, dtype="uint16", code=4)

    def full_disk(a, b, *args, **kwargs):  # as shutil's sendfile copy reports it
        raise OSError(errno.ENOSPC, "No space left on device", str(a), None, str(b))

    monkeypatch.setattr(_shutil, "copyfile", full_disk)
    out = tmp_path / "out"
    sink = DerivativesDataSink(base_directory=str(out), space=REF_SPACE, desc="synth7T",
                               compress=True, in_file=str(in_file), source_file=str(src))
    with pytest.raises(OSError) as err:
        sink.run()
    dest = out / "sub-01" / "anat" / f"sub-01_space-{REF_SPACE}_desc-synth7T_T1w.nii.gz"
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(dest), err.value
    assert not dest.exists() and not (out / ".synth7t-staging").exists()


def test_deriv_relpath_names():
    rel = "sub-01/ses-a/anat/sub-01_ses-a_acq-mp_T1w.nii.gz"
    assert outputs.deriv_relpath(rel, desc="preproc") == \
        "sub-01/ses-a/anat/sub-01_ses-a_acq-mp_desc-preproc_T1w.nii.gz"
    assert outputs.deriv_uri(rel, **outputs.xfm_entities("T1w", REF_SPACE, ".h5")) == \
        f"bids::sub-01/ses-a/anat/sub-01_ses-a_acq-mp_from-T1w_to-{REF_SPACE}_mode-image_xfm.h5"


# --------------------------------------------------------------------------- storage
@pytest.mark.parametrize("dtype", ["uint16", "int16"])
def test_scaled_integer_storage(tmp_path, dtype):
    rng = np.random.default_rng(1)
    data = rng.random((30, 31, 32)).astype(np.float32)
    data[data < 0.3] = 0
    data[0, 0, 0] = 1.0
    raw, slope = encode(data, dtype)
    assert raw.dtype == np.dtype(dtype) and slope > 0
    path = save_image(data, np.eye(4), tmp_path / "x.nii.gz", dtype=dtype, code=4)
    img = nib.load(path)
    for loaded in (img.get_fdata(), img.get_fdata(dtype=np.float32),
                   np.asanyarray(img.dataobj)):
        assert loaded.max() <= 1.0 and loaded.min() >= 0
        assert np.all(loaded[data == 0] == 0)
        assert np.abs(loaded - data).max() < 2e-4
    assert not list(tmp_path.glob(".*"))  # no temp file left


# --------------------------------------------------------------------------- interfaces
def _itk_affine(path: Path, matrix, translation, center=(0, 0, 0)) -> Path:
    params = " ".join(f"{v:.10g}" for v in [*np.ravel(matrix), *translation])
    path.write_text("#Insight Transform File V1.0\n#Transform 0\n"
                    "Transform: AffineTransform_double_3_3\n"
                    f"Parameters: {params}\nFixedParameters: {' '.join(map(str, center))}\n")
    return path


def test_invert_linear_itk(tmp_path):
    from nitransforms.io.itk import ITKLinearTransform

    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                    [0, 0, 1]])
    fwd = _itk_affine(tmp_path / "fwd.txt", rot, (3.0, -2.0, 1.5), center=(1, 2, 3))
    inv = invert_linear_itk(str(fwd), str(tmp_path / "inv.txt"))
    a = ITKLinearTransform.from_filename(str(fwd)).to_ras()
    b = ITKLinearTransform.from_filename(inv).to_ras()
    assert np.allclose(a @ b, np.eye(4), atol=1e-6)


def test_skull_strip_skip_and_passthrough_synthesis(tmp_path):
    img = tiny_image(stripped=True)
    src = tmp_path / "brain.nii.gz"
    img.to_filename(src)
    res = SkullStrip(in_file=str(src), mode="skip").run(cwd=str(tmp_path))
    assert res.outputs.input_stripped
    mask = np.asanyarray(nib.load(res.outputs.out_mask).dataobj)
    assert mask.dtype == np.uint8
    assert np.array_equal(mask > 0, np.asanyarray(img.dataobj) > 0)

    synth = Synthesize(in_file=str(src), mask_file=res.outputs.out_mask, contrast="T1w",
                       field_bin=7.0, passthrough=True, storage_dtype="float32")
    out = nib.load(synth.run(cwd=str(tmp_path)).outputs.out_file).get_fdata()
    assert out.max() <= 1 and out.min() >= 0 and np.all(out[mask == 0] == 0)


def test_to_native_crop_is_exact(tmp_path):
    """The bounding-box crop before resampling back to native space changes nothing."""
    from synth7t.preprocess import to_native

    from workflows.interfaces import _crop_to_nonzero

    ident = _itk_affine(tmp_path / "id.txt", np.eye(3), (0, 0, 0))
    ref = tiny_image(shape=(40, 44, 40), zooms=(1.0, 1.0, 1.0), stripped=True)
    data = np.asanyarray(ref.dataobj, dtype=np.float32)
    ref = nib.Nifti1Image(data / data.max(), ref.affine)
    native = tiny_image(shape=(18, 22, 18), zooms=(2.0, 2.0, 2.0))
    mask = native.__class__((np.asanyarray(native.dataobj) > 50).astype(np.uint8),
                            native.affine)
    for name, im in (("ref", ref), ("native", native), ("mask", mask)):
        im.to_filename(tmp_path / f"{name}.nii.gz")
    full = to_native(ref, native, [str(ident)]).get_fdata()
    cropped = to_native(_crop_to_nonzero(ref), native, [str(ident)]).get_fdata()
    assert np.allclose(full, cropped, atol=1e-6)
    res = ToNative(in_file=str(tmp_path / "ref.nii.gz"),
                   reference_file=str(tmp_path / "native.nii.gz"),
                   mask_file=str(tmp_path / "mask.nii.gz"),
                   transforms=[str(ident)]).run(cwd=str(tmp_path))
    out = nib.load(res.outputs.out_file)
    assert out.shape == native.shape and np.allclose(out.affine, native.affine)
    arr = out.get_fdata()
    assert arr.max() <= 1 and np.all(arr[np.asanyarray(mask.dataobj) == 0] == 0)


def test_itk_text_transforms_match_ants(tmp_path):
    """The .txt copies/inverses of an ANTs .mat resample exactly like the .mat itself."""
    import ants

    from synth7t.preprocess import to_native

    from workflows.interfaces import linear_itk_to_txt

    theta = np.deg2rad(8)
    rot = [[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]]
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=np.array(rot), translation=(2.0, -3.0, 1.0),
                                    center=(4.0, 5.0, -6.0))
    mat = str(tmp_path / "rigid.mat")
    ants.write_transform(tx, mat)
    txt = linear_itk_to_txt(mat, str(tmp_path / "fwd.txt"))
    inv = invert_linear_itk(mat, str(tmp_path / "inv.txt"))
    img = tiny_image(shape=(24, 26, 22), zooms=(1.5, 1.5, 1.5))
    grid = tiny_image(shape=(20, 22, 20), zooms=(1.7, 1.7, 1.7))
    a = to_native(img, grid, [mat]).get_fdata()
    b = to_native(img, grid, [txt]).get_fdata()
    assert np.allclose(a, b, atol=1e-3 * a.max())
    c = to_native(img, grid, [mat], invert=[True]).get_fdata()
    d = to_native(img, grid, [inv]).get_fdata()
    assert np.allclose(c, d, atol=1e-3 * c.max())
    assert not np.allclose(a, c)


def test_sink_copies_bytes(tmp_path):
    """.nii.gz inputs are copied as they are (no recompression), other files are real copies."""
    src = _raw_source(tmp_path)
    in_file = tmp_path / "preproc.nii.gz"
    save_image(np.random.default_rng(2).random((9, 9, 9)), np.eye(4), in_file, code=1)
    xfm = _itk_affine(tmp_path / "fwd.txt", np.eye(3), (1, 2, 3))
    out = tmp_path / "out"
    nii = DerivativesDataSink(base_directory=str(out), desc="preproc", compress=True,
                              in_file=str(in_file), source_file=str(src)).run()
    assert Path(nii.outputs.out_file).read_bytes() == in_file.read_bytes()
    txt = DerivativesDataSink(base_directory=str(out), suffix="xfm", mode="image",
                              to="T1w", compress=None, in_file=str(xfm), source_file=str(src),
                              **{"from": "T2w"}).run()
    dest = Path(txt.outputs.out_file)
    assert dest.name == "sub-01_from-T2w_to-T1w_mode-image_xfm.txt"
    assert dest.read_bytes() == xfm.read_bytes() and dest.stat().st_ino != xfm.stat().st_ino
    import niworkflows.interfaces.bids as nwb
    from niworkflows.utils.misc import _copy_any

    assert nwb._copy_any is _copy_any  # restored


def test_native_outputs_need_no_header_fix(tmp_path):
    """Native images handed to the sinks already have scanner codes and mm units."""
    from workflows.interfaces import MaskToNative

    img = tiny_image()
    src = _raw_source(tmp_path)
    (tmp_path / "in.nii.gz").write_bytes(src.read_bytes())
    ident = _itk_affine(tmp_path / "id.txt", np.eye(3), (0, 0, 0))
    img.to_filename(tmp_path / "ref.nii.gz")
    res = MaskToNative(in_mask=str(tmp_path / "ref.nii.gz"),
                       reference_file=str(tmp_path / "ref.nii.gz"),
                       transforms=[str(ident)]).run(cwd=str(tmp_path))
    sink = DerivativesDataSink(base_directory=str(tmp_path / "out"), space="T2w", desc="brain",
                               suffix="mask", compress=True, in_file=res.outputs.out_mask,
                               source_file=str(src)).run()
    assert sink.outputs.fixed_hdr == [False]


def test_n4_output_is_copied_by_the_sink(tmp_path):
    src = _raw_source(tmp_path)
    res = N4BiasFieldCorrection(in_file=str(src)).run(cwd=str(tmp_path))
    hdr = nib.load(res.outputs.out_file).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 1)
    sink = DerivativesDataSink(base_directory=str(tmp_path / "out"), desc="preproc",
                               compress=True, in_file=res.outputs.out_file,
                               source_file=str(src)).run()
    assert sink.outputs.fixed_hdr == [False]


def test_brain_extraction_of_stripped_input_reserves_one_slot(tmp_path):
    """An anchor that looks brain-extracted at build time gets a one-slot brain-extraction node
    (it will only detect); a whole head keeps the engine's omp_nthreads slots; unreadable
    input is left to the run."""
    stripped, head = tmp_path / "stripped.nii.gz", tmp_path / "head.nii.gz"
    tiny_image(shape=(40, 48, 40), zooms=(1.0, 1.0, 1.0), stripped=True).to_filename(stripped)
    tiny_image(shape=(40, 48, 40), zooms=(1.0, 1.0, 1.0)).to_filename(head)
    from synth7t.preprocess import detect_skull_stripped

    assert detect_skull_stripped(nib.load(stripped)) and not detect_skull_stripped(nib.load(head))
    assert anatomical.looks_stripped(stripped) and not anatomical.looks_stripped(head)
    assert not anatomical.looks_stripped(tmp_path / "missing.nii.gz")
    for expect, mode, slots in ((True, "auto", 1), (False, "auto", 2), (True, "force", 2),
                                (False, "skip", 1)):
        wf = anatomical.init_anat_preproc_wf(contrast="T1w", skull_strip=mode, omp_nthreads=2,
                                             expect_stripped=expect)
        assert wf.get_node("skull_strip").n_procs == slots, (expect, mode)
