"""Exit 0 when every requirement `.ci/run` would install is already met in this Python, else 1 (naming what
is not): the build system's, the package's, its `test` extra's and the pinned torch build, and what those
need in turn (the installed distributions' own requirements, with the extras asked for). pip resolves all
of them again on every call (~20 s here) even when nothing changed; `.ci/run` skips that resolution only
when this finds nothing missing."""
from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

PINNED = ["torch==2.13.0"]  # .ci/run installs it before the rest: the CPU build on local disk


def _applies(req, extras) -> bool:
    """Whether a requirement's environment marker holds here for one of `extras` (or no extra)."""
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))


def unmet(requirements: list[str]) -> list[str]:
    """Each requirement (and, through the installed metadata, everything it needs) not met, with why."""
    from packaging.requirements import Requirement

    missing, seen, todo = [], set(), [(Requirement(text), ()) for text in requirements]
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        key = (req.name.lower(), str(req.specifier), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req} (installed: {version})")
            continue
        todo += [(Requirement(dep), tuple(req.extras)) for dep in importlib.metadata.requires(req.name) or []]
    return missing


def main() -> int:
    try:
        import packaging.requirements  # noqa: F401
    except ImportError:
        print("requirements: `packaging` is not installed", file=sys.stderr)
        return 1
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    missing = unmet(meta["build-system"]["requires"] + meta["project"]["dependencies"]
                    + meta["project"]["optional-dependencies"]["test"] + PINNED)
    for line in missing:
        print(f"requirements: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
