"""The core never imports the CLI or the dev tooling (read from the modules' import statements, nothing runs)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ckpt_stage"
CORE = ("pipeline", "registry", "storage", "scan", "sandbox", "load", "policy", "domain", "errors", "config",
        "orchestrate", "integrity")
FORBIDDEN = ("ckpt_stage.cli", "ckpt_stage.dev")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, ``from x import y`` as x and x.y;
    ``package`` resolves relative imports (default: the file's own package)."""
    if package is None:
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
    return out


def _core_files() -> list[Path]:
    files = []
    for name in CORE:
        if (PACKAGE / name).is_dir():
            files += sorted((PACKAGE / name).rglob("*.py"))
        else:
            files.append(PACKAGE / f"{name}.py")
    return files


def test_the_core_imports_neither_the_cli_nor_the_dev_tooling():
    files = _core_files()
    assert len(files) > 30 and all(f.exists() for f in files)
    bad = {f"{f.relative_to(PACKAGE)} imports {m}" for f in files for m in _imports(f) if _forbidden(m)}
    assert sorted(bad) == []


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_the_check_sees_every_way_of_importing_the_cli(tmp_path):
    fake = tmp_path / "mod.py"
    fake.write_text("import importlib\n\ndef f():\n    from ckpt_stage.cli import main\n    import ckpt_stage.dev.samples\n"
                    "    from .. import cli\n    importlib.import_module('ckpt_stage.cli.show')\n")
    found = {m for m in _imports(fake, package="ckpt_stage.scan") if _forbidden(m)}
    assert found == {"ckpt_stage.cli", "ckpt_stage.cli.main", "ckpt_stage.dev.samples", "ckpt_stage.cli.show"}
