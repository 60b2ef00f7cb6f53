"""The walls between parts stay up: a forbidden import, even a lazy one, fails this test.

Every import statement counts, wherever it stands (module level, inside a function, under
TYPE_CHECKING), and rules apply to what a module reaches through other project modules too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("breakwater", "gateway", "worker", "serving", "proto", "prompts", "loadtest")
SDK = ("breakwater.client", "breakwater.types", "breakwater.errors", "breakwater")


@dataclass(frozen=True)
class Wall:
    """Modules matching `source` (a package prefix) may not reach anything in `forbidden`."""

    source: str
    forbidden: tuple[str, ...]
    why: str
    exempt: tuple[str, ...] = ()


WALLS = (
    Wall(
        "gateway",
        ("worker", "torch", "breakwater"),
        "the gateway starts fast and small; the SDK is what app developers install",
    ),
    Wall("worker", ("gateway", "breakwater"), "a worker must not depend on the gateway or SDK"),
    Wall(
        "worker.engine",
        ("proto", "grpc", "grpc_health", "aiohttp", "httpx", "redis", "serving", "worker"),
        "the engine knows no network and no wire format",
        exempt=("worker.engine",),
    ),
    Wall("serving", ("gateway", "worker", "breakwater", "torch"), "serving is shared by both"),
    Wall("proto", ("gateway", "worker", "breakwater", "serving", "torch"), "the wire contract"),
    Wall(
        "prompts",
        ("gateway", "worker", "breakwater", "serving", "proto", "torch", "grpc", "aiohttp"),
        "prompt tokenization and block keys: a leaf both the engine and the router import",
    ),
)
SDK_FORBIDDEN = ("torch", "grpc", "aiohttp", "gateway", "worker", "serving", "loadtest")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            if "fake_vllm" not in path.parts:
                mods[module_name(path, root)] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Absolute names a module imports; `from a import b` yields a.b when that is a module."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return out


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    mods = project_modules(root, packages)
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every name reachable from `start`, with the project module that imports it."""
    seen: dict[str, str] = {}
    stack = [start]
    while stack:
        mod = stack.pop()
        for dep in graph.get(mod, ()):
            if dep not in seen:
                seen[dep] = mod
                if dep in graph:
                    stack.append(dep)
    return seen


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for wall in WALLS:
        for mod in sorted(m for m in graph if _under(m, wall.source)):
            for dep, via in sorted(reach(graph, mod).items()):
                bad = [f for f in wall.forbidden if _under(dep, f)]
                if bad and not any(_under(dep, e) for e in wall.exempt):
                    found.append(f"{mod} reaches {dep} (imported by {via}): {wall.why}")
    for mod in SDK:
        for dep, via in sorted(reach(graph, mod).items()):
            if any(_under(dep, f) for f in SDK_FORBIDDEN):
                found.append(f"SDK module {mod} reaches {dep} (imported by {via})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between project modules (a package importing its own children excepted)."""
    edges = {
        m: {d for d in deps if d in graph and not _under(d, m) and not _under(m, d)}
        for m, deps in graph.items()
    }
    found: list[list[str]] = []
    for start in sorted(edges):
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        seen: set[str] = set()
        while stack:
            mod, path = stack.pop()
            for dep in edges[mod]:
                if dep == start:
                    found.append([*path, start])
                elif dep not in seen and dep > start:  # report each cycle once
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
    return found


def test_no_import_crosses_a_wall() -> None:
    assert violations(import_graph(ROOT, PACKAGES)) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph(ROOT, PACKAGES)) == []


def test_the_checker_catches_a_planted_violation(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "gateway" / "routing.py").write_text("import serving.helper\n")
    (tmp_path / "serving" / "helper.py").write_text(
        "def lazy():\n    from worker.engine import thing\n"
    )
    (tmp_path / "worker" / "engine").mkdir()
    (tmp_path / "worker" / "engine" / "__init__.py").write_text("from . import runner\n")
    (tmp_path / "worker" / "engine" / "runner.py").write_text("from proto import stubs\n")
    (tmp_path / "breakwater" / "client.py").write_text("import torch\n")
    (tmp_path / "loadtest" / "a.py").write_text("from loadtest import b\n")
    (tmp_path / "loadtest" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import loadtest.a\n"
    )
    graph = import_graph(tmp_path, PACKAGES)
    found = "\n".join(violations(graph))
    assert "gateway.routing reaches worker.engine (imported by serving.helper)" in found
    assert "serving.helper reaches worker.engine" in found
    assert "worker.engine.runner reaches proto" in found
    assert "SDK module breakwater.client reaches torch" in found
    assert cycles(graph) == [["loadtest.a", "loadtest.b", "loadtest.a"]]


def test_gateway_and_sdk_load_without_torch_or_the_engine() -> None:
    """The same wall at run time, for imports the static view cannot see (e.g. importlib)."""
    code = (
        "import sys, gateway.app, gateway.registry.redis_backend, gateway.resilience.breaker_sync,"
        " breakwater.client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'worker'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
