"""Train with open_clip's own trainer (``open_clip_train``), unchanged, plus msclip_fast's
fast modules and losses.

Usage::

    python -m msclip_fast.integrations.open_clip_train [msclip flags] <open_clip_train args>

    # e.g. (every flag without the --msclip- prefix is open_clip_train's, passed on as is)
    python -m msclip_fast.integrations.open_clip_train \\
        --model ViT-B-32 --train-data 'shards/{000000..000099}.tar' --dataset-type webdataset \\
        --train-num-samples 1000000 --batch-size 256 --epochs 1 --precision amp_bf16 \\
        --msclip-backend auto

    # from Python (returns open_clip's exit status: 0, or -1 when it refused to run)
    from msclip_fast.integrations.open_clip_train import run
    run(["--model", "ViT-B-32", "--train-data", "...", "--msclip-no-loss"])

It calls ``open_clip_train.main.main(argv)`` with two changes:

1. The model that ``create_model_and_transforms`` returns (the model being trained: the first
   call; a distillation teacher built by a second call is left alone) goes through
   :func:`msclip_fast.integrations.open_clip.patch` (fast attention / LayerNorm / MLP modules,
   same parameters and state-dict keys, so checkpoints stay open_clip checkpoints).
2. The loss that ``create_loss(args)`` returns is replaced by :class:`msclip_fast.ClipLoss`
   (for open_clip's ``ClipLoss``) or :class:`msclip_fast.SigLipLoss` (for ``SigLipLoss``,
   ``--siglip``), built with the very arguments open_clip used (read back from the loss it
   built). Other losses (``CoCaLoss``, ``DistillClipLoss``, or a ``ClipLoss`` under Horovod)
   stay open_clip's, with a log line saying so. The loss ops pick their backend by "auto"
   (or the ``MSCLIP_FAST_BACKEND`` environment variable, see DESIGN.md §5).

How: ``open_clip_train.main`` calls both functions through its module-global names, so for the
life of :func:`run` those two names in the ``open_clip_train.main`` namespace are wrapped, and
restored in a ``finally`` block. This is meant for a runner process (this module's ``__main__``)
and is not something library code does; nothing else in open_clip is modified, except one
compatibility fix, done the same way: webdataset (1.0.x) ends every shard with an empty
end-of-file marker sample that open_clip_train's own tar reader (``group_by_keys_nothrow``,
open_clip 3.3) does not expect (KeyError 'fname' at the end of the first shard), so
``open_clip_train.data.tar_file_expander`` is called with ``eof_value=None`` (webdataset's
switch for no markers; samples are still grouped by key, as in older webdataset versions)
while :func:`run` runs (DataLoader workers see it when they are forked, Linux's default; under
the "spawn" start method they re-import the module and would not).

msclip flags (parsed and removed before the rest reaches open_clip's parser):

    --msclip-no-attention      keep open_clip's attention modules
    --msclip-no-layer-norm     keep open_clip's LayerNorms
    --msclip-no-mlp            keep open_clip's MLPs
    --msclip-no-loss           keep open_clip's loss
    --msclip-backend NAME      backend for the patched modules (auto, reference, triton, cpu, cuda)
    --msclip-model-config PATH register an open_clip model config (a JSON file, or a directory of
                               them; the name is the file's stem) before open_clip runs; repeatable

pandas: ``open_clip_train.data`` imports pandas at module level (for its CSV dataset), so it is
in requirements.txt.

What was patched and swapped is logged (``logging``, to open_clip's log: its ``out.log`` and
console).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import logging
import sys
from dataclasses import dataclass, field

__all__ = ["RunnerOptions", "parse_runner_args", "run", "main"]

logger = logging.getLogger(__name__)

PREFIX = "--msclip-"


@dataclass
class RunnerOptions:
    """The ``--msclip-*`` flags; see the module docstring."""

    attention: bool = True
    layer_norm: bool = True
    mlp: bool = True
    loss: bool = True
    backend: str = "auto"
    model_configs: list = field(default_factory=list)

    @property
    def patch_any(self) -> bool:
        return self.attention or self.layer_norm or self.mlp


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m msclip_fast.integrations.open_clip_train",
        description="open_clip_train with msclip_fast modules and losses; every argument that does "
        "not start with --msclip- goes to open_clip_train (its --help follows).",
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("--msclip-no-attention", action="store_true", help="keep open_clip's attention modules")
    p.add_argument("--msclip-no-layer-norm", action="store_true", help="keep open_clip's LayerNorms")
    p.add_argument("--msclip-no-mlp", action="store_true", help="keep open_clip's MLPs")
    p.add_argument("--msclip-no-loss", action="store_true", help="keep open_clip's loss")
    p.add_argument("--msclip-backend", default="auto", metavar="NAME",
                   help="backend of the patched modules: auto, reference, triton, cpu, cuda (default auto)")
    p.add_argument("--msclip-model-config", action="append", default=[], metavar="PATH",
                   help="open_clip model config JSON file or directory to register (repeatable)")
    return p


def parse_runner_args(argv) -> tuple[RunnerOptions, list]:
    """Split ``argv`` into the ``--msclip-*`` options and the arguments for open_clip_train.

    Only tokens starting with ``--msclip-`` (and the value of ``--msclip-backend`` /
    ``--msclip-model-config``) are taken; everything else is returned in order. An unknown
    ``--msclip-*`` flag is an error (argparse exits with status 2)."""
    argv = list(argv)
    ours, rest = [], []
    takes_value = ("--msclip-backend", "--msclip-model-config")
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith(PREFIX):
            ours.append(tok)
            if tok in takes_value and i + 1 < len(argv):
                ours.append(argv[i + 1])
                i += 1
        else:
            rest.append(tok)
        i += 1
    ns = _parser().parse_args(ours)
    opts = RunnerOptions(
        attention=not ns.msclip_no_attention,
        layer_norm=not ns.msclip_no_layer_norm,
        mlp=not ns.msclip_no_mlp,
        loss=not ns.msclip_no_loss,
        backend=ns.msclip_backend,
        model_configs=list(ns.msclip_model_config),
    )
    return opts, rest


def _import_open_clip_train_main():
    """``import open_clip_train.main`` (it imports pandas at module level: a requirement)."""
    return importlib.import_module("open_clip_train.main")


def _wrap_create_model(orig, opts: RunnerOptions, state: dict):
    def create_model_and_transforms(*args, **kwargs):
        out = orig(*args, **kwargs)
        state["model_calls"] += 1
        if state["model_calls"] > 1:
            logger.info("msclip_fast: model #%d from create_model_and_transforms (e.g. a distillation "
                        "teacher) left as open_clip's", state["model_calls"])
            return out
        for note in state.get("notes", ()):  # open_clip's logging is set up by now
            logger.info("msclip_fast: %s", note)
        model, preprocess_train, preprocess_val = out
        if not opts.patch_any:
            logger.info("msclip_fast: model left as open_clip's (--msclip-no-attention/-layer-norm/-mlp)")
            return out
        if kwargs.get("jit"):
            logger.warning("msclip_fast: TorchScript model (--torchscript) left as open_clip's")
            return out
        from msclip_fast.integrations.open_clip import patch  # lazy: keeps this module importable

        model = patch(model, attention=opts.attention, layer_norm=opts.layer_norm, mlp=opts.mlp,
                      backend=opts.backend)
        counts: dict = {}
        for m in model.modules():
            if type(m).__module__.startswith("msclip_fast."):
                counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
        state["patched_model"] = model
        skipped = len(getattr(getattr(model, "_msclip_patch_report", None), "skipped", ()))
        logger.info(
            "msclip_fast: patched the open_clip model (attention=%s, layer_norm=%s, mlp=%s, backend=%s): %s"
            "; %d block(s)/norm(s) left as open_clip's",
            opts.attention, opts.layer_norm, opts.mlp, opts.backend,
            ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())) or "no msclip_fast modules", skipped,
        )
        return model, preprocess_train, preprocess_val

    return create_model_and_transforms


def swap_loss(loss):
    """msclip_fast's equivalent of an open_clip loss instance, built with the same arguments,
    or ``loss`` itself (with a log line) when there is none: only exactly
    ``open_clip.loss.ClipLoss`` (not its subclasses CoCaLoss / DistillClipLoss) and
    ``open_clip.loss.SigLipLoss`` are replaced."""
    import open_clip.loss as ocl

    import msclip_fast as mf

    if type(loss) is ocl.ClipLoss:
        if loss.use_horovod and loss.world_size > 1:
            logger.info("msclip_fast: ClipLoss under Horovod left as open_clip's (not supported)")
            return loss
        new = mf.ClipLoss(local_loss=loss.local_loss, gather_with_grad=loss.gather_with_grad,
                          cache_labels=loss.cache_labels, rank=loss.rank, world_size=loss.world_size,
                          use_horovod=loss.use_horovod)
        logger.info("msclip_fast: loss open_clip ClipLoss -> msclip_fast.ClipLoss (local_loss=%s, "
                    "gather_with_grad=%s, rank=%d, world_size=%d)", loss.local_loss, loss.gather_with_grad,
                    loss.rank, loss.world_size)
        return new
    if type(loss) is ocl.SigLipLoss:
        new = mf.SigLipLoss(cache_labels=loss.cache_labels, rank=loss.rank, world_size=loss.world_size,
                            dist_impl=loss.dist_impl)
        logger.info("msclip_fast: loss open_clip SigLipLoss -> msclip_fast.SigLipLoss (dist_impl=%s, rank=%d, "
                    "world_size=%d)", loss.dist_impl, loss.rank, loss.world_size)
        return new
    logger.info("msclip_fast: loss %s left as open_clip's (no msclip_fast equivalent)", type(loss).__name__)
    return loss


def _wrap_create_loss(orig, opts: RunnerOptions, state: dict):
    def create_loss(args):
        loss = orig(args)
        if not opts.loss:
            logger.info("msclip_fast: loss %s left as open_clip's (--msclip-no-loss)", type(loss).__name__)
        else:
            loss = swap_loss(loss)
        state["loss"] = loss
        return loss

    return create_loss


@contextlib.contextmanager
def patched_open_clip_train(opts: RunnerOptions, state: dict | None = None):
    """Wrap ``create_model_and_transforms`` and ``create_loss`` in the ``open_clip_train.main``
    namespace while the block runs; yields ``(module, state)`` where ``state`` collects
    ``model_calls``, ``patched_model`` and ``loss``. Restores the originals on exit."""
    ocmain = _import_open_clip_train_main()
    ocdata = sys.modules.get("open_clip_train.data")
    state = {} if state is None else state
    state.setdefault("model_calls", 0)
    orig_model, orig_loss = ocmain.create_model_and_transforms, ocmain.create_loss
    orig_expander = getattr(ocdata, "tar_file_expander", None)
    ocmain.create_model_and_transforms = _wrap_create_model(orig_model, opts, state)
    ocmain.create_loss = _wrap_create_loss(orig_loss, opts, state)
    if orig_expander is not None and "eof_value" in inspect.signature(orig_expander).parameters:
        ocdata.tar_file_expander = functools.partial(orig_expander, eof_value=None)
        state.setdefault("notes", []).append(
            "webdataset's end-of-shard markers turned off for open_clip_train's tar reader "
            "(it does not expect them)")
    try:
        yield ocmain, state
    finally:
        ocmain.create_model_and_transforms = orig_model
        ocmain.create_loss = orig_loss
        if orig_expander is not None:
            ocdata.tar_file_expander = orig_expander


def run(argv=None, state: dict | None = None) -> int:
    """Run open_clip_train's ``main`` on ``argv`` (default ``sys.argv[1:]``) with msclip_fast's
    modules and loss; returns open_clip's status as an int (0 on success, -1 when it refused,
    e.g. an experiment name that exists). ``state`` (optional dict) receives what was patched
    (see :func:`patched_open_clip_train`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, rest = parse_runner_args(argv)
    if "-h" in rest or "--help" in rest:
        _parser().print_help()
    state = {} if state is None else state
    notes = state.setdefault("notes", [])
    if opts.model_configs:
        import open_clip

        for path in opts.model_configs:
            open_clip.add_model_config(path)
            notes.append(f"registered open_clip model config(s) from {path}")
    with patched_open_clip_train(opts, state) as (ocmain, _):
        status = ocmain.main(rest)
    return 0 if status is None else int(status)


def main(argv=None) -> int:
    """Console entry point: ``sys.exit(main())``; open_clip's -1 (refused to run) becomes 1."""
    status = run(argv)
    return 1 if status < 0 else status


if __name__ == "__main__":
    sys.exit(main())
