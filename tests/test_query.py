"""BIDS querying (pybids), field-strength routing and input validation (fast)."""
from __future__ import annotations

import json

import pytest

from bids_app.exitcodes import (
    EX_BIDS_INVALID,
    EX_DATAERR,
    EX_NO_MATCH,
    EX_NOINPUT,
    EX_USAGE,
    Synth7tExit,
)
from bids_app.query import check_images, check_participants, collect_inputs, init_layout
from synth7t.fields import FieldStrengthError, route_field


# --------------------------------------------------------------------------- field routing
@pytest.mark.parametrize("raw, expected", [(1.5, 1.5), (2.89, 3.0), (0.064, 0.1), (3, 3.0),
                                           (5.0, 5.0), (1.494, 1.5), ("3", 3.0)])
def test_route_field_bins(raw, expected):
    routing = route_field(raw, where="sub-01_T1w.nii.gz")
    assert routing.bin == expected
    assert routing.raw == float(raw)
    assert routing.source == "sidecar" and not routing.passthrough


def test_route_field_missing_names_flag():
    with pytest.raises(FieldStrengthError, match="--field-strength"):
        route_field(None, where="sub-01/anat/sub-01_T1w.nii.gz")


def test_route_field_override_wins():
    routing = route_field(1.5, override=3, where="x")
    assert routing.bin == 3.0 and routing.source == "--field-strength"
    assert routing.raw == 1.5  # the sidecar value is still recorded
    assert route_field(None, override=3, where="x").raw == 3.0


def test_route_field_7t_passthrough():
    assert route_field(7.0, where="x").passthrough


# --------------------------------------------------------------------------- participants
def test_check_participants(bids_two_subjects):
    assert check_participants(bids_two_subjects, None) == ["01", "02"]
    assert check_participants(bids_two_subjects, ["02"]) == ["02"]
    with pytest.raises(Synth7tExit) as err:
        check_participants(bids_two_subjects, ["02", "zz9"])
    assert err.value.code == EX_NO_MATCH and "sub-zz9" in err.value.message


# --------------------------------------------------------------------------- queries
def _collect(root, participants=None, **kw):
    participants = participants or check_participants(root, None)
    return collect_inputs(init_layout(root, participants), participants, **kw)


def test_collect_contrasts_and_routing(tiny_bids):
    root = tiny_bids({"01": {"T1w": 2.89, "T2w": 3, "FLAIR": 3}, "02": {"T1w": 0.064}})
    items, errors = _collect(root)
    assert not errors
    assert [(i.subject, i.session, i.contrasts) for i in items] == [
        ("01", None, ["T1w", "T2w", "FLAIR"]), ("02", None, ["T1w"])]
    t1 = items[0].images["T1w"]
    assert t1.relpath == "sub-01/anat/sub-01_T1w.nii.gz"
    assert t1.uri == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert (t1.routing.raw, t1.routing.bin) == (2.89, 3.0)
    assert items[1].images["T1w"].routing.bin == 0.1
    summary = items[0].summary()
    assert summary["images"]["T1w"]["routing"]["bin_label"] == "3T"
    json.dumps(summary)


def test_collect_contrast_selection(tiny_bids):
    root = tiny_bids({"01": {"T1w": 3, "T2w": 3, "FLAIR": 3}})
    items, _ = _collect(root, contrasts=["FLAIR", "T2w"])
    assert items[0].contrasts == ["T2w", "FLAIR"]


def test_collect_sessions_and_labels(tiny_bids):
    root = tiny_bids({"01": {"ses-a": {"T1w": 3}, "ses-b": {"T1w": 1.5, "T2w": 1.5}},
                      "02": {"ses-a": {"T1w": 3}}})
    items, _ = _collect(root)
    assert [i.name for i in items] == ["sub-01_ses-a", "sub-01_ses-b", "sub-02_ses-a"]
    assert items[1].images["T2w"].routing.bin == 1.5
    items, _ = _collect(root, sessions=["b"])
    assert [i.name for i in items] == ["sub-01_ses-b"]
    with pytest.raises(Synth7tExit) as err:
        _collect(root, sessions=["zz"])
    assert err.value.code == EX_NO_MATCH and "ses-zz" in err.value.message


def test_sidecar_inheritance(tiny_bids):
    root = tiny_bids({"01": {"T1w": "inherit", "T2w": 1.5}},
                     top_sidecars={"T1w": {"MagneticFieldStrength": 5}})
    items, errors = _collect(root)
    assert not errors
    assert items[0].images["T1w"].routing.bin == 5.0
    assert items[0].images["T1w"].metadata["MagneticFieldStrength"] == 5


def test_missing_field_is_a_participant_error(tiny_bids):
    root = tiny_bids({"01": {"T1w": None}, "02": {"T1w": 3}})
    items, errors = _collect(root)
    assert [i.subject for i in items] == ["02"]
    (code, msg), = errors["01"]
    assert code == EX_DATAERR and "--field-strength" in msg and "sub-01_T1w.nii.gz" in msg
    items, errors = _collect(root, field_strength=3)
    assert not errors and [i.images["T1w"].routing.source for i in items] == \
        ["--field-strength"] * 2


def test_field_far_from_bins(tiny_bids):
    root = tiny_bids({"01": {"T1w": 11.7}})
    _, errors = _collect(root)
    assert errors["01"][0][0] == EX_DATAERR


def test_7t_passthrough_warns(tiny_bids):
    root = tiny_bids({"01": {"T1w": 7}})
    items, _ = _collect(root)
    assert items[0].images["T1w"].routing.passthrough
    assert any("7 T" in w for w in items[0].warnings)


def test_filters_and_runs(tiny_bids):
    root = tiny_bids({"01": {"T1w": [3, 3]}})
    items, _ = _collect(root)
    assert items[0].images["T1w"].relpath.endswith("run-1_T1w.nii.gz")
    assert items[0].ignored["T1w"] == ["sub-01/anat/sub-01_run-2_T1w.nii.gz"]
    assert items[0].warnings
    items, _ = _collect(root, bids_filters={"t1w": {"run": 2}})
    assert items[0].images["T1w"].relpath.endswith("run-2_T1w.nii.gz")
    with pytest.raises(Synth7tExit) as err:
        _collect(root, bids_filters={"t1w": {"run": 9}})
    assert err.value.code == EX_NO_MATCH
    with pytest.raises(Synth7tExit) as err:
        _collect(root, bids_filters={"t1w": {"notanentity": "x"}})
    assert err.value.code == EX_USAGE


def test_no_image_is_a_participant_error(tiny_bids):
    root = tiny_bids({"01": {"T1w": 3}, "02": {"T1w": 3}})
    items, errors = _collect(root, contrasts=["FLAIR"])
    assert not items and errors["01"][0][0] == EX_NOINPUT


def test_check_images(tiny_bids):
    root = tiny_bids({"01": {"T1w": 3}, "02": {"T1w": 3}})
    (root / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"not a nifti")
    items, _ = _collect(root)
    bad = check_images(items)
    assert list(bad) == ["sub-02"]
    code, msg = bad["sub-02"][0]
    assert code == EX_DATAERR and "sub-02_T1w.nii.gz" in msg and "\n" not in msg


# --------------------------------------------------------------------------- validation
def test_validator_reports_errors(tiny_bids):
    from bids_app.validation import validate_dataset

    root = tiny_bids({"01": {"T1w": 3}, "02": {"T1w": 3}})
    assert isinstance(validate_dataset(root), list)
    (root / "sub-02" / "anat" / "sub-02_bogus.json").write_text("{}")
    with pytest.raises(Synth7tExit) as err:
        validate_dataset(root)
    assert err.value.code == EX_BIDS_INVALID
    assert "sub-02_bogus.json" in err.value.message and "--skip-bids-validation" in \
        err.value.message
    # errors in another participant's folder do not block the selected one
    validate_dataset(root, ["01"])


def test_session_in_filter_file(tiny_bids):
    root = tiny_bids({"01": {"ses-a": {"T1w": 3}, "ses-b": {"T1w": 3, "T2w": 3}}})
    items, errors = _collect(root, bids_filters={"t1w": {"session": "b"}})
    assert [(i.name, i.contrasts) for i in items] == [("sub-01_ses-b", ["T1w", "T2w"])]
    assert not errors  # ses-a has nothing left, but the participant has a session to run
