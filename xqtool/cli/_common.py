"""Shared CLI plumbing: consoles, the user-error wrapper, and command registration."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from xqtool.errors import XQError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

USER_ERROR_EXIT_CODE = 2


def user_errors(fn: F) -> F:
    """Turn an :class:`XQError` into one red line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except XQError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(USER_ERROR_EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]


def add_command(app: typer.Typer, fn: Callable[..., Any], name: str, **kwargs: Any) -> None:
    """Register `fn` as subcommand `name` of `app`, wrapped with :func:`user_errors`."""
    app.command(name, **kwargs)(user_errors(fn))
