"""The `qforge` command.

    qforge serve      migrate, start a Celery worker beside the API, serve the API
    qforge worker     only a worker (production: one per GPU machine)
    qforge migrate    bring the database schema to the newest migration
    qforge generate   load an LLM artifact (folder or downloaded .tar) and generate text
    qforge quantize   run one job on this machine, no server (qforge.cli_quantize)
    qforge submit, wait, status, report, download, cancel, presets
                      talk to a server through the SDK (qforge.cli_jobs)

Options given here override the matching QFORGE_* environment variables; they are passed
on through the environment, so the worker process started by `serve` sees them too. The
exit codes are qforge.exits'.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

WORKER_APP = "worker.celery_app"


def worker_command(concurrency: int) -> list[str]:
    """The Celery worker: real processes (prefork), as in production; never eager mode."""
    return [
        sys.executable, "-m", "celery", "-A", WORKER_APP, "worker",
        "--pool=prefork", f"--concurrency={concurrency}", "--loglevel=INFO",
    ]


def _settings_from(args: argparse.Namespace):
    from app.core.config import get_settings

    for option in ("data_dir", "host", "port", "concurrency"):
        value = getattr(args, option, None)
        if value is not None:
            name = "worker_concurrency" if option == "concurrency" else option
            os.environ[f"QFORGE_{name.upper()}"] = str(value)
    get_settings.cache_clear()
    settings = get_settings()
    from app import logctx

    logctx.configure(settings.log_format)  # the service's commands log as QFORGE_LOG_FORMAT says
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.core.db import migrate

    settings = _settings_from(args)
    migrate()
    print(f"database at the newest migration: {settings.database_url}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    command = worker_command(settings.worker_concurrency)
    # exec: the worker becomes this process, so a container's stop signal reaches Celery itself.
    os.execv(command[0], command)
    return 0  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    from qforge.serve import serve

    return serve(_settings_from(args), with_worker=not args.no_worker)


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from quantcore.generate import try_artifact

    result = try_artifact(args.artifact, args.prompt, args.max_new_tokens, compare_float=args.compare)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for label, run in (("quantized", result["quantized"]), ("float", result["float"])):
        if run is None:
            continue
        print(f"--- {label}{' (' + run['model'] + ')' if 'model' in run else ''}: {run['new_tokens']} tokens, "
              f"prefill {run['prefill_s'] * 1000:.0f} ms, decode {run['decode_tokens_per_s']:.1f} tokens/s")
        print(args.prompt + run["text"])
    if "speedup" in result:
        print(f"--- decode speed, quantized / float: {result['speedup']:.2f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qforge import cli_admin, cli_jobs, cli_quantize, exits

    parser = argparse.ArgumentParser(
        prog="qforge", description="qforge: quantization as a service", epilog=exits.HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_dir_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", help="root of the embedded database, broker and artifacts (QFORGE_DATA_DIR)")

    serve = commands.add_parser("serve", help="run the API with a worker beside it")
    serve.add_argument("--host", help="address to listen on (QFORGE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (QFORGE_PORT, default 8000)")
    data_dir_option(serve)
    serve.add_argument("--no-worker", action="store_true", help="only the API; workers run elsewhere")
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run a Celery worker only")
    worker.add_argument("--concurrency", type=int, help="jobs at once (QFORGE_WORKER_CONCURRENCY, default 1)")
    data_dir_option(worker)
    worker.set_defaults(func=cmd_worker)

    migrate = commands.add_parser("migrate", help="upgrade the database schema")
    data_dir_option(migrate)
    migrate.set_defaults(func=cmd_migrate)

    generate = commands.add_parser("generate", help="generate text with an LLM artifact, on its fast CPU paths")
    generate.add_argument("artifact", help="an artifact folder, or the .tar downloaded from /v1/jobs/<id>/artifact")
    generate.add_argument("--prompt", default="The Python language reference says that", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--compare", action="store_true", help="also run the float source model: tokens/s beside it")
    generate.add_argument("--json", action="store_true", help="print the result as JSON")
    generate.set_defaults(func=cmd_generate)

    cli_quantize.add_command(commands)
    cli_jobs.add_commands(commands)
    cli_admin.add_command(commands, data_dir_option)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from qforge.exits import exit_code

    args = build_parser().parse_args(argv)  # a usage error exits 2 here
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin, every start
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request; the SDK logs its retries itself
    try:
        return int(args.func(args))
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise  # not an outcome the CLI expects: the traceback says where (exit 1)
        print(f"qforge {args.command}: {exc}", file=sys.stderr)
        return int(code)


if __name__ == "__main__":
    sys.exit(main())
