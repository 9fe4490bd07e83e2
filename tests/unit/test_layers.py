"""The layers of `cascade/` as folders, imports pointing one way: read from the source with `ast`,
type-hint imports and imports inside functions included."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cascade", "lightning_modules", "datamodules", "callbacks")

# (layer, what belongs to it), lowest first: a module imports only from its own layer and the layers below it
LAYERS = [
    ("data", ["cascade.data", "cascade.sequence_data", "cascade.utils"]),
    ("model", ["cascade.model", "cascade.exit_fn"]),
    ("objects", ["cascade.llm", "cascade.ensemble", "cascade.config"]),
    ("training", ["cascade.training"]),
    ("routing", ["cascade.routing", "cascade.llm_evaluator"]),
    ("lightning", ["lightning_modules", "datamodules", "callbacks"]),
    ("run", ["cascade.run", "cascade.fit", "cascade.llm_trainer", "cascade.ensemble_trainer", "cascade.dataloader"]),
    ("package", ["cascade"]),  # cascade/__init__.py: the faces users import
]
LIGHTNING_FROM = "lightning"  # the first layer that may import Lightning
# The seed's verbs on its objects, each a one-line call into the routing layer imported inside the method
DELEGATIONS = {
    ("cascade.llm", "cascade.routing.handover"),  # LLM.collect_hard_tokens, LLM.transform_data
    ("cascade.ensemble", "cascade.routing.evaluation"),  # Ensemble.evaluate
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, wherever the import statement stands."""
    this = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    # `from cascade.routing.route import route` also names the packages above it, which it does not depend on
    return {m for m in found if not any(o.startswith(m + ".") for o in found) or known[m].name != "__init__.py"}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_belongs_to_a_layer():
    for module in modules():
        layer_of(module)


def test_imports_form_no_circle():
    edges = {m: {d for d in deps if (m, d) not in DELEGATIONS} for m, deps in graph().items()}
    edges = {m: {d for d in deps if d != "cascade"} for m, deps in edges.items()}  # the package face imports all
    assert cycles(edges) == []


def test_each_layer_imports_only_the_layers_below_it():
    upward = sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in graph().items()
        for d in deps
        if layer_of(d) > layer_of(m) and (m, d) not in DELEGATIONS
    )
    assert upward == []


def test_the_delegations_are_imported_inside_a_method():
    known = modules()
    for module, target in DELEGATIONS:
        tree = ast.parse(known[module].read_text())
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert target not in top, f"{module} imports {target} at module level"
        assert target in imports(known[module], known), f"{module} no longer delegates to {target}: drop it from DELEGATIONS"


def test_below_the_lightning_folders_nothing_imports_lightning():
    bad = []
    for module, path in modules().items():
        if layer_of(module) >= [name for name, _ in LAYERS].index(LIGHTNING_FROM):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{module}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics")]
    assert bad == []


def test_a_circle_and_an_upward_edge_are_found():
    """The checks themselves can fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("cascade.routing.route") > layer_of("cascade.llm") > layer_of("cascade.model.attention")
