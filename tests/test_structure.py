"""The package's structure: no import cycles (lazy imports inside functions count too), and no module reaching for
another module's private names."""

import ast
from pathlib import Path

import pytest

import lictrain

PACKAGE = Path(lictrain.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported lictrain module, names taken from it) for every import statement in the file, wherever it is."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("lictrain")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lictrain"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if (PACKAGE.parent / f"{target}.{n}".replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / f"{target}.{n}".replace(".", "/") / "__init__.py").exists()]
            out += [(m, []) for m in submodules]
            out.append((target, [n for n in names if f"{target}.{n}" not in submodules]))
    return out


def graph() -> dict[str, set[str]]:
    g = {}
    for path in PACKAGE.rglob("*.py"):
        g[module_name(path)] = {m for m, _ in imports(path) if m != module_name(path)}
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue  # a package and its own modules (__init__ re-exports) are one unit
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_no_module_imports_private_names_of_another():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in imports(path):
            offenders += [f"{module_name(path)}: {target}.{n}" for n in names if n.startswith("_")]
    assert not offenders, offenders


def test_registries_are_filled_by_their_modules_and_refuse_duplicates():
    import torch

    from lictrain.errors import LictrainError
    from lictrain.methods import build_method
    from lictrain.optim import build_optimizer
    import lictrain.models  # noqa: F401  (registering happens where the plug-ins are defined: importing fills)
    from lictrain.recipes import recipe_overrides
    from lictrain.registry import METHODS, MODELS, OPTIMIZERS, RECIPES, WRAPPERS, Registry, register_method

    assert list(MODELS)[:3] == ["bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean"] and "elic" in MODELS
    assert list(OPTIMIZERS) == ["adam", "adamw", "sgd", "cautious-adam", "adagrad", "soap", "shampoo", "muon"]
    assert list(WRAPPERS) == ["sma"] and list(METHODS)[0] == "standard"
    assert RECIPES["cmd-lic"]["method.name"] == "cmd-lic" and set(RECIPES) >= {"adam", "soap", "balanced-rd"}
    assert recipe_overrides("balanced-rd") == ["optim.name=adam", "method.name=balanced-rd"]
    with pytest.raises(ValueError, match="method 'standard' is registered twice"):
        register_method("standard")(object)
    reg = Registry("widget")
    assert reg.add("a", 1) == 1
    with pytest.raises(LictrainError, match="unknown widget 'b'; valid widgets: a"):
        reg.lookup("b")

    # a method registered by decorator is usable by name, and the decorator returns the class itself
    from lictrain.methods.standard import Standard

    @register_method("test-only-method")
    class Doubled(Standard):
        pass

    try:
        assert isinstance(build_method("test-only-method"), Doubled)
    finally:
        del METHODS["test-only-method"]
    assert isinstance(build_optimizer("adam+sma", [torch.nn.Parameter(torch.zeros(2))], 1e-3).base, torch.optim.Adam)
