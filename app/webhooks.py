"""Webhooks, the service's side: the `callback_url` a job may name, which addresses a
receiver may be at, the deployment's secret, and the event a finished job sends. The
worker delivers the events (worker.webhooks); the signature format is qforge.webhooks'.

Which receivers are allowed: a callback URL makes the worker send a request wherever the
submitter says, so an address inside the worker's own network (cloud metadata at
169.254.169.254, a database, an admin port) would turn qforge into a way in. Public
addresses are always allowed; loopback only where `webhook_loopback_allowed` says (the
embedded default); other private ranges only when listed in `webhook_allowed_networks`.
The check runs at submission, for a readable 422, and again on every connection the worker
makes, on the address it actually connects to, so a host name that later resolves
elsewhere (DNS rebinding) gains nothing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import typing
from typing import Annotated, Any, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, StringConstraints, Tag

from app.core.config import Settings
from app.errors import validation_problem
from app.models import Job, JobStatus
from quantcore.classic_job import ClassicJobRequest, JobSpec
from quantcore.job import JobRequest

MAX_URL_LENGTH = 2048  # the jobs.callback_url column; longer URLs are refused by many servers anyway
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # IPv6 addresses a NAT64 gateway turns into the IPv4 address inside


# --------------------------------------------------------------------------------------
# the request field
# --------------------------------------------------------------------------------------
def _check_url(url: str) -> str:
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(
            "must be ASCII without spaces: percent-encode other characters, and give a host name in its xn-- form"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, not '{parts.scheme or url}'")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold credentials (user:password@); authenticate requests by their signature")
    try:
        parts.port  # noqa: B018 (raises on a port out of range or not a number)
    except ValueError:
        raise ValueError("has an invalid port") from None
    return url


CallbackUrl = Annotated[str, StringConstraints(max_length=MAX_URL_LENGTH), AfterValidator(_check_url)]
CALLBACK_DOC = (
    "http(s) URL that receives one signed POST when the job finishes (succeeded, failed or cancelled); "
    "see the webhooks section of the service documentation"
)


class JobSubmission(JobRequest):
    """A recipe job as POST /v1/jobs takes it: quantcore's request and the service's callback."""

    callback_url: CallbackUrl | None = Field(None, description=CALLBACK_DOC)


class ClassicJobSubmission(ClassicJobRequest):
    callback_url: CallbackUrl | None = Field(None, description=CALLBACK_DOC)


# quantcore's own discriminator (recipe job, or classic by `kind`), so both unions choose alike
_, _discriminator = typing.get_args(JobSpec)
SubmissionSpec = Annotated[
    Union[Annotated[JobSubmission, Tag("recipe")], Annotated[ClassicJobSubmission, Tag("classic")]], _discriminator
]


def request_data(request: JobRequest | ClassicJobRequest) -> dict[str, Any]:
    """The request stored with the job, as the worker validates it again: without the
    callback, which is the service's, not quantcore's."""
    return request.model_dump(mode="json", exclude={"callback_url"})


# --------------------------------------------------------------------------------------
# which receivers are allowed
# --------------------------------------------------------------------------------------
def address_allowed(address: IPAddress, settings: Settings) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    elif isinstance(address, ipaddress.IPv6Address) and address in NAT64:
        address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)  # 64:ff9b::a00:1 reaches 10.0.0.1
    if any(address.version == net.version and address in net for net in settings.webhook_allowed_networks):
        return True
    if address.is_loopback:
        return settings.webhook_loopback_allowed
    # is_global is False for private, link-local, CGNAT and reserved ranges, but True for multicast
    return address.is_global and not address.is_multicast


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address a host name stands for (an IP literal is its own); raises OSError (or
    UnicodeError, for a name that cannot be encoded)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # a scoped IPv6 address (fe80::1%eth0) is link-local, never allowed unless listed
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in found))


def not_allowed_reason(host: str, addresses: list[IPAddress]) -> str:
    shown = ", ".join(str(a) for a in addresses[:4])
    return (
        f"'{host}' is at {shown}: not a public address, and not in QFORGE_WEBHOOK_ALLOWED_NETWORKS"
        " (loopback: QFORGE_WEBHOOK_ALLOW_LOOPBACK)"
    )


def check_callback(url: str, settings: Settings) -> None:
    """At submission: a 422 naming `callback_url` when its host does not resolve, or resolves
    to an address this service does not send to."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a label over 63 characters, say
        reason = getattr(exc, "strerror", None) or exc
        message, kind = f"the host '{host}' does not resolve: {reason}", "callback_url_unresolved"
    else:
        if all(address_allowed(a, settings) for a in addresses):
            return
        refused = [a for a in addresses if not address_allowed(a, settings)]
        message, kind = not_allowed_reason(host, refused), "callback_url_not_allowed"
    error = {"loc": ["body", "callback_url"], "msg": message, "type": kind}
    raise validation_problem([error], slug="callback-url-not-allowed", title="Callback URL not allowed")


# --------------------------------------------------------------------------------------
# the secret and the event
# --------------------------------------------------------------------------------------
def webhook_secret(settings: Settings) -> bytes:
    """The configured secret, else one generated once beside the signing key: a separate
    key, so handing the webhook secret to receivers does not let them sign download links."""
    from app.artifacts import key_file

    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value().encode()
    return key_file(settings, "webhook.secret")


def _when(moment: dt.datetime | None) -> str | None:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if moment is not None else None


def build_event(job: Job, event_id: str, settings: Settings, now: dt.datetime) -> tuple[str, bytes]:
    """The event of a finished job: its type and the body sent (compact JSON, fixed once so
    every retry sends the same bytes under the same id)."""
    if not job.status.terminal:
        raise ValueError(f"job {job.id} is {job.status.value}: only a finished job has an event")
    from app.artifacts import job_artifacts

    event_type = f"job.{job.status.value}"
    base = f"{settings.api_url}/v1/jobs/{job.id}"
    links: dict[str, str] = {"job": base}
    artifacts = []
    if job.status == JobStatus.SUCCEEDED:
        links["report"] = f"{base}/report"
        stored = job_artifacts(job)
        if stored:
            links["artifact"] = f"{base}/artifact"
        # as in the job JSON: the main artifact's plain URL, ?format= for each further one
        artifacts = [
            {"format": a.format, "sha256": a.sha256, "bytes": a.bytes,
             "url": f"{base}/artifact" + (f"?format={a.format}" if i and a.format else "")}
            for i, a in enumerate(stored)
        ]
    event = {
        "id": event_id,
        "type": event_type,
        "created_at": _when(now),
        "job": {
            "id": job.id,
            "status": job.status.value,
            "model": job.model,
            "error": job.error,  # why it failed; null otherwise
            "attempts": job.attempts,
            "created_at": _when(job.created_at),
            "started_at": _when(job.started_at),
            "finished_at": _when(job.finished_at),
        },
        "artifacts": artifacts,
        "links": links,
    }
    return event_type, json.dumps(event, separators=(",", ":")).encode()
