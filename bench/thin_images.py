"""Benchmark: peak RSS of reading a folder with a 1x32000 strip next to normal images (image size 256).

Runs the data layer (``open_image_source``, eval preprocessing) in a FRESH subprocess twice: on a folder of
normal photos only, and on the same folder plus a 1x32000 and a 32000x1 strip, with the aspect-ratio limit
off (``XQTOOL_MAX_ASPECT_RATIO=0``) so the strips are really resized. Prints one JSON object with each
run's peak RSS (MB) and the difference. Before crop-before-resize the strips alone needed ~20 GB.

Usage: python bench/thin_images.py [--image-size 256] [--normal 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import resource, sys
from xqtool.data.images import open_image_source
n = sum(1 for s in open_image_source(sys.argv[1], image_size=int(sys.argv[2])))
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run(folder: Path, size: int) -> tuple:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XQTOOL_MAX_ASPECT_RATIO="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(size)], env=env, check=True,
                         capture_output=True, text=True)
    n, rss = out.stdout.split()
    return int(n), float(rss)


def main() -> None:
    import numpy as np
    import skimage.data as sd
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--normal", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        normal, mixed = Path(tmp) / "normal", Path(tmp) / "mixed"
        normal.mkdir()
        mixed.mkdir()
        photos = [sd.astronaut(), sd.coffee(), sd.chelsea()]
        for i in range(args.normal):
            for d in (normal, mixed):
                Image.fromarray(photos[i % 3]).save(d / f"{i:03d}.png", compress_level=1)
        strip = np.random.default_rng(0).integers(0, 256, (1, 32000, 3), dtype=np.uint8)
        Image.fromarray(strip).save(mixed / "banner_1x32000.png")
        Image.fromarray(strip.transpose(1, 0, 2).copy()).save(mixed / "banner_32000x1.png")
        n0, rss0 = run(normal, args.image_size)
        n1, rss1 = run(mixed, args.image_size)
    print(json.dumps({"image_size": args.image_size, "normal_images": n0, "with_strips": n1,
                      "peak_rss_mb_normal": round(rss0, 1), "peak_rss_mb_with_strips": round(rss1, 1),
                      "extra_mb": round(rss1 - rss0, 1)}))


if __name__ == "__main__":
    main()
