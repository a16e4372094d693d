"""The twins are peers: every module of vqvae_jax imports without torch or vqvae_torch, every
module of vqvae_torch without JAX, Flax, optax, orbax or vqvae_jax, and vqvae_common without
either framework. Each check runs in a fresh interpreter whose import system refuses the
blocked packages, as an environment without them would; and since an import inside a function
runs only when called, the source is also read for any import statement of them."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

IMPORT_ALL_BLOCKING = """
import importlib, importlib.abc, pkgutil, sys

BLOCKED = set(sys.argv[2].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, Block())
package = importlib.import_module(sys.argv[1])
for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
    print(module.name)
leaked = sorted({name.partition(".")[0] for name in sys.modules} & BLOCKED)
assert not leaked, leaked
"""

TORCH = ("torch", "vqvae_torch")
JAX = ("jax", "jaxlib", "flax", "optax", "orbax", "vqvae_jax")
FORBIDDEN = {"vqvae_jax": TORCH, "vqvae_torch": JAX, "vqvae_common": TORCH + JAX}


def imported_packages(source: str) -> set[str]:
    """The top-level package of every import statement in `source`, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_statement_names_the_other_framework(package):
    for path in sorted((ROOT / package).glob("*.py")):
        found = imported_packages(path.read_text()) & set(FORBIDDEN[package])
        assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}"


def test_a_deferred_import_is_found():
    assert imported_packages("def f():\n    from torch import nn\n") == {"torch"}


@pytest.mark.parametrize("package, blocked", sorted(FORBIDDEN.items()))
def test_package_imports_without_the_other_framework(package, blocked):
    run = subprocess.run([sys.executable, "-c", IMPORT_ALL_BLOCKING, package, ",".join(blocked)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(run.stdout.split()) >= 3, run.stdout  # every module was imported, not none


def test_the_block_catches_a_forbidden_import(tmp_path):
    """The same check fails on a package that imports a blocked one."""
    (tmp_path / "leaky").mkdir()
    (tmp_path / "leaky" / "__init__.py").write_text("")
    (tmp_path / "leaky" / "bridge.py").write_text("import torch\n")
    run = subprocess.run([sys.executable, "-c", IMPORT_ALL_BLOCKING, "leaky", "torch"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "No module named 'torch' (blocked)" in run.stderr
