"""The package layout's import rules, read from the source with ``ast``: no module imports another module's private
(underscore) name, a private module (``_name.py``) is imported only inside its own package, and
``samplers`` imports nothing else of diffalign."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffalign"

KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()
"""(importer, private name) pairs still to be made public; the coordinator keeps this empty at merge."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, str | None]]:
    """``(absolute module, imported name or None)`` for every import statement of ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [(module, alias.name) for alias in node.names]
    return found


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_imports(path: Path) -> set[tuple[str, str]]:
    """Imports in ``path`` of an underscore name of another module, or of a private module outside its package."""
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    bad = set()
    for module, name in imports(path):
        if module.split(".")[0] != "diffalign":
            continue
        parts = module.split(".")
        for i, part in enumerate(parts):
            parent = ".".join(parts[:i])
            if is_private(part) and not (package == parent or package.startswith(parent + ".")):
                bad.add((importer, module))
        if name is not None and is_private(name):
            bad.add((importer, f"{module}.{name}"))
    return bad


def test_no_module_imports_a_private_name_of_another():
    found = set().union(*(private_imports(path) for path in PACKAGE.rglob("*.py")))
    assert found - KNOWN_PRIVATE_IMPORTS == set(), "make these names public (diffusers' names where they exist)"
    assert KNOWN_PRIVATE_IMPORTS <= found, "fixed: remove these from KNOWN_PRIVATE_IMPORTS"


def test_samplers_import_nothing_else_of_diffalign():
    outside = {
        (module_name(path), module)
        for path in (PACKAGE / "samplers").rglob("*.py")
        for module, _ in imports(path)
        if module.split(".")[0] == "diffalign" and not module.startswith("diffalign.samplers")
    }
    assert outside == set()


def test_the_checker_sees_private_imports(tmp_path, monkeypatch):
    """The rule fails on what it should: a private module of another package, and a private name."""
    (tmp_path / "diffalign" / "evaluation").mkdir(parents=True)
    source = tmp_path / "diffalign" / "evaluation" / "probe.py"
    source.write_text(
        "import torch\nfrom ..samplers._base import MODEL_KEYS\nfrom ..samplers import _helper\nfrom ._own import x\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "diffalign")
    assert private_imports(source) == {
        ("diffalign.evaluation.probe", "diffalign.samplers._base"),
        ("diffalign.evaluation.probe", "diffalign.samplers._helper"),
    }
