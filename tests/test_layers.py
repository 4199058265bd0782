"""Dependencies point one way (DESIGN.md): no import cycle inside `avr`, and each layer imports only
from the layers below it. Read from the source, so an import inside a function counts too (only
imports under `if TYPE_CHECKING:`, which never run, are left out)."""

import ast
from collections import defaultdict
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

AVR = Path(__file__).parents[1] / "avr"

#: What each part may import from `avr` (beside itself); the parts are DESIGN.md's.
ALLOWED = {
    "avr.flow": set(),
    "avr.outputs": set(),
    "avr.sequence": set(),
    "avr.world": {"avr.sequence", "avr.outputs"},
    "avr.grpo": {"avr.flow"},
    "avr.backbone": {"avr.flow", "avr.grpo", "avr.sequence", "avr.outputs"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in AVR.rglob("*.py"):
        name = ".".join(path.relative_to(AVR.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The `avr` modules `path` imports (a `from package import module` names the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = defaultdict(set)
    for name, path in modules.items():
        for target in _imports(path, modules):
            if target != name and not name.startswith(target + "."):  # a package's own parent
                graph[name].add(target)
    return graph


def test_no_import_cycle_in_avr():
    try:
        tuple(TopologicalSorter(_graph()).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_each_layer_imports_only_the_layers_below_it():
    def part(module: str) -> str | None:
        return next((p for p in ALLOWED if module == p or module.startswith(p + ".")), None)

    wrong = [
        f"{source} imports {target}"
        for source, targets in _graph().items()
        if (own := part(source)) is not None
        for target in targets
        if part(target) != own
        and not any(target == a or target.startswith(a + ".") for a in ALLOWED[own])
    ]
    assert not wrong, wrong


def test_the_checker_sees_a_cycle_and_a_wrong_arrow(tmp_path):
    """The two checks above can fail: a cycle and an upward import written here are found."""
    graph = {"a": {"b"}, "b": {"a"}}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError:
        pass
    else:
        raise AssertionError("the cycle a -> b -> a went unseen")
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from avr.lit import sft\n", encoding="utf-8")
    assert _imports(module, {"avr.lit", "avr.lit.sft"}) == {"avr.lit", "avr.lit.sft"}
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from avr.lit import sft\n",
        encoding="utf-8",
    )
    assert _imports(module, {"avr.lit", "avr.lit.sft"}) == set()


def test_the_product_does_not_import_the_research_code():
    """`avr.research` (the ladder, the claims table) sits on top: it uses the product's parts, and
    nothing outside it imports it (the `avr` console script names its modules, it does not
    import them)."""
    wrong = [
        f"{source} imports {target}"
        for source, targets in _graph().items()
        if not source.startswith("avr.research")
        for target in targets
        if target.startswith("avr.research")
    ]
    assert not wrong, wrong
