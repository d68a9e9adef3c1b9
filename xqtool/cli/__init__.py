"""xqtool command-line interface (Typer).

One thin function per subcommand lives in a module of this package; each module exposes
``register(app)``. No model logic here: commands parse options, load the config, call ONE task
function and print a rich summary.

May import ``tasks`` (the work), ``config`` and ``validate`` (options), ``errors``, ``runtime``,
``distributed``, ``fsutil`` and the loaders of ``checkpoints``; nothing imports ``cli``.
"""

from __future__ import annotations

from typing import Optional

import typer

from xqtool import __version__

app = typer.Typer(
    name="xqtool",
    help="XQ-GAN image tokenizers and VAR generation: train, encode, decode, probe, sample, evaluate.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"xqtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """XQ-GAN image tokenizers and VAR next-scale generation."""
    from xqtool.runtime import configure_cpu_math

    configure_cpu_math()


def _register_all() -> None:
    from xqtool.cli import data_cmds, eval_cmds, inspect_cmd, misc_cmds, train_cmds, var_cmds

    for module in (inspect_cmd, train_cmds, data_cmds, var_cmds, eval_cmds, misc_cmds):
        module.register(app)
    from xqtool.cli import hub_cmds

    hub_cmds.register(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    app()
