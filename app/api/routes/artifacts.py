"""/v1/artifacts: downloads through signed links (POST /v1/jobs/{id}/artifact/link), which
carry their own proof and need no other credentials."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from app import artifacts
from app.api.deps import SessionDep, SettingsDep
from app.artifact_store import store_for
from app.core.db import with_request_session

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


@router.get("/{file}")
@with_request_session
def download_by_link(
    file: Annotated[str, Path(max_length=128)],
    expires: Annotated[int, Query(description="the link's expiry, Unix seconds")],
    signature: Annotated[str, Query(max_length=128)],
    session: SessionDep,
    settings: SettingsDep,
    range: Annotated[str | None, Header()] = None,
) -> Response:
    artifacts.check_link(settings, file, expires, signature)
    artifact = artifacts.artifact_by_file(session, file)
    return artifacts.artifact_response(store_for(settings), artifact, range)
