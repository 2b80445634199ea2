"""BIDS querying with pybids: which images to process, and the field strength of each."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from synth7t.fields import CONTRASTS, FieldRouting, FieldStrengthError, bin_label, route_field

from .exitcodes import EX_DATAERR, EX_NO_MATCH, EX_NOINPUT, EX_USAGE, Synth7tExit

LOGGER = logging.getLogger("synth7t")

#: Base pybids query per contrast (the keys of --bids-filter-file are the lower-case names).
DEFAULT_QUERIES: dict[str, dict] = {
    c: {"datatype": "anat", "suffix": c, "extension": [".nii", ".nii.gz"]} for c in CONTRASTS
}


@dataclass
class InputImage:
    """One raw image to process."""

    contrast: str
    path: Path
    relpath: str  # POSIX path relative to the BIDS root, e.g. sub-01/anat/sub-01_T1w.nii.gz
    metadata: dict
    routing: FieldRouting

    @property
    def uri(self) -> str:
        """BIDS URI of the image in the raw dataset (``DatasetLinks.raw``)."""
        return f"bids:raw:{self.relpath}"


@dataclass
class SessionInputs:
    """Everything one participant/session graph needs from the BIDS dataset."""

    subject: str
    session: str | None
    images: dict[str, InputImage] = field(default_factory=dict)  # contrast -> image
    ignored: dict[str, list[str]] = field(default_factory=dict)  # contrast -> unused files
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def contrasts(self) -> list[str]:
        return [c for c in CONTRASTS if c in self.images]

    def summary(self) -> dict:
        """JSON-serialisable description (run config, run info, report)."""
        return {
            "subject": self.subject,
            "session": self.session,
            "images": {
                c: {
                    "file": img.relpath,
                    "MagneticFieldStrength": img.metadata.get("MagneticFieldStrength"),
                    "routing": {
                        "raw": img.routing.raw, "bin": img.routing.bin,
                        "bin_label": bin_label(img.routing.bin),
                        "source": img.routing.source, "passthrough": img.routing.passthrough,
                    },
                }
                for c, img in self.images.items()
            },
            "ignored": self.ignored,
            "warnings": self.warnings,
        }


def list_participants(bids_dir: Path) -> list[str]:
    """Participant labels present as ``sub-<label>`` folders (cheap, no indexing)."""
    return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())


def check_participants(bids_dir: Path, requested: list[str] | None) -> list[str]:
    """Return the participants to process; exit 18 naming labels that match nothing."""
    present = list_participants(bids_dir)
    if not requested:
        if not present:
            raise Synth7tExit(EX_NO_MATCH, f"no participants (sub-*) found in {bids_dir}")
        return present
    missing = [label for label in requested if label not in present]
    if missing:
        raise Synth7tExit(
            EX_NO_MATCH,
            "participant label(s) matched nothing in {}: {} (present: {})".format(
                bids_dir, ", ".join(f"sub-{m}" for m in missing),
                ", ".join(f"sub-{p}" for p in present[:20]) + (" ..." if len(present) > 20 else "")
                if present else "none"),
        )
    return list(requested)


def init_layout(bids_dir: Path, participants: list[str] | None = None):
    """Index ``bids_dir`` with pybids (in memory: nothing is written into the dataset)."""
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    ignore = ["code", "stimuli", "sourcedata", "models", "derivatives", re.compile(r"^\.")]
    if participants:
        alts = "|".join(map(re.escape, participants))
        ignore.append(re.compile(rf"sub-(?!({alts})(\b|_))"))
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
    return BIDSLayout(str(bids_dir), validate=False, indexer=indexer)


def _convert_filters(filters: dict) -> dict:
    """JSON filter values -> pybids: null = entity absent, "*" = any value."""
    from bids.layout import Query

    def _conv(value):
        if value is None:
            return Query.NONE
        if value == "*":
            return Query.ANY
        if isinstance(value, list):
            return [_conv(v) for v in value]
        return value

    return {k: _conv(v) for k, v in filters.items()}


def collect_inputs(
    layout,
    participants: list[str],
    *,
    sessions: list[str] | None = None,
    contrasts: list[str] | tuple[str, ...] = CONTRASTS,
    bids_filters: dict | None = None,
    field_strength: float | None = None,
) -> tuple[list[SessionInputs], dict[str, list[tuple[int, str]]]]:
    """Query T1w/T2w/FLAIR per participant and session and route their field strengths.

    Parameters
    ----------
    layout
        A :class:`bids.layout.BIDSLayout`.
    participants
        Participant labels (without ``sub-``); they must exist.
    sessions
        Session labels to keep (``--session-label``); ``None`` keeps all.
    contrasts
        Contrasts to look for (``--contrasts``).
    bids_filters
        ``--bids-filter-file`` content: ``{"t1w": {...}, "t2w": {...}, "flair": {...}}``.
    field_strength
        ``--field-strength`` override.

    Returns
    -------
    inputs : list of SessionInputs
        One item per participant/session with at least one usable image.
    errors : dict
        ``{participant: [(exit code, message), ...]}`` for participants that cannot run:
        65 for a missing/unsupported field strength, 66 when no image of the requested
        contrasts exists. Other participants are processed regardless.

    Raises
    ------
    Synth7tExit
        18 if the session labels or BIDS filters matched nothing at all, 64 for invalid filter
        entities.
    """
    bids_filters = {k.lower(): v for k, v in (bids_filters or {}).items()}
    root = Path(layout.root)
    out: list[SessionInputs] = []
    errors: dict[str, list[tuple[int, str]]] = {}
    matched_session = False
    for subject in participants:
        available = layout.get_sessions(subject=subject)
        if sessions:
            subj_sessions = [s for s in available if s in sessions]
            if not subj_sessions:
                LOGGER.warning("sub-%s has none of the requested sessions %s (has: %s); skipped",
                               subject, ", ".join(sessions), ", ".join(available) or "none")
                continue
        else:
            subj_sessions = available or [None]
        matched_session = True
        empty: list[str] = []
        for session in subj_sessions:
            item = SessionInputs(subject=subject, session=session)
            failed = False
            for contrast in contrasts:
                query = dict(DEFAULT_QUERIES[contrast])
                user = bids_filters.get(contrast.lower(), {})
                query.update(_convert_filters(user))
                query["subject"] = subject
                if session is not None:
                    wanted = user.get("session")
                    if wanted is not None and session not in (
                            wanted if isinstance(wanted, list) else [wanted]):
                        continue  # the filter file selects other sessions for this contrast
                    query["session"] = session
                try:
                    files = sorted(layout.get(return_type="file", **query))
                except (ValueError, TypeError) as exc:
                    raise Synth7tExit(EX_USAGE, f"invalid BIDS filter for {contrast}: {exc}") \
                        from None
                if not files:
                    continue
                if len(files) > 1:
                    rel = [Path(f).relative_to(root).as_posix() for f in files]
                    item.ignored[contrast] = rel[1:]
                    msg = (f"{item.name}: {len(files)} {contrast} images match; using {rel[0]} "
                           f"(select another with --bids-filter-file)")
                    item.warnings.append(msg)
                    LOGGER.warning(msg)
                path = Path(files[0])
                relpath = path.relative_to(root).as_posix()
                metadata = layout.get_metadata(str(path))
                try:
                    routing = route_field(metadata.get("MagneticFieldStrength"),
                                          override=field_strength, where=relpath)
                except FieldStrengthError as exc:
                    errors.setdefault(subject, []).append((EX_DATAERR, str(exc)))
                    failed = True
                    continue
                if routing.passthrough:
                    msg = (f"{relpath}: acquired at {routing.raw:g} T (already 7 T); the image "
                           "is passed through without synthesis")
                    item.warnings.append(msg)
                    LOGGER.warning(msg)
                item.images[contrast] = InputImage(contrast, path, relpath, dict(metadata),
                                                   routing)
            if failed:
                continue
            if item.images:
                out.append(item)
            else:
                empty.append(item.name)
        if empty and not any(it.subject == subject for it in out) and subject not in errors:
            errors.setdefault(subject, []).append((
                EX_NO_MATCH if bids_filters else EX_NOINPUT,
                f"{', '.join(empty)}: no {'/'.join(contrasts)} image"
                + (" matches the BIDS filters" if bids_filters else "")))
        elif empty:
            LOGGER.info("no %s image in %s", "/".join(contrasts), ", ".join(empty))
    if sessions and not matched_session:
        raise Synth7tExit(
            EX_NO_MATCH,
            f"session label(s) {', '.join('ses-' + s for s in sessions)} matched nothing for "
            f"{', '.join('sub-' + s for s in participants)}")
    if bids_filters and not out and errors and all(
            code == EX_NO_MATCH for errs in errors.values() for code, _ in errs):
        raise Synth7tExit(EX_NO_MATCH, f"the BIDS filters matched no {'/'.join(contrasts)} "
                          f"image in {root}")
    return out, errors


def check_images(inputs: list[SessionInputs]) -> dict[str, list[tuple[int, str]]]:
    """Open every image with :func:`synth7t.io.load_image`.

    Returns
    -------
    dict
        ``{item.name: [(65, "<path>: <reason>"), ...]}`` for participant/sessions with an
        unreadable image (``item.name`` is ``sub-<label>[_ses-<label>]``).
    """
    from synth7t.io import ImageError, load_image

    errors: dict[str, list[tuple[int, str]]] = {}
    for item in inputs:
        for img in item.images.values():
            try:
                load_image(img.path)
            except ImageError as exc:
                errors.setdefault(item.name, []).append((EX_DATAERR, str(exc)))
            except Exception as exc:  # noqa: BLE001 - any unreadable file is bad data
                errors.setdefault(item.name, []).append((EX_DATAERR, f"{img.path}: {exc}"))
    return errors
