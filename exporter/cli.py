"""The command line: `run`, `run --once`, `demo`, `simulate`.

Every setting is also a flag; flags win over the environment. A bad setting exits with status 2
and one line that names it, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from exporter import __version__
from exporter.settings import Settings, SettingsError, env_name, flag_name, load_settings

PROG = "connect-usage-exporter"
EXIT_SETTINGS = 2


def _is_bool(field: str) -> bool:
    return Settings.model_fields[field].annotation is bool


def _shown(default: object) -> str:
    """A default as one would write it in the environment."""
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or '""'
    return str(default)


def _add_setting_flags(parser: argparse.ArgumentParser, *, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    for field, info in Settings.model_fields.items():
        if field == "api_key" or field in skip:
            continue  # the key only from the environment: a flag would show it in `ps`
        help_text = (
            f"(env {env_name(field)}; default {_shown(info.default)})"
            if not info.is_required()
            else f"(env {env_name(field)}; required)"
        )
        if _is_bool(field):
            parser.add_argument(
                flag_name(field),
                dest=field,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(field), dest=field, default=None, metavar="VALUE", help=help_text
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Prometheus exporter for Posit Connect usage data."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="poll Connect and serve /metrics (the service)")
    _add_setting_flags(run)
    run.add_argument(
        "--once", action="store_true", help="poll once, commit, print the exposition and exit"
    )
    run.add_argument(
        "--output", type=Path, default=None, help="with --once: write to FILE atomically"
    )

    demo = commands.add_parser("demo", help="the exporter against an embedded Connect simulator")
    _add_setting_flags(demo, skip={"server"})
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--content", type=int, default=60, help="content items in the simulator")
    demo.add_argument("--users", type=int, default=200, help="users in the simulator")
    demo.add_argument(
        "--sim-history-days",
        type=float,
        default=30.0,
        help="days of usage the simulator has before it starts",
    )
    demo.add_argument("--sim-port", type=int, default=0, help="simulator port (0: any free port)")
    demo.add_argument(
        "--clock-speed",
        type=float,
        default=1.0,
        help="simulated seconds per real second (1: Connect's times line up with Prometheus's)",
    )
    demo.add_argument(
        "--start",
        default=None,
        metavar="TIME",
        help="the simulated clock's starting instant, RFC 3339 or epoch seconds (default: now)",
    )
    demo.add_argument(
        "--backfill",
        type=Path,
        default=None,
        metavar="FILE",
        help="once the first start has counted the history, write it to FILE as `backfill` "
        "does (kept if FILE exists)",
    )
    demo.add_argument("--backfill-job", default="connect-usage-exporter", metavar="JOB")
    demo.add_argument("--backfill-instance", default="exporter:9741", metavar="INSTANCE")

    backfill = commands.add_parser(
        "backfill",
        help="write the usage history before the first start as OpenMetrics for promtool",
    )
    _add_setting_flags(backfill)
    backfill.add_argument("--output", type=Path, required=True, metavar="FILE")
    backfill.add_argument(
        "--step",
        type=int,
        default=60,
        metavar="SECONDS",
        help="how finely changes are dated (10 to 3600; default 60)",
    )
    backfill.add_argument(
        "--job", default="connect-usage-exporter", help="the scrape job's name (its job label)"
    )
    backfill.add_argument(
        "--instance",
        required=True,
        help="the exporter's instance label as Prometheus scrapes it, e.g. exporter:9741",
    )
    backfill.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another target label the scrape adds (repeat for each)",
    )
    backfill.add_argument(
        "--viewers",
        action="store_true",
        help="also the top viewers and top users (CONNECT_EXPORTER_TOP_VIEWERS/_TOP_USERS) at "
        "every 5-minute step: about 19 series an item sampled throughout, a large file",
    )

    commands.add_parser("simulate", help="start the Connect simulator alone", add_help=False)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        field: getattr(args, field, None) for field in Settings.model_fields if field != "api_key"
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        from exporter.simulator.cli import main as simulate

        return simulate(argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help(sys.stderr)
        return EXIT_SETTINGS
    if args.command == "demo":
        from exporter.demo import run_demo

        return run_demo(args, _overrides(args))
    from exporter.service import fail, run_backfill_command, run_service

    try:
        settings = load_settings(_overrides(args))
    except SettingsError as exc:
        return fail(str(exc), EXIT_SETTINGS)
    if args.command == "backfill":
        if not 10 <= args.step <= 3600:
            return fail(f"invalid --step {args.step}: from 10 to 3600 seconds", EXIT_SETTINGS)
        return run_backfill_command(
            settings,
            output=args.output,
            step=args.step,
            job=args.job,
            instance=args.instance,
            labels=args.label,
            viewers=args.viewers,
        )
    return run_service(settings, once=args.once, output=args.output)
