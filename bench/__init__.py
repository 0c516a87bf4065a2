"""The benchmark package (not part of CI): the results suite, the photo benchmark, speed and scale figures, and
the analyses the docs cite. One runner, one argument style: ``python -m bench <command> [options]``;
``python -m bench`` lists the commands, ``python -m bench <command> --help`` explains one."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
