"""Shared CLI plumbing: consoles, the user-error wrapper, and command registration."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, TypeVar

import typer
from rich.console import Console

from xqtool.errors import XQError

# soft_wrap: long lines (paths) are never broken at 80 columns in piped logs; tables keep their layout
console = Console(soft_wrap=True)
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
    """{parameter name: option as typed (its longest --flag, or the argument's NAME)} from Typer's declarations.

    Declarations are read from ``Annotated[..., typer.Option(...)]`` metadata (see :mod:`xqtool.cli.options`) or
    from a ``typer.Option(...)`` default.
    """
    import inspect
    import typing

    hints = typing.get_type_hints(fn, include_extras=True)
    labels: Dict[str, str] = {}
    for name, param in inspect.signature(fn).parameters.items():
        infos = [param.default, *getattr(hints.get(name), "__metadata__", ())]
        for info in infos:
            if isinstance(info, typer.models.ArgumentInfo):
                labels[name] = name.upper()
            elif isinstance(info, typer.models.OptionInfo):
                decls = [str(d) for d in (info.param_decls or ()) if str(d).startswith("--")]
                decls = [d.split("/")[0] for d in decls]
                labels[name] = max(decls, key=len) if decls else "--" + name.replace("_", "-")
            else:
                continue
            break
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


def add_command(app: typer.Typer, fn: Callable[..., Any], name: str,
                aliases: Optional[Dict[str, Sequence[str]]] = None, **kwargs: Any) -> None:
    """Register `fn` as subcommand `name` of `app`: parameters validated first (:mod:`xqtool.validate`), user errors
    printed in one line (:func:`user_errors`).

    `aliases` maps deprecated option spellings to their replacement (see :class:`xqtool.cli.options.AliasCommand`).
    """
    from xqtool.cli.options import alias_command

    app.command(name, cls=alias_command(aliases or {}), **kwargs)(user_errors(validated(fn, name)))


def run_facts(precision: Any, device: Any = None) -> str:
    """'world size N, device D, precision P, backend B' of the run that just finished (for final summaries).

    World size and device come from Accelerate's process state (what the task actually used); `device` overrides
    the device when the task picked its own.
    """
    world, dev, backend = 1, device, None
    try:
        from accelerate import PartialState

        state = PartialState()
        world = state.num_processes
        backend = state.backend
        dev = dev if dev is not None else state.device
    except Exception:  # pragma: no cover - accelerate is a dependency
        pass
    from xqtool.distributed import precision_label

    return (f"world size {world}, device {dev if dev is not None else 'cpu'}, "
            f"precision {precision_label(precision)}, backend {backend or 'none (1 process)'}")
