"""The layering of docs/architecture.md holds: no import cycles among the modules of hiertrans,
lit_modules and datamodules (imports inside functions count), and the models know nothing of
Lightning."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hiertrans", "lit_modules", "datamodules")
# the only hiertrans modules that may import Lightning: the CLI and the Fabric trainer
LIGHTNING_ALLOWED = {"hiertrans.cli", "hiertrans.trainer", "hiertrans.__main__"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports, anywhere in the file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {t for t in targets if t in known and t != name}


def test_no_import_cycles():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "active"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_models_do_not_import_lightning():
    found = modules()
    offenders = []
    for name, path in found.items():
        if not name.startswith("hiertrans") or name in LIGHTNING_ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("lightning", "pytorch_lightning", "lit_modules", "datamodules") for n in names):
                offenders.append(name)
    assert not offenders, f"hiertrans modules importing Lightning or the task/data packages: {sorted(set(offenders))}"
