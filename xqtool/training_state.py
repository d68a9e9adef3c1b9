"""Training-state directories shared by every trainer: atomic Accelerate `save_state`, listing, `--resume`.

Layout: ``RUN/checkpoints/step-NNNNNNN/`` holds Accelerate's state (models, optimizers, schedulers,
scalers, RNG states, registered objects) plus ``trainer_state.json``. The JSON is written last, inside a
temporary directory that is then renamed, so a directory with the JSON is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from xqtool.errors import CheckpointError

STATE_DIR = "checkpoints"
STATE_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def state_path(run_dir: Path, step: int) -> Path:
    """``run_dir/checkpoints/step-NNNNNNN``."""
    return Path(run_dir) / STATE_DIR / f"{STATE_PREFIX}{step:07d}"


def list_states(run_dir: Path) -> List[Path]:
    """Complete training-state directories of a run, oldest first."""
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name[len(STATE_PREFIX):]
        if p.name.startswith(STATE_PREFIX) and suffix.isdigit() and (p / STATE_FILE).is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``None``/empty → no resume; ``auto`` → newest complete state (None when there is none);
    a run directory → its newest state; a state directory → itself. Anything else is a CheckpointError."""
    if not resume:
        return None
    if resume == "auto":
        states = list_states(run_dir)
        return states[-1] if states else None
    path = Path(resume)
    if (path / STATE_DIR).is_dir():
        states = list_states(path)
        if states:
            return states[-1]
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {resume}: not a complete training state (expected {STATE_DIR}/{STATE_PREFIX}N with "
            f"{STATE_FILE}); use --resume auto or a run directory"
        )
    return path


def read_state(path: Path) -> Dict[str, Any]:
    """The ``trainer_state.json`` of a state directory."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {Path(path) / STATE_FILE}: {exc}") from None


def save_state_atomic(accelerator: Any, run_dir: Path, step: int, state: Dict[str, Any], keep: int) -> Path:
    """``accelerator.save_state`` into a temp dir, add ``trainer_state.json``, rename; keep the newest `keep`."""
    final = state_path(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_states(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
