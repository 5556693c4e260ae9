"""The CLI's exit codes: each says what a pipeline should do next."""

from __future__ import annotations

import enum

from pydantic import ValidationError

from qforge.client.errors import ChecksumMismatch, JobCancelled, JobFailed, QforgeError, ServerUnavailable, WaitTimeout


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # a bug or an unforeseen failure: read the traceback
    BAD_INPUT = 2  # fix the command: usage, a file, a recipe, or the API said 4xx
    JOB_FAILED = 3  # the job ran and failed (or was cancelled): read its reason
    TIMEOUT = 4  # still running when --timeout ran out: wait again or raise the timeout
    UNAVAILABLE = 5  # server unreachable, 5xx, or a download that failed its checksum: retry later
    BUDGET_EXCEEDED = 6  # the job succeeded, but a --check failed: the model is not good enough


HELP = """exit codes:
  0  success
  1  unexpected error (a traceback says where)
  2  bad input: command usage, a missing or invalid recipe file, an unknown metric, or a 4xx from the API
  3  the job failed or was cancelled (the reason is printed)
  4  timed out waiting for the job (it goes on running on the server)
  5  server unreachable, a 5xx from the API, or a download that failed its sha256 check: worth retrying
  6  budget exceeded: the job succeeded but a `report --check` failed"""


class BadInput(Exception):
    """The command's own input is wrong (a file, a recipe, a check expression)."""


class LocalJobFailed(Exception):
    """A job run here (`qforge quantize`) raised; the message is its reason."""


def exit_code(error: BaseException) -> ExitCode | None:
    """The code for an error the CLI expects; None for one it does not (a bug: show it)."""
    if isinstance(error, (JobFailed, JobCancelled, LocalJobFailed)):
        return ExitCode.JOB_FAILED
    if isinstance(error, WaitTimeout):
        return ExitCode.TIMEOUT
    if isinstance(error, (ServerUnavailable, ChecksumMismatch)):
        return ExitCode.UNAVAILABLE
    if isinstance(error, QforgeError):
        if error.is_client_error:
            return ExitCode.BAD_INPUT
        return ExitCode.UNAVAILABLE if error.status is not None and error.status >= 500 else ExitCode.ERROR
    if isinstance(error, (BadInput, ValidationError)):
        return ExitCode.BAD_INPUT
    return None
