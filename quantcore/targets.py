"""Which modules a recipe stage touches: `targets` by type, minus `ignore` by name.

An ignore pattern matches a module name when it is
* the exact name, or a dotted suffix of it (`lm_head`, `mlp.down_proj`),
* an fnmatch glob (`model.layers.0.*`, `*.k_proj`),
* or a regular expression written `re:<regex>` (matched with re.search).

Python's regular expressions backtrack: `(a+)+$` or ten `.*` in a row take exponential or
high-polynomial time on a name that almost matches, and a recipe comes from a client. So a
`re:` pattern may hold at most `MAX_REPEATS` repetitions, none inside another, no
alternation inside a repetition and no backreference (`check_pattern`); module names are
short, so what is left stays cheap. fnmatch globs are translated without that risk.
"""

from __future__ import annotations

import fnmatch
import re
from re import _constants as sre, _parser as sre_parse  # type: ignore[attr-defined]  # the parser re uses

from torch import nn

TARGET_TYPES: dict[str, tuple[type[nn.Module], ...]] = {"Linear": (nn.Linear,)}
MAX_PATTERN = 256
MAX_REPEATS = 3
_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT))


def check_pattern(pattern: str) -> None:
    """Raise ValueError when an ignore pattern is too long, or a `re:` pattern is invalid or
    could take exponential time (see the module docstring)."""
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"pattern is longer than {MAX_PATTERN} characters")
    if not pattern.startswith("re:"):
        return
    try:
        parsed = sre_parse.parse(pattern[3:])
    except re.error as exc:
        raise ValueError(f"'{pattern}' is not a regular expression: {exc}") from None
    if _repeats(list(parsed), inside=False) > MAX_REPEATS:
        raise ValueError(f"'{pattern}' repeats more than {MAX_REPEATS} times; matching it could take very long")


def _repeats(items, inside: bool) -> int:
    count = 0
    for op, av in items:
        if op in _REPEATS and av[1] > 1:
            if inside:
                raise ValueError("a repetition inside a repetition can take exponential time to match")
            count += 1 + _repeats(list(av[2]), inside=True)
        elif op in _REPEATS:  # ? or {0,1}: no backtracking blow-up
            count += _repeats(list(av[2]), inside)
        elif op == sre.SUBPATTERN:
            count += _repeats(list(av[3]), inside)
        elif op == sre.BRANCH:
            if inside:
                raise ValueError("an alternation inside a repetition can take exponential time to match")
            count += sum(_repeats(list(branch), inside) for branch in av[1])
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            count += _repeats(list(av[1]), inside)
        elif op in (sre.GROUPREF, sre.GROUPREF_EXISTS):
            raise ValueError("backreferences are not allowed in ignore patterns")
    return count


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
