"""The shape of the code that the other issues build on: common/ imports form no cycle, every script
is an importable module with main() and a __main__ guard, and importing common/ starts nothing."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCRIPTS = ("train_resnet_cifar.py", "train_tinyvit_cifar.py", "compare_runs.py",
           "plot_four_panels.py", "show_resnet_example.py", "check.py")


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """The common.* modules a file imports, at the top or inside functions."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("common"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("common"))
    return found


def test_common_has_no_import_cycles():
    files = {_module(p): p for p in (ROOT / "common").rglob("*.py")}
    graph = {m: {t for t in _imports(p) if t in files and t != m} for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert "common.trainer" not in {t for m in ("common.bench", "common.bench_suite")
                                    for t in graph[m]}


def test_every_script_has_main_and_a_guard():
    for name in SCRIPTS:
        tree = ast.parse((ROOT / name).read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name
        assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)
                   for n in tree.body), name


def test_importing_common_has_no_side_effects(tmp_path):
    """Every module imports in a fresh interpreter without writing files, printing or touching
    CUDA."""
    mods = sorted(_module(p) for p in (ROOT / "common").rglob("*.py"))
    code = ("import sys, torch; sys.path.insert(0, %r)\n" % str(ROOT)
            + "".join(f"import {m}\n" for m in mods)
            + "assert not torch.cuda.is_initialized()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == "" and not list(tmp_path.iterdir())


def test_the_tracked_top_level_files_are_the_ones_the_layout_documents():
    """README's Layout section names every top-level file and folder; anything else tracked there
    (a stray cwd.txt, an empty `started`) fails here."""
    import re

    git = ROOT / ".git"
    assert git.exists(), f"{ROOT} is not a git checkout: the tracked files cannot be listed"
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = {line.split("/")[0] for line in r.stdout.splitlines() if line}
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    documented = {name.rstrip("/") for name in re.findall(r"`([^`\s]+)`", section)
                  if "/" not in name.rstrip("/")}
    assert tracked == documented, (f"tracked but not in README's Layout: {tracked - documented}; "
                                   f"documented but not tracked: {documented - tracked}")
