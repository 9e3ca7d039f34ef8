"""Command line of the evaluations (DESIGN §5)::

    python -m msclip_fast.eval zeroshot  --checkpoint CKPT --data DIR --classes openclipart|digits|imagenet|FILE
             [--prompts train-captions --train-data DIR/train]
    python -m msclip_fast.eval retrieval --checkpoint CKPT --data DIR/val
    python -m msclip_fast.eval gallery   --checkpoint CKPT --data DIR/val --out OUT [--queries N] [--top K]

``CKPT`` is a run directory (its latest checkpoint), a checkpoint directory or a model.pt.
``DIR`` is a shard spec (directory, brace pattern, glob, ``::``-joined); when it has a
``--split`` subdirectory (default ``val``) that one is used, so both ``data/digits`` and
``data/digits/val`` work. Logs go to stderr; the metrics (gallery: the files written) are printed
as ONE JSON object on the last line of stdout.
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
        description="Zero-shot classification, image-text retrieval and a retrieval gallery of an msclip_fast "
                    "checkpoint.",
    )
    sub = p.add_subparsers(dest="task", required=True, metavar="{zeroshot,retrieval,gallery}")

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
        sp.add_argument("--no-progress", action="store_true", help="no progress bar (stderr) over the split")

    zs = sub.add_parser("zeroshot", help="zero-shot classification from text prompts",
                        description="Zero-shot top-1/top-5/balanced accuracy with chance levels.")
    common(zs)
    zs.add_argument("--classes", required=True,
                    help="openclipart | digits: that source's prompt templates; the class NAMES come from the "
                         "shard set's manifest.json 'classes' (in the --data dir or its parent), else from the "
                         "distinct meta['class'] values of the evaluated samples. imagenet: open_clip's ImageNet "
                         "class names and OpenAI's 80 templates. FILE: the class names (JSON list, manifest "
                         "with 'classes', or one name per line) with generic templates")
    zs.add_argument("--per-class", action="store_true", help="also report top-1 per class")
    zs.add_argument("--prompts", choices=("classnames", "train-captions"), default="classnames",
                    help="classnames: templates filled with each class name (default). train-captions: per class, "
                         "its most distinctive words and most frequent captions in the TRAINING split "
                         "(--train-data); the class-name result is reported beside it as 'plain_prompts'")
    zs.add_argument("--train-data", default=None,
                    help="training shards for --prompts train-captions (DIR/train is used when it exists); "
                         "must not share shards with --data")

    rt = sub.add_parser("retrieval", help="image<->text recall@1/5/10",
                        description="Image->text and text->image recall@K with chance levels.")
    common(rt)
    rt.add_argument("--no-dedup", action="store_true",
                    help="skip the recalls where any identical caption counts as correct")

    ga = sub.add_parser("gallery", help="PNG pictures of top retrievals on held-out pairs",
                        description="Draw held-out captions with their top-K retrieved images and held-out "
                                    "images with their top-K captions (true match highlighted), plus a JSON of "
                                    "what is shown.")
    common(ga)
    ga.add_argument("--out", required=True, help="output directory (created)")
    ga.add_argument("--queries", type=int, default=8, help="query rows per picture (default: 8)")
    ga.add_argument("--top", type=int, default=5, help="retrieved items per query (default: 5)")
    ga.add_argument("--seed", type=int, default=0, help="seed of the choice of queries (default: 0)")
    return p


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def resolve_data(data: str, split: str | None, flag: str = "--data") -> str:
    """``DIR`` -> ``DIR/split`` when that directory exists, else ``data`` unchanged.

    Raises:
        ValueError: ``data`` is a directory with neither ``split`` nor shards of its own (the
            message names the split and lists what the directory holds).
    """
    if split and "::" not in data:
        d = Path(data)
        cand = d / split
        if cand.is_dir():
            return str(cand)
        if d.is_dir() and not any(p.name.endswith(".tar") and not p.name.endswith(".fallback.tar")
                                  for p in d.iterdir()):
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir())
            splits = [e.rstrip("/") for e in entries if e.endswith("/") and any((d / e).glob("*.tar"))]
            shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
            hint = f"; split directories with shards: {splits} (pass --split NAME)" if splits else ""
            raise ValueError(f"{flag} {data}: no split {split!r} (no directory {cand}) and no shards (*.tar) in "
                             f"{data} itself; it contains: {shown or 'nothing'}{hint}")
    return data


class _Progress:
    """The loader with a tqdm bar (stderr) over each pass; other attributes (``skipped``...)
    are the loader's."""

    def __init__(self, loader, desc: str, enabled: bool):
        self.loader, self.desc, self.enabled = loader, desc, enabled

    def __iter__(self):
        from tqdm import tqdm

        try:
            total = len(self.loader)
        except TypeError:  # no manifest or index: the length is unknown
            total = None
        yield from tqdm(self.loader, total=total, desc=self.desc, unit="batch", disable=not self.enabled,
                        file=sys.stderr, leave=False)

    def __getattr__(self, name):
        return getattr(self.loader, name)


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
    if args.task == "gallery":
        _positive("--queries", args.queries)
        _positive("--top", args.top)
    if args.task == "zeroshot" and (args.prompts == "train-captions") != (args.train_data is not None):
        raise ValueError("--prompts train-captions needs --train-data (the training shards), and --train-data "
                         "is only used with --prompts train-captions")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")

    from .. import load_model
    from ..data import build_loader

    device = resolve_device(args.device)
    data = resolve_data(args.data, args.split)  # before the model load: a wrong --data fails fast
    model = load_model(args.checkpoint, map_location="cpu").to(device).eval()
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
    loader = _Progress(loader, f"encoding {Path(data).name or data}", enabled=not args.no_progress)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        if args.task == "zeroshot":
            from .zeroshot import resolve_classes, zero_shot_eval

            classnames, templates = resolve_classes(args.classes, data=args.data)
            class_prompts = None
            if args.prompts == "train-captions":
                from ..data import resolve_urls
                from .prompts import train_caption_prompts

                if classnames is None:
                    raise ValueError("--prompts train-captions needs the class names up front: a manifest.json "
                                     "with 'classes' beside --data, or --classes FILE")
                train_data = resolve_data(args.train_data, "train", "--train-data")
                class_prompts, words = train_caption_prompts(train_data, classnames, templates,
                                                             eval_urls=resolve_urls(data))
            metrics = zero_shot_eval(
                model, loader, classnames, templates,
                max_batches=args.max_batches, per_class=args.per_class, class_prompts=class_prompts,
            )
            if class_prompts is not None:
                metrics["prompts"] = "train-captions"
                metrics["train_caption_words"] = words
        elif args.task == "gallery":
            from ..data import resolve_urls
            from .gallery import make_gallery

            metrics = make_gallery(model, loader, resolve_urls(data), args.out, queries=args.queries,
                                   top=args.top, seed=args.seed, max_batches=args.max_batches)
            print(f"text -> image pictures: {metrics['text_to_image']}\n"
                  f"image -> text pictures: {metrics['image_to_text']}\n"
                  f"what they show: {metrics['json']}", flush=True)
        else:
            from .retrieval import retrieval_eval

            metrics = retrieval_eval(model, loader, dedup=not args.no_dedup, max_batches=args.max_batches)
    skipped = getattr(loader, "skipped", None)
    if skipped:
        metrics["data_skipped"] = dict(skipped)
    print(json.dumps(metrics, sort_keys=False), flush=True)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """Entry point: a user error (ValueError, a missing file) becomes one ``error:`` line and
    exit status 2; ``--debug`` keeps the traceback (:func:`msclip_fast.cli.run_cli`)."""
    from ..cli import run_cli

    rc = run_cli(main, argv)
    return rc if rc == 2 else 0
