"""The shape of the house (the design card's layout): the top level holds the three scripts, pyproject lists exactly those,
the library has no import cycles and imports at module top, model.py imports nothing of the project, train()'s loop
and GPT.forward name no feature, and no script folder shadows a standard-library module."""

import ast
import sys

from conftest import REPO

PROJECT = ("model", "train", "sample", "sologpt", "tools", "prepare", "bench")


def source_files():
    files = [REPO / f"{m}.py" for m in ("model", "train", "sample")]
    for folder in ("sologpt", "tools", "prepare", "bench"):
        files += sorted((REPO / folder).glob("*.py"))
    return files


def module_name(path):
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def project_imports(path, top_level_only=False):
    """The project modules a file imports (from x import y counts x.y when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in PROJECT}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if (REPO / (sub.replace(".", "/") + ".py")).is_file() else node.module)
    return out


def test_the_top_level_holds_the_three_scripts_and_pyproject_lists_them():
    import tomllib
    assert sorted(p.stem for p in REPO.glob("*.py")) == ["model", "sample", "train"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert sorted(project["tool"]["setuptools"]["py-modules"]) == ["model", "sample", "train"]
    found = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"sologpt", "prepare", "tools"} <= set(found)


def test_no_import_cycles_and_imports_at_the_top():
    graph = {module_name(p): project_imports(p) for p in source_files()}
    for path in source_files():  # imports inside functions are for optional packages only (and for bench/'s
        if path.parent.name != "bench":  # child processes, which measure memory from a bare interpreter)
            assert project_imports(path) == project_imports(path, top_level_only=True), path
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph.get(node, ()):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(stack + [node, dep])}"
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_model_imports_nothing_of_the_project():
    assert project_imports(REPO / "model.py") == set()


def attributes_of(node, name):
    return {n.attr for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == name}


def test_the_training_loop_and_the_forward_name_no_feature():
    tree = ast.parse((REPO / "train.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 120
    loop = next(n for n in ast.walk(train) if isinstance(n, ast.While))
    assert attributes_of(loop, "cfg") <= {"eval_interval", "max_iters", "always_save_checkpoint"}
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_step")
    assert step.end_lineno - step.lineno + 1 <= 30 and not attributes_of(step, "cfg")
    model = ast.parse((REPO / "model.py").read_text())
    gpt = next(n for n in model.body if isinstance(n, ast.ClassDef) and n.name == "GPT")
    for name in ("forward", "hidden_states"):
        fn = next(n for n in gpt.body if isinstance(n, ast.FunctionDef) and n.name == name)
        config_fields = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                         and isinstance(n.value, ast.Attribute) and n.value.attr == "config"}
        assert config_fields <= {"vocab_size", "block_size"}, (name, config_fields)


def test_no_script_shadows_the_standard_library():
    for folder in ("bench", "tools", "prepare", "sologpt"):
        for path in (REPO / folder).glob("*.py"):
            assert path.stem not in sys.stdlib_module_names, path
