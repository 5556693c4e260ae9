"""Tenants and their API keys: created by an operator (`qforge admin`), or a tenant's admin
key (`/v1/keys`), and checked on every API call.

A key is `qf_` and 43 URL-safe characters (32 random bytes). Only its sha256 is stored, so
a leaked database does not leak working keys, and the key is shown once, when it is created.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import DEFAULT_TENANT, ApiKey, Scope, Tenant, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "qf_"
SHOWN_PREFIX = 10  # characters of a key kept in clear, to tell keys apart in listings
TENANT_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
MIN_KEY_LENGTH = 32  # a key chosen by an operator (QFORGE_BOOTSTRAP_API_KEY) must be at least this long
# last_used_at is written at most this often per key: a write on every request would make
# each read a write, and serialize clients on SQLite.
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
KEY_FILE = "api.key"


class TenantError(ValueError):
    """A tenant or key request that cannot be done: the message says why."""


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    secret: str  # the key itself: shown to its owner once, never stored


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID.match(tenant_id):
        raise TenantError(
            f"tenant '{tenant_id}': use 1-64 lowercase letters, digits and dashes, starting and ending with a letter or digit"
        )
    return tenant_id


def create_tenant(session: Session, tenant_id: str) -> Tenant:
    check_tenant_id(tenant_id)
    if session.get(Tenant, tenant_id) is not None:
        raise TenantError(f"tenant '{tenant_id}' exists already")
    tenant = Tenant(id=tenant_id, created_at=utcnow())
    session.add(tenant)
    session.commit()
    return tenant


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.id)))


def create_key(session: Session, tenant_id: str, scope: Scope, name: str = "", secret: str | None = None) -> NewKey:
    """A new key of the tenant; `secret` chooses the key (bootstrap), default a random one."""
    if session.get(Tenant, tenant_id) is None:
        raise TenantError(f"no tenant '{tenant_id}': create it first (qforge admin tenant create {tenant_id})")
    secret = secret if secret is not None else generate_key()
    if len(secret) < MIN_KEY_LENGTH:
        raise TenantError(f"an API key must be at least {MIN_KEY_LENGTH} characters long")
    row = ApiKey(
        tenant_id=tenant_id, name=name[:255], prefix=secret[:SHOWN_PREFIX], key_hash=hash_key(secret), scope=scope,
        created_at=utcnow(),
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise TenantError("that key exists already") from None
    return NewKey(row, secret)


def list_keys(session: Session, tenant_id: str | None = None, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.tenant_id, ApiKey.created_at, ApiKey.id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str, tenant_id: str | None = None) -> ApiKey | None:
    """Revoke a key (of that tenant, when given); None when there is no such key. Revoking
    twice is harmless: the first revocation's time stays."""
    key = session.get(ApiKey, key_id)
    if key is None or (tenant_id is not None and key.tenant_id != tenant_id):
        return None
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key


# built once: every API call looks its key up, and building the statement cost more than running it
_KEY_BY_HASH = select(ApiKey).where(ApiKey.key_hash == bindparam("key_hash"))


def find_key(session: Session, presented: str) -> ApiKey | None:
    """The live key a caller presented, or None. Looked up by hash: comparing hashes of a
    256-bit secret leaks nothing an attacker could use through timing."""
    key = session.scalar(_KEY_BY_HASH, {"key_hash": hash_key(presented)})
    if key is None or key.revoked_at is not None:
        return None
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
        session.commit()
    return key


def bootstrap(session: Session, settings: Settings) -> str | None:
    """Make sure the service can be used at all, at `qforge serve`:

    - with QFORGE_BOOTSTRAP_API_KEY set, that key exists as an admin key of the default tenant
      (an operator's or a test's way to know a key in advance);
    - otherwise, on the embedded default (SQLite) with no live key at all, an admin key of the
      default tenant is made and written to <data_dir>/api.key (owner-only), where the CLI of
      the same user finds it. A shared deployment never gets a key it did not ask for.
    Returns a line for the console, or None."""
    chosen = settings.bootstrap_api_key.get_secret_value() if settings.bootstrap_api_key else None
    if chosen:
        if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(chosen))) is None:
            create_key(session, DEFAULT_TENANT, Scope.ADMIN, "bootstrap (QFORGE_BOOTSTRAP_API_KEY)", secret=chosen)
            return f"created the admin key of tenant '{DEFAULT_TENANT}' given in QFORGE_BOOTSTRAP_API_KEY"
        return None
    key_file = settings.data_dir / KEY_FILE
    if list_keys(session):
        return f"API key: see {key_file}" if key_file.exists() else None
    if not settings.database_url.startswith("sqlite"):
        return f"no API key exists yet: create one with `qforge admin key create --tenant {DEFAULT_TENANT} --scope admin`"
    new = create_key(session, DEFAULT_TENANT, Scope.ADMIN, "embedded default (qforge serve)")
    write_key_file(key_file, new.secret)
    return f"API key (admin, tenant '{DEFAULT_TENANT}'): {new.secret}  (saved in {key_file}; the CLI reads it from there)"


def write_key_file(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # created owner-only before the key is written: no moment where another user could read it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


def read_key_file(data_dir: Path) -> str | None:
    path = data_dir / KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
