"""Which modules a recipe stage touches: `targets` by type, minus `ignore` by name.

An ignore pattern matches a module name when it is
* the exact name, or a dotted suffix of it (`lm_head`, `mlp.down_proj`),
* an fnmatch glob (`model.layers.0.*`, `*.k_proj`),
* or a regular expression written `re:<regex>` (matched with re.search).
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

TARGET_TYPES: dict[str, tuple[type[nn.Module], ...]] = {"Linear": (nn.Linear,)}


def is_ignored(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def select_modules(model: nn.Module, targets: list[str], ignore: list[str]) -> list[tuple[str, nn.Module]]:
    types = tuple(t for name in targets for t in TARGET_TYPES[name])
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, types) and not is_ignored(name, ignore)
    ]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
