"""`qforge admin`: an operator's commands on tenants and API keys, run where the service's
database is reachable (QFORGE_DATABASE_URL, or the embedded default under --data-dir).

    qforge admin tenant create acme
    qforge admin tenant quota acme --max-active-jobs 5 --max-stored-bytes 10GiB --requests-per-minute 600
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
    quota = tenant.add_parser("quota", help="show or set a tenant's own limits (unset ones: the service's defaults)")
    quota.add_argument("tenant")
    quota.add_argument("--max-active-jobs", type=_count, help="jobs queued or running at once")
    quota.add_argument("--max-stored-bytes", type=_size, help="bytes of uploads and artifacts kept, e.g. 500MiB, 20GiB")
    quota.add_argument("--requests-per-minute", type=_count, help="API calls a minute (0: no limit)")
    quota.add_argument("--reset", action="store_true", help="back to the service's defaults, then apply the others")
    data_dir_option(quota)
    quota.set_defaults(func=cmd_tenant_quota)
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


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def _size(text: str) -> int:
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text}: a number of bytes, optionally with a unit (MB, GiB, ...)")
    value = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least one byte")
    return value


def cmd_tenant_quota(args: argparse.Namespace) -> int:
    from app import quotas
    from app.core.config import get_settings
    from app.models import Tenant

    with _session(args) as session:
        tenant = session.get(Tenant, args.tenant)
        if tenant is None:
            raise BadInput(f"no tenant '{args.tenant}' (see `qforge admin tenant list`)")
        if args.max_active_jobs == 0:
            raise BadInput("--max-active-jobs must be at least 1 (revoke the tenant's keys to stop it)")
        if args.reset:
            tenant.max_active_jobs = tenant.max_stored_bytes = tenant.requests_per_minute = None
        for name in ("max_active_jobs", "max_stored_bytes", "requests_per_minute"):
            if getattr(args, name) is not None:
                setattr(tenant, name, getattr(args, name))
        session.commit()
        limits = quotas.limits(tenant, get_settings())
        usage = quotas.usage(session, tenant.id)
        for name, value in vars(limits).items():
            source = "own" if getattr(tenant, name) is not None else "default"
            print(f"{name}\t{value}\t({source})")
        for name, value in vars(usage).items():
            print(f"{name}\t{value}\t(in use)")
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
