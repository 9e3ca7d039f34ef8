"""``python -m msclip_fast.eval {zeroshot,retrieval,gallery} ...`` (see :mod:`msclip_fast.eval.cli`)."""
import sys

from .cli import cli

if __name__ == "__main__":
    sys.exit(cli())
