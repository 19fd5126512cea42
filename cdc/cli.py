"""The `cdc` command line: thin typer commands over the stack launcher, the capture path and the consumers."""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional

import typer

from cdc.errors import CdcError

app = typer.Typer(help="Change-data-capture pipeline: Debezium on Kafka Connect into destination databases.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
stack_app = typer.Typer(help="Start, inspect and stop the local stack (PostgreSQL, Kafka, registry, Connect).",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


def _echo(line: str) -> None:
    typer.echo(line)


def _run(action: Callable[[], int | None]) -> None:
    """Run a command body; our errors become a message on stderr and the contract's exit status."""
    try:
        code = action()
    except CdcError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(code or 0)


@stack_app.command("up")
def stack_up() -> None:
    """Start every component not yet running and wait until all are healthy (idempotent)."""
    from infra import stack

    def body() -> int:
        layout = stack.up(_echo)
        for name, url in layout.urls().items():
            typer.echo(f"  {name:16} {url}")
        typer.echo(f"  state and logs   {layout.home}")
        return 0

    _run(body)


@stack_app.command("status")
def stack_status(as_json: bool = typer.Option(False, "--json", help="Print the endpoints and states as JSON.")) -> None:
    """Show each component's state and endpoint; exit 1 unless all are healthy."""
    from infra import stack

    def body() -> int:
        info = stack.status()
        if as_json:
            typer.echo(json.dumps(info, indent=2))
        else:
            for name, comp in info["components"].items():  # type: ignore[union-attr]
                pid = f"pid {comp['pid']}" if comp["pid"] else ""
                typer.echo(f"{name:16} {comp['state']:10} {comp['url']:52} {pid}")
            typer.echo(f"state and logs: {info['home']}")
        return 0 if info["healthy"] else 1

    _run(body)


@stack_app.command("down")
def stack_down() -> None:
    """Stop the components this stack started (and nothing else)."""
    from infra import stack

    _run(lambda: stack.down(_echo))


@app.command("demo")
def demo(
    events: int = typer.Option(12, help="How many change events to print."),
    keep_running: bool = typer.Option(True, "--keep-running/--stop", help="Leave the stack running afterwards."),
) -> None:
    """Everything end to end on a built-in sample: stack, sample source, Debezium connector, change events."""
    from cdc import demo as demo_mod

    _run(lambda: demo_mod.run(events=events, keep_running=keep_running, echo=_echo))


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="cdc")


if __name__ == "__main__":
    main()
