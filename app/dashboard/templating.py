"""The Jinja2 environment of the dashboard and the few filters its templates share."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import HTMLResponse

from app.dashboard.auth import Principal
from app.dashboard.views import job_recipe_name

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def when(value: dt.datetime | str | None) -> str:
    """UTC, to the second: absolute, so a live list re-renders only when something changed."""
    if value is None:
        return "–"
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


templates.env.filters.update(human_bytes=human_bytes, when=when, number=number)
templates.env.globals.update(recipe_name=job_recipe_name)


def page(request: Request, name: str, principal: Principal, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"principal": principal, **context}, status_code=status_code)


def fragment(name: str, **context: Any) -> str:
    """A template rendered to a string, for server-sent events."""
    return templates.get_template(name).render(**context)
