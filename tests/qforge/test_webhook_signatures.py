"""qforge.webhooks: the signature a sender computes and a receiver checks, held to an HMAC
computed here with hmac/hashlib from the documented format: `t=<t>,v1=<hex>` over `<t>.<body>`."""

import hashlib
import hmac
import json
import subprocess
import sys

import pytest

from qforge.webhooks import WebhookVerificationError, signature_header, verify_webhook

SECRET = "3f1c0a9e-receiver-secret"
BODY = json.dumps({"id": "e1", "type": "job.succeeded", "job": {"id": "j1", "status": "succeeded"}}).encode()
NOW = 1_800_000_000


def reference(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).hexdigest()


def test_the_header_is_the_documented_hmac():
    assert signature_header(SECRET, BODY, timestamp=NOW) == f"t={NOW},v1={reference(SECRET, NOW, BODY)}"


def test_a_header_computed_independently_verifies_and_gives_the_event():
    header = f"t={NOW},v1={reference(SECRET, NOW, BODY)}"
    assert verify_webhook(SECRET, BODY, header, now=NOW + 10) == json.loads(BODY)
    assert verify_webhook(SECRET.encode(), BODY.decode(), header, now=NOW - 10)["type"] == "job.succeeded"


@pytest.mark.parametrize(
    "secret, body, header, match",
    [
        ("another secret", BODY, f"t={NOW},v1={reference(SECRET, NOW, BODY)}", "no signature matches"),
        (SECRET, BODY.replace(b"succeeded", b"failed"), f"t={NOW},v1={reference(SECRET, NOW, BODY)}", "no signature matches"),
        (SECRET, BODY + b" ", f"t={NOW},v1={reference(SECRET, NOW, BODY)}", "no signature matches"),
        # the timestamp is signed: moving it to pass the age check breaks the signature
        (SECRET, BODY, f"t={NOW + 1},v1={reference(SECRET, NOW, BODY)}", "no signature matches"),
        (SECRET, BODY, f"t={NOW},v1={reference(SECRET, NOW, BODY).upper()}", "no signature matches"),
        (SECRET, BODY, f"v1={reference(SECRET, NOW, BODY)}", "no timestamp"),
        (SECRET, BODY, f"t={NOW}", "no v1 signature"),
        (SECRET, BODY, f"t=soon,v1={reference(SECRET, NOW, BODY)}", "unix seconds"),
        (SECRET, BODY, "garbage", "malformed"),
        (SECRET, BODY, "", "no X-Qforge-Signature"),
        (SECRET, BODY, None, "no X-Qforge-Signature"),
    ],
    ids=["wrong secret", "altered body", "trailing byte", "moved timestamp", "uppercase hex", "no t", "no v1",
         "t not a number", "malformed", "empty", "missing"],
)
def test_what_was_not_signed_with_the_secret_is_refused(secret, body, header, match):
    with pytest.raises(WebhookVerificationError, match=match):
        verify_webhook(secret, body, header, now=NOW)


def test_old_and_future_timestamps_are_refused_past_the_tolerance():
    header = f"t={NOW},v1={reference(SECRET, NOW, BODY)}"
    verify_webhook(SECRET, BODY, header, now=NOW + 300)
    with pytest.raises(WebhookVerificationError, match=r"\+301 s"):
        verify_webhook(SECRET, BODY, header, now=NOW + 301)  # a replay
    with pytest.raises(WebhookVerificationError, match="-301 s"):
        verify_webhook(SECRET, BODY, header, now=NOW - 301)
    verify_webhook(SECRET, BODY, header, tolerance_s=3600, now=NOW + 3000)
    verify_webhook(SECRET, BODY, header, tolerance_s=None, now=NOW + 10**6)


def test_one_matching_signature_among_several_is_enough():
    header = f"t={NOW},v1={reference('old secret', NOW, BODY)},v0=whatever,v1={reference(SECRET, NOW, BODY)}"
    assert verify_webhook(SECRET, BODY, header, now=NOW)["id"] == "e1"
    assert verify_webhook("old secret", BODY, header, now=NOW)["id"] == "e1"


def test_signed_but_not_json_is_refused():
    header = f"t={NOW},v1={reference(SECRET, NOW, b'not json')}"
    with pytest.raises(WebhookVerificationError, match="not JSON"):
        verify_webhook(SECRET, b"not json", header, now=NOW)


def test_the_module_imports_without_the_server():
    """Receivers install qforge for this module alone: it must not pull in the service."""
    code = "import sys, qforge.webhooks; print(sorted(m for m in ('app', 'worker', 'fastapi', 'sqlalchemy', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
