"""`xqtool encode`, `xqtool decode`, `xqtool make-shards`: thin wrappers over xqtool.tasks."""

from __future__ import annotations

import os

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import typer
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

from xqtool.cli._common import add_command, console
from xqtool.errors import ConfigError

_MAX_LISTED = 10


class _RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} images/s" if speed else "- images/s", style="progress.data.speed")


@contextmanager
def _progress(label: str, enabled: bool = True) -> Iterator[Tuple[Callable[[Optional[int]], None], Callable[[int], None]]]:
    """Yield (on_start(total), advance(n)) driving a rich progress bar (no-ops when disabled)."""
    if not enabled:
        yield (lambda total: None), (lambda n: None)
        return
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(label, total=None)

        def on_start(total: Optional[int]) -> None:
            prog.update(task, total=total)

        def advance(n: int) -> None:
            prog.advance(task, n)

        yield on_start, advance


def _print_skipped(skipped: Dict[str, str], where: Optional[Path]) -> None:
    if not skipped:
        return
    console.print(f"[yellow]skipped {len(skipped)} bad input(s)[/]" + (f" (all listed in {where})" if where else ""))
    for name, reason in list(sorted(skipped.items()))[:_MAX_LISTED]:
        console.print(f"  [yellow]-[/] {name}: {reason}", highlight=False)
    if len(skipped) > _MAX_LISTED:
        console.print(f"  ... and {len(skipped) - _MAX_LISTED} more")


def _is_main() -> bool:
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # pragma: no cover - accelerate always installed
        return True


def encode(
    source: str = typer.Argument(..., help="Images: class-tree or flat folder, .txt list, image file, or WebDataset shards (path, {000..127} pattern, http(s)://, pipe:)."),
    output: Path = typer.Option(..., "--output", "-o", help="X.npy (one [N, P, L] array + X.npy.json) or a folder (token shards + manifest.json)."),
    ckpt: Path = typer.Option(..., "--ckpt", help="Tokenizer checkpoint: xqtool directory or official .pt."),
    config: Optional[Path] = typer.Option(None, "--config", help="Tokenizer YAML (default: the checkpoint's own)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass (per process)."),
    num_workers: int = typer.Option(
        min(4, os.cpu_count() or 1), "--num-workers", "-j", min=0, help="DataLoader worker processes (default: min(4, CPUs))."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: Accelerate's device)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | fp16 (autocast)."),
    flip: bool = typer.Option(False, "--flip", help="Also encode the horizontally flipped image (rows k, k@flip)."),
    ten_crop: bool = typer.Option(False, "--ten-crop", help="Encode 10 crops per image (rows k@crop0..k@crop9)."),
    bad_files: str = typer.Option("skip", "--bad-files", help="skip (report in OUT's skipped.txt) | fail (stop at the first)."),
    unit_size: int = typer.Option(1000, "--unit-size", min=1, help="Files per resumable work unit (folder/list sources)."),
) -> None:
    """Encode images into token ids, streaming (memory bounded by the batch) and resumable.

    Multi-GPU: [bold]accelerate launch -m xqtool encode ...[/] (each process encodes its share of the work units,
    the main process merges). Re-running an interrupted command keeps the finished units.

    Example: [bold]xqtool encode imgs/ -o tokens.npy --ckpt runs/tiny-cnn/best[/]
    """
    from xqtool.tasks.encode import encode_images

    if flip and ten_crop:
        raise ConfigError("choose one of --flip and --ten-crop")
    augmentation = "flip" if flip else "ten-crop" if ten_crop else "none"
    main = _is_main()
    with _progress("encoding", enabled=main) as (on_start, advance):
        result = encode_images(
            source, output, ckpt=ckpt, config=config, batch_size=batch_size, num_workers=num_workers,
            device=device, precision=precision, augmentation=augmentation, bad_files=bad_files,
            unit_size=unit_size, progress=advance, on_start=on_start,
        )
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
    _print_skipped(result.skipped, result.skipped_file)


def decode(
    tokens: Path = typer.Argument(..., help="Token file (.npy with its .npy.json) or token-shard folder from `xqtool encode`."),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Folder for the PNGs (named after the source keys)."),
    ckpt: Path = typer.Option(..., "--ckpt", help="The tokenizer checkpoint that encoded the tokens."),
    config: Optional[Path] = typer.Option(None, "--config", help="Tokenizer YAML (default: the checkpoint's own)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda when available)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | fp16 (autocast)."),
    progressive: bool = typer.Option(False, "--progressive", help="Also write KEY.progressive.png: columns = scales, rows = all branches then each branch alone."),
) -> None:
    """Decode token ids back to PNG images.

    Refuses tokens whose manifest does not match the tokenizer (names the differing field).

    Example: [bold]xqtool decode tokens.npy -o recon/ --ckpt runs/tiny-cnn/best --progressive[/]
    """
    from xqtool.tasks.decode import decode_tokens

    with _progress("decoding") as (on_start, advance):
        result = decode_tokens(
            tokens, out_dir, ckpt=ckpt, config=config, batch_size=batch_size, device=device,
            precision=precision, progressive=progressive, progress=advance, on_start=on_start,
        )
    extra = f" (+ {len(result.progressive_files)} progressive strips)" if progressive else ""
    console.print(f"[green]wrote[/] {result.count} PNGs to {result.out_dir}{extra}")


def make_shards_cmd(
    source: str = typer.Argument(..., help="Any image source (folder, class tree, .txt list, image, shards)."),
    out_dir: Path = typer.Argument(..., help="Output folder for PREFIX-000000.tar ... + shards.json."),
    maxcount: int = typer.Option(1000, "--maxcount", min=1, help="Samples per shard."),
    image_format: str = typer.Option("jpg", "--format", help="jpg (quality --quality) or png (lossless)."),
    quality: int = typer.Option(95, "--quality", min=1, max=100, help="JPEG quality."),
    prefix: str = typer.Option("shard", "--prefix", help="Shard file name prefix."),
    bad_files: str = typer.Option("skip", "--bad-files", help="skip | fail."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes that will read the shards (for the too-few-shards warning)."),
    workers: int = typer.Option(4, "--workers", min=1, help="DataLoader workers per node that will read them."),
) -> None:
    """Pack images into WebDataset shards (jpg/png + cls + json with original size and path).

    Example: [bold]xqtool make-shards train/ shards/ --maxcount 1000[/], then
    [bold]xqtool encode 'shards/shard-{000000..000127}.tar' -o tokens/ --ckpt CKPT[/]
    """
    from xqtool.tasks.make_shards import make_shards

    with _progress("packing") as (on_start, advance):
        result = make_shards(
            source, out_dir, maxcount=maxcount, image_format=image_format, quality=quality, prefix=prefix,
            bad_files=bad_files, nodes=nodes, workers=workers, progress=advance,
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
    add_command(app, encode, "encode")
    add_command(app, decode, "decode")
    add_command(app, make_shards_cmd, "make-shards")
