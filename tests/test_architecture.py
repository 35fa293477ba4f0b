"""docs/architecture.md stays true: every `file: function` hop it names exists in that file (and
every `Class.method` it names bare exists somewhere), and
imports run one way down its layers (no module imports from a layer above its own)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "expertmesh"
DOC = ROOT / "docs" / "architecture.md"

# A hop as the document writes it: `path/to/module.py: Name` or `...: Outer.inner`; once a
# sentence has named a class's file, it may name more of its methods bare: `Runner._batch`.
HOP = re.compile(r"`([\w/]+\.py): ([\w.]+)`")
METHOD = re.compile(r"`([A-Z]\w*\.\w+)`")

# Layers, top to bottom, by top-level module or package under expertmesh/ (as the document's table).
LAYERS = [
    {"cli", "place_cli", "profile", "sim", "__main__"},
    {"server"},
    {"elastic"},
    {"run_flags"},
    {"engine", "faults", "op_count", "pretend_device"},
    {"parallel"},
    {"checkpoint", "model"},
    {"config", "deployment", "topology", "split", "trace", "launch", "rank_env", "heartbeat"},
]


def defined_names(path: Path) -> set[str]:
    """Every class, function and method in a module, nested ones as `Outer.inner`."""
    names: set[str] = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(prefix + child.name)
                visit(child, prefix + child.name + ".")

    visit(ast.parse(path.read_text()), "")
    return names


def test_every_hop_in_the_document_exists():
    hops = HOP.findall(DOC.read_text())
    assert len(hops) > 20, "the document lost its hops, or the pattern no longer matches them"
    missing = [f"{file}: {name}" for file, name in hops
               if not (PACKAGE / file).exists() or name not in defined_names(PACKAGE / file)]
    assert not missing, f"docs/architecture.md names what the code does not have: {missing}"


def test_every_method_the_document_names_bare_exists_somewhere():
    methods = METHOD.findall(DOC.read_text())
    assert len(methods) > 10
    everywhere = set().union(*(defined_names(p) for p in PACKAGE.rglob("*.py")))
    missing = [m for m in methods if m not in everywhere]
    assert not missing, f"docs/architecture.md names methods the code does not have: {missing}"


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_imports_run_one_way_down_the_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        here = layer_of(parts[0])
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "expertmesh":
                    targets = [a.name for a in node.names]
                elif node.module.startswith("expertmesh."):
                    targets = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("expertmesh.")]
            upward += [f"{'/'.join(parts)} imports {t}" for t in targets if layer_of(t) < here]
    assert not upward, f"imports that run back up a layer: {upward}"


def test_the_model_layer_never_imports_torch_distributed():
    """docs/architecture.md: `model/` is the single-device reference; what crosses ranks lives in
    `parallel/` and `engine/` (the expert kernels' plan is shared by `engine/shard.py`)."""
    offenders = []
    for path in (PACKAGE / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.startswith("torch.distributed") for name in names):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, f"model/ modules importing torch.distributed: {offenders}"
