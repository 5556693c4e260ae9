"""Signing and verifying qforge's webhook events. Standard library only: a receiver imports
this module without the server's dependencies.

A job submitted with a `callback_url` gets one POST when it finishes (succeeded, failed or
cancelled). Each attempt carries

    X-Qforge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">
    X-Qforge-Event-Id:  <event id>, the same on every retry of the event

`t` is the time of the attempt, so a receiver that rejects old timestamps (`tolerance_s`)
rejects a replayed request, while a retry an hour later still verifies. Several `v1=`
entries may appear (signatures under more than one secret); one match is enough.

One secret per deployment, not one per job. A receiver keeps one secret per sender, as for
GitHub's and Stripe's webhooks, and verifies a request before parsing anything in it; with
a secret per job it would have to read the job id from the unverified body, and keep a
secret for every job it ever submitted. qforge has no tenants yet; once it has, the secret
becomes one per tenant (so one tenant cannot sign events for another's receiver) without a
change to this format. The service never returns the secret: the operator hands it out
(`QFORGE_WEBHOOK_SECRET`, or the file `<data_dir>/webhook.secret` it is generated into).

Verifying, in a receiver (any web framework; `body` is the request's raw bytes):

    from qforge.webhooks import WebhookVerificationError, verify_webhook

    try:
        event = verify_webhook(secret, body, headers["X-Qforge-Signature"])
    except WebhookVerificationError:
        return 400
    if seen(event["id"]):  # deliveries are at least once: skip an event already handled
        return 200
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

SIGNATURE_HEADER = "X-Qforge-Signature"
EVENT_ID_HEADER = "X-Qforge-Event-Id"
SIGNATURE_SCHEME = "v1"


class WebhookVerificationError(ValueError):
    """The request was not signed with the secret, was altered, or is too old (or too new)."""


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def compute_signature(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of `<timestamp>.<body>` under the secret."""
    return hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The X-Qforge-Signature value for one attempt (now, unless a timestamp is given)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},{SIGNATURE_SCHEME}={compute_signature(secret, t, body)}"


def parse_signature_header(header: str) -> tuple[int, list[str]]:
    """The timestamp and the v1 signatures of a header; entries of other schemes are ignored
    (a later scheme may be sent beside v1)."""
    timestamp, signatures = None, []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            raise WebhookVerificationError(f"malformed {SIGNATURE_HEADER} entry '{item.strip()}'")
        if name == "t":
            if not value.isascii() or not value.isdigit():
                raise WebhookVerificationError(f"{SIGNATURE_HEADER}: t must be unix seconds, not '{value}'")
            timestamp = int(value)
        elif name == SIGNATURE_SCHEME:
            signatures.append(value)
    if timestamp is None:
        raise WebhookVerificationError(f"{SIGNATURE_HEADER} has no timestamp (t=)")
    if not signatures:
        raise WebhookVerificationError(f"{SIGNATURE_HEADER} has no {SIGNATURE_SCHEME} signature")
    return timestamp, signatures


def verify_webhook(
    secret: str | bytes, body: bytes | str, header: str | None, tolerance_s: float | None = 300, now: float | None = None
) -> dict[str, Any]:
    """Check a delivery and return its event (the parsed body).

    Raises WebhookVerificationError unless one v1 signature in `header` is the HMAC of
    `<t>.<body>` under `secret` and `t` is within `tolerance_s` of now (either way: a
    timestamp from the future is as suspect as an old one). `body` must be the raw bytes
    received: parsed and re-serialized JSON does not verify. `tolerance_s=None` skips the
    time check (e.g. to verify a stored request later)."""
    if not header:
        raise WebhookVerificationError(f"no {SIGNATURE_HEADER} header")
    raw = body.encode() if isinstance(body, str) else body
    timestamp, signatures = parse_signature_header(header)
    expected = compute_signature(secret, timestamp, raw)
    # compare_digest for every candidate: the time taken reveals nothing about the expected value
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise WebhookVerificationError("no signature matches: another secret, or an altered body")
    if tolerance_s is not None:
        age = (time.time() if now is None else now) - timestamp
        if abs(age) > tolerance_s:
            raise WebhookVerificationError(f"timestamp {timestamp} is {age:+.0f} s from now; at most {tolerance_s:g} s allowed")
    try:
        return json.loads(raw)
    except ValueError as exc:  # signed by the secret, so a sender's bug rather than an attack
        raise WebhookVerificationError(f"the body is not JSON: {exc}") from None
