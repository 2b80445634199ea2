#!/usr/bin/env python3
"""Check every file named in a model registry against its SHA-256 (standard library only).

    python3 scripts/verify_models.py [MODEL_DIR]      # default: synth7t/models

The container build runs it right after copying the models and before the (slow) install, so an
image is never built around a modified or corrupted weight file. The full check (format, header,
loading) is ``synth7t.registry.read_verified``, which the build runs again after the install.
Exit 0 all verified, 1 a mismatch or a missing file (each named on stderr).
"""
import hashlib
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    model_dir = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "synth7t" / "models")
    entries = json.loads((model_dir / "registry.json").read_text())["models"]
    problems, checked = [], {}
    for e in entries:
        path = model_dir / e["file"]
        want = str(e["sha256"]).lower()
        if path not in checked:
            if not path.is_file():
                problems.append(f"{path}: model file is missing")
                checked[path] = None
                continue
            checked[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        got = checked[path]
        if got is not None and got != want:
            problems.append(f"{path}: SHA-256 mismatch (registry {want[:12]}..., file {got[:12]}...) "
                            f"for {e['name']} {e['contrast']} {e['field_bin']} T")
    for line in dict.fromkeys(problems):
        print(f"verify_models: {line}", file=sys.stderr)
    if problems:
        print("verify_models: FAILED, a model file was modified or corrupted", file=sys.stderr)
        return 1
    print(f"verify_models: {len(entries)} registry entries, {len(checked)} files, SHA-256 verified")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
