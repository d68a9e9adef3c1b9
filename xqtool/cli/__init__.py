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
    help="XQ-GAN image tokenizers and VAR generation: train, encode, decode, probe, sample, evaluate.\n\n"
    "Example: [bold]xqtool train-tokenizer configs/tokenizer/tiny-cnn.yaml[/] (a tiny tokenizer on bundled "
    "photos, about 2 minutes on a CPU); the README's quick start continues from there.",
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


def main(argv: Optional[list] = None) -> None:
    """Console-script entry point.

    A usage error (unknown command or option, missing argument, malformed value) is one ``error:`` line on
    stderr with a pointer to ``--help`` and exit code 2, like every other bad input; everything else (exit codes
    130/143 of interrupted training, 2 of refused inputs, ``--help``) is Click's usual behaviour.
    """
    import sys

    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    from xqtool.cli._common import err_console

    try:
        code = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError as exc:  # bare `xqtool` / `xqtool CMD` without arguments: the help, as before
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else "xqtool"
        err_console.print(f"[bold red]error:[/] {exc.format_message()} (see: {path} --help)", highlight=False,
                          soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted", highlight=False)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
