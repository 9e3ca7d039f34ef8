"""Command line of the evaluations (DESIGN §5)::

    python -m msclip_fast.eval zeroshot  --checkpoint CKPT --data DIR --classes openclipart|digits|imagenet|FILE
    python -m msclip_fast.eval retrieval --checkpoint CKPT --data DIR/val

``CKPT`` is a run directory (its latest checkpoint), a checkpoint directory or a model.pt.
``DIR`` is a shard spec (directory, brace pattern, glob, ``::``-joined); when it has a
``--split`` subdirectory (default ``val``) that one is used, so both ``data/digits`` and
``data/digits/val`` work. Logs go to stderr; the metrics are printed as ONE JSON object on the
last line of stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger("msclip_fast.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m msclip_fast.eval",
        description="Zero-shot classification and image-text retrieval of an msclip_fast checkpoint.",
    )
    sub = p.add_subparsers(dest="task", required=True, metavar="{zeroshot,retrieval}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--checkpoint", required=True,
                        help="run dir (uses checkpoints/latest), checkpoint dir, or model.pt")
        sp.add_argument("--data", required=True,
                        help="shards: dir / brace pattern / glob / '::'-joined; DIR/SPLIT is used when it exists")
        sp.add_argument("--split", default="val", help="subdirectory of --data to use when present (default: val)")
        sp.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
        sp.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
        sp.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast (default: fp32)")
        sp.add_argument("--data-backend", choices=("torch", "dali"), default="torch",
                        help="build_loader backend (default: torch)")
        sp.add_argument("--num-workers", type=int, default=0, help="loader workers (default: 0)")
        sp.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    zs = sub.add_parser("zeroshot", help="zero-shot classification from text prompts",
                        description="Zero-shot top-1/top-5/balanced accuracy with chance levels.")
    common(zs)
    zs.add_argument("--classes", required=True,
                    help="openclipart | digits | imagenet | FILE (JSON list, manifest, or one name per line)")
    zs.add_argument("--per-class", action="store_true", help="also report top-1 per class")

    rt = sub.add_parser("retrieval", help="image<->text recall@1/5/10",
                        description="Image->text and text->image recall@K with chance levels.")
    common(rt)
    rt.add_argument("--no-dedup", action="store_true",
                    help="skip the recalls where any identical caption counts as correct")
    return p


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def resolve_data(data: str, split: str | None) -> str:
    """``DIR`` -> ``DIR/split`` when that directory exists, else ``data`` unchanged."""
    if split and "::" not in data:
        cand = Path(data) / split
        if cand.is_dir():
            return str(cand)
    return data


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={device!r} but CUDA is not available here")
    return dev


def main(argv: list[str] | None = None) -> dict:
    """Run one evaluation; print the metrics JSON as the last stdout line and return it."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _positive("--batch-size", args.batch_size)
    _positive("--max-batches", args.max_batches)
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")

    from .. import load_model
    from ..data import build_loader

    device = resolve_device(args.device)
    model = load_model(args.checkpoint, map_location="cpu").to(device).eval()
    data = resolve_data(args.data, args.split)
    logger.info("evaluating %s on %s (%s, %s)", args.checkpoint, data, device, args.precision)
    loader = build_loader(
        data,
        args.batch_size,
        train=False,
        image_size=model.image_size,
        mean=tuple(model.image_mean),
        std=tuple(model.image_std),
        backend=args.data_backend,
        num_workers=args.num_workers,
        drop_last=False,
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        if args.task == "zeroshot":
            from .zeroshot import resolve_classes, zero_shot_eval

            classnames, templates = resolve_classes(args.classes, data=args.data)
            metrics = zero_shot_eval(
                model, loader, classnames, templates,
                max_batches=args.max_batches, per_class=args.per_class,
            )
        else:
            from .retrieval import retrieval_eval

            metrics = retrieval_eval(model, loader, dedup=not args.no_dedup, max_batches=args.max_batches)
    skipped = getattr(loader, "skipped", None)
    if skipped:
        metrics["data_skipped"] = dict(skipped)
    print(json.dumps(metrics, sort_keys=False), flush=True)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """Entry point: ValueError (bad input) becomes a one-line error and exit status 2."""
    try:
        main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
