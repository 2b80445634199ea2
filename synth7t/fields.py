"""Field-strength routing: map a sidecar's ``MagneticFieldStrength`` to a supported bin."""
from __future__ import annotations

from dataclasses import asdict, dataclass

#: Source fields that have synthesis models, in tesla.
SUPPORTED_BINS: tuple[float, ...] = (0.1, 1.5, 3.0, 5.0)
#: The target field; inputs already at 7 T are passed through.
TARGET_FIELD = 7.0
#: Values outside this range are not plausible MRI field strengths and are always refused.
PLAUSIBLE_RANGE: tuple[float, float] = (0.05, 7.5)
#: Relative tolerance for binning (2.89 -> 3, 1.494 -> 1.5, 0.064 -> 0.1 via the low-field rule).
REL_TOLERANCE = 0.25
#: Every field below this is "very low field" and goes to the 0.1 T bin (0.05-0.35 T scanners).
LOW_FIELD_MAX = 0.35

CONTRASTS: tuple[str, ...] = ("T1w", "T2w", "FLAIR")


class FieldStrengthError(ValueError):
    """The field strength is missing, malformed or unsupported (exit code 65)."""


@dataclass(frozen=True)
class FieldRouting:
    """Where an input's field strength was routed."""

    raw: float | None
    bin: float
    source: str  # "sidecar" or "--field-strength"
    passthrough: bool = False  # True for 7 T inputs

    def as_dict(self) -> dict:
        return asdict(self)


def bin_label(field_bin: float) -> str:
    """``0.1 -> '0.1T'``, ``3.0 -> '3T'`` (the MRIxFields spelling)."""
    return f"{field_bin:g}T"


def parse_field(value: object, *, where: str = "") -> float:
    """Parse a field value from a sidecar or the CLI, raising :class:`FieldStrengthError`."""
    if value is None or isinstance(value, bool):
        raise FieldStrengthError(
            f"{where}: MagneticFieldStrength is missing; set it in the sidecar or pass "
            "--field-strength"
        )
    try:
        field = float(value)
    except (TypeError, ValueError):
        raise FieldStrengthError(
            f"{where}: MagneticFieldStrength {value!r} is not a number; fix the sidecar or pass "
            "--field-strength"
        ) from None
    if not (PLAUSIBLE_RANGE[0] <= field <= PLAUSIBLE_RANGE[1]):
        raise FieldStrengthError(
            f"{where}: field strength {field:g} T is outside the plausible range "
            f"{PLAUSIBLE_RANGE[0]:g}-{PLAUSIBLE_RANGE[1]:g} T"
        )
    return field


def nearest_bin(field: float, *, where: str = "") -> tuple[float, bool]:
    """Return ``(bin, passthrough)`` for a plausible field value."""
    if field <= LOW_FIELD_MAX:
        return 0.1, False
    if abs(field - TARGET_FIELD) / TARGET_FIELD <= 0.05:
        return TARGET_FIELD, True
    best = min(SUPPORTED_BINS, key=lambda b: abs(b - field))
    if abs(field - best) / best > REL_TOLERANCE:
        raise FieldStrengthError(
            f"{where}: field strength {field:g} T is not within {REL_TOLERANCE:.0%} of a supported "
            f"field ({', '.join(bin_label(b) for b in SUPPORTED_BINS)}); pass --field-strength "
            "to choose a model explicitly"
        )
    return best, False


def route_field(sidecar_value: object, *, override: float | None = None, where: str = "") -> FieldRouting:
    """Route an image to a field bin.

    Parameters
    ----------
    sidecar_value
        ``MagneticFieldStrength`` as read from the (inherited) sidecar, or ``None``.
    override
        ``--field-strength``; wins over the sidecar but is still checked for plausibility.
    where
        Name of the image, used in error messages.
    """
    if override is not None:
        field = parse_field(override, where=f"{where} (--field-strength)")
        raw = None
        try:
            raw = float(sidecar_value) if sidecar_value is not None else None
        except (TypeError, ValueError):
            raw = None
        fbin, passthrough = nearest_bin(field, where=f"{where} (--field-strength)")
        return FieldRouting(raw=field if raw is None else raw, bin=fbin,
                            source="--field-strength", passthrough=passthrough)
    try:
        field = parse_field(sidecar_value, where=where)
    except FieldStrengthError as exc:
        if "--field-strength" in str(exc):
            raise
        # an implausible sidecar value (e.g. 11.7) is most likely a wrong sidecar
        raise FieldStrengthError(f"{exc}; fix the sidecar or pass --field-strength") from None
    fbin, passthrough = nearest_bin(field, where=where)
    return FieldRouting(raw=field, bin=fbin, source="sidecar", passthrough=passthrough)
