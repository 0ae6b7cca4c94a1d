"""The house: the tree shows the pipeline, rooms import one way, no class grows past a page or two, one registry,
training outside the package (issue #26)."""

import ast
from pathlib import Path

import pytest

import vlm_accel

PKG = Path(vlm_accel.__file__).parent
FACES = {"cli", "demo", "bench", "vllm", "lmms_eval"}  # what users touch; the library never imports them
ROOMS = {"adapters", "control", "kernels", "kv", "llm", "methods", "prellm", "tower", "video", "zoo"}
MAX_CLASS_LINES = 460


def _modules():
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        pkg = parts[:-1]
        yield p, (parts[:-1] if parts[-1] == "__init__" else parts), pkg


def _room(mod: tuple) -> str:
    return mod[1] if len(mod) > 1 else "__init__"


def _imports(path: Path, pkg: tuple) -> set[tuple]:
    """Every ``vlm_accel`` module ``path`` imports (at module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - (node.level - 1)] if node.level else ()
            target = base + tuple(node.module.split(".")) if node.module else base
            if target[:1] != ("vlm_accel",):
                continue
            if node.module is None:  # from . import a, b: submodules
                out |= {target + (a.name,) for a in node.names}
            else:
                out.add(target)
        elif isinstance(node, ast.Import):
            out |= {tuple(a.name.split(".")) for a in node.names if a.name.startswith("vlm_accel")}
    return out


def _room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path, mod, pkg in _modules():
        for target in _imports(path, pkg):
            a, b = _room(mod), _room(target)
            if a != b and b != "__init__":
                graph.setdefault(a, set()).add(b)
    return graph


def test_the_rooms_are_the_pipeline_stages():
    found = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert ROOMS | {"bench", "vllm"} == found


def test_no_import_circle_between_rooms():
    graph = _room_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted(room for room in graph if room in reach(room))
    assert not circles, f"rooms on an import circle: {circles} ({ {r: sorted(graph[r]) for r in circles} })"


def test_the_library_never_imports_its_faces_and_adapters_stay_low():
    graph = _room_graph()
    library = [r for r in graph if r not in FACES]
    for room in library:
        assert not graph[room] & FACES, f"{room} imports a face: {sorted(graph[room] & FACES)}"
    assert graph.get("adapters", set()) <= set(), f"adapters import {graph.get('adapters')}"
    assert graph.get("methods", set()) <= {"kernels"}  # reducers are pure functions of tensors
    assert graph.get("kernels", set()) == set()


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_class_over_a_page_or_two(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{node.name} is {size} lines; hand a stage to an object of its own"


def test_one_registry_lists_every_name_accelerate_takes():
    from vlm_accel.methods import STAGES, get, names, stage_of

    every = [n for s in STAGES for n in names(s)]
    assert len(every) == len(set(every))
    assert sorted(vlm_accel.methods()) == sorted(n for n in every if stage_of(n) != "kv")
    assert {stage_of(n) for n in vlm_accel.methods()} == {"tower", "pre", "llm"}
    assert "tome_vit" in vlm_accel.methods() and set(vlm_accel.methods("kv")) >= {"snapkv", "h2o", "streaming"}
    for n in vlm_accel.methods():
        assert get(n).name == n
    from vlm_accel.kv.presses import get_press

    for n in vlm_accel.methods("kv"):
        assert get_press(n).name == n
    with pytest.raises(ValueError, match="unknown method 'snapkv'"):
        get("snapkv")  # a press is not a token method


def test_training_lives_outside_the_package():
    names = {p.stem for p in PKG.rglob("*.py")}
    assert not names & {"train", "train_video", "build", "probe"}
    for path in PKG.rglob("*.py"):  # an installed package has no training/ beside it
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert (node.module or "").split(".")[0] != "training", f"{path} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "training" for a in node.names), path
    repo = PKG.parent
    if (repo / "training").is_dir():  # a source checkout (not an installed wheel)
        assert (repo / "training" / "README.md").exists()
