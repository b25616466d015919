"""medxfer.trust stays a numeric core: numpy, scipy, scikit-learn, threadpoolctl, the standard library and
medxfer.errors only (so training, predict, serve and the report can all use it without import cycles)."""

import ast
import sys
from pathlib import Path

import medxfer.trust

ALLOWED = {"numpy", "scipy", "sklearn", "threadpoolctl", "medxfer"}


def test_trust_imports_only_numeric_libraries_and_errors():
    root = Path(medxfer.trust.__file__).parent
    seen = set()
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                seen.add(name)
                assert top in ALLOWED or top in sys.stdlib_module_names or top == "__future__", (path.name, name)
                if top == "medxfer":
                    assert name == "medxfer.errors" or name.startswith("medxfer.trust"), (path.name, name)
    assert "medxfer.errors" in seen
