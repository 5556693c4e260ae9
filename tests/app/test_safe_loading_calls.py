"""No code path of the service can unpickle or run a model's code: every torch.load passes
weights_only=True, every np.load allow_pickle=False, trust_remote_code is only ever False,
and nothing calls pickle.load(s), torch.export.load or torch.jit.load. Read from the source's
syntax tree, so a new call anywhere in the packages is held to it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "quantcore", "worker", "qforge")
UNSAFE = {("pickle", "load"), ("pickle", "loads"), ("export", "load"), ("jit", "load"), ("dill", "load")}


def calls():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = node.func.value
                    owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", owner_name, node.func.attr, node
                # trust_remote_code as a keyword, or as a key of a dict of keywords (loading.OFFLINE)
                pairs = [(k.arg, k.value) for k in node.keywords] if isinstance(node, ast.Call) else []
                if isinstance(node, ast.Dict):
                    pairs = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
                for name, value in pairs:
                    if name == "trust_remote_code":
                        yield f"{path.relative_to(ROOT)}:{value.lineno}", "", "trust_remote_code", value


def constant(node: ast.Call, name: str):
    values = [k.value for k in node.keywords if k.arg == name]
    return values[0].value if values and isinstance(values[0], ast.Constant) else "missing or not a constant"


def test_the_scan_sees_the_calls_it_checks():
    found = {(owner, attr) for _, owner, attr, _ in calls()}
    assert ("torch", "load") in found and ("np", "load") in found and ("", "trust_remote_code") in found


CHECKED = [c for c in calls() if c[1:3] in {("torch", "load"), ("np", "load"), ("", "trust_remote_code")} | UNSAFE]


@pytest.mark.parametrize("where, owner, attr, node", CHECKED, ids=[c[0] for c in CHECKED])
def test_every_loading_call_is_safe(where, owner, attr, node):
    assert (owner, attr) not in UNSAFE, f"{where}: {owner}.{attr} runs pickled code"
    if (owner, attr) == ("torch", "load"):
        assert constant(node, "weights_only") is True, where
    elif (owner, attr) == ("np", "load"):
        assert constant(node, "allow_pickle") is False, where
    else:
        assert isinstance(node, ast.Constant) and node.value is False, where
