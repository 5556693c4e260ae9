"""`qforge admin`: an operator's commands on tenants and API keys, run where the service's
database is reachable (QFORGE_DATABASE_URL, or the embedded default under --data-dir).

    qforge admin tenant create acme
    qforge admin key create --tenant acme --scope submit --name ci   # prints the key, once
    qforge admin key list --tenant acme
    qforge admin key revoke <key id>

`key create` prints the key alone on stdout (KEY=$(qforge admin key create ...) keeps it)
and what it made on stderr.
"""

from __future__ import annotations

import argparse
import sys

from qforge.exits import BadInput

SCOPES = ("read", "submit", "admin")


def add_command(commands, data_dir_option) -> None:
    admin = commands.add_parser("admin", help="manage tenants and API keys (on the service's database)")
    objects = admin.add_subparsers(dest="object", required=True, metavar="OBJECT")

    tenant = objects.add_parser("tenant", help="create or list tenants").add_subparsers(dest="action", required=True)
    create = tenant.add_parser("create", help="a new tenant: lowercase letters, digits and dashes")
    create.add_argument("tenant")
    data_dir_option(create)
    create.set_defaults(func=cmd_tenant_create)
    listing = tenant.add_parser("list", help="every tenant, with its live keys")
    data_dir_option(listing)
    listing.set_defaults(func=cmd_tenant_list)

    key = objects.add_parser("key", help="create, list or revoke API keys").add_subparsers(dest="action", required=True)
    create = key.add_parser("create", help="a new key of a tenant; printed once, never stored in clear")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scope", choices=SCOPES, default="submit", help="read < submit < admin (default submit)")
    create.add_argument("--name", default="", help="what the key is for, shown in listings")
    data_dir_option(create)
    create.set_defaults(func=cmd_key_create)
    listing = key.add_parser("list", help="keys (of one tenant), without the keys themselves")
    listing.add_argument("--tenant")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    data_dir_option(listing)
    listing.set_defaults(func=cmd_key_list)
    revoke = key.add_parser("revoke", help="revoke a key by its id (from `key list`); it stops working at once")
    revoke.add_argument("key_id")
    data_dir_option(revoke)
    revoke.set_defaults(func=cmd_key_revoke)


def _session(args: argparse.Namespace):
    from app.core.db import migrate, session_scope
    from qforge.cli import _settings_from

    _settings_from(args)
    migrate()  # an operator may create the first tenant before the service ever started
    return session_scope()


def cmd_tenant_create(args: argparse.Namespace) -> int:
    from app import tenants

    with _session(args) as session:
        try:
            tenant = tenants.create_tenant(session, args.tenant)
        except tenants.TenantError as exc:
            raise BadInput(str(exc)) from None
        print(tenant.id)
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    from app import tenants

    with _session(args) as session:
        keys = tenants.list_keys(session)
        for tenant in tenants.list_tenants(session):
            live = sum(1 for k in keys if k.tenant_id == tenant.id)
            print(f"{tenant.id}\t{live} live key{'s' if live != 1 else ''}\tcreated {tenant.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    from app import tenants
    from app.models import Scope

    with _session(args) as session:
        try:
            new = tenants.create_key(session, args.tenant, Scope(args.scope), args.name)
        except tenants.TenantError as exc:
            raise BadInput(str(exc)) from None
        print(f"created key {new.row.id} ({new.row.scope.value}) of tenant '{new.row.tenant_id}'; "
              "it is shown once, below: keep it now", file=sys.stderr)
        print(new.secret)
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    from app import tenants

    with _session(args) as session:
        for key in tenants.list_keys(session, args.tenant, include_revoked=args.all):
            used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "live"
            print(f"{key.id}\t{key.tenant_id}\t{key.scope.value}\t{key.prefix}…\tused {used}\t{state}\t{key.name}")
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    from app import tenants

    with _session(args) as session:
        if tenants.revoke_key(session, args.key_id) is None:
            raise BadInput(f"no API key with id '{args.key_id}' (see `qforge admin key list`)")
        print(f"revoked key {args.key_id}", file=sys.stderr)
    return 0
