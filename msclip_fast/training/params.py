"""Command-line flags of ``train.py`` (DESIGN §5) and their validation.

Kept free of heavy imports (no deepspeed) so that ``train.py --help`` is instant.
"""
from __future__ import annotations

import argparse
import math
import os

PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("clip", "siglip")
# Zhai et al. 2023 (SigLIP): t' = log 10 and b = -10 start the logits near the prior that almost
# every pair is a negative (sigmoid(-10) ~ 5e-5), instead of spending the first steps correcting it
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def _float_or_none(text: str):
    """A number, or "none" (no bias parameter)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train CLIP / MS-CLIP. `deepspeed train.py --ds_config configs/ds/zero2.json ...` "
        "for DeepSpeed (ZeRO 0-3), `python train.py ...` for one process without the launcher.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("launcher / DeepSpeed")
    g.add_argument("--ds_config", "--deepspeed_config", "--ds-config", dest="ds_config", default=None,
                   help="DeepSpeed JSON config; batch sizes may be 'auto' (filled from the flags below)")
    g.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed compatibility (a ds config implies it)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   default=int(os.environ.get("LOCAL_RANK", -1)), help="set by the launcher")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="msclip-tiny", help="preset name (see msclip_fast.list_models())")
    g.add_argument("--train-data", required=False, default=None, help="training shards: dir, brace, glob or '::'-joined")
    g.add_argument("--val-data", default=None,
                   help="validation shards: their mean loss is logged (val_loss in metrics.jsonl) every "
                   "--eval-every steps, by default once per epoch")
    g.add_argument("--image-size", type=int, default=None, help="override the preset's image size (px)")
    g.add_argument("--packed", dest="packed", action="store_true",
                   help="run image and text tokens through each shared block in one call; "
                        "default: the preset's `packed`, true where attention and FFN are shared")
    g.add_argument("--no-packed", dest="packed", action="store_false", help="force the per-tower path")
    g.set_defaults(packed=None)
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes per rank")
    g.add_argument("--data-backend", default="torch", choices=("torch", "dali"), help="data loader backend")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=32, help="micro-batch size PER RANK")
    g.add_argument("--epochs", type=int, default=1, help="epochs (defines the schedule length)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (does not change the schedule unless "
                   "the loader length is unknown)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--lr-share", type=float, default=None, help="peak lr of shared parameters (default --lr)")
    g.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay")
    g.add_argument("--wd-share", type=float, default=None, help="weight decay of shared parameters (default --wd)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.98)
    g.add_argument("--eps", type=float, default=1e-6)
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="micro-batches of --batch-size per optimizer step (per rank)")
    g.add_argument("--accum-mode", choices=("exact", "independent"), default="exact",
                   help="exact: one contrastive loss over all accum-steps x batch-size x ranks pairs, by "
                   "feature caching (GradCache; one extra no-grad forward per sample, activation memory of "
                   "one micro-batch); independent: the mean of accum-steps separate losses, each over one "
                   "micro-batch's batch-size x ranks pairs (fewer negatives; no extra forward)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute every transformer block in backward (activation checkpointing): less "
                   "activation memory, about one more forward of the blocks per step")
    g.add_argument("--grad-clip", type=float, default=None,
                   help="max global grad norm (0: off). Default: the ds config's gradient_clipping, "
                   "else 1.0")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: what the ds config enables, else bf16 autocast with fp32 master "
                   "weights on a GPU and fp32 on the CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lock-image", action="store_true", help="freeze the image tower (open_clip style)")
    g.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    g.add_argument("--local-loss", action="store_true", help="ClipLoss(local_loss=True) across ranks (--loss clip)")
    g.add_argument("--loss", choices=LOSSES, default="clip",
                   help="clip: softmax InfoNCE (ClipLoss); siglip: pairwise sigmoid loss (SigLipLoss, Zhai et al. "
                   "2023) with a learned logit bias; the model then starts at scale 10 and bias -10 unless "
                   "--logit-scale-init / --logit-bias-init say otherwise")
    g.add_argument("--logit-scale-init", type=float, default=None,
                   help="initial log scale (model config logit_scale_init); default: the preset's (CLIP: "
                   "ln(1/0.07)) with --loss clip, ln 10 with --loss siglip")
    g.add_argument("--logit-bias-init", type=_float_or_none, default=None,
                   help="initial learned logit bias, or 'none' for no bias parameter (model config "
                   "logit_bias_init); default: the preset's (none) with --loss clip, -10 with --loss siglip")

    g = p.add_argument_group("run directory")
    g.add_argument("--output", default="runs/default", help="run directory (metrics.jsonl, checkpoints/, summary.json)")
    g.add_argument("--resume", default=None, help="run dir (its latest checkpoint) or checkpoint dir; 'auto' = --output")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--log-every", type=int, default=1, help="write metrics every N steps")
    g.add_argument("--eval-every", type=int, default=None,
                   help="validation loss every N steps on --val-data (0: off); default with --val-data: once "
                   "per epoch, or once at the last step when the run stops sooner or the epoch length is "
                   "unknown")
    g.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")
    # read and removed by msclip_fast.cli.run_cli before parsing; here for --help
    g.add_argument("--debug", action="store_true",
                   help="show the traceback of a bad flag or input instead of one 'error:' line (also "
                   "MSCLIP_FAST_DEBUG=1)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate ``argv`` (default ``sys.argv[1:]``).

    Raises:
        ValueError: a flag with an invalid value (the message names the flag and value).
        SystemExit: argparse errors and ``--help``.
    """
    args = build_parser().parse_args(argv)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    """Check value ranges; fill ``lr_share`` / ``wd_share`` defaults and, for ``--loss siglip``,
    the SigLIP logit scale / bias initialization. ``eval_every`` stays None (once per epoch,
    resolved by the trainer once the epoch length is known) only with ``--val-data``."""
    if not args.train_data:
        raise ValueError("--train-data is required")
    positive = ("batch_size", "epochs", "accum_steps", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    non_negative = ("warmup", "save_every", "eval_every", "workers", "wd", "lr")
    for name in non_negative:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.eval_every and not args.val_data:
        raise ValueError(f"--eval-every {args.eval_every} needs --val-data (the validation shards)")
    if args.eval_every is None and not args.val_data:
        args.eval_every = 0
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.grad_clip is not None and args.grad_clip < 0:
        raise ValueError(f"--grad-clip must be >= 0, got {args.grad_clip}")
    if args.image_size is not None and args.image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {args.image_size}")
    if args.lock_image and args.lock_text:
        raise ValueError("--lock-image and --lock-text together leave nothing to train")
    if args.lr_share is None:
        args.lr_share = args.lr
    if args.wd_share is None:
        args.wd_share = args.wd
    if args.lr_share < 0 or args.wd_share < 0:
        raise ValueError(f"--lr-share/--wd-share must be >= 0, got {args.lr_share}/{args.wd_share}")
    if args.resume == "auto":
        args.resume = args.output
    if args.local_loss and args.loss != "clip":
        raise ValueError(f"--local-loss applies to --loss clip only (--loss {args.loss} scores each rank's "
                         "images against all texts already)")
    for name in ("logit_scale_init", "logit_bias_init"):
        v = getattr(args, name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be finite, got {v}")
    if args.loss == "siglip":
        if args.logit_scale_init is None:
            args.logit_scale_init = SIGLIP_LOGIT_SCALE_INIT
        if args.logit_bias_init is None:
            args.logit_bias_init = SIGLIP_LOGIT_BIAS_INIT


def check_inputs(args: argparse.Namespace) -> None:
    """What :func:`validate` leaves to the caller because it looks beyond the flags: ``--model``
    is a preset, ``--ds_config`` a readable DeepSpeed config, and ``--train-data`` /
    ``--val-data`` name shards that exist (remote URLs pass unchecked). ``train.py`` calls it
    before importing DeepSpeed, so a typo fails in seconds instead of after every rank's start-up.

    Raises:
        ValueError: naming the flag and the value (for ``--model``, the known presets).
    """
    from ..data.urls import resolve_urls
    from ..models import list_models
    from .ds_config import read_ds_config

    presets = list_models()
    if args.model not in presets:
        raise ValueError(f"--model {args.model!r} is not a preset; choose one of: {', '.join(presets)}")
    if args.ds_config:
        read_ds_config(args.ds_config)
    for flag, spec in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        if spec:
            try:
                resolve_urls(spec)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
