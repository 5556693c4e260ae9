"""The FastAPI application: `uvicorn app.main:app` (or `qforge serve`)."""

from __future__ import annotations

from importlib.metadata import version

from fastapi import FastAPI

from app import dashboard, errors, middleware
from app.api.routes import artifacts, datasets, health, jobs, keys, metrics, models, presets


def create_app() -> FastAPI:
    app = FastAPI(
        title="qforge",
        version=version("qforge"),
        summary="Quantization as a service: submit a model and a recipe, get a quantized artifact and a report.",
    )
    errors.install(app)
    middleware.install(app)  # request ids, a log line and latency per request
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(datasets.router)
    app.include_router(models.router)
    app.include_router(presets.router)
    app.include_router(keys.router)
    dashboard.install(app)  # the pages at /, after the API's routes
    return app


app = create_app()
