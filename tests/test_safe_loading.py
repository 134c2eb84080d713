"""Nothing unsafe is loaded: every torch.load in the project passes weights_only=True, numpy never
allows pickles, and nothing calls pickle.load(s)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def calls(name_ok):
    for path in sorted(p for d in ("pipeline", "tasks", "kernels", "bench") for p in (ROOT / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                if name_ok(owner, node.func.attr):
                    yield path.relative_to(ROOT), node


def keyword(node, name):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only():
    found = list(calls(lambda owner, attr: owner == "torch" and attr == "load"))
    assert found, "the scan sees the project's torch.load calls"
    for path, node in found:
        value = keyword(node, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno} torch.load without weights_only=True"


def test_no_pickle_loads_and_numpy_refuses_pickles():
    assert not list(calls(lambda owner, attr: owner in ("pickle", "cPickle", "dill") and attr in ("load", "loads")))
    for path, node in calls(lambda owner, attr: owner == "np" and attr == "load"):
        value = keyword(node, "allow_pickle")
        assert isinstance(value, ast.Constant) and value.value is False, f"{path}:{node.lineno} np.load may unpickle"
