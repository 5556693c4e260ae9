"""The qforge Python SDK: `Client` (blocking) and `AsyncClient` over the REST API (v1).

Answers are the API's own pydantic models (`app.schemas.JobOut`, `JobPage`, `Preset`,
`ModelOut`, `DatasetOut`); every error is a `QforgeError`. See docs/sdk.md.
"""

from qforge.client.aio import AsyncClient
from qforge.client.errors import (
    ChecksumMismatch,
    JobCancelled,
    JobFailed,
    QforgeError,
    ServerUnavailable,
    WaitTimeout,
)
from qforge.client.retry import RetryPolicy
from qforge.client.sync import Client

__all__ = [
    "AsyncClient",
    "ChecksumMismatch",
    "Client",
    "JobCancelled",
    "JobFailed",
    "QforgeError",
    "RetryPolicy",
    "ServerUnavailable",
    "WaitTimeout",
]
