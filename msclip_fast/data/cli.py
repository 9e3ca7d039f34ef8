"""Command line of the data tools that have no module of their own to print from:
``python -m msclip_fast.data.index DIR [DIR...] [--workers N] [--max-pixels N] [--force]``
(the library is :mod:`msclip_fast.data.index`)."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Optional, Sequence

from .images import DEFAULT_MAX_PIXELS


def index_main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the shard indices; prints the :func:`~msclip_fast.data.index.build_index` summary
    as one JSON line on stdout. A bad spec or shard (ValueError, IndexBuildError included) is
    one ``error:`` line on stderr and status 2 (:func:`msclip_fast.cli.run_cli`; ``--debug``
    keeps the traceback)."""
    from ..cli import run_cli
    from .index import build_index

    def run(args: Sequence[str]) -> int:
        p = argparse.ArgumentParser(prog="python -m msclip_fast.data.index",
                                    description="Validate WebDataset shards once and write DALI index files.")
        p.add_argument("dirs", nargs="+", metavar="DIR", help="shard directory (recursive), shard file or pattern")
        p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
        p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help="skip images with more pixels (must match the loader's max_pixels)")
        p.add_argument("--force", action="store_true", help="rebuild indexes that are present and fresh")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
        a = p.parse_args(args)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        summary = build_index(a.dirs, workers=a.workers, max_pixels=a.max_pixels, force=a.force,
                              progress=not a.no_progress)
        print(json.dumps(summary))
        return 0

    return run_cli(run, argv)
