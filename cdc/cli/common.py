"""What every command of the command line shares: the -c/--config the user typed, loading the pipeline file, and
running a command body so that our errors become one message and the contract's exit status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from cdc.errors import CdcError

# Only what was typed (-c/--config before or after the command); $CDC_CONFIG is read by cdc.config.load.
_state: dict[str, str | None] = {"config": None}


def _pipeline():
    from cdc import config

    return config.load(_state["config"])


def _echo(line: str) -> None:
    typer.echo(line)


def _cut_lines(message: str) -> str:
    """Every line of an error cut to a readable length: a name given on the command line (up to 128 KiB) or read from
    a database is echoed by many messages, and one place keeps them all short (long enough for a list of tables)."""
    from cdc.config import cut

    return "\n".join(cut(line, 2000) for line in message.splitlines())


def _run(action: Callable[[], int | None]) -> None:
    """Run a command body; our errors become a message on stderr and the contract's exit status."""
    try:
        code = action()
    except CdcError as exc:
        typer.echo(f"error: {_cut_lines(str(exc))}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:  # noqa: BLE001 - only library errors are turned into messages; the rest re-raised
        # Errors of the libraries we talk through (psycopg, SQLAlchemy, confluent-kafka, httpx) that reached here
        # without being named by our code: still a message and exit 1, not a traceback.
        if type(exc).__module__.split(".")[0] not in ("psycopg", "sqlalchemy", "confluent_kafka", "cimpl", "httpx",
                                                       "httpcore", "pymysql"):
            raise
        typer.echo(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(code or 0)


def serve_until_interrupted(server: Any, command: str, host: str) -> int:
    """Say where a page server (consumers/lag/server.py) listens, serve it until Ctrl-C, then close it."""
    typer.echo(f"{command}: page http://{host}:{server.port}/  metrics http://{host}:{server.port}/metrics")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
