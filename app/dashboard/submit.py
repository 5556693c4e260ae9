"""Submitting a job from the dashboard, and uploading the checkpoint or data it runs on.

A submission goes through `app.jobs.submit`, as POST /v1/jobs does; uploads through
`app.uploads`, as POST /v1/models and /v1/datasets do. Errors come back as the form with
each message beside its field.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import FormData

from app import crud, jobs, uploads
from app.api.deps import SessionDep, SettingsDep
from app.core.db import run_db, with_request_session
from app.dashboard import forms
from app.dashboard.auth import Principal, PrincipalDep, SubmitterPrincipalDep
from app.dashboard.templating import page
from app.errors import Problem
from app.models import Dataset, DatasetKind, UploadedModel
from quantcore.models.classifiers import BUNDLED_CLASSIFIERS, BUNDLED_DATA
from quantcore.models import bundled_models
from quantcore.recipe import PRESETS

router = APIRouter(include_in_schema=False)
KINDS = ("recipe", "classic")
UPLOADS_SHOWN = 100


async def form_data(request: Request) -> FormData:
    # Read on the event loop, as an await; the route's own body is sync (with_request_session).
    return await request.form()


@router.get("/jobs/new", response_class=HTMLResponse)
@with_request_session
def new_job(
    request: Request,
    principal: SubmitterPrincipalDep,
    session: SessionDep,
    kind: Annotated[str, Query(pattern="^(recipe|classic)$")] = "recipe",
    model: Annotated[str | None, Query(max_length=64)] = None,
    uploaded: Annotated[str | None, Query(max_length=200)] = None,
):
    notice = f"Uploaded {uploaded}." if uploaded else None
    return _form(request, principal, session, forms.default_values(kind, model), notice=notice)


@router.get("/jobs/new/editor", response_class=HTMLResponse)
def recipe_editor(
    request: Request,
    principal: PrincipalDep,
    kind: Annotated[str, Query(pattern="^(recipe|classic)$")] = "recipe",
    preset: Annotated[str, Query(max_length=100)] = forms.DEFAULT_PRESET,
):
    """The YAML editor holding a preset (htmx swaps it in when the preset choice changes)."""
    values = {"kind": kind, "recipe": forms.starting_point(kind, preset)}
    return page(request, "_recipe_editor.html", principal, kind=kind, values=values, errors={})


@router.post("/jobs/new", response_class=HTMLResponse)
@with_request_session
def submit_job(
    request: Request,
    principal: SubmitterPrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    form: Annotated[FormData, Depends(form_data)],
):
    values = forms.submitted_values(form)
    if values.get("kind") not in KINDS:
        values["kind"] = "recipe"
    if form.get("action") == "preset":  # without JavaScript: fill the editor with the chosen preset
        values["recipe"] = forms.starting_point(values["kind"], values.get("preset", ""))
        return _form(request, principal, session, values)
    try:
        job_request = forms.build_request(values)
        job, _ = jobs.submit(session, job_request, values.get("idempotency_key") or None, settings, principal.tenant)
    except forms.FormErrors as errors:
        return _form(request, principal, session, values, errors, status_code=422)
    except Problem as problem:
        errors = forms.problem_errors(problem.extra["errors"], values.get("recipe", "")) if "errors" in problem.extra \
            else forms.FormErrors({"": [problem.detail]})
        return _form(request, principal, session, values, errors, status_code=problem.status)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/uploads/model", response_class=HTMLResponse)
async def upload_model(request: Request, principal: SubmitterPrincipalDep, session: SessionDep, settings: SettingsDep):
    """Multipart: `file`, `config` and `name`, handed whole to the API's upload code."""
    try:
        model = await uploads.receive_within_quota("model", request, session, settings, principal.tenant)
    except Problem as problem:
        return await run_db(_upload_failed, request, principal, session, "model", problem)
    query = urlencode({"kind": "classic", "model": f"upload:{model.id}", "uploaded": f"model {model.name}"})
    return RedirectResponse(f"/jobs/new?{query}", status_code=303)


@router.post("/uploads/dataset", response_class=HTMLResponse)
async def upload_dataset(request: Request, principal: SubmitterPrincipalDep, session: SessionDep, settings: SettingsDep):
    try:
        dataset = await uploads.receive_within_quota("dataset", request, session, settings, principal.tenant)
    except Problem as problem:
        return await run_db(_upload_failed, request, principal, session, "dataset", problem)
    query = urlencode({"kind": "classic", "uploaded": f"dataset {dataset.name}"})
    return RedirectResponse(f"/jobs/new?{query}", status_code=303)


def _upload_failed(request: Request, principal: Principal, session, what: str, problem: Problem) -> HTMLResponse:
    errors = forms.FormErrors()
    for error in problem.extra.get("errors") or [{"msg": problem.detail}]:
        errors.add(f"upload_{what}", error["msg"])
    return _form(request, principal, session, forms.default_values("classic"), errors, status_code=problem.status)


def _form(request: Request, principal: Principal, session, values: dict[str, Any], errors: forms.FormErrors | None = None,
          status_code: int = 200, notice: str | None = None) -> HTMLResponse:
    models, _ = crud.list_uploads(session, UploadedModel, principal.tenant, UPLOADS_SHOWN, 0)
    datasets, _ = crud.list_uploads(session, Dataset, principal.tenant, UPLOADS_SHOWN, 0)
    kind = values.get("kind", "recipe")
    presets = {name: spec["description"] for name, spec in PRESETS.items()} if kind == "recipe" else \
        {name: f"a {name} job with every option at its default" for name in forms.CLASSIC_SPECS}
    return page(
        request, "submit.html", principal, status_code=status_code, kind=kind, values=values,
        errors=(errors or forms.FormErrors()).fields, notice=notice,
        # a fresh key per rendering: a double-clicked submit makes one job, not two
        idempotency_key=uuid.uuid4().hex,
        bundled={f"bundled:{name}": text for name, text in bundled_models().items()},
        bundled_classifiers=BUNDLED_CLASSIFIERS, presets=presets, export_formats=forms.EXPORT_FORMATS,
        calibration_options=[(name, name) for name in forms.CALIBRATION_DATASETS], uploaded_models=models,
        # classic jobs train and calibrate on arrays; text uploads are for other jobs
        train_options=[*((ref, ref) for ref in BUNDLED_DATA),
                       *((f"upload:{d.id}", f"{d.name} ({d.samples} samples)") for d in datasets if d.kind == DatasetKind.ARRAYS)],
        architectures=sorted(uploads.ARCHITECTURES), config_example=uploads.CONFIG_EXAMPLE, labels=forms.LABELS,
    )
