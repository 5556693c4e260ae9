"""What the SDK raises. Every error is a `QforgeError`, so one `except` catches them all.

An API error is the server's RFC 9457 problem document (`status`, `type`, `title`,
`detail`, and its extension members in `problem`); the other errors keep the same fields so
a caller can print any of them the same way.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from app.schemas import JobOut

PROBLEM_MEDIA_TYPE = "application/problem+json"


class QforgeError(Exception):
    """An error answer of the API (or, in subclasses, a failure on the way to one)."""

    def __init__(
        self,
        status: int | None,
        type: str,
        title: str,
        detail: str,
        problem: dict[str, Any] | None = None,
        request: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.type, self.title, self.detail = status, type, title, detail
        self.problem = problem or {}
        self.request = request  # "GET http://host/v1/jobs/...": which call failed

    @property
    def slug(self) -> str:
        """The last part of the problem type: `validation-error`, `job-not-found`, ..."""
        return self.type.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_client_error(self) -> bool:
        """4xx: the request itself is wrong; sending it again will not help."""
        return self.status is not None and 400 <= self.status < 500

    def __str__(self) -> str:
        head = f"{self.status} {self.title}" if self.status else self.title
        return f"{head}: {self.detail}" if self.detail and self.detail != self.title else head


class ServerUnavailable(QforgeError):
    """The server could not be reached (connection refused, DNS, timeouts) after every retry."""

    def __init__(self, detail: str) -> None:
        super().__init__(None, "about:blank", "Server unreachable", detail)

    @classmethod
    def after(cls, where: str, error: Exception) -> ServerUnavailable:
        return cls(f"{where}: {type(error).__name__}: {error}")


class ChecksumMismatch(QforgeError):
    """A download's bytes do not hash to the sha256 the API gave; nothing was kept."""

    def __init__(self, detail: str, expected: str, actual: str) -> None:
        super().__init__(None, "about:blank", "Checksum mismatch", detail)
        self.expected, self.actual = expected, actual


class WaitTimeout(QforgeError, TimeoutError):
    """`wait` gave up before the job finished; the job goes on running on the server."""

    def __init__(self, job: JobOut, timeout_s: float) -> None:
        stage = f", stage {job.progress.stage} at {job.progress.percent:.0f} %" if job.progress.stage else ""
        detail = f"job {job.id} still {job.status.value} after {timeout_s:g} s{stage}"
        super().__init__(None, "about:blank", "Timed out waiting for the job", detail)
        self.job = job


class JobFailed(QforgeError):
    """The job ended `failed`; `reason` is the server's explanation for a person to read."""

    def __init__(self, job: JobOut) -> None:
        self.reason = job.error or "no reason recorded"
        super().__init__(None, "about:blank", "Job failed", f"job {job.id} failed: {self.reason}")
        self.job = job


class JobCancelled(QforgeError):
    """The job ended `cancelled` (someone asked for it) while it was waited for."""

    def __init__(self, job: JobOut) -> None:
        super().__init__(None, "about:blank", "Job cancelled", f"job {job.id} was cancelled")
        self.job = job


def error_from_response(response: httpx.Response) -> QforgeError:
    """The problem document of an error answer; a body that is not one (a proxy's HTML page,
    say) still gives an error with the status and the start of the body."""
    request = f"{response.request.method} {response.request.url}"
    problem: dict[str, Any] | None = None
    try:
        body = json.loads(response.content)
        if isinstance(body, dict) and ("type" in body or "title" in body):
            problem = body
    except ValueError:
        pass
    if problem is None:
        text = response.content[:500].decode("utf-8", "replace").strip()
        title = response.reason_phrase or "HTTP error"
        return QforgeError(response.status_code, "about:blank", title, text, request=request)
    return QforgeError(
        int(problem.get("status") or response.status_code),
        str(problem.get("type", "about:blank")),
        str(problem.get("title", response.reason_phrase)),
        str(problem.get("detail", "")),
        problem=problem,
        request=request,
    )
