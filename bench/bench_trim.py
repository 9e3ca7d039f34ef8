"""Text trimmed at EOT vs padded to the context length: FLOPs and training-step time on real
captions (DESIGN §3, config ``trim_text``).

For each preset, two models with identical weights, ``create_model(name, trim_text=True)`` and
``trim_text=False``, run the same batch: random pixels and a seeded random sample of the
captions the openclipart training shards carry (``msclip_fast.data.make_shards``' openclipart
source: SVG metadata captions, generic collection captions disambiguated by file name, empty
captions dropped), tokenized with the CLIP tokenizer; ``text_lengths`` (``eot + 1``) come from
the CPU tokens and are passed to both models (the padded one ignores them). Both models
compute the same features (the first step's losses are compared).

(a) FLOPs per sample of one training step's forward + backward
    (``torch.utils.flop_counter.FlopCounterMode``: matmuls, attention, convolutions; not the
    optimizer), trimmed and padded, and their split into the image tower and the text tower
    (``encode_image`` / ``encode_text`` forward + backward counted on their own; the text tower
    includes the shared blocks' text rows). Ratio = padded / trimmed.
(b) Training-step time (forward + ClipLoss + backward + AdamW step, fp32, every op on the
    plain-PyTorch ``reference`` backend, MSCLIP_FAST_BACKEND=reference), trimmed and padded
    steps alternating in one process (load from other processes hits both alike); median and
    IQR; ratio = padded / trimmed (> 1: trimming is faster). Each step's phases (forward with
    the loss, backward, optimizer step) are timed too, and each repeat also times the text
    tower alone (``encode_text`` forward + backward, trimmed and padded) and the image tower
    alone: the parts trimming leaves unchanged (image tower, optimizer) explain most of the
    gap between the FLOP ratio and the time ratio, which each row's ``note`` spells out.

Usage::

    python bench/bench_trim.py --json bench/results/trim-cpu.json
    python bench/bench_trim.py --presets msclip-s-tiny --batch-size 2 --repeats 1 --captions caps.txt

``--captions FILE`` (one caption per line) replaces the openclipart captions (tests, or a
machine without the Debian openclipart-svg/-png packages); without it a missing
/usr/share/openclipart is an error. The table is printed; ``--json`` writes the results,
which ``python -m bench.report`` turns into bench/RESULTS.md (schema: bench/report.py).
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if str(Path(__file__).resolve().parent) not in sys.path:  # find bench/_common.py also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_PRESETS = ("msclip-s-tiny", "msclip-s-b32")


@dataclass
class Row:
    preset: str
    params_m: float
    batch: int
    packed: bool                      # execution schedule of both models (the preset's default)
    # caption lengths eot + 1 of this batch
    len_mean: float
    len_median: float
    len_p90: float
    len_max: int
    text_rows_trimmed: int            # sum of lengths
    text_rows_padded: int             # batch x context_length
    # (a) FLOPs per sample, forward + backward
    gflop_trimmed: float
    gflop_padded: float
    flop_ratio: float                 # padded / trimmed
    text_gflop_trimmed: float         # encode_text forward + backward
    text_gflop_padded: float
    image_gflop: float                # encode_image forward + backward (the same for both)
    # (b) step time, median over timed steps (ms)
    trimmed_ms: float
    trimmed_iqr_ms: float
    padded_ms: float
    padded_iqr_ms: float
    time_ratio: float                 # padded / trimmed
    repeats: int
    # phases of the step (medians, ms)
    trimmed_fwd_ms: float             # model forward + ClipLoss
    trimmed_bwd_ms: float
    trimmed_opt_ms: float             # AdamW step + zero_grad
    padded_fwd_ms: float
    padded_bwd_ms: float
    padded_opt_ms: float
    # towers alone, forward + backward (medians, ms)
    text_trimmed_ms: float
    text_padded_ms: float
    text_time_ratio: float            # padded / trimmed
    image_ms: float
    cpu_share: float                  # process CPU time / (wall x threads) over the timed steps
    loss_diff: float                  # |loss_trimmed - loss_padded| of the first step (same function)
    note: str


# ----------------------------------------------------------------------------- captions


def openclipart_captions(root: str | None = None) -> list[str]:
    """The captions the openclipart training shards get (``make_shards --source openclipart``):
    one per PNG, from its SVG's metadata, generic collection captions prefixed with the file
    name's words, empty ones dropped (the shards also drop the few images that fail to
    decode; their captions are kept here). ~10 s for the 8,121 files.

    Raises:
        FileNotFoundError: ``root`` (default /usr/share/openclipart) has no png/ folder.
    """
    from msclip_fast.data import make_shards
    from msclip_fast.data.openclipart import DEFAULT_ROOT

    root = root or DEFAULT_ROOT
    if not os.path.isdir(os.path.join(root, "png")):
        raise FileNotFoundError(
            f"no openclipart captions: {root}/png does not exist. Install the Debian packages "
            "openclipart-png and openclipart-svg, pass --openclipart-root DIR, or pass --captions FILE "
            "(one caption per line)")
    cands, _, _ = make_shards._openclipart(argparse.Namespace(root=root, limit=None), collections.Counter())
    return [c.caption for c in cands if c.caption]


def read_captions(path: Path | str) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    caps = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    caps = [c for c in caps if c]
    if not caps:
        raise ValueError(f"{path}: no captions (expected one caption per line)")
    return caps


def length_stats(lengths: torch.Tensor) -> dict:
    """mean, median, p90, p99, max of ``eot + 1`` lengths; share at the context length (cut)."""
    x = lengths.to(torch.float64)
    return {"n": int(x.numel()), "mean": round(float(x.mean()), 2), "median": float(x.median()),
            "p90": float(torch.quantile(x, 0.9)), "p99": float(torch.quantile(x, 0.99)),
            "max": int(x.max())}


class Corpus:
    """Captions tokenized once for every preset (``context_length`` 77 for all of them)."""

    def __init__(self, captions: list[str], context_length: int, source: str):
        import msclip_fast as mf
        from msclip_fast.modules import text_lengths

        self.source, self.context_length = source, context_length
        self.tokens = mf.get_tokenizer(context_length)(captions)
        self.lengths = text_lengths(self.tokens)
        self.stats = {**length_stats(self.lengths),
                      "cut_at_context": round(float((self.lengths == context_length).double().mean()), 4)}

    def batch(self, batch: int, image_size: int, seed: int):
        """(images (B,3,S,S), tokens (B,L), lengths (B,)): pixels from ``seed``, captions a
        ``seed``-ed sample without replacement (with replacement when the corpus is smaller)."""
        g = torch.Generator().manual_seed(seed)
        n = self.tokens.shape[0]
        idx = torch.randperm(n, generator=g)[:batch] if n >= batch else torch.randint(0, n, (batch,), generator=g)
        images = torch.randn(batch, 3, image_size, image_size, generator=g)
        return images, self.tokens[idx].clone(), self.lengths[idx].clone()


# ----------------------------------------------------------------------------- measuring


def count_flops(fn) -> int:
    """FLOPs FlopCounterMode counts while ``fn()`` runs (totals only: ``depth=0`` skips the
    per-module table, which makes counting ~4x slower and misattributes backward ops)."""
    counter = FlopCounterMode(display=False, depth=0)
    with counter:
        fn()
    return counter.get_total_flops()


def step_flops(model, images, tokens, lengths) -> int:
    """Forward + ClipLoss + backward of one training step (grads cleared after)."""
    import msclip_fast as mf

    def run():
        img, txt, scale = model(images, tokens, text_lengths=lengths)
        mf.ClipLoss()(img, txt, scale).backward()

    n = count_flops(run)
    model.zero_grad(set_to_none=True)
    return n


def _tower_fns(model, images, tokens, lengths):
    """Closures running the text / image tower alone, forward + backward (grads cleared)."""
    def text():
        model.encode_text(tokens, lengths=lengths).sum().backward()
        model.zero_grad(set_to_none=True)

    def image():
        model.encode_image(images).sum().backward()
        model.zero_grad(set_to_none=True)

    return text, image


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def make_step(model, images, tokens, lengths):
    """Closure running one fp32 train step (as ``_common.make_train_step``, with the batch's
    ``text_lengths``); returns (loss, {fwd, bwd, opt, total} ms)."""
    import msclip_fast as mf

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.2)
    loss_fn = mf.ClipLoss()
    model.train()

    def step():
        t0 = time.perf_counter()
        img, txt, scale = model(images, tokens, text_lengths=lengths)
        loss = loss_fn(img, txt, scale)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return float(loss.detach()), {"fwd": (t1 - t0) * 1e3, "bwd": (t2 - t1) * 1e3, "opt": (t3 - t2) * 1e3,
                                      "total": (t3 - t0) * 1e3}

    return step


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def explain(r: Row, text_width: int, vocab: int) -> str:
    """The gap between the FLOP ratio and the time ratio, worked out from the row's own numbers:
    the optimizer as a fixed cost, then the text tower's measured times."""
    def rate(gflop_per_sample, ms):  # achieved GFLOP/s of a part run alone
        return gflop_per_sample * r.batch / (ms / 1e3) if ms else float("nan")

    def share(x, of):
        return f"{x / of:.0%}" if of else "?"

    t, f = r.trimmed_ms, r.flop_ratio
    # (1) AdamW fixed (measured in each step), the rest of the step proportional to its FLOPs
    with_opt = ((t - r.trimmed_opt_ms) * f + r.padded_opt_ms) / t if t else float("nan")
    # (2) the trimmed step with the text tower's measured padded time in place of its trimmed time
    with_text = (t - r.text_trimmed_ms + r.text_padded_ms) / t if t else float("nan")
    text_flop_ratio = r.text_gflop_padded / r.text_gflop_trimmed if r.text_gflop_trimmed else float("nan")
    gap = (f"measured {r.time_ratio:.2f}x: in this run the optimizer accounts for the gap"
           if r.time_ratio >= with_opt - 0.05 else f"measured {r.time_ratio:.2f}x: the rest of the gap is (2)")
    rt, rp = rate(r.text_gflop_trimmed, r.text_trimmed_ms), rate(r.text_gflop_padded, r.text_padded_ms)
    ri = rate(r.image_gflop, r.image_ms)
    return (
        f"FLOP ratio {f:.2f}, step time ratio {r.time_ratio:.2f}. (1) The AdamW step counts no FLOPs and costs "
        f"the same either way ({r.trimmed_opt_ms:.0f} / {r.padded_opt_ms:.0f} ms for {r.params_m:.1f}M "
        f"parameters, {share(r.trimmed_opt_ms, t)} of the trimmed step): with it fixed and the rest of the step "
        f"proportional to FLOPs, {with_opt:.2f}x ({gap}). (2) The text tower, the only part trimming shrinks, "
        f"scales less than its FLOPs: alone (per tower, fwd+bwd) {r.text_padded_ms:.0f} -> "
        f"{r.text_trimmed_ms:.0f} ms, {r.text_time_ratio:.2f}x for "
        f"{text_flop_ratio:.2f}x fewer FLOPs ({rp:.0f} GFLOP/s padded, {rt:.0f} trimmed): "
        f"GEMMs over {r.text_rows_trimmed} text rows instead of {r.text_rows_padded} reach fewer GFLOP/s on a "
        "CPU (the weight gradients reduce over fewer rows), and fixed costs do not shrink: zero-filled gradient "
        f"buffers (the dense {vocab} x {text_width} token-embedding gradient among them), gathers, LayerNorms, "
        "the reference ragged attention's bucketed calls. The trimmed step with the text tower's padded time "
        f"swapped in predicts {with_text:.2f}x, likely an underestimate: in the packed step the shared blocks "
        "run the text rows in the same GEMMs as the image rows, where fewer text rows cost less efficiency "
        "than alone. The image tower is the same "
        f"in both ({r.image_ms:.0f} ms alone, {ri:.0f} GFLOP/s; {share(r.image_gflop, r.gflop_trimmed)} of the "
        f"trimmed step's FLOPs, {share(r.image_ms, t)} of its time).")


def bench_preset(name: str, corpus: Corpus, batch: int, warmup: int, repeats: int, seed: int) -> Row:
    import msclip_fast as mf

    torch.manual_seed(seed)
    trimmed = mf.create_model(name, trim_text=True)
    padded = mf.create_model(name, trim_text=False)
    padded.load_state_dict(trimmed.state_dict())
    if trimmed.context_length != corpus.context_length:
        raise ValueError(f"{name}: context_length {trimmed.context_length} != the corpus' {corpus.context_length}")
    images, tokens, lengths = corpus.batch(batch, trimmed.image_size, seed)
    models = {"trimmed": trimmed, "padded": padded}

    # (a) FLOPs (also the first, untimed forward + backward of each model)
    flops = {k: step_flops(m, images, tokens, lengths) for k, m in models.items()}
    towers = {k: _tower_fns(m, images, tokens, lengths) for k, m in models.items()}
    text_flops = {k: count_flops(t[0]) for k, t in towers.items()}
    image_flops = count_flops(towers["trimmed"][1])

    # (b) time: trimmed and padded alternate, then each tower alone
    steps = {k: make_step(m, images, tokens, lengths) for k, m in models.items()}
    first = {k: s()[0] for k, s in steps.items()}  # same weights and batch: same loss
    for _ in range(max(warmup - 1, 0)):
        for s in steps.values():
            s()
    phases = {k: collections.defaultdict(list) for k in steps}
    text_ms = {k: [] for k in steps}
    image_ms = []
    wall, cpu0 = 0.0, time.process_time()
    t_start = time.perf_counter()
    for _ in range(repeats):
        for k, s in steps.items():
            for ph, ms in s()[1].items():
                phases[k][ph].append(ms)
        for k in steps:
            text_ms[k].append(_timed(towers[k][0]))
        image_ms.append(_timed(towers["trimmed"][1]))
    wall = time.perf_counter() - t_start
    cpu_share = (time.process_time() - cpu0) / wall / torch.get_num_threads() if wall else 0.0

    med = statistics.median
    tm, pm = med(phases["trimmed"]["total"]), med(phases["padded"]["total"])
    st = length_stats(lengths)
    row = Row(
        preset=name, params_m=sum(p.numel() for p in trimmed.parameters()) / 1e6, batch=batch,
        packed=bool(trimmed.config.packed),
        len_mean=st["mean"], len_median=st["median"], len_p90=st["p90"], len_max=st["max"],
        text_rows_trimmed=int(lengths.sum()), text_rows_padded=batch * trimmed.context_length,
        gflop_trimmed=flops["trimmed"] / batch / 1e9, gflop_padded=flops["padded"] / batch / 1e9,
        flop_ratio=flops["padded"] / flops["trimmed"],
        text_gflop_trimmed=text_flops["trimmed"] / batch / 1e9, text_gflop_padded=text_flops["padded"] / batch / 1e9,
        image_gflop=image_flops / batch / 1e9,
        trimmed_ms=tm, trimmed_iqr_ms=_iqr(phases["trimmed"]["total"]),
        padded_ms=pm, padded_iqr_ms=_iqr(phases["padded"]["total"]), time_ratio=pm / tm, repeats=repeats,
        trimmed_fwd_ms=med(phases["trimmed"]["fwd"]), trimmed_bwd_ms=med(phases["trimmed"]["bwd"]),
        trimmed_opt_ms=med(phases["trimmed"]["opt"]),
        padded_fwd_ms=med(phases["padded"]["fwd"]), padded_bwd_ms=med(phases["padded"]["bwd"]),
        padded_opt_ms=med(phases["padded"]["opt"]),
        text_trimmed_ms=med(text_ms["trimmed"]), text_padded_ms=med(text_ms["padded"]),
        text_time_ratio=med(text_ms["padded"]) / med(text_ms["trimmed"]), image_ms=med(image_ms),
        cpu_share=cpu_share, loss_diff=abs(first["trimmed"] - first["padded"]), note="",
    )
    row.note = explain(row, trimmed.config.text.width, trimmed.config.text.vocab_size)
    del models, steps, towers, trimmed, padded
    gc.collect()
    return row


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help=f"comma-separated preset names (default: {','.join(DEFAULT_PRESETS)})")
    p.add_argument("--batch-size", type=int, default=32, help="batch for *-tiny presets (default: 32)")
    p.add_argument("--full-batch-size", type=int, default=8, help="batch for full-size presets (default: 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="weights, pixels and the caption sample (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--captions", type=Path, default=None,
                   help="caption file, one per line, instead of the openclipart captions")
    p.add_argument("--openclipart-root", default=None, help="openclipart folder (default: /usr/share/openclipart)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (schema: bench/report.py)")
    return p


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark; returns one Row per preset. Restores MSCLIP_FAST_BACKEND."""
    import msclip_fast as mf

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.full_batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--batch-size/--full-batch-size/--repeats must be >= 1 and --warmup >= 0, got "
                         f"{args.batch_size}/{args.full_batch_size}/{args.repeats}/{args.warmup}")
    presets = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in presets if n not in mf.list_models()]
    if unknown or not presets:
        raise ValueError(f"--presets must be names from {mf.list_models()}, got {args.presets!r}")
    meta = _common.run_meta("cpu", "bench/bench_trim.py", sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.captions is not None:
        captions, source = read_captions(args.captions), f"file {args.captions.name}"
    else:
        try:
            captions, source = openclipart_captions(args.openclipart_root), "openclipart (make_shards captions)"
        except FileNotFoundError as e:
            parser.error(str(e))
    from msclip_fast.models import get_model_config

    corpus = Corpus(captions, get_model_config(presets[0]).text.context_length, source)
    print(f"captions: {source}, {corpus.stats['n']} captions, eot+1 mean {corpus.stats['mean']:.1f} median "
          f"{corpus.stats['median']:.0f} p90 {corpus.stats['p90']:.0f} ({time.time() - t0:.1f} s)", file=sys.stderr)
    rows = []
    with _common.reference_backend():
        for name in presets:
            batch = args.batch_size if name.endswith("-tiny") else args.full_batch_size
            r = bench_preset(name, corpus, batch, args.warmup, args.repeats, args.seed)
            rows.append(r)
            print(f"{name}: {r.gflop_trimmed:.2f} vs {r.gflop_padded:.2f} GFLOP/sample (x{r.flop_ratio:.2f}); "
                  f"step trimmed {r.trimmed_ms:.0f} ms, padded {r.padded_ms:.0f} ms (x{r.time_ratio:.2f})",
                  file=sys.stderr, flush=True)
    settings = {"presets": presets, "batch_size": args.batch_size, "full_batch_size": args.full_batch_size,
                "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed, "backend": "reference",
                "dtype": "fp32", "captions": source, "corpus_lengths": corpus.stats,
                "total_s": round(time.time() - t0, 1)}
    headline = {}
    for r in rows:
        headline[f"trim_flop_ratio_{r.preset}"] = round(r.flop_ratio, 3)
        headline[f"trim_step_speedup_{r.preset}"] = round(r.time_ratio, 3)
    _common.publish("trim", meta, settings, rows, headline, args.json)
    return rows


if __name__ == "__main__":
    main()
