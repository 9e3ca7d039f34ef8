"""Activation checkpointing (``model.set_grad_checkpointing``): every transformer block step
of the executor runs under a non-reentrant ``torch.utils.checkpoint``. The loss and every
gradient equal the plain forward's (fp64, every tiny preset, both schedules, frozen towers),
the blocks really are recomputed in backward, fewer activations are kept for backward, it is
a no-op without grad, and BatchNorm running statistics are updated once per forward."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import msclip_fast as mf
from msclip_fast.models import executor
from msclip_fast.modules import TransformerBlock

SOT, EOT, CTX = 49406, 49407, 77
N_IMG, N_TXT = 3, 4  # different batch sizes on purpose
TINY = [n for n in mf.list_models() if n.endswith("-tiny")]
# (preset, packed) for every tiny preset: per tower always, packed where the plan can pack
CASES = [(n, packed) for n in TINY for packed in (False, True)
         if not packed or mf.create_model(n).plan.packed_span() is not None]
IDS = [f"{n}-{'packed' if p else 'per_tower'}" for n, p in CASES]


def _tokens(b, seed=0):
    """SOT, ragged random words (3, 7, 11... ids), EOT, zero padding."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(b, CTX, dtype=torch.int64)
    for i in range(b):
        n = 3 + 4 * i
        tok[i, 0] = SOT
        tok[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        tok[i, n] = EOT
    return tok


def _images(b, seed=1, dtype=torch.float64):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _model(name, dtype=torch.float64, seed=0):
    """A tiny preset whose per-modality rows and zero-initialized parallel modules differ."""
    torch.manual_seed(seed)
    model = mf.create_model(name).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ln" in n or "parallel_" in n or n.startswith("ln"):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def _loss(model, images, tokens, packed):
    """Features dotted with fixed random weights, plus the (clamped, exponentiated) scale."""
    img, txt = model.forward_features(images, tokens, packed=packed)
    g = torch.Generator().manual_seed(7)
    wi = torch.randn(img.shape, generator=g, dtype=torch.float64).to(img.dtype)
    wt = torch.randn(txt.shape, generator=g, dtype=torch.float64).to(txt.dtype)
    scale = model.logit_scale.exp().clamp(max=model.config.logit_scale_max)
    return (img * wi).sum() + (txt * wt).sum() * scale / 10 + scale


def _loss_and_grads(model, images, tokens, packed, ckpt):
    model.set_grad_checkpointing(ckpt)
    assert model.grad_checkpointing is ckpt
    model.zero_grad(set_to_none=True)
    loss = _loss(model, images, tokens, packed)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _check_same(a, b, rtol=1e-10, atol=1e-12):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert set(ga) == set(gb), set(ga) ^ set(gb)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


class _Counter:
    """Counts ``TransformerBlock.forward_packed`` calls (forward and recomputation) and
    ``executor.checkpoint`` calls."""

    def __init__(self, monkeypatch):
        self.blocks = 0
        self.checkpoints = 0
        real_fp, real_ckpt = TransformerBlock.forward_packed, executor.checkpoint

        def forward_packed(blk, *a, **kw):
            self.blocks += 1
            return real_fp(blk, *a, **kw)

        def checkpoint(*a, **kw):
            self.checkpoints += 1
            return real_ckpt(*a, **kw)

        monkeypatch.setattr(TransformerBlock, "forward_packed", forward_packed)
        monkeypatch.setattr(executor, "checkpoint", checkpoint)


def _n_steps(model, packed):
    """Block steps of one forward_features: one per position per stream (one joint stream
    on the packed span)."""
    span = model.plan.packed_span() if packed else None
    first, end = span if span is not None else (0, 0)
    return sum(1 if first <= i < end else len(p.modalities) for i, p in enumerate(model.plan.positions))


def test_off_by_default_and_toggles():
    model = mf.create_model("msclip-tiny")
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing()
    assert model.grad_checkpointing is True
    model.set_grad_checkpointing(False)
    assert model.grad_checkpointing is False


@pytest.mark.parametrize("name,packed", CASES, ids=IDS)
def test_checkpointed_loss_and_grads_equal_plain_fp64(name, packed, monkeypatch):
    model = _model(name)
    images, tokens = _images(N_IMG), _tokens(N_TXT)
    count = _Counter(monkeypatch)
    plain = _loss_and_grads(model, images, tokens, packed, ckpt=False)
    steps = _n_steps(model, packed)
    assert (count.blocks, count.checkpoints) == (steps, 0)
    count.blocks = 0
    ckpt = _loss_and_grads(model, images, tokens, packed, ckpt=True)
    # every block step was checkpointed and ran again in backward
    assert count.checkpoints == steps
    assert count.blocks == 2 * steps
    assert len(plain[1]) == sum(1 for _ in model.parameters())  # every parameter got a gradient
    _check_same(ckpt, plain)


def test_encode_paths_checkpointed_fp64():
    """encode_image / encode_text run the same executor step (per tower)."""
    model = _model("msclip-s-tiny")
    images, tokens = _images(N_IMG), _tokens(N_TXT)

    def run(ckpt):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        out = (model.encode_image(images) ** 3).sum() + (model.encode_text(tokens) ** 3).sum()
        out.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    _check_same(run(True), run(False))


def _saved_bytes(model, images, tokens, ckpt):
    """Bytes of the distinct non-parameter tensors saved for backward during one forward, as
    the outer saved_tensors_hooks see them (inside a non-reentrant checkpoint its own hooks
    take over), and the total count of saved tensors."""
    params = {p.data_ptr() for p in model.parameters()}
    seen, n = {}, [0]

    def pack(t):
        n[0] += 1
        if t.data_ptr() not in params:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    model.set_grad_checkpointing(ckpt)
    with saved_tensors_hooks(pack, lambda t: t):
        img, txt = model.forward_features(images, tokens)
    (img.sum() + txt.sum()).backward()  # the graph is sound
    model.zero_grad(set_to_none=True)
    return sum(seen.values()), n[0]


@pytest.mark.parametrize("name", ["msclip-tiny", "msclip-s-tiny"])
def test_checkpointing_keeps_fewer_activations(name):
    model = _model(name, dtype=torch.float32)
    images, tokens = _images(8, dtype=torch.float32), _tokens(8)
    plain, n_plain = _saved_bytes(model, images, tokens, ckpt=False)
    ckpt, n_ckpt = _saved_bytes(model, images, tokens, ckpt=True)
    ratio = ckpt / plain
    msg = (f"{name}: saved for backward with checkpointing {ckpt / 2**20:.2f} MiB ({n_ckpt} tensors) vs "
           f"{plain / 2**20:.2f} MiB ({n_plain} tensors) without: ratio {ratio:.3f}")
    print(msg)
    assert ratio < 0.7, msg


@pytest.mark.parametrize("name,packed", [("msclip-s-tiny", True), ("msclip-tiny", False), ("clip-tiny", False)],
                         ids=["msclip-s-tiny-packed", "msclip-tiny-per_tower", "clip-tiny-per_tower"])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_frozen_tower_checkpointed_grads_equal_plain(name, packed, tower):
    """A locked tower's tokens reach the checkpointed blocks without requiring grad (all of
    them, for a preset whose blocks are all shared and hence frozen with the image tower)."""
    model = _model(name)
    (model.lock_image_tower if tower == "image" else model.lock_text_tower)()
    images, tokens = _images(N_IMG), _tokens(N_TXT)
    plain = _loss_and_grads(model, images, tokens, packed, ckpt=False)
    ckpt = _loss_and_grads(model, images, tokens, packed, ckpt=True)
    assert plain[1], "some parameter still trains"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(plain[1])
    _check_same(ckpt, plain)


@pytest.mark.parametrize("name,packed", [("msclip-tiny", True), ("clip-tiny", False)],
                         ids=["msclip-tiny-packed", "clip-tiny-per_tower"])
def test_frozen_embeddings_trainable_blocks_checkpointed(name, packed):
    """Frozen embeddings (stem, CLS/positional embeddings, ln_pre, token embedding) and
    trainable blocks: the first block's input does not require grad but its parameters do,
    which a reentrant checkpoint would get wrong (no gradient for any block)."""
    model = _model(name)
    for n, p in model.named_parameters():
        if n.startswith(("visual.stem", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre",
                         "text.token_embedding", "text.positional_embedding")):
            p.requires_grad_(False)
    images, tokens = _images(N_IMG), _tokens(N_TXT)
    plain = _loss_and_grads(model, images, tokens, packed, ckpt=False)
    ckpt = _loss_and_grads(model, images, tokens, packed, ckpt=True)
    assert any(n.startswith(("blocks.", "visual.blocks.", "text.blocks.")) for n in plain[1])
    _check_same(ckpt, plain)


@pytest.mark.parametrize("name,packed", [("msclip-s-tiny", True), ("msclip-s-tiny", False), ("clip-tiny", False)],
                         ids=["msclip-s-tiny-packed", "msclip-s-tiny-per_tower", "clip-tiny-per_tower"])
def test_no_grad_is_a_no_op(name, packed, monkeypatch):
    model = _model(name).eval()
    images, tokens = _images(N_IMG), _tokens(N_TXT)
    count = _Counter(monkeypatch)
    with torch.no_grad():
        model.set_grad_checkpointing(False)
        ref = model.forward_features(images, tokens, packed=packed)
        model.set_grad_checkpointing(True)
        out = model.forward_features(images, tokens, packed=packed)
    with torch.inference_mode():
        inf = model.forward_features(images, tokens, packed=packed)
    assert count.checkpoints == 0
    for a, b, c in zip(out, ref, inf):
        assert not a.requires_grad
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def _bn_state(model):
    return {n: (m.num_batches_tracked.clone(), m.running_mean.clone(), m.running_var.clone())
            for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per_tower"])
def test_batchnorm_stats_updated_once(packed):
    model = _model("msclip-s-tiny").train()
    images, tokens = _images(N_IMG), _tokens(N_TXT)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = _bn_state(model)
    assert len(before) > 20  # conv stem, parallel branch and adapters
    assert all(int(t) == 0 for t, _, _ in before.values())
    results = {}
    for ckpt in (True, False):
        model.load_state_dict(start)
        results[ckpt] = _loss_and_grads(model, images, tokens, packed, ckpt=ckpt)
        after = _bn_state(model)
        for n, (t, mean, var) in after.items():
            assert int(t) == 1, f"{n}: num_batches_tracked {int(t)} after one forward+backward (ckpt={ckpt})"
            assert not torch.equal(mean, before[n][1]), n  # it did update
        results[ckpt] += (after,)
    with_ckpt, without = results[True][2], results[False][2]
    for n in without:
        for a, b in zip(with_ckpt[n], without[n]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
    _check_same(results[True][:2], results[False][:2])
