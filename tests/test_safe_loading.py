"""Safe loading, checked on the package's source: weights are read and written as safetensors, `torch.load` only
with `weights_only=True`, no pickle, and folder code runs only when the user passes `trust_remote_code`."""

import ast
from pathlib import Path

import pytest

import uae_hf

SOURCES = sorted(Path(uae_hf.__file__).parent.rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def name_of(call: ast.Call) -> str:
    return ast.unparse(call.func)


def keyword(call: ast.Call, name: str):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def guarded_by(tree: ast.AST, target: ast.AST, flag: str) -> bool:
    """Whether `target` sits in the body of an `if` that tests `flag`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and flag in ast.unparse(node.test):
            if any(inner is target for statement in node.body for inner in ast.walk(statement)):
                return True
    return False


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(Path(uae_hf.__file__).parent)))
def test_source_loads_and_saves_safely(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            assert not {"pickle", "dill", "cloudpickle"} & set(modules), f"{path}:{node.lineno} imports pickle"
    for call in calls(tree):
        where = f"{path.name}:{call.lineno}"
        if name_of(call) == "torch.load":
            value = keyword(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{where}: torch.load without weights_only"
        for flag in ("safe_serialization", "use_safetensors"):
            value = keyword(call, flag)
            assert not (isinstance(value, ast.Constant) and value.value is False), f"{where}: {flag}=False"
        value = keyword(call, "trust_remote_code")
        if isinstance(value, ast.Constant) and value.value is True:
            assert guarded_by(tree, call, "trust_remote_code"), f"{where}: trust_remote_code=True the user did not ask for"


def test_the_scan_sees_the_package():
    names = {path.name for path in SOURCES}
    assert {"loading.py", "decoder_trainer.py", "checkpointing.py"} <= names
