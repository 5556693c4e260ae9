"""Tenants, keys and the bootstrap of `qforge serve`: names checked, keys random and hashed,
the embedded default's first key written owner-only, a shared deployment given no key it did
not ask for; and the `qforge admin` commands that operators use."""

from __future__ import annotations

import hashlib
import stat

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from app import tenants
from app.core.db import session_scope
from app.models import DEFAULT_TENANT, ApiKey, Scope
from qforge.cli import main as qforge_main


@pytest.mark.parametrize("name", ["acme", "team-7", "a", "x" * 64])
def test_tenant_names_that_are_accepted(settings, name):
    with session_scope() as session:
        assert tenants.create_tenant(session, name).id == name


@pytest.mark.parametrize("name", ["", "Acme", "-acme", "acme-", "a_b", "a b", "x" * 65, "../etc", "é"])
def test_tenant_names_that_are_refused(settings, name):
    with session_scope() as session, pytest.raises(tenants.TenantError, match="lowercase"):
        tenants.create_tenant(session, name)


def test_a_tenant_exists_once_and_keys_need_a_tenant(settings):
    with session_scope() as session:
        with pytest.raises(tenants.TenantError, match="exists already"):
            tenants.create_tenant(session, DEFAULT_TENANT)  # made by the migration
        with pytest.raises(tenants.TenantError, match="no tenant 'ghost'"):
            tenants.create_key(session, "ghost", Scope.READ)


def test_keys_are_long_random_and_distinct(settings):
    with session_scope() as session:
        keys = [tenants.create_key(session, DEFAULT_TENANT, Scope.READ).secret for _ in range(20)]
    assert len(set(keys)) == 20
    assert all(k.startswith("qf_") and len(k) == 3 + 43 for k in keys)  # 32 random bytes, URL-safe base64


def test_scopes_include_the_ones_before():
    assert Scope.ADMIN.allows(Scope.SUBMIT) and Scope.ADMIN.allows(Scope.READ) and Scope.SUBMIT.allows(Scope.READ)
    assert not Scope.READ.allows(Scope.SUBMIT) and not Scope.SUBMIT.allows(Scope.ADMIN)


def test_embedded_bootstrap_writes_one_admin_key_owner_only(settings):
    with session_scope() as session:
        line = tenants.bootstrap(session, settings)
        again = tenants.bootstrap(session, settings)
    key_file = settings.data_dir / tenants.KEY_FILE
    key = key_file.read_text().strip()
    assert key in line and str(key_file) in again and key not in again  # the key is printed once
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with session_scope() as session:
        rows = session.scalars(select(ApiKey)).all()
    assert [(r.tenant_id, r.scope, r.key_hash) for r in rows] == [
        (DEFAULT_TENANT, Scope.ADMIN, hashlib.sha256(key.encode()).hexdigest())
    ]


def test_a_shared_deployment_gets_no_key_it_did_not_ask_for(settings):
    shared = settings.model_copy(update={"database_url": "postgresql+psycopg2://q@db/q"})
    with session_scope() as session:
        line = tenants.bootstrap(session, shared)
        assert tenants.list_keys(session) == []
    assert "qforge admin key create" in line and not (settings.data_dir / tenants.KEY_FILE).exists()


def test_a_chosen_bootstrap_key_is_made_once(settings):
    chosen = settings.model_copy(update={"bootstrap_api_key": SecretStr("qf_operator-chosen-key-0123456789abcdef")})
    with session_scope() as session:
        assert tenants.bootstrap(session, chosen) is not None
        assert tenants.bootstrap(session, chosen) is None
        assert [k.scope for k in tenants.list_keys(session)] == [Scope.ADMIN]
    short = settings.model_copy(update={"bootstrap_api_key": SecretStr("short")})
    with session_scope() as session, pytest.raises(tenants.TenantError, match="at least 32"):
        tenants.bootstrap(session, short)


def test_admin_cli_creates_lists_and_revokes(settings, capsys):
    data_dir = ["--data-dir", str(settings.data_dir)]
    assert qforge_main(["admin", "tenant", "create", "acme", *data_dir]) == 0
    assert qforge_main(["admin", "tenant", "create", "Bad_Name", *data_dir]) != 0
    capsys.readouterr()
    assert qforge_main(["admin", "key", "create", "--tenant", "acme", "--scope", "read", "--name", "ci", *data_dir]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("qf_") and "\n" not in key and "shown once" in out.err
    assert qforge_main(["admin", "key", "list", "--tenant", "acme", *data_dir]) == 0
    listing = capsys.readouterr().out
    key_id = listing.split("\t")[0]
    assert "acme\tread" in listing and key not in listing and key[:10] in listing
    assert qforge_main(["admin", "key", "revoke", key_id, *data_dir]) == 0
    assert qforge_main(["admin", "key", "revoke", "nope", *data_dir]) != 0
    capsys.readouterr()
    assert qforge_main(["admin", "key", "list", "--tenant", "acme", *data_dir]) == 0
    assert capsys.readouterr().out == ""
    with session_scope() as session:
        assert tenants.find_key(session, key) is None
