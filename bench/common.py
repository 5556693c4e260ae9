"""What every benchmark prints and records: when, with what, on which machine, with which seed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from quantcore.job import environment


def run_header(seed: int, **settings) -> list[str]:
    extra = "".join(f", {k.replace('_', ' ')}: {v}" for k, v in settings.items())
    return [
        f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, seed: {seed}{extra}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in environment().items()),
    ]


def write_section(path: Path, title: str, header: list[str], table: str, command: str) -> None:
    """Replace (or append) the section `## title` of a markdown results file."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    body = f"## {title}\n\ncommand: `{command}`\n\n" + "\n".join(f"{h}  " for h in header) + "\n\n" + table + "\n"
    start = text.find(f"## {title}\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + body + (text[end + 1 :] if end != -1 else "")
    path.write_text(text)
