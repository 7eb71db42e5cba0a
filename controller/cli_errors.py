"""How every `ringmaster` command reports a user's mistake: one line on stderr, exit 2.

The message is printed literally: rich markup in it (a path or a spec value such as
`[0, 1]` or `[red]`) is escaped, so what the user sent is what the user reads, and a
message can never be swallowed as a markup tag or raise a markup error.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["err", "fail", "print_error"]

err = Console(stderr=True, soft_wrap=True)  # writes to whatever sys.stderr is at print time


def print_error(exc: Exception | str) -> None:
    """`error: <message>` on stderr, the message escaped."""
    err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)


def fail(exc: Exception | str) -> NoReturn:
    """Show a user's mistake as one line on stderr and exit with status 2."""
    print_error(exc)
    raise typer.Exit(2)
