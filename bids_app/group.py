"""The ``group`` analysis level: one table and one page for the whole study.

``synth7t bids_dir out_dir group`` reads what the participant runs left in ``out_dir`` (their run
records ``logs/sub-<label>/run-<uuid>.json``, the JSON sidecars of the synthetic images, the
report figures) and recomputes nothing. It writes, at the top of the derivatives:

``group_qc.tsv``
    One row per participant and session: status (``ok``, ``partial``, ``refused``, ``crashed``,
    ``not run``) and the reason, the participant's exit code, contrasts, source field strength,
    field bin and where it came from, model name and version, the QC values of the run record
    (:mod:`bids_app.qc`: ``BrainVolumeML``, ``RegistrationDice``, per contrast
    ``<C>_NoiseReduction``, ``<C>_TissueAgreementDice``), every other numeric value found in the
    run record's ``qc`` or at the top level of the synthetic image's sidecar (``<C>_<key>``, e.g.
    ``T1w_UncertaintyMeanBrain``), the input's protocol from its BIDS sidecar (``<C>_TR_ms``,
    ``<C>_TE_ms``, ``<C>_TI_ms``, ``<C>_FA_deg``: a participant scanned off the study's protocol
    is an outlier there), run time, and the outlier flags. Missing values are ``n/a``.
``group_qc.json``
    A BIDS-style description of every column (``Description``, ``Units``, ``Levels``).
``group.html``
    The table (click a header to sort, type to filter, pick a status), a distribution of every
    numeric column (one dot per participant/session, median and the robust-z = 3 limits) with
    the outliers flagged, and a thumbnail per row linking to the participant's report. The page
    is self-contained: thumbnails are inline (base64 JPEG), plots are inline SVG, the script is
    inline; it needs no network and opens from disk.

Outliers: for each numeric column, over the rows that have a value (at least
:data:`MIN_VALUES`), the robust z-score of a value ``x`` is
``z = (x - median) / (1.4826 * MAD)`` with ``MAD = median(|x - median|)`` (1.4826 makes it a
standard deviation for normal data; when MAD is 0 the mean absolute deviation times 1.2533 is
used). ``|z| > 3`` flags the value.

Participants present in ``bids_dir`` without a run record are listed as ``not run``; run records
of participants no longer in ``bids_dir`` are kept and said so. A partially finished study is the
normal case: the page and the log say what is missing, and the exit code is 0 as long as the
three files were written (66 when there is nothing at all to report, 18 when a
``--participant-label`` matches nothing, 73 when they cannot be written).
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from synth7t.io import PROTOCOL_UNITS

from .exitcodes import EX_CANTCREAT, EX_NO_MATCH, EX_NOINPUT, EX_OK, Synth7tExit

LOGGER = logging.getLogger("synth7t")

#: Robust z-score above which a value is flagged.
OUTLIER_Z = 3.0
#: A column needs this many values before outliers are looked for.
MIN_VALUES = 5
#: Width of the thumbnails (pixels).
THUMB_WIDTH = 360
#: Session-level QC keys (one value per participant/session, not per contrast).
SESSION_QC = ("BrainVolumeML", "RegistrationDice")
#: Numeric sidecar keys that are provenance, not QC.
SIDECAR_SKIP = {"MagneticFieldStrength", "SourceMagneticFieldStrength", "SourceFieldBin",
                "RandomSeed", "UncertaintyThreshold", "UncertaintyOODThreshold"}
#: The input's acquisition protocol (run record ``inputs[].protocol``, from its BIDS sidecar):
#: column suffix, description, units. A participant scanned off the study's protocol stands out
#: as an outlier of these columns.
PROTOCOL_COLUMNS = {k: (f"{k}_{PROTOCOL_UNITS[k]}", desc, PROTOCOL_UNITS[k]) for k, desc in (
    ("TR", "repetition time (RepetitionTime of its sidecar)"),
    ("TE", "echo time (EchoTime; the first echo of a list)"),
    ("TI", "inversion time (InversionTime)"), ("FA", "flip angle (FlipAngle)"))}
#: The same, by column suffix: description and units.
_PROTOCOL_BY_SUFFIX = {col: (desc, unit) for col, desc, unit in PROTOCOL_COLUMNS.values()}
STATUSES = ("ok", "partial", "refused", "crashed", "not run")
GROUP_FILES = ("group_qc.tsv", "group_qc.json", "group.html")

_FIXED = {
    "participant_id": ("Participant label", None),
    "session_id": ("Session label (n/a: the dataset has no sessions or none was run)", None),
    "status": ("Outcome of the newest participant-level run covering this row", None),
    "reason": ("Why the row is not ok: the error lines of the run record (file named), or "
               "what is missing", None),
    "exit_code": ("This participant's exit code (0 ok, 1 crashed, 16 BIDS validation, 65 bad "
                  "data, 66 input missing, 18 no match)", None),
    "contrasts": ("Contrasts processed (comma-separated)", None),
    "source_field": ("MagneticFieldStrength of the input (raw value; per contrast when they "
                     "differ)", "T"),
    "field_bin": ("Supported field bin the input was routed to", "T"),
    "field_source": ("Where the field strength came from (sidecar, --field-strength, ...)",
                     None),
    "model": ("Synthesis model name(s)", None),
    "model_version": ("Synthesis model version(s)", None),
    "run_seconds": ("Wall time of the participant-level run that produced the row (shared by "
                    "every participant of that run; n/a when nothing was processed)", "s"),
    "run_end": ("End of that run (ISO 8601, UTC)", None),
    "run_uuid": ("Identifier of that run (logs/sub-<label>/run-<uuid>.json)", None),
    "report": ("The participant's HTML report, relative to the derivatives folder", None),
    "outliers": (f"Numeric columns of this row with a robust z-score above {OUTLIER_Z:g} "
                 "(z in brackets)", None),
}


@dataclass
class Row:
    """One participant/session of the table."""

    values: dict
    thumb: Path | None = None
    zscores: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_records(out_dir: Path, participants: list[str] | None = None) -> dict[str, list[dict]]:
    """``{label: [run record, ...]}`` newest first (by ``end_time``, then file time)."""
    out: dict[str, list[dict]] = {}
    logs = Path(out_dir) / "logs"
    for folder in sorted(logs.glob("sub-*")) if logs.is_dir() else []:
        label = folder.name[4:]
        if participants and label not in participants:
            continue
        recs = []
        for f in folder.glob("run-*.json"):
            rec = _read_json(f)
            if rec is None:
                LOGGER.warning("%s: not a readable run record; skipped", f)
                continue
            try:
                mtime = f.stat().st_mtime
            except OSError:
                mtime = 0.0
            rec["_path"] = f
            recs.append((str(rec.get("end_time") or ""), mtime, rec))
        if recs:
            recs.sort(key=lambda t: (t[0], t[1]), reverse=True)
            out[label] = [r for _, _, r in recs]
    return out


def dataset_sessions(bids_dir: Path | None, participants: list[str] | None = None
                     ) -> dict[str, list[str | None]]:
    """``{label: [session, ...]}`` from the folder names of the input dataset (no indexing)."""
    if bids_dir is None or not Path(bids_dir).is_dir():
        return {}
    out = {}
    for p in sorted(Path(bids_dir).glob("sub-*")):
        if not p.is_dir() or (participants and p.name[4:] not in participants):
            continue
        ses = sorted(s.name[4:] for s in p.glob("ses-*") if s.is_dir())
        out[p.name[4:]] = ses or [None]
    return out


def _sidecar_numbers(out_dir: Path, der: dict) -> dict:
    """Numeric (and true/false) top-level values of the synthetic image's sidecar.

    Provenance keys (:data:`SIDECAR_SKIP`) are left out; flags such as
    ``UncertaintyOutOfDistribution`` become ``true``/``false`` text columns.
    """
    rel = der.get("synth") or der.get("synth_native")
    if not rel:
        return {}
    side = _read_json(Path(out_dir) / (str(rel).rsplit(".nii", 1)[0] + ".json")) or {}
    out = {}
    for k, v in side.items():
        if k in SIDECAR_SKIP:
            continue
        if _is_number(v):
            out[k] = v
        elif isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, dict) and k in ("QC", "QualityMetrics", "Uncertainty"):
            out.update({f"{k}{kk}": vv for kk, vv in v.items() if _is_number(vv)})
    return out


def _join(values) -> str:
    vals = [str(v) for v in dict.fromkeys(v for v in values if v not in (None, ""))]
    return ",".join(vals) if vals else "n/a"


def _field_value(inputs: list[dict], key: str):
    vals = {i["contrast"]: (i.get("field") or {}).get(key) for i in inputs}
    distinct = set(map(str, vals.values()))
    if len(distinct) == 1:
        v = next(iter(vals.values()))
        return v if v is not None else "n/a"
    return ";".join(f"{c}:{v}" for c, v in vals.items())


def rows_of_record(rec: dict, out_dir: Path) -> dict[str | None, Row]:
    """Rows (per session) of one run record."""
    label = str(rec.get("participant"))
    inputs = [i for i in rec.get("inputs") or [] if isinstance(i, dict)]
    status = rec.get("status") or "n/a"
    errors = [str(e) for e in rec.get("errors") or []]
    report = f"sub-{label}.html" if (Path(out_dir) / f"sub-{label}.html").is_file() else "n/a"
    by_session: dict = {}
    for i in inputs:
        by_session.setdefault(i.get("session"), []).append(i)
    if not by_session:
        by_session[None] = []
    rows = {}
    for session, items in by_session.items():
        v = {
            "participant_id": f"sub-{label}",
            "session_id": f"ses-{session}" if session else "n/a",
            "status": status,
            "reason": "; ".join(errors) if errors else "n/a",
            "exit_code": rec.get("exit_code", 0 if status == "ok" else "n/a"),
            "contrasts": _join(i.get("contrast") for i in items),
            "source_field": _field_value(items, "raw") if items else "n/a",
            "field_bin": _field_value(items, "bin") if items else "n/a",
            "field_source": _field_value(items, "source") if items else "n/a",
            "model": _join((i.get("model") or {}).get("Name") for i in items),
            "model_version": _join((i.get("model") or {}).get("Version") for i in items),
            "run_seconds": rec.get("elapsed_seconds", "n/a") if items else "n/a",
            "run_end": rec.get("end_time") or "n/a",
            "run_uuid": rec.get("run_uuid") or "n/a",
            "report": report,
        }
        for i in items:
            c = i.get("contrast", "?")
            if i.get("error"):
                v["reason"] = "; ".join(x for x in (v["reason"], f"{c}: {i['error']}")
                                        if x != "n/a")
            qc = {k: x for k, x in (i.get("qc") or {}).items() if _is_number(x)}
            for k in SESSION_QC:
                if k in qc:
                    v.setdefault(k, qc[k])
            for k, x in qc.items():
                if k not in SESSION_QC:
                    v[f"{c}_{k}"] = x
            for k, x in (i.get("protocol") or {}).items():
                if k in PROTOCOL_COLUMNS and _is_number(x):
                    v[f"{c}_{PROTOCOL_COLUMNS[k][0]}"] = x
            for k, x in _sidecar_numbers(out_dir, i.get("derivatives") or {}).items():
                v.setdefault(f"{c}_{k}", x)
        rows[session] = Row(v, thumb=_thumbnail_source(out_dir, label, session, items))
    return rows


def _figure_of(out_dir: Path, label: str, session, contrasts) -> Path | None:
    """The report's axial input/synthetic mosaic of a participant/session (anchor first)."""
    figs = Path(out_dir) / f"sub-{label}" / "figures"
    if not figs.is_dir():
        return None
    ent = f"sub-{label}" + (f"_ses-{session}" if session else "")
    for c in list(contrasts) + ["*"]:
        for f in sorted(figs.glob(f"{ent}_desc-synth7Taxial_{c}.png")):
            return f
    return None


def thumbnail_path(figure: Path) -> Path:
    """Where the participant level stores the thumbnail of ``figure`` (beside it, JPEG)."""
    return figure.with_name(figure.name.replace("_desc-synth7Taxial_", "_desc-thumbnail_")
                            .rsplit(".", 1)[0] + ".jpg")


def _thumbnail_source(out_dir: Path, label: str, session, items) -> Path | None:
    """The stored thumbnail when it is newer than its figure, else the figure itself."""
    fig = _figure_of(out_dir, label, session, [i.get("contrast") for i in items])
    if fig is None:
        return None
    thumb = thumbnail_path(fig)
    try:
        if thumb.stat().st_mtime >= fig.stat().st_mtime:
            return thumb
    except OSError:
        pass
    return fig


def thumbnail_jpeg(figure: Path) -> bytes:
    """A :data:`THUMB_WIDTH` px wide JPEG of a report figure."""
    from PIL import Image

    with Image.open(figure) as im:
        im = im.convert("RGB") if im.mode not in ("RGB", "L") else im
        w, h = im.size
        if w >= 2 * THUMB_WIDTH:
            im = im.reduce(w // THUMB_WIDTH)  # box filter by an integer factor (fast)
            w, h = im.size
        if w > THUMB_WIDTH:
            im = im.resize((THUMB_WIDTH, max(1, round(h * THUMB_WIDTH / w))),
                           Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def write_thumbnails(out_dir: Path, info: dict) -> list[Path]:
    """Participant level: store one thumbnail per session beside the report's figures.

    The group level then only inlines these bytes (it also makes them itself, in memory, for
    outputs of older runs). Never raises.
    """
    from synth7t.io import atomic_write_bytes

    label = str(info.get("participant"))
    sessions: dict = {}
    for i in info.get("inputs") or []:
        sessions.setdefault(i.get("session"), []).append(i.get("contrast"))
    written = []
    for session, contrasts in sessions.items():
        fig = _figure_of(out_dir, label, session, contrasts)
        if fig is None:
            continue
        try:
            written.append(atomic_write_bytes(thumbnail_jpeg(fig), thumbnail_path(fig)))
        except Exception as exc:  # noqa: BLE001 - a thumbnail must never cost the run
            LOGGER.warning("%s: no thumbnail (%s: %s)", fig, type(exc).__name__, exc)
    return written


def collect_rows(out_dir: Path, bids_dir: Path | None = None,
                 participants: list[str] | None = None) -> tuple[list[Row], dict]:
    """All rows of the study and what is missing (``not_run``, ``not_in_dataset``)."""
    records = read_records(out_dir, participants)
    in_dataset = dataset_sessions(bids_dir, participants)
    rows: list[Row] = []
    missing = {"not_run": [], "not_in_dataset": []}
    for label in sorted(set(records) | set(in_dataset)):
        recs = records.get(label, [])
        got: dict = {}
        if recs:
            got = rows_of_record(recs[0], out_dir)
            if None not in got:  # a session run: older records may cover other sessions
                for rec in recs[1:]:
                    for ses, row in rows_of_record(rec, out_dir).items():
                        if ses is not None and ses not in got:
                            got[ses] = row
        expected = in_dataset.get(label)
        if recs and expected is None and bids_dir is not None and Path(bids_dir).is_dir():
            missing["not_in_dataset"].append(f"sub-{label}")
        for ses in expected or []:
            if ses in got:
                continue
            if None in got and got[None].values["status"] in ("refused", "crashed"):
                continue  # the whole participant is already listed as refused/crashed
            name = f"sub-{label}" + (f"_ses-{ses}" if ses else "")
            missing["not_run"].append(name)
            got[ses] = Row({"participant_id": f"sub-{label}",
                            "session_id": f"ses-{ses}" if ses else "n/a",
                            "status": "not run",
                            "reason": "no participant-level run record in logs/"
                                      f"sub-{label}/", "exit_code": "n/a",
                            "report": "n/a"})
        rows += [got[k] for k in sorted(got, key=lambda s: "" if s is None else str(s))]
    return rows, missing


# --------------------------------------------------------------------------- statistics
def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def robust_z(values: list[float]) -> list[float]:
    """``(x - median) / (1.4826 * MAD)`` (mean absolute deviation x 1.2533 if MAD is 0)."""
    med = _median(values)
    dev = [abs(x - med) for x in values]
    scale = 1.4826 * _median(dev)
    if scale <= 0:
        scale = 1.2533 * (sum(dev) / len(dev))
    if scale <= 0:
        return [0.0] * len(values)
    return [(x - med) / scale for x in values]


def numeric_columns(rows: list[Row], columns: list[str]) -> list[str]:
    out = []
    for c in columns:
        vals = [r.values.get(c) for r in rows if r.values.get(c) not in (None, "n/a")]
        if vals and all(_is_number(v) for v in vals) and c != "exit_code":
            out.append(c)
    return out


def flag_outliers(rows: list[Row], columns: list[str]) -> dict[str, dict]:
    """Robust z of every value of every numeric column; returns per-column statistics."""
    stats = {}
    for c in columns:
        idx = [k for k, r in enumerate(rows) if _is_number(r.values.get(c))]
        vals = [float(rows[k].values[c]) for k in idx]
        med = _median(vals) if vals else float("nan")
        mad = _median([abs(x - med) for x in vals]) if vals else float("nan")
        st = {"n": len(vals), "median": med, "mad": mad, "outliers": []}
        if len(vals) >= MIN_VALUES:
            for k, z in zip(idx, robust_z(vals)):
                rows[k].zscores[c] = z
                if abs(z) > OUTLIER_Z:
                    st["outliers"].append(k)
        stats[c] = st
    for r in rows:
        flags = [f"{c}({z:+.1f})" for c, z in r.zscores.items() if abs(z) > OUTLIER_Z]
        r.values["outliers"] = ",".join(flags) if flags else "n/a"
    return stats


# --------------------------------------------------------------------------- columns
def ordered_columns(rows: list[Row]) -> list[str]:
    head = ["participant_id", "session_id", "status", "reason", "exit_code", "contrasts",
            "source_field", "field_bin", "field_source", "model", "model_version"]
    tail = ["run_seconds", "run_end", "run_uuid", "report", "outliers"]
    seen = set(head) | set(tail)
    extra = []
    for r in rows:
        for k in r.values:
            if k not in seen:
                seen.add(k)
                extra.append(k)
    session = [k for k in SESSION_QC if k in extra]
    per = sorted((k for k in extra if k not in SESSION_QC),
                 key=lambda k: (_contrast_rank(k), k))
    return head + session + per + tail


def _contrast_rank(key: str) -> int:
    for n, c in enumerate(("T1w", "T2w", "FLAIR")):
        if key.startswith(c + "_"):
            return n
    return 3


def describe_columns(columns: list[str]) -> dict:
    """The ``group_qc.json`` sidecar: a description of every column."""
    from .qc import QC_DESCRIPTIONS

    out = {}
    for c in columns:
        if c in _FIXED:
            desc, units = _FIXED[c]
        elif c in QC_DESCRIPTIONS:
            desc, units = QC_DESCRIPTIONS[c]
            desc += " (run record, logs/sub-<label>/run-<uuid>.json: inputs[].qc)"
        else:
            contrast, _, key = c.partition("_")
            if key in _PROTOCOL_BY_SUFFIX:
                desc, units = _PROTOCOL_BY_SUFFIX[key]
                desc = f"{contrast} input's {desc} (run record: inputs[].protocol)"
            elif key in QC_DESCRIPTIONS:
                desc, units = QC_DESCRIPTIONS[key]
                desc = f"{contrast}: {desc} (run record: inputs[].qc)"
            else:
                desc, units = (f"{key} of the {contrast} input: numeric (or true/false) "
                               "value from the run record's qc or the synthetic image's JSON "
                               "sidecar"), None
        entry = {"Description": desc}
        if units:
            entry["Units"] = units
        out[c] = entry
    out["status"]["Levels"] = {
        "ok": "every input processed", "partial": "some inputs refused, the others processed",
        "refused": "not processed: BIDS validation error, bad data or missing input (reason)",
        "crashed": "a Nipype node crashed (reason; crash files in logs/sub-<label>/)",
        "not run": "in the dataset, but no participant-level run record yet"}
    out["outliers"]["Description"] += (
        f"; robust z = (x - median) / (1.4826 * MAD) over the rows with a value (at least "
        f"{MIN_VALUES}), MAD = median absolute deviation")
    return out


def _fmt(v) -> str:
    if v is None or v == "":
        return "n/a"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("\t", " ").replace("\n", " ")


def to_tsv(rows: list[Row], columns: list[str]) -> str:
    lines = ["\t".join(columns)]
    lines += ["\t".join(_fmt(r.values.get(c)) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML
def thumbnail_uri(path: Path | None) -> str | None:
    """A stored JPEG thumbnail, or a report figure made small, as a ``data:`` URI."""
    if path is None:
        return None
    try:
        data = path.read_bytes() if path.suffix == ".jpg" else thumbnail_jpeg(path)
    except Exception as exc:  # noqa: BLE001 - a bad figure costs its thumbnail only
        LOGGER.warning("%s: no thumbnail (%s)", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


_E = html.escape

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222}
nav{position:sticky;top:0;background:#24292e;padding:.5em 1em;z-index:2}
nav a{color:#fff;margin-right:1.5em;text-decoration:none;font-weight:600}
main{padding:0 1.5em 3em}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:.2em .45em;vertical-align:top;text-align:left}
th{background:#f6f8fa;cursor:pointer;position:sticky;top:2.3em;white-space:nowrap}
th.sorted-asc::after{content:" \\25B2"} th.sorted-desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.out{background:#fdecea;color:#b71c1c;font-weight:600}
tr.st-refused td.st,tr.st-crashed td.st{color:#b71c1c;font-weight:600}
tr.st-notrun td.st{color:#888;font-style:italic} tr.st-partial td.st{color:#e65100}
td.reason{min-width:16em;max-width:32em;font-size:.9em;overflow-wrap:anywhere}
img.thumb{width:180px;display:block;background:#000}
.dist{display:inline-block;margin:.4em 1.2em .8em 0;vertical-align:top}
.dist h3{font-size:.95em;margin:.2em 0}
.note{color:#555;font-size:.92em;max-width:70em}
.miss{background:#fff8e1;border-left:4px solid #f0ad4e;padding:.4em .8em;margin:.3em 0}
#filters{margin:.6em 0} #filter{width:22em}
"""

_JS = """
(function(){
  var table=document.getElementById('qc'), body=table.tBodies[0];
  var rows=Array.prototype.slice.call(body.rows);
  var heads=table.tHead.rows[0].cells, state={col:-1,dir:1};
  function key(cell){var v=cell.getAttribute('data-v'); if(v===null) v=cell.textContent;
    var n=parseFloat(v); return (v!=='' && v!=='n/a' && !isNaN(n) && isFinite(v))?[0,n]:[1,v];}
  function cmp(a,b){if(a[0]!==b[0]) return a[0]-b[0]; return a[1]<b[1]?-1:a[1]>b[1]?1:0;}
  Array.prototype.forEach.call(heads,function(th,i){
    th.addEventListener('click',function(){
      state.dir=(state.col===i)?-state.dir:1; state.col=i;
      Array.prototype.forEach.call(heads,function(h){h.className='';});
      th.className=state.dir>0?'sorted-asc':'sorted-desc';
      rows.sort(function(a,b){var ka=key(a.cells[i]), kb=key(b.cells[i]);
        var na=(ka[1]==='n/a'), nb=(kb[1]==='n/a');
        if(na!==nb) return na?1:-1;  /* missing values last, both directions */
        return state.dir*cmp(ka,kb);});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  var text=document.getElementById('filter'), status=document.getElementById('status'),
      outl=document.getElementById('onlyout'), shown=document.getElementById('shown');
  function apply(){
    var q=text.value.toLowerCase(), s=status.value, o=outl.checked, n=0;
    rows.forEach(function(r){
      var ok=(!q||r.textContent.toLowerCase().indexOf(q)>=0)&&(!s||r.getAttribute('data-status')===s)
             &&(!o||r.getAttribute('data-outlier')==='1');
      r.style.display=ok?'':'none'; if(ok) n++;
    });
    shown.textContent=n+' of '+rows.length+' rows';
  }
  text.addEventListener('input',apply); status.addEventListener('change',apply);
  outl.addEventListener('change',apply); apply();
})();
"""


def _svg_distribution(rows: list[Row], col: str, st: dict) -> str:
    """Strip plot: one dot per row, median line, robust-z = +-3 limits, outliers red."""
    pts = [(r.values["participant_id"] + ("" if r.values.get("session_id") in (None, "n/a")
                                          else "_" + r.values["session_id"]),
            float(r.values[col]), r.zscores.get(col)) for r in rows
           if _is_number(r.values.get(col))]
    if not pts:
        return ""
    w, h, pad = 420, 90, 12
    lo = min(p[1] for p in pts)
    hi = max(p[1] for p in pts)
    med, mad = st["median"], st["mad"]
    limits = []
    if st["n"] >= MIN_VALUES:
        scale = 1.4826 * mad
        if scale <= 0:
            dev = [abs(p[1] - med) for p in pts]
            scale = 1.2533 * sum(dev) / len(dev)
        if scale > 0:
            limits = [med - OUTLIER_Z * scale, med + OUTLIER_Z * scale]
    lo, hi = min([lo] + limits), max([hi] + limits)
    span = (hi - lo) or 1.0

    def x(v):
        return pad + (w - 2 * pad) * (v - lo) / span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'role="img" aria-label="{_E(col)} distribution">',
             f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fafafa" stroke="#ddd"/>']
    for lim in limits:
        parts.append(f'<line x1="{x(lim):.1f}" x2="{x(lim):.1f}" y1="8" y2="{h - 22}" '
                     'stroke="#d9534f" stroke-dasharray="3,3"><title>robust z = '
                     f'{"+" if lim > med else "-"}{OUTLIER_Z:g}: {lim:.4g}</title></line>')
    parts.append(f'<line x1="{x(med):.1f}" x2="{x(med):.1f}" y1="8" y2="{h - 22}" '
                 f'stroke="#333" stroke-width="2"><title>median {med:.4g}</title></line>')
    for k, (name, v, z) in enumerate(pts):
        out = z is not None and abs(z) > OUTLIER_Z
        y = 14 + (k * 37 % 41)  # deterministic jitter
        ztxt = f", robust z {z:+.2f}" if z is not None else ""
        parts.append(f'<circle cx="{x(v):.1f}" cy="{y}" r="{4 if out else 3}" '
                     f'fill="{"#d32f2f" if out else "#1565c0"}" fill-opacity="0.75">'
                     f'<title>{_E(name)}: {v:.4g}{ztxt}</title></circle>')
        if out:
            anchor = "end" if x(v) > w - 60 else "start" if x(v) < 60 else "middle"
            parts.append(f'<text x="{x(v):.1f}" y="{y - 6}" font-size="9" fill="#b71c1c" '
                         f'text-anchor="{anchor}">{_E(name)}</text>')
    parts.append(f'<text x="{pad}" y="{h - 6}" font-size="10" fill="#555">{lo:.4g}</text>')
    parts.append(f'<text x="{w - pad}" y="{h - 6}" font-size="10" fill="#555" '
                 f'text-anchor="end">{hi:.4g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(rows: list[Row], columns: list[str], numeric: list[str], stats: dict,
            missing: dict, *, title: str, counts: dict, thumbs: list[str | None]) -> str:
    shown = [c for c in columns if c not in ("run_uuid",)]
    head = "<th>thumbnail</th>" + "".join(f"<th>{_E(c)}</th>" for c in shown)
    body = []
    for r, thumb in zip(rows, thumbs):
        v = r.values
        st = str(v.get("status", "n/a"))
        is_out = any(abs(z) > OUTLIER_Z for z in r.zscores.values())
        cells = []
        rep = v.get("report")
        link = rep if rep not in (None, "n/a") else None
        if thumb:
            img = (f'<img class="thumb" src="{thumb}" alt="{_E(v["participant_id"])} '
                   'synthetic 7T">')
            if link:
                img = f'<a href="{_E(link)}">{img}</a>'
            cells.append(f'<td data-v="">{img}</td>')
        else:
            cells.append('<td data-v="">n/a</td>')
        for c in shown:
            val = v.get(c)
            text = _fmt(val)
            cls = []
            attrs = ""
            if c in numeric and _is_number(val):
                cls.append("num")
                attrs = f' data-v="{val!r}"'
                z = r.zscores.get(c)
                if z is not None and abs(z) > OUTLIER_Z:
                    cls.append("out")
                    attrs += f' title="robust z = {z:+.2f}"'
            if c == "status":
                cls.append("st")
            if c == "reason":
                cls.append("reason")
            content = _E(text)
            if c in ("participant_id", "report") and link:
                content = f'<a href="{_E(link)}">{_E(text)}</a>'
            cells.append(f'<td class="{" ".join(cls)}"{attrs}>{content}</td>')
        body.append(f'<tr class="st-{st.replace(" ", "")}" data-status="{_E(st)}" '
                    f'data-outlier="{1 if is_out else 0}">{"".join(cells)}</tr>')
    options = "".join(f'<option value="{_E(s)}">{_E(s)} ({counts.get(s, 0)})</option>'
                      for s in STATUSES if counts.get(s))
    miss = []
    if missing.get("not_run"):
        miss.append(f'<div class="miss"><b>Not run yet ({len(missing["not_run"])}):</b> '
                    + _E(", ".join(missing["not_run"])) + "</div>")
    if missing.get("not_in_dataset"):
        miss.append(f'<div class="miss"><b>Run records of participants not in the dataset '
                    f'({len(missing["not_in_dataset"])}):</b> '
                    + _E(", ".join(missing["not_in_dataset"])) + "</div>")
    dists = []
    for c in numeric:
        st = stats[c]
        svg = _svg_distribution(rows, c, st)
        if not svg:
            continue
        n_out = len(st["outliers"])
        dists.append(f'<div class="dist"><h3>{_E(c)} <small>(n={st["n"]}, median '
                     f'{st["median"]:.4g}{", " + str(n_out) + " outlier(s)" if n_out else ""}'
                     f')</small></h3>{svg}</div>')
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts.get(s))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_E(title)}</title><style>{_CSS}</style></head>
<body><nav><a href="#summary">Summary</a><a href="#distributions">Distributions</a>
<a href="#table">Table</a></nav><main>
<h1>{_E(title)}</h1>
<section id="summary"><h2>Summary</h2>
<p>{len(rows)} participant/session row(s): {_E(summary or "none")}.
Written by <code>synth7t bids_dir out_dir group</code> from the participant-level run records
(<code>logs/sub-*/run-*.json</code>) and sidecars; nothing was recomputed. The same table is in
<code>group_qc.tsv</code>, its columns are described in <code>group_qc.json</code>.</p>
{''.join(miss)}
<p class="note">Outliers: for each numeric column, over the rows that have a value (at least
{MIN_VALUES}), the robust z-score is z = (x &minus; median) / (1.4826 &times; MAD), MAD being the
median absolute deviation from the median (1.4826 makes it a standard deviation for normal data;
if MAD is 0, 1.2533 &times; the mean absolute deviation is used). |z| &gt; {OUTLIER_Z:g} is
flagged in red here and in the <code>outliers</code> column.</p></section>
<section id="distributions"><h2>Distributions</h2>
<p class="note">One dot per participant/session (hover for its name and z); black: median;
dashed red: robust z = &plusmn;{OUTLIER_Z:g}; red dots: outliers.</p>
{''.join(dists) or '<p class="note">No numeric values yet.</p>'}</section>
<section id="table"><h2>Table</h2>
<div id="filters">Filter: <input id="filter" type="search" placeholder="text in any cell">
Status: <select id="status"><option value="">all</option>{options}</select>
<label><input id="onlyout" type="checkbox"> outliers only</label>
<span id="shown"></span></div>
<p class="note">Click a column header to sort; click a thumbnail or a participant to open its
report.</p>
<table id="qc"><thead><tr>{head}</tr></thead><tbody>
{''.join(body)}
</tbody></table></section>
</main><script>{_JS}</script></body></html>
"""


# --------------------------------------------------------------------------- entry point
def build_group(out_dir: Path, bids_dir: Path | None = None,
                participants: list[str] | None = None) -> dict:
    """Collect, score and write the three group files; returns a summary dict."""
    from synth7t.io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    rows, missing = collect_rows(out_dir, bids_dir, participants)
    if not rows:
        raise Synth7tExit(EX_NOINPUT, f"nothing to report in {out_dir}: no run records under "
                          f"{out_dir / 'logs'} and no participants in {bids_dir}; run the "
                          "participant level first")
    columns = ordered_columns(rows)
    numeric = numeric_columns(rows, columns)
    stats = flag_outliers(rows, numeric)
    counts: dict = {}
    for r in rows:
        counts[r.values["status"]] = counts.get(r.values["status"], 0) + 1
    thumbs = [thumbnail_uri(r.thumb) for r in rows]
    title = f"synth7t group report: {out_dir.name}"
    desc = _read_json(out_dir / "dataset_description.json") or {}
    if desc.get("Name"):
        title = f"synth7t group report: {desc['Name']}"
    page = to_html(rows, columns, numeric, stats, missing, title=title, counts=counts,
                   thumbs=thumbs)
    try:
        atomic_write_text(to_tsv(rows, columns), out_dir / "group_qc.tsv")
        atomic_write_json(describe_columns(columns), out_dir / "group_qc.json")
        atomic_write_text(page, out_dir / "group.html")
        ignore = out_dir / ".bidsignore"
        lines = ignore.read_text().splitlines() if ignore.exists() else []
        new = [f for f in GROUP_FILES if f not in lines]
        if new:
            atomic_write_text("\n".join(lines + new) + "\n", ignore)
    except OSError as exc:
        raise Synth7tExit(EX_CANTCREAT, f"cannot write the group files into {out_dir}: "
                          f"{exc.strerror or exc}") from None
    outliers = {c: [rows[k].values["participant_id"]
                    + ("" if rows[k].values.get("session_id") in (None, "n/a")
                       else "_" + rows[k].values["session_id"]) for k in st["outliers"]]
                for c, st in stats.items() if st["outliers"]}
    return {"rows": len(rows), "counts": counts, "missing": missing, "outliers": outliers,
            "columns": columns, "numeric": numeric}


def run_group(opts, argv: list[str] | None = None) -> int:
    """``synth7t bids_dir out_dir group``: write group_qc.tsv/.json and group.html."""
    t0 = time.monotonic()
    out_dir = opts.output_dir
    if not Path(out_dir).is_dir():
        raise Synth7tExit(EX_NOINPUT, f"the derivatives folder {out_dir} does not exist; run "
                          "the participant level first")
    bids_dir = opts.bids_dir
    if not Path(bids_dir).is_dir():
        LOGGER.warning("the BIDS dataset %s does not exist: participants that were never run "
                       "cannot be listed", bids_dir)
    if opts.participant_label:
        known = set(read_records(out_dir, opts.participant_label)) | set(
            dataset_sessions(bids_dir, opts.participant_label))
        unknown = [f"sub-{p}" for p in opts.participant_label if p not in known]
        if unknown:
            raise Synth7tExit(EX_NO_MATCH, "participant label(s) matched nothing in "
                              f"{bids_dir} or {out_dir / 'logs'}: {', '.join(unknown)}")
    res = build_group(out_dir, bids_dir, opts.participant_label)
    for name in res["missing"]["not_run"]:
        LOGGER.warning("%s: not run yet (no run record)", name)
    for name in res["missing"]["not_in_dataset"]:
        LOGGER.warning("%s: has a run record but is not in %s", name, bids_dir)
    for col, names in res["outliers"].items():
        LOGGER.warning("outlier(s) in %s (robust z > %g): %s", col, OUTLIER_Z, ", ".join(names))
    counts = ", ".join(f"{res['counts'][s]} {s}" for s in STATUSES if res["counts"].get(s))
    LOGGER.info("group level in %.1f s: %d row(s): %s; %d outlier value(s); wrote %s",
                time.monotonic() - t0, res["rows"], counts,
                sum(len(v) for v in res["outliers"].values()),
                ", ".join(str(Path(out_dir) / f) for f in GROUP_FILES))
    return EX_OK
