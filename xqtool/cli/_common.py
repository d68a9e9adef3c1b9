"""Shared CLI plumbing: consoles, the user-error wrapper, and command registration."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, TypeVar

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


def _option_labels(fn: Callable[..., Any]) -> Dict[str, str]:
    """{parameter name: option as typed (its longest --flag, or the argument's NAME)} from Typer's declarations."""
    import inspect

    labels: Dict[str, str] = {}
    for name, param in inspect.signature(fn).parameters.items():
        info = param.default
        if isinstance(info, typer.models.ArgumentInfo):
            labels[name] = name.upper()
        elif isinstance(info, typer.models.OptionInfo):
            decls = [str(d) for d in (info.param_decls or ()) if str(d).startswith("--")]
            decls = [d.split("/")[0] for d in decls]
            labels[name] = max(decls, key=len) if decls else "--" + name.replace("_", "-")
    return labels


def validated(fn: F, name: str) -> F:
    """Run :func:`xqtool.validate.validate_command` on the parsed parameters before `fn` (no model loaded yet)."""

    labels = _option_labels(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from xqtool.validate import validate_command

        validate_command(name, kwargs, labels)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def add_command(app: typer.Typer, fn: Callable[..., Any], name: str, **kwargs: Any) -> None:
    """Register `fn` as subcommand `name` of `app`, its parameters validated first, wrapped with :func:`user_errors`."""
    app.command(name, **kwargs)(user_errors(validated(fn, name)))
