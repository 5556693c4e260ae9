"""Prometheus metrics (app/metrics.py lists them). Like the probes, it needs no API key:
Prometheus scrapes it; keep it reachable only from the monitoring network."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from app.metrics import REGISTRY

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_PLAIN_0_0_4: {}}}})
def metrics() -> Response:
    """The Prometheus text format (a sync route: the job metrics query the database)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_PLAIN_0_0_4)
