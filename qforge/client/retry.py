"""When the SDK sends a request again, and how long it waits first.

Retried: connection errors, 5xx answers, and 429 (after its `Retry-After`). Never retried:
any other 4xx, which says the request itself is wrong. The delay grows exponentially with
"equal jitter" (half the backoff fixed, half random), so many clients that failed together
do not come back together, yet each still waits at least half its backoff.

A request that is not safe to repeat (an upload: a second one would store a second copy)
is retried only when the server surely did not act on it: the connection was never made,
or the answer was 429 or 503.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import random

import httpx
from pydantic import BaseModel, ConfigDict, Field

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# answers that mean the server refused the request before acting on it
NOT_ACTED_ON_STATUS = frozenset({429, 503})
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class RetryPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(5, ge=1, le=50, description="tries in all, the first one included")
    backoff_s: float = Field(0.5, ge=0, description="backoff before the first retry")
    multiplier: float = Field(2.0, ge=1, description="each further retry's backoff is this times the last")
    max_backoff_s: float = Field(30.0, ge=0, description="the backoff stops growing here")
    jitter: bool = Field(True, description="wait between half and all of the backoff, at random")
    max_retry_after_s: float = Field(
        120.0, ge=0, description="the longest Retry-After honoured; a server asking for more ends the retries"
    )

    def backoff(self, retry: int) -> float:
        """The wait before retry number `retry` (1 for the first)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * self.multiplier ** (retry - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2) if self.jitter else ceiling

    def after_response(self, response: httpx.Response, retry: int, idempotent: bool = True) -> float | None:
        """Seconds to wait before sending again after this error answer; None: give up."""
        status = response.status_code
        if retry >= self.attempts or status not in RETRYABLE_STATUS:
            return None
        if not idempotent and status not in NOT_ACTED_ON_STATUS:
            return None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is None:
            return self.backoff(retry)
        return retry_after if retry_after <= self.max_retry_after_s else None

    def after_error(self, error: Exception, retry: int, idempotent: bool = True) -> float | None:
        """Seconds to wait before sending again after a transport error; None: give up."""
        if retry >= self.attempts or not isinstance(error, httpx.TransportError):
            return None
        if not idempotent and not isinstance(error, NOT_SENT_ERRORS):
            return None
        return self.backoff(retry)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
