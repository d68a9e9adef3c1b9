"""`xqtool encode`, `xqtool decode`, `xqtool make-shards`: thin wrappers over xqtool.tasks."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import typer
from typing_extensions import Annotated
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from xqtool.cli._common import add_command, console, run_facts
from xqtool.cli.options import (
    BadFiles,
    BadFilesPolicy,
    DEFAULT_NUM_WORKERS,
    BatchSize,
    IgnoreFingerprint,
    Overwrite,
    Device,
    NumWorkers,
    Precision,
    PrecisionOpt,
    Tokenizer,
    TokenizerConfigOpt,
    output_option,
    resolve_device,
    legacy_positional,
)
from xqtool.errors import ConfigError

_MAX_LISTED = 10


class _RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} images/s" if speed else "- images/s", style="progress.data.speed")


@contextmanager
def _progress(label: str, enabled: bool = True) -> Iterator[Tuple[Callable[[Optional[int]], None], Callable[[int], None]]]:
    """Yield (on_start(total), advance(n)) driving a progress display (no-ops when disabled).

    Nothing is shown before ``on_start``: tasks call it after their argument checks, so an error is never
    preceded by a stale "0/?" bar. On a terminal: a live rich bar. Otherwise (piped, cluster log): one plain
    line at every tenth of the work and at the end.
    """
    if not enabled:
        yield (lambda total: None), (lambda n: None)
        return
    state: Dict[str, object] = {"prog": None, "task": None, "done": 0, "total": None, "next": 0.1}
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn()]

    def on_start(total: Optional[int]) -> None:
        state["total"] = total
        if console.is_terminal and state["prog"] is None:
            prog = Progress(*columns, console=console, transient=False)
            prog.start()
            state["prog"], state["task"] = prog, prog.add_task(label, total=total)
        elif state["prog"] is not None:
            state["prog"].update(state["task"], total=total)  # type: ignore[attr-defined]

    def advance(n: int) -> None:
        state["done"] = int(state["done"]) + n  # type: ignore[call-overload]
        if state["prog"] is None and console.is_terminal:  # tasks without on_start: the first item starts it
            on_start(state["total"])  # type: ignore[arg-type]
        if state["prog"] is not None:
            state["prog"].advance(state["task"], n)  # type: ignore[attr-defined]
            return
        total = state["total"]
        if total:
            frac = int(state["done"]) / int(total)  # type: ignore[call-overload]
            if frac + 1e-9 >= float(state["next"]):  # type: ignore[arg-type]
                console.print(f"{label}: {state['done']}/{total} ({100 * frac:.0f}%)", highlight=False)
                while float(state["next"]) <= frac + 1e-9:  # type: ignore[arg-type]
                    state["next"] = float(state["next"]) + 0.1  # type: ignore[arg-type]

    try:
        yield on_start, advance
    finally:
        if state["prog"] is not None:
            state["prog"].stop()  # type: ignore[attr-defined]
        elif not state["total"] and state["done"]:
            console.print(f"{label}: {state['done']} done", highlight=False)


def _print_skipped(skipped: Dict[str, str], where: Optional[Path]) -> None:
    if not skipped:
        return
    console.print(f"[yellow]skipped {len(skipped)} bad input(s)[/]" + (f" (all listed in {where})" if where else ""))
    for name, reason in list(sorted(skipped.items()))[:_MAX_LISTED]:
        console.print(f"  [yellow]-[/] {name}: {reason}", highlight=False)
    if len(skipped) > _MAX_LISTED:
        console.print(f"  ... and {len(skipped) - _MAX_LISTED} more")


def _is_main() -> bool:
    from xqtool.distributed import process_state

    return bool(process_state().is_main_process)  # CPU (gloo) processes under ACCELERATE_USE_CPU


def encode(
    source: Annotated[str, typer.Argument(help="Images: class-tree or flat folder, .txt list, image file, or WebDataset shards (path, {000..127} pattern, http(s)://, pipe:).")],
    output: Annotated[str, output_option("X.npy (one [N, P, L] array + X.npy.json) or DIR/ (token shards + manifest.json; trailing slash or an existing folder).")],
    tokenizer: Tokenizer,
    config: TokenizerConfigOpt = None,
    batch_size: BatchSize = 32,
    num_workers: NumWorkers = DEFAULT_NUM_WORKERS,
    device: Device = None,
    precision: PrecisionOpt = Precision.fp32,
    flip: Annotated[bool, typer.Option("--flip", help="Also encode the horizontally flipped image (rows k, k@flip).")] = False,
    ten_crop: Annotated[bool, typer.Option("--ten-crop", help="Encode 10 crops per image (rows k@crop0..k@crop9).")] = False,
    bad_files: BadFiles = BadFilesPolicy.skip,
    unit_size: Annotated[int, typer.Option("--unit-size", help="Files per resumable work unit (folder/list sources).")] = 1000,
    overwrite: Overwrite = False,
) -> None:
    """Encode images into token ids, streaming (memory bounded by the batch) and resumable.

    Multi-GPU: [bold]accelerate launch -m xqtool encode ...[/] (each process encodes its share of the work units,
    the main process merges). Re-running an interrupted command keeps the finished units.

    Example: [bold]xqtool encode runs/demo_images/val -o runs/tokens/val.npy -t runs/tiny-cnn/best[/]
    """
    from xqtool.tasks.encode import EncodeSettings, encode_images, token_output_path
    from xqtool.tasks.injected import Injected

    if flip and ten_crop:
        raise ConfigError("choose one of --flip and --ten-crop")
    out_path = token_output_path(output)
    augmentation = "flip" if flip else "ten-crop" if ten_crop else "none"
    main = _is_main()
    with _progress("encoding", enabled=main) as (on_start, advance):
        settings = EncodeSettings(
            source=source, output=out_path, ckpt=tokenizer, config=config, batch_size=batch_size,
            num_workers=num_workers, device=device, precision=precision.value, augmentation=augmentation,
            bad_files=bad_files.value, unit_size=unit_size, overwrite=overwrite,
        )
        result = encode_images(settings, Injected(progress=advance, on_start=on_start))
    if not main or result.manifest is None:
        return
    m = result.manifest
    console.print(
        f"[green]wrote[/] {result.output}: {m.count} rows x {m.num_branches} branches x {m.tokens_per_branch} tokens "
        f"({m.dtype}, K={m.codebook_size}, scales {m.scales}, augmentation {m.augmentation})"
    )
    console.print(
        f"encoded {result.count if result.units_resumed == 0 else 'the remaining'} images in {result.seconds:.1f}s "
        f"({result.images_per_s:,.1f} images/s); work units {result.units_total}, resumed {result.units_resumed}"
    )
    console.print(f"ran on: {run_facts(precision, device)}; output: {result.output}")
    _print_skipped(result.skipped, result.skipped_file)


def decode(
    tokens: Annotated[Path, typer.Argument(help="Token file (.npy with its .npy.json) or token-shard folder from `xqtool encode`.")],
    output: Annotated[Path, output_option("Folder for the PNGs (named after the source keys).")],
    tokenizer: Tokenizer,
    config: TokenizerConfigOpt = None,
    batch_size: BatchSize = 32,
    device: Device = None,
    precision: PrecisionOpt = Precision.fp32,
    progressive: Annotated[bool, typer.Option("--progressive", help="Also write KEY.progressive.png: columns = scales, rows = all branches then each branch alone.")] = False,
    overwrite: Overwrite = False,
    ignore_fingerprint: IgnoreFingerprint = False,
) -> None:
    """Decode token ids back to PNG images.

    Refuses tokens whose manifest does not match the tokenizer (names the differing field).

    Example: [bold]xqtool decode runs/tokens/val.npy -o runs/recon -t runs/tiny-cnn/best --progressive[/]
    """
    from xqtool.tasks.decode import DecodeSettings, decode_tokens
    from xqtool.tasks.injected import Injected
    from xqtool.distributed import main_process_only

    if not main_process_only("decode"):  # under a multi-process launch, rank 0 does all of it
        return

    with _progress("decoding") as (on_start, advance):
        settings = DecodeSettings(
            tokens=tokens, out_dir=output, ckpt=tokenizer, config=config, batch_size=batch_size, device=device,
            precision=precision.value, progressive=progressive, overwrite=overwrite,
            ignore_fingerprint=ignore_fingerprint,
        )
        result = decode_tokens(settings, Injected(progress=advance, on_start=on_start))
    extra = f" (+ {len(result.progressive_files)} progressive strips)" if progressive else ""
    console.print(f"[green]wrote[/] {result.count} PNGs to {result.out_dir}{extra}")
    console.print(f"ran on: {run_facts(precision, resolve_device(device))}")


def make_shards_cmd(
    source: Annotated[str, typer.Argument(help="Any image source (folder, class tree, .txt list, image, shards).")],
    legacy_out: Annotated[Optional[Path], typer.Argument(hidden=True, help="Deprecated: use -o/--output.")] = None,
    output: Annotated[Optional[Path], output_option("Output folder for PREFIX-000000.tar ... + shards.json.")] = None,
    maxcount: Annotated[int, typer.Option("--maxcount", help="Samples per shard.")] = 1000,
    image_format: Annotated[str, typer.Option("--format", help="jpg (quality --quality) or png (lossless).")] = "jpg",
    quality: Annotated[int, typer.Option("--quality", help="JPEG quality.")] = 95,
    prefix: Annotated[str, typer.Option("--prefix", help="Shard file name prefix.")] = "shard",
    bad_files: BadFiles = BadFilesPolicy.skip,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes that will read the shards (for the too-few-shards warning).")] = 1,
    reader_workers: Annotated[int, typer.Option("--reader-workers", help="DataLoader workers per node that will read them (for the same warning).")] = 4,
    overwrite: Overwrite = False,
) -> None:
    """Pack images into WebDataset shards (jpg/png + cls + json with original size and path).

    Example: [bold]xqtool make-shards runs/demo_images/train -o runs/shards --maxcount 100[/], then
    [bold]xqtool encode 'runs/shards/shard-{000000..000003}.tar' -o runs/tokens/ -t CKPT[/]
    """
    from xqtool.tasks.make_shards import make_shards
    from xqtool.distributed import main_process_only

    if not main_process_only("make-shards"):  # under a multi-process launch, rank 0 does all of it
        return

    output = legacy_positional(legacy_out, output, "output folder", "-o/--output DIR")
    if output is None:
        raise ConfigError("missing -o/--output DIR (the folder for the shards)")
    with _progress("packing") as (on_start, advance):
        result = make_shards(
            source, output, maxcount=maxcount, image_format=image_format, quality=quality, prefix=prefix,
            bad_files=bad_files.value, nodes=nodes, workers=reader_workers, progress=advance, overwrite=overwrite,
        )
    console.print(f"[green]wrote[/] {len(result.shards)} shards with {result.count} images to {result.out_dir}")
    if result.shards:
        first, last = result.shards[0][0], result.shards[-1][0]
        console.print(f"shards: {first} .. {last}")
    if result.warning:
        console.print(f"[yellow]warning:[/] {result.warning}")
    _print_skipped(result.skipped, result.out_dir / "skipped.txt" if result.skipped else None)


def register(app: typer.Typer) -> None:
    """Add `encode`, `decode` and `make-shards` to `app`."""
    add_command(app, encode, "encode", aliases={"--ckpt": ["--tokenizer"]})
    add_command(app, decode, "decode", aliases={"--ckpt": ["--tokenizer"]})
    add_command(app, make_shards_cmd, "make-shards", aliases={"--workers": ["--reader-workers"]})
