"""Model registry: which model serves each (contrast, field bin), and loading it safely.

The shipped registry is ``synth7t/models/registry.json``::

    {"schema": "synth7t-registry/1",
     "models": [{"name": "default", "kind": "unet", "contrast": "T1w", "field_bin": 1.5,
                 "version": "...", "file": "x.safetensors", "sha256": "...", "card": "x.json"},
                ...]}

``file`` and ``card`` are relative to the folder holding that ``registry.json``. A user
``--model-dir`` holding a ``registry.json`` of the same schema overrides entries with the same
(contrast, field bin, name) and adds new ones.

Every load re-hashes the weights file (SHA-256) and refuses anything that is not the expected
format: ``unet`` weights must be safetensors (never unpickled), ``baseline`` parameters JSON.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .fields import CONTRASTS, SUPPORTED_BINS
from .io import sha256_file  # noqa: F401  (re-exported: callers import it from here)


#: Folder of the shipped registry and weights.
MODELS_DIR = Path(__file__).parent / "models"
REGISTRY_FILE = "registry.json"
SCHEMA = "synth7t-registry/1"
KINDS = ("unet", "baseline")
_REQUIRED = ("name", "kind", "contrast", "field_bin", "version", "file", "sha256", "card")
#: MRIxFields spellings accepted at the edges.
_CONTRAST_ALIASES = {"T1W": "T1w", "T2W": "T2w", "T2FLAIR": "FLAIR", "t1w": "T1w", "t2w": "T2w",
                     "flair": "FLAIR"}
# Magic numbers of formats that can execute code when loaded.
_PICKLE_MAGIC = (b"\x80",)  # pickle protocol >= 2 starts with PROTO (0x80)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save zip archives (which contain a pickle)


class RegistryError(ValueError):
    """The registry is malformed or has no entry for a request (one-line message)."""


class ModelIntegrityError(RegistryError):
    """A model file is missing, fails its SHA-256 check or has a refused format."""


def canonical_contrast(contrast: str) -> str:
    """Map a contrast name (BIDS or MRIxFields spelling) to the BIDS suffix."""
    name = _CONTRAST_ALIASES.get(contrast, contrast)
    if name not in CONTRASTS:
        raise RegistryError(f"unknown contrast {contrast!r}; expected one of {', '.join(CONTRASTS)}")
    return name


def canonical_bin(field_bin: float | str) -> float:
    """Map ``1.5``, ``"1.5"`` or ``"1.5T"`` to the supported bin ``1.5``."""
    text = str(field_bin).strip().rstrip("Tt")
    try:
        value = float(text)
    except ValueError:
        raise RegistryError(f"field bin {field_bin!r} is not a number") from None
    for b in SUPPORTED_BINS:
        if abs(b - value) < 1e-6:
            return b
    raise RegistryError(f"field bin {field_bin!r} is not one of "
                        f"{', '.join(f'{b:g}' for b in SUPPORTED_BINS)}")


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry with its paths resolved.

    Attributes
    ----------
    name, kind, contrast, field_bin, version, sha256
        As in ``registry.json``.
    file, card
        Absolute paths of the weights/parameters file and its JSON model card.
    origin
        The ``registry.json`` this entry came from (shipped or ``--model-dir``).
    extra
        Any further keys of the entry, kept verbatim.
    """

    name: str
    kind: str
    contrast: str
    field_bin: float
    version: str
    file: Path
    sha256: str
    card: Path
    origin: Path
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, float, str]:
        return (self.contrast, self.field_bin, self.name)

    def load_card(self) -> dict:
        """The JSON model card (empty dict when missing or unreadable)."""
        try:
            return json.loads(self.card.read_text())
        except (OSError, ValueError):
            return {}

    def provenance(self) -> dict:
        """Value of the ``SynthesisModel`` sidecar key.

        Keys: ``Name``, ``Kind``, ``Version``, ``SHA256``, ``File``, ``Contrast``,
        ``SourceFieldBin``, ``Description``, ``TrainingData``, ``Metrics`` (and ``Registry``, the
        registry file the entry came from). Baseline entries always describe themselves as
        ``"baseline: non-deep per-tissue intensity mapping ..."``.
        """
        card = self.load_card()
        if self.kind == "baseline":
            description = card.get("Description", "")
            if not description.startswith("baseline: non-deep"):
                description = ("baseline: non-deep per-tissue intensity mapping to 7T "
                               "(3-class intensity clustering, piecewise-linear map of the tissue "
                               "medians)")
        else:
            description = card.get("Description", f"{self.kind} synthesis model")
        prov = {
            "Name": self.name,
            "Kind": self.kind,
            "Version": self.version,
            "SHA256": self.sha256,
            "File": self.file.name,
            "Contrast": self.contrast,
            "SourceFieldBin": self.field_bin,
            "Description": description,
            "TrainingData": card.get("TrainingData", "unknown"),
            # Cards hold per-pair tables; a sidecar needs only this entry's pair.
            "Metrics": _select_pair(card.get("Metrics", {}),
                                    f"{self.contrast}@{self.field_bin:g}T"),
            # No machine paths in sidecars for shipped models; a user model dir is worth naming.
            "Registry": ("shipped" if self.origin.parent == MODELS_DIR.resolve()
                         else str(self.origin.parent)),
        }
        if self.extra.get("note"):
            prov["Note"] = self.extra["note"]
        return prov


def _select_pair(obj: object, key: str) -> object:
    """Reduce nested metric tables keyed by ``"T1w@3T"``-style pairs to the entry ``key``."""
    if not isinstance(obj, dict):
        return obj
    if key in obj:
        return obj[key]
    out = {k: _select_pair(v, key) for k, v in obj.items()}
    pair_keys = [k for k in obj if "@" in str(k)]
    for k in pair_keys:  # other pairs' entries are dropped
        out.pop(k, None)
    return out


def _parse_registry(path: Path) -> list[ModelEntry]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc})") from None
    models = data.get("models") if isinstance(data, dict) else data
    if not isinstance(models, list):
        raise RegistryError(f"{path}: expected {{'models': [...]}}")
    entries = []
    for i, raw in enumerate(models):
        if not isinstance(raw, dict):
            raise RegistryError(f"{path}: models[{i}] is not an object")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise RegistryError(f"{path}: models[{i}] lacks {', '.join(missing)}")
        if raw["kind"] not in KINDS:
            raise RegistryError(f"{path}: models[{i}] has unknown kind {raw['kind']!r}")
        try:
            contrast = canonical_contrast(raw["contrast"])
            fbin = canonical_bin(raw["field_bin"])
        except RegistryError as exc:
            raise RegistryError(f"{path}: models[{i}]: {exc}") from None
        entries.append(ModelEntry(
            name=str(raw["name"]), kind=raw["kind"], contrast=contrast, field_bin=fbin,
            version=str(raw["version"]), file=(path.parent / raw["file"]).resolve(),
            sha256=str(raw["sha256"]).lower(), card=(path.parent / raw["card"]).resolve(),
            origin=path.resolve(),
            extra={k: v for k, v in raw.items() if k not in _REQUIRED},
        ))
    return entries


class Registry:
    """All known models, keyed by (contrast, field bin, name)."""

    def __init__(self, entries: list[ModelEntry] | None = None) -> None:
        self._entries: dict[tuple[str, float, str], ModelEntry] = {}
        for entry in entries or []:
            self._entries[entry.key] = entry

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> "Registry":
        """Load the shipped registry, then overlay ``model_dir/registry.json`` if given.

        Parameters
        ----------
        model_dir
            A folder holding a ``registry.json`` (same schema); its entries override shipped
            entries with the same (contrast, field bin, name) and add new ones.
        """
        reg = cls(_parse_registry(MODELS_DIR / REGISTRY_FILE))
        if model_dir is not None:
            user = Path(model_dir)
            if not (user / REGISTRY_FILE).is_file():
                raise RegistryError(f"{user}: --model-dir has no {REGISTRY_FILE}")
            for entry in _parse_registry(user / REGISTRY_FILE):
                reg._entries[entry.key] = entry
        return reg

    def get(self, contrast: str, field_bin: float | str, name: str = "default") -> ModelEntry:
        """The entry for ``(contrast, field_bin, name)``; :class:`RegistryError` if none."""
        key = (canonical_contrast(contrast), canonical_bin(field_bin), name)
        try:
            return self._entries[key]
        except KeyError:
            have = sorted({n for (_, _, n) in self._entries})
            raise RegistryError(f"no model {name!r} for {key[0]} at {key[1]:g} T "
                                f"(names available: {', '.join(have) or 'none'})") from None

    def names(self) -> list[str]:
        """Model names present in the registry."""
        return sorted({n for (_, _, n) in self._entries})

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.key))

    def __len__(self) -> int:
        return len(self._entries)


def read_verified(entry: ModelEntry) -> bytes:
    """Read ``entry.file``, refuse unsafe formats and check its SHA-256.

    Returns the file's bytes so callers parse exactly what was hashed (no re-read race).

    Raises
    ------
    ModelIntegrityError
        Missing file, refused format (pickle, ``.pt``/``.pth``/``.ckpt``, anything not
        safetensors for a ``unet``, not JSON for a ``baseline``) or SHA-256 mismatch.
    """
    path = entry.file
    if not path.is_file():
        raise ModelIntegrityError(f"{path}: model file is missing")
    suffix = path.suffix.lower()
    if entry.kind == "unet" and suffix != ".safetensors":
        raise ModelIntegrityError(f"{path}: refused, unet weights must be .safetensors "
                                  f"(got {suffix or 'no extension'}; pickled weights are never loaded)")
    if entry.kind == "baseline" and suffix != ".json":
        raise ModelIntegrityError(f"{path}: refused, baseline parameters must be .json")
    data = path.read_bytes()
    if data[:1] in _PICKLE_MAGIC or data[:4] == _ZIP_MAGIC:
        raise ModelIntegrityError(f"{path}: refused, the file is a pickle/torch archive, "
                                  "which could run code when loaded")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise ModelIntegrityError(f"{path}: SHA-256 mismatch (registry {entry.sha256[:12]}..., "
                                  f"file {digest[:12]}...); the file was modified or corrupted")
    if entry.kind == "unet":
        _check_safetensors_header(path, data)
    return data


def _check_safetensors_header(path: Path, data: bytes) -> dict:
    # safetensors layout: u64 little-endian header length, then a JSON header.
    if len(data) < 8:
        raise ModelIntegrityError(f"{path}: refused, not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or data[8:9] != b"{":
        raise ModelIntegrityError(f"{path}: refused, not a safetensors file")
    try:
        return json.loads(data[8:8 + n])
    except ValueError:
        raise ModelIntegrityError(f"{path}: refused, corrupt safetensors header") from None


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (already verified by :func:`read_verified`)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}
