"""The dependencies run one way: the library (losses, miners, augmenters, proxies, regularisers, data,
evaluation, models, hooks, inference) never imports the pipelines built on it (training, fewshot, the
CLI), not even lazily or for type checking; training never imports the pipelines above it."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "deepmetric"
# A package may import the packages of its own layer or below, never above.
PIPELINES = {"training": 1, "fewshot": 2, "product": 2, "cli": 3}


def layer(module: str) -> int:
    parts = module.split(".")
    return PIPELINES.get(parts[1], 0) if len(parts) > 1 else 0


def module_name(path: Path, root: Path = SRC) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = SRC) -> set[str]:
    """Every deepmetric module ``path`` imports, at module level, inside functions or under TYPE_CHECKING."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m == "deepmetric" or m.startswith("deepmetric.")}


MODULES = sorted(SRC.rglob("*.py"))


def test_the_source_tree_is_found():
    assert any(p.name == "trainer.py" for p in MODULES) and len(MODULES) > 50


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_layer_above_its_own(path):
    own = layer(module_name(path))
    above = sorted(m for m in imported(path) if layer(m) > own)
    assert not above, f"{module_name(path)} (layer {own}) imports {above}: move what it needs below"


def test_the_check_sees_relative_lazy_and_type_checking_imports(tmp_path):
    root = tmp_path / "deepmetric"
    (root / "augment").mkdir(parents=True)
    fake = root / "augment" / "iaa.py"
    fake.write_text("if TYPE_CHECKING:\n    from ..training.trainer import Trainer\n"
                    "def f():\n    import deepmetric.cli\n")
    found = imported(fake, root)
    assert {"deepmetric.training.trainer", "deepmetric.cli"} <= found
    assert max(layer(m) for m in found) > layer(module_name(fake, root)) == 0
