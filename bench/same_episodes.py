"""Whether a rebuilt calibration directory holds the episodes its original manifest records (bench/lib.sh's
regen_episodes): the same policy weights, episode ids, policy calls and outcomes, and the same observations where
both manifests record their sha256. Exits 1, naming the first difference, if not.

    python bench/same_episodes.py REBUILT/manifest.json ORIGINAL/manifest.json
"""
from __future__ import annotations

import json
import sys


def difference(rebuilt: dict, original: dict) -> str | None:
    if original.get("weights_sha256") not in (None, rebuilt.get("weights_sha256")):
        return f"made by other policy weights ({rebuilt['weights_sha256'][:12]} against {original['weights_sha256'][:12]})"
    if len(rebuilt["episodes"]) != len(original["episodes"]):
        return f"{len(rebuilt['episodes'])} episodes against {len(original['episodes'])}"
    for new, old in zip(rebuilt["episodes"], original["episodes"]):
        keys = ["id", "calls", "success"] + (["sha256"] if "sha256" in new and "sha256" in old else [])
        for k in keys:
            if new[k] != old[k]:
                return f"episode {old['id']}: {k} {new[k]!r} against {old[k]!r}"
    return None


def main(argv=None) -> int:
    rebuilt, original = (json.load(open(f)) for f in (argv or sys.argv[1:]))
    diff = difference(rebuilt, original)
    if diff:
        print(f"regenerated episodes differ from {sys.argv[2] if argv is None else argv[1]}: {diff}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
