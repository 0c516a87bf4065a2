"""Per-image loader cost of large originals with and without the resized cache, against small copies.

    python -m bench loader --n 12 --image-size 224 --out bench/results/loader_cpu.json

Builds its own data in a temporary folder: scikit-image's sample photos upscaled to 6000x4000 (24 megapixels)
and saved as JPEG quality 90, and 256 px copies of the same photos (shorter side 256). Times ``dataset[i]``
(evaluation transform, one process) over every file, best of 3 passes, for: the originals with the cache off;
the originals with the cache, first pass (it builds the copies) and second pass; the 256 px copies. Prints and
writes the figures, the bytes of a cached copy, and the ratio "cached second pass / 256 px copies" (target <= 3).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import skimage.data
import torch
from PIL import Image

from bench.docs_sections import publish
from bench.environment import environment
from shortcut_lightning.data import MetadataDataModule

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
)
TARGET = 3.0


def photo(k: int) -> Image.Image:
    """The ``k``-th sample photo (mirrored after the first round, so every file is distinct)."""
    array = getattr(skimage.data, PHOTOS[k % len(PHOTOS)])()
    image = Image.fromarray(array).convert("RGB")
    return image if k < len(PHOTOS) else image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # a distinct file


def write_folder(root: Path, n: int, side: int | None) -> Path:
    """``n`` JPEGs at 6000x4000 (``side`` None) or with shorter side ``side``, in a metadata.csv folder."""
    (root / "img").mkdir(parents=True)
    rows = []
    for k in range(n):
        image = photo(k)
        size = (6000, 4000) if side is None else (round(side * 1.5), side)
        image.resize(size, Image.Resampling.BICUBIC).save(root / f"img/{k}.jpg", quality=90)
        rows.append({"img_filename": f"img/{k}.jpg", "y": k % 2, "split": 2, "place": (k // 2) % 2})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def per_image_ms(dataset, passes: int) -> list[float]:
    """Milliseconds per ``dataset[i]`` of each full pass."""
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        times.append(1000 * (time.perf_counter() - start) / len(dataset))
    return times


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=12, help="files of each kind (default 12)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("bench/results/loader_cpu.json"))
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only, not docs/results.md")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        tmp = Path(tmp)
        print(f"writing {args.n} 6000x4000 JPEGs and {args.n} 256 px copies in {tmp} ...", flush=True)
        large, small, cache = (
            write_folder(tmp / "large", args.n, None),
            write_folder(tmp / "small", args.n, 256),
            tmp / "cache",
        )

        def dataset(root: Path, resize_cache: str):
            dm = MetadataDataModule(
                root=str(root),
                image_size=args.image_size,
                num_workers=0,
                check_images="none",
                resize_cache=resize_cache,
            )
            return dm.dataset("test")

        figures = {
            "originals_cache_off": min(per_image_ms(dataset(large, "off"), 3)),
            "originals_cache_first_pass": per_image_ms(dataset(large, str(cache)), 1)[0],
            "originals_cache_second_pass": min(per_image_ms(dataset(large, str(cache)), 3)),
            "copies_256px": min(per_image_ms(dataset(small, "off"), 3)),
        }
        copies = sorted(cache.rglob("*.npy"))
        bytes_per_copy = int(np.mean([os.path.getsize(p) for p in copies]))
    ratio = figures["originals_cache_second_pass"] / figures["copies_256px"]
    result = {
        "n": args.n,
        "image_size": args.image_size,
        "original": "6000x4000 JPEG q90",
        "copy": "shorter side 256 JPEG q90",
        "ms_per_image": {k: round(v, 3) for k, v in figures.items()},
        "cached_copies": len(copies),
        "bytes_per_cached_copy": bytes_per_copy,
        "ratio_cached_second_pass_to_256px": round(ratio, 2),
        "target_ratio": TARGET,
        "meets_target": ratio <= TARGET,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    for name, ms in result["ms_per_image"].items():
        print(f"{name:32s} {ms:9.2f} ms/image")
    print(
        f"cached copy: {bytes_per_copy:,} bytes; cached second pass / 256 px copies = {ratio:.2f} (target <= {TARGET})"
    )
    publish(result, args.out, "loader", None if args.no_docs else markdown(result))


LABELS = {
    "originals_cache_off": "6000x4000 originals, cache off",
    "originals_cache_first_pass": "6000x4000 originals, first pass (builds the resized cache)",
    "originals_cache_second_pass": "6000x4000 originals, from the second pass (the cache)",
    "copies_256px": "256 px copies of the same photos (the baseline)",
}


def markdown(result: dict[str, Any]) -> str:
    """The section of docs/results.md: ms per image of each path and the target ratio."""
    env = environment()
    lines = [
        f"`python -m bench loader` (run by `make bench`) on {env['date']} ({env['machine']}): `dataset[i]` over "
        f"{result['n']} files of each kind at `image_size: {result['image_size']}`, one process, best of 3 passes.",
        "",
        "| path | ms per image |",
        "|---|---|",
        *(f"| {LABELS[k]} | {v:.2f} |" for k, v in result["ms_per_image"].items()),
        "",
        f"Cached second pass / 256 px copies: **{result['ratio_cached_second_pass_to_256px']:.2f}** (target <= "
        f"{result['target_ratio']:g}: {'met' if result['meets_target'] else 'missed'}); a cached copy takes "
        f"{result['bytes_per_cached_copy']:,} bytes.",
    ]
    return "\n".join(lines) + "\n"
