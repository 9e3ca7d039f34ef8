"""One convention for every command-line entry point (train.py, make_shards, the index builder,
eval, plot): a mistake of the user's is one ``error: ...`` line on stderr and exit status 2
(argparse's convention for bad usage); a real bug keeps its traceback.

"A mistake of the user's" is a :class:`ValueError` (the project raises it, naming the flag and
the value, for every bad input it checks; its subclasses, e.g. the index's
``IndexMissingError``, included) or a :class:`FileNotFoundError` naming a path the user gave.
Under a distributed launcher every rank would print the same line, so only rank 0 (``RANK``
unset or ``0``) prints it; every rank exits 2, the others a few seconds later. ``--debug`` on the command line, or
``MSCLIP_FAST_DEBUG=1``, re-raises instead, traceback included.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional, Sequence

USER_ERRORS = (ValueError, FileNotFoundError)
# A launcher (deepspeed, torchrun) kills every rank as soon as one exits non-zero, polling about
# once a second. Every rank meets the same mistake at about the same moment, so a silent rank
# that got there first would often take rank 0 down before rank 0 printed the line: the others
# wait this long first (the launcher kills them sooner when rank 0 exits).
NONZERO_RANK_EXIT_DELAY_S = 5.0


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
    """``--debug`` in ``argv`` (default ``sys.argv``) or ``MSCLIP_FAST_DEBUG=1``."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("MSCLIP_FAST_DEBUG", "") == "1"


def is_rank_zero() -> bool:
    """True unless a launcher set ``RANK`` to a rank other than 0."""
    return os.environ.get("RANK", "0") in ("", "0")


def run_cli(main: Callable[..., object], argv: Optional[Sequence[str]] = None, prog: str = "") -> int:
    """Call ``main(argv)``; returns its int status (0 when it returns anything else).

    Args:
        main: the entry point's ``main(argv)``.
        argv: arguments without the program name (default: ``sys.argv[1:]``); ``--debug`` is
            removed before ``main`` sees it.
        prog: prefix of the error line (``"prog: error: ..."``), default none.
    Returns:
        ``main``'s status, or 2 after a user error (one line on stderr, rank 0 only).
    Raises:
        whatever ``main`` raises that is not a user error, and user errors too under
        ``--debug`` / ``MSCLIP_FAST_DEBUG=1``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != "--debug"]
    try:
        rc = main(args)
    except USER_ERRORS as e:
        if debug:
            raise
        if is_rank_zero():
            msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"{e.strerror}: {e.filename}"
            print(f"{prog + ': ' if prog else ''}error: {msg}", file=sys.stderr, flush=True)
        else:
            time.sleep(NONZERO_RANK_EXIT_DELAY_S)
        return 2
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
