"""The plug-in rule, checked on the source: nothing outside a task's own files asks which task is
active, and nothing outside a method's own files asks which method is (DESIGN.md §1). What the core
needs of a plug-in is a field of its protocol instead. (The import layers are checked by
`lint-imports`, in CI.)"""

from __future__ import annotations

import ast
from pathlib import Path

from tunesmith import registry

SOURCE = Path(__file__).parents[2] / "src" / "tunesmith"
RECORD_TYPES = {"Example", "ImageExample", "PreferenceExample", "SftExample"}


def name_branches(names: set[str], own: Path, root: Path = SOURCE) -> list[str]:
    """Where a file outside `own` compares with one of `names` (`x == "sft"`, `x in ("dpo", "rl")`),
    keys a table by them (`{"sft": ...}`), matches on them, or branches on record types with isinstance."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.is_relative_to(own):
            continue
        hits = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            what = _branch(node, names)
            if what:
                line = node.pattern.lineno if isinstance(node, ast.match_case) else node.lineno  # type: ignore[attr-defined]
                hits.append((line, what))
        found += [f"{path.relative_to(root)}:{line}: {what}" for line, what in sorted(hits)]
    return found


def _branch(node: ast.AST, names: set[str]) -> str:
    if isinstance(node, ast.Compare) and any(_names_in(n, names) for n in (node.left, *node.comparators)):
        return "compares with a name"
    if isinstance(node, ast.Dict) and any(_names_in(k, names) for k in node.keys if k is not None):
        return "a table keyed by name"
    if isinstance(node, ast.match_case) and _names_in(node.pattern, names):
        return "matches on a name"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
        kinds = node.args[1] if len(node.args) > 1 else None
        types = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
        if any(isinstance(t, ast.Name) and t.id in RECORD_TYPES for t in types):
            return "branches on a record type"
    return ""


def _names_in(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Constant) and n.value in names for n in ast.walk(node))


# The one table allowed to be keyed by a word that is also a task's name: OpenAI's method types
# ("dpo" is OpenAI's word there), translated into tunesmith's tasks in one place.
OPENAI_METHODS = "service/openai_schema.py"


def test_no_task_name_is_compared_outside_the_tasks() -> None:
    tasks = set(registry.tasks())
    found = name_branches(tasks, SOURCE / "tasks")
    exempt = [f for f in found if f.startswith(f"{OPENAI_METHODS}:") and f.endswith("a table keyed by name")]
    assert len(exempt) <= 1
    assert [f for f in found if f not in exempt] == []


def test_no_method_name_is_compared_outside_the_methods() -> None:
    methods = set(registry.methods())
    assert name_branches(methods, SOURCE / "methods") == []


def test_the_scan_finds_the_branches_it_forbids(tmp_path: Path) -> None:
    """The scan itself must be able to fail."""
    (tmp_path / "core.py").write_text(
        'if cfg.task == "sft":\n    pass\n'
        'ok = task not in ("dpo", "rl")\n'
        'HEADLINE = {"reward": ("accuracy",)}\n'
        "if isinstance(example, (Example, SftExample)):\n    pass\n"
        'match cfg.task:\n    case "sft":\n        pass\n'
        'fine = {"task": "sft"}  # naming a task to use it is not a branch\n'
    )
    found = name_branches({"sft", "dpo", "rl", "reward"}, tmp_path / "tasks", root=tmp_path)
    assert [line.split(": ", 1)[1] for line in found] == [
        "compares with a name",
        "compares with a name",
        "a table keyed by name",
        "branches on a record type",
        "matches on a name",
    ]
