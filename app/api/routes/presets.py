"""/v1/recipes/presets: the named recipes a job may ask for by name."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.auth import authenticate
from app.schemas import Preset
from quantcore.recipe import list_presets

router = APIRouter(prefix="/v1/recipes", tags=["recipes"], dependencies=[Depends(authenticate)])


@router.get("/presets", response_model=list[Preset])
def presets() -> list[Preset]:
    return [Preset(**p) for p in list_presets()]
