"""The import structure of `diffusion_jax`, checked from the source with `ast`.

Every ``import`` / ``from ... import`` of every module counts, at module level and inside
functions alike (a lazy import hides a dependency from the reader, not from this test), except
those of a module-level ``if __name__ == "__main__":`` block: that block is the program the
module is when run with ``python -m`` (the converters' command lines), i.e. the CLI layer.

Checked:
  * every module belongs to one layer of `LAYERS` (`LAYER_OF`, longest prefix wins) and imports
    only from its own layer or the layers below it;
  * there is no import cycle, neither between modules nor between packages (a subpackage
    counted as one node: ``pipelines -> applications -> pipelines`` is a cycle);
  * models import nothing of the library but models, and no optimiser, checkpoint or mesh
    library: a network knows no schedule, loss, mesh or optimiser;
  * nothing outside the command-line layer imports it.

`ALLOWED` lists the known violations that open work removes, each naming its owner; an entry
that no longer occurs fails, so the list only shrinks. The README's "Architecture" section lists
the same layers (`test_readme_lists_the_layers_of_this_table`).
"""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "diffusion_jax"

LAYERS = ("base", "math", "samplers", "models", "train/eval", "pipelines/applications", "cli")
"""Bottom to top: a module may import from its own layer and from the layers before it."""

LAYER_OF = {
    # base: files, configs, checkpoints, meshes, data and text -- nothing of diffusion.
    "diffusion_jax": "base",
    "diffusion_jax.config_utils": "base",
    "diffusion_jax.compilation_cache": "base",
    "diffusion_jax.workdir_lock": "base",
    "diffusion_jax.image_io": "base",
    "diffusion_jax.plotting": "base",
    "diffusion_jax.sharding": "base",
    "diffusion_jax.checkpoint": "base",
    "diffusion_jax.resume": "base",
    "diffusion_jax.idx": "base",
    "diffusion_jax.data": "base",
    "diffusion_jax.captions": "base",
    "diffusion_jax.clip_tokenizer": "base",
    "diffusion_jax.caption_tokenizer": "base",
    # math: pure functions of arrays.
    "diffusion_jax.schedules": "math",
    "diffusion_jax.diffusion": "math",
    "diffusion_jax.losses": "math",
    "diffusion_jax.sde": "math",
    "diffusion_jax.contrastive": "math",
    "diffusion_jax.metrics": "math",
    # samplers: chains over a denoiser callable, and the denoiser callable itself.
    "diffusion_jax.samplers": "samplers",
    "diffusion_jax.conditioning": "samplers",
    "diffusion_jax.denoisers": "samplers",
    "diffusion_jax.guidance": "samplers",
    # models: networks and the converters of published checkpoints into them.
    "diffusion_jax.models": "models",
    "diffusion_jax.convert": "models",
    # train/eval: training, loading a trained model, compiled sampling, evaluation.
    "diffusion_jax.train": "train/eval",
    "diffusion_jax.objectives": "train/eval",
    "diffusion_jax.classifier_training": "train/eval",
    "diffusion_jax.loading": "train/eval",
    "diffusion_jax.generate": "train/eval",
    "diffusion_jax.latent_generate": "train/eval",
    "diffusion_jax.likelihood_eval": "train/eval",
    "diffusion_jax.metrics_clip": "train/eval",
    "diffusion_jax.digits_classifier": "train/eval",
    "diffusion_jax.fashion_metric": "train/eval",
    # pipelines/applications: tasks built on a loaded model and a sampler.
    "diffusion_jax.pipelines": "pipelines/applications",
    "diffusion_jax.stage_pipeline": "pipelines/applications",
    "diffusion_jax.applications": "pipelines/applications",
    # cli: flags and entry points (the web app is one); nothing below imports them.
    "diffusion_jax.cli": "cli",
    "diffusion_jax.app": "cli",
}

ALLOWED = {}
"""Known violations (importer, imported) -> who removes them."""

MODEL_FORBIDDEN_EXTERNAL = ("optax", "orbax", "jax.sharding", "jax.experimental.mesh_utils",
                            "grain", "tensorflow_datasets")


def _sources(root: str = ROOT) -> dict[str, tuple[str, bool]]:
    """Module name -> (source text, is a package) of every module of the package under root."""
    found = {}
    for directory, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                with open(path, encoding="utf-8") as f:
                    found[module.removesuffix(".__init__")] = (f.read(), name == "__init__.py")
    return found


def _imported_names(module: str, source: str, is_package: bool) -> set[str]:
    """Every dotted name ``module`` imports, absolute (``from .x import y`` -> ``pkg.x.y``)."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source, module)
    tree.body = [node for node in tree.body if not _is_main_block(node)]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _is_main_block(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` at module level: the code that runs only when the module
    is the program (``python -m diffusion_jax.convert.unet2d``) belongs to the command-line
    layer, so its imports are not the module's."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.ops[0], ast.Eq)
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _owner(name: str, modules) -> str | None:
    """The module of ``modules`` that a dotted name denotes (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` (self-imports dropped)."""
    graph = {}
    for module, (source, is_package) in sources.items():
        owners = {_owner(n, sources) for n in _imported_names(module, source, is_package)
                  if n.split(".")[0] == PACKAGE}
        graph[module] = owners - {None, module}
    return graph


def _layer(module: str) -> str:
    prefixes = [p for p in LAYER_OF if module == p or module.startswith(p + ".")]
    if not prefixes:
        raise KeyError(module)
    return LAYER_OF[max(prefixes, key=len)]


def _node(module: str) -> str:
    """A module's node in the package graph: its subpackage of `PACKAGE`, or itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as ``[a, b, ..., a]``, or None (iterative DFS)."""
    state = {}
    for start in sorted(graph):
        if start in state:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        state[start] = "open"
        while stack:
            node, successors = stack[-1]
            nxt = next(successors, None)
            if nxt is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = "open"
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def _without_allowed(graph):
    return {m: {d for d in deps if (m, d) not in ALLOWED} for m, deps in graph.items()}


def layer_violations(graph) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{m} ({_layer(m)}) imports {d} ({_layer(d)})"
            for m, deps in sorted(graph.items()) for d in sorted(deps)
            if rank[_layer(d)] > rank[_layer(m)]]


def cycles(graph) -> list[list[str]]:
    """A cycle between modules and one between packages, where there are."""
    packages = {}
    for m, deps in graph.items():
        packages.setdefault(_node(m), set()).update(_node(d) for d in deps if _node(d) != _node(m))
    return [c for c in (_cycle(graph), _cycle(packages)) if c]


def model_violations(graph, sources) -> list[str]:
    bad = []
    for m in sorted(m for m in graph if m.startswith(f"{PACKAGE}.models")):
        bad += [f"{m} imports {d}" for d in sorted(graph[m])
                if not d.startswith(f"{PACKAGE}.models")]
        bad += [f"{m} imports {n}" for n in sorted(_imported_names(m, *sources[m]))
                if any(n == f or n.startswith(f + ".") for f in MODEL_FORBIDDEN_EXTERNAL)]
    return bad


def cli_importers(graph) -> list[str]:
    return [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
            if _layer(d) == "cli" and _layer(m) != "cli"]


@pytest.fixture(scope="module")
def sources():
    return _sources()


@pytest.fixture(scope="module")
def graph(sources):
    return import_graph(sources)


def test_every_module_has_a_layer(sources):
    missing = []
    for m in sorted(sources):
        try:
            _layer(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"add these modules to LAYER_OF in tests/test_layering.py: {missing}"


def test_imports_point_down_the_layers(graph):
    bad = layer_violations(_without_allowed(graph))
    assert not bad, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    found = cycles(_without_allowed(graph))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_models_import_no_schedule_loss_mesh_or_optimizer(graph, sources):
    bad = model_violations(graph, sources)
    assert not bad, "models must import only models (and jax/flax/numpy):\n" + "\n".join(bad)


def test_nothing_below_the_cli_imports_it(graph):
    bad = cli_importers(_without_allowed(graph))
    assert not bad, "the command-line layer is imported by the library:\n" + "\n".join(bad)


def test_allowed_violations_still_occur(graph):
    gone = [f"{a} -> {b} ({who})" for (a, b), who in ALLOWED.items() if b not in graph.get(a, ())]
    assert not gone, "remove from ALLOWED in tests/test_layering.py (fixed): " + "; ".join(gone)


def test_readme_lists_the_layers_of_this_table():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    listed = {}
    for name, members in re.findall(r"^\d+\. \*\*([\w/]+)\*\*[^:]*: (.*)$", section, re.M):
        listed[name] = {f"{PACKAGE}.{m}" if m != PACKAGE else m
                        for m in re.findall(r"`([\w.]+)`", members)}
    expected = {name: {m for m, layer in LAYER_OF.items() if layer == name} for name in LAYERS}
    assert list(listed) == list(LAYERS)
    assert listed == expected


# The checks above must be able to fail: each is run on the real sources with one import added.
@pytest.mark.parametrize("module,added,check", [
    ("diffusion_jax.schedules", "from diffusion_jax import samplers", "layer"),
    ("diffusion_jax.diffusion", "def f():\n    from diffusion_jax.train import TrainState", "layer"),
    ("diffusion_jax.models.unet", "def f():\n    from diffusion_jax import schedules", "models"),
    ("diffusion_jax.models.layers", "import optax", "models"),
    ("diffusion_jax.models.layers", "from jax.sharding import Mesh", "models"),
    ("diffusion_jax.pipelines", "from diffusion_jax.app import engine", "cli"),
    ("diffusion_jax.schedules", "def f():\n    from . import losses", "cycle"),
    ("diffusion_jax.sde.sdes", "from ..sde import ode", "cycle"),
])
def test_checks_catch_an_added_import(sources, module, added, check):
    checks = {"layer": lambda g, _: layer_violations(_without_allowed(g)),
              "models": model_violations,
              "cli": lambda g, _: cli_importers(_without_allowed(g)),
              "cycle": lambda g, _: cycles(_without_allowed(g))}
    assert not checks[check](import_graph(sources), sources)
    source, is_package = sources[module]
    changed = {**sources, module: (f"{source}\n{added}\n", is_package)}
    found = checks[check](import_graph(changed), changed)
    assert found and module in str(found), found


def test_a_main_block_may_call_the_cli(sources):
    """``if __name__ == "__main__":`` may import the CLI; the same import elsewhere may not."""
    module = "diffusion_jax.convert.vae"
    source, is_package = sources[module]
    for added, found in (('if __name__ == "__main__":\n    from diffusion_jax.cli import flags',
                          False),
                         ('if __name__ != "__main__":\n    from diffusion_jax.cli import flags',
                          True)):
        changed = {**sources, module: (f"{source}\n{added}\n", is_package)}
        assert bool(cli_importers(_without_allowed(import_graph(changed)))) == found, added
