"""The package's import map against its docstring (``orpo/__init__.py``, the live map of shared/DESIGN.md §2):
every module sits in one room, every import (at module level or inside a function; not the type-checking ones)
points to the module's own room or one above it, and no group of modules imports itself in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import orpo

PACKAGE = Path(orpo.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _rooms() -> list[tuple[str, list[str]]]:
    """``(room, [module, ...])`` in the docstring's order: each ``- room: ``name`` (...), ``name`` ...`` item,
    the modules being the double-backquoted names that follow ': ' or ', ' at the item's top level."""
    rooms = []
    for item in re.split(r"\n- ", orpo.__doc__.split("\n- ", 1)[1].split("\n\n")[0]):
        room, text = item.split(":", 1)
        depth, top = 0, []
        for char in text:  # drop what is in parentheses: descriptions may name other things
            depth += char == "("
            if depth == 0:
                top.append(char)
            depth -= char == ")"
        rooms.append((room.strip(), re.findall(r"``([a-z_]+)``", "".join(top))))
    return rooms


def _room_of(module: str, rooms) -> int | None:
    name = module.split(".")[1] if module != "orpo" else None
    for index, (_, members) in enumerate(rooms):
        if name in members:
            return index
    return None


def _imports(module: str, path: Path, modules) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "importlib.import_module":
            names = [node.args[0].value] if node.args and isinstance(node.args[0], ast.Constant) else []
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name not in (module, "orpo"):
                found.add(name)
    return found


def _import_map():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_one_room_in_the_docstring():
    rooms = _rooms()
    named = [name for _, members in rooms for name in members]
    assert len(named) == len(set(named)), "a module is listed in two rooms"
    tops = {m.split(".")[1] for m in _modules() if m != "orpo"}
    assert tops == set(named), f"not in the docstring: {tops - set(named)}; not modules: {set(named) - tops}"


def test_no_import_runs_back_up_the_rooms():
    rooms = _rooms()
    modules, imports = _import_map()
    back = [
        f"{a} ({rooms[_room_of(a, rooms)][0]}) -> {b} ({rooms[_room_of(b, rooms)][0]})"
        for a in modules
        if a != "orpo"
        for b in imports[a]
        if _room_of(b, rooms) > _room_of(a, rooms)
    ]
    assert back == []


def test_no_import_circles():
    modules, imports = _import_map()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in imports[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    assert circles == []
