"""The architecture visible from `ls` stays true: lessons on top, one engine below, arrows only down.

Read from the source (every import statement, also inside functions): the engine imports no
lesson, no lesson imports another lesson, and no module outside tests grows past ~400 lines.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fine_tuning_llms"
FRONT_DOOR = {"fine_tuning_llms", "fine_tuning_llms.cli", "fine_tuning_llms.__main__"}
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every fine_tuning_llms module ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import lesson`
    return {m for m in found if m.startswith("fine_tuning_llms")}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
ENGINE = {m for m in MODULES if m.startswith("fine_tuning_llms.engine")}
LESSONS = set(MODULES) - ENGINE - FRONT_DOOR


def test_the_layout_has_both_floors():
    assert {"fine_tuning_llms.model_comparison", "fine_tuning_llms.special_tokens", "fine_tuning_llms.data_preprocessing",
            "fine_tuning_llms.fine_tuning", "fine_tuning_llms.trainer_explained"} <= LESSONS
    assert {"fine_tuning_llms.engine.models", "fine_tuning_llms.engine.lora", "fine_tuning_llms.engine.batching"} <= ENGINE


def test_imports_are_resolved_the_way_python_does():
    """The checker itself: a relative import inside the engine resolves into the engine."""
    imports = imported_modules(MODULES["fine_tuning_llms.engine.trainer"])
    assert "fine_tuning_llms.engine.batching" in imports
    assert "fine_tuning_llms.engine.chat_format" in imports  # `from . import chat_format`


@pytest.mark.parametrize("module", sorted(ENGINE))
def test_engine_imports_no_lesson(module):
    upward = {m for m in imported_modules(MODULES[module]) if m in LESSONS or m in FRONT_DOOR - {"fine_tuning_llms"}}
    assert not upward, f"{module} imports {upward}: the engine must not depend on lessons"


@pytest.mark.parametrize("module", sorted(LESSONS))
def test_no_lesson_imports_another(module):
    sideways = {m for m in imported_modules(MODULES[module]) if m in LESSONS and m != module}
    assert not sideways, f"{module} imports {sideways}: shared code belongs in the engine"


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                                         *(ROOT / "scripts").glob("*.py"), ROOT / "run_fine_tuning.py"]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_a_god_file(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it"
