"""Memory-lean distributed ClipLoss (``fused_distributed=True``) and its op
``ops.contrastive_loss_share``: each rank's tiled share of the global loss, exact gradients,
and no ``N_local x N`` allocation."""
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from msclip_fast import ops
from msclip_fast.losses import ClipLoss


def _feats(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return img, txt


def _simulated_ranks(img, txt, scale, sizes, tile):
    """Every 'rank' computes its share on slices of the full batch; gradients are assembled the
    way the gather's backward does (the gathered copies' gradients summed into their owners)."""
    d_img, d_txt = torch.zeros_like(img), torch.zeros_like(txt)
    d_scale = torch.zeros_like(scale)
    total = 0.0
    lo = 0
    for n in sizes:
        sl = slice(lo, lo + n)
        leaves = [t.detach().clone().requires_grad_() for t in (img[sl], txt[sl], img, txt, scale)]
        share = ops.contrastive_loss_share(*leaves, tile=tile)
        grads = torch.autograd.grad(share, leaves)
        d_img[sl] += grads[0]
        d_txt[sl] += grads[1]
        d_img += grads[2]
        d_txt += grads[3]
        d_scale += grads[4]
        total = total + share.detach()
        lo += n
    return total, d_img, d_txt, d_scale


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)],
                         ids=str)
@pytest.mark.parametrize("scale_v", [1.0, 100.0])
def test_shares_sum_to_full_batch_loss_and_grads(dtype, tol, scale_v):
    img, txt = _feats(12, 7, seed=1, dtype=dtype)
    img[6:9], txt[6:9] = img[0:3], txt[0:3]  # duplicated pairs across 'ranks'
    scale = torch.tensor(scale_v, dtype=torch.float64)
    got = _simulated_ranks(img, txt, scale, sizes=(5, 3, 4), tile=2)
    leaves = [img.double().requires_grad_(), txt.double().requires_grad_(), scale.clone().requires_grad_()]
    ref_loss = ops.contrastive_loss_ref(*leaves)
    ref = (ref_loss, *torch.autograd.grad(ref_loss, leaves))
    for name, a, b in zip(("loss", "d_img", "d_txt", "d_scale"), got, ref):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err <= tol, f"{name}: {err:.3g} > {tol}"


def test_bad_input_raises():
    img, txt = _feats(4, 8, seed=0)
    with pytest.raises(ValueError, match="tile"):
        ops.contrastive_loss_share(img, txt, img, txt, torch.tensor(1.0), tile=0)
    with pytest.raises(ValueError, match="all_img"):
        ops.contrastive_loss_share(img, txt, img[:3], txt[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="fused_tile"):
        ClipLoss(fused_distributed=True, fused_tile=0)


class AllocationSpy(TorchDispatchMode):
    """Records the largest tensor (in elements) any op outputs while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_allocates_local_rows_times_n():
    n_local, n_total, d, tile = 48, 192, 8, 16  # N x D and tile² are both far below n_local x N
    all_img, all_txt = _feats(n_total, d, seed=2, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (all_img[:n_local], all_txt[:n_local], all_img, all_txt)]
    scale = torch.tensor(50.0, requires_grad=True)
    with AllocationSpy() as spy:
        share = ops.contrastive_loss_share(*leaves, scale, tile=tile)
        share.backward()
    assert spy.max_numel <= max(n_total * d, tile * tile) < n_local * n_total // 4
    with AllocationSpy() as naive:  # the spy does see a materialized block
        (all_img[:n_local] @ all_txt.t()).sum()
    assert naive.max_numel == n_local * n_total


# --- 2 gloo ranks on loopback ---------------------------------------------------------------

D_IN, E = 7, 4
SIZES = (10, 6)  # unequal rows per rank on purpose: the mode is exact anyway
TILE = 3  # N_local > E and tile² small, so an N_local x N block would be the largest tensor


def _problem():
    g = torch.Generator().manual_seed(321)
    x_img = torch.randn(sum(SIZES), D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(sum(SIZES), D_IN, generator=g, dtype=torch.float64)
    x_txt[9:12] = x_txt[0:3]  # duplicated captions, within and across ranks
    w = torch.randn(D_IN, E, generator=g, dtype=torch.float64)
    return x_img, x_txt, w, torch.tensor(3.0, dtype=torch.float64)


def _loss_and_grads(x_img, x_txt, w, log_scale, loss_fn):
    """Shared-weight toy model (both towers use W): loss, dW, dlog_scale, d(image features)."""
    w = w.clone().requires_grad_(True)
    ls = log_scale.clone().requires_grad_(True)
    fi = F.normalize(x_img @ w, dim=-1)
    ft = F.normalize(x_txt @ w, dim=-1)
    fi.retain_grad()
    loss = loss_fn(fi, ft, ls.exp())
    loss.backward()
    return loss.detach(), w.grad, ls.grad, fi.grad


def _worker(rank, world_size, port, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        x_img, x_txt, w, log_scale = _problem()
        lo = sum(SIZES[:rank])
        sl = slice(lo, lo + SIZES[rank])
        loss_fn = ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size,
                           fused_distributed=True, fused_tile=TILE)
        with AllocationSpy() as spy:
            loss, gw, gls, gfeat = _loss_and_grads(x_img[sl], x_txt[sl], w, log_scale, loss_fn)
        for g in (gw, gls):  # what DDP / DeepSpeed do with parameter gradients: average
            dist.all_reduce(g)
            g /= world_size
        dist.all_reduce(loss)
        queue.put((rank, spy.max_numel, *[t.numpy().copy() for t in (loss / world_size, gw, gls, gfeat)]))
        dist.barrier()  # tear gloo down together: a rank leaving early has aborted at exit
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_fused_distributed_equals_full_batch():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    world_size, port = 2, _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, max_numel, *vals = queue.get()
        results[rank] = (max_numel, vals)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    x_img, x_txt, w, log_scale = _problem()
    loss, gw, gls, gfeat = _loss_and_grads(x_img, x_txt, w, log_scale, ClipLoss())
    n_total = sum(SIZES)
    for rank in range(world_size):
        max_numel, vals = results[rank]
        r_loss, r_gw, r_gls, r_gfeat = (torch.from_numpy(a) for a in vals)
        torch.testing.assert_close(r_loss, loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r_gw, gw, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r_gls, gls, rtol=1e-10, atol=1e-12)
        lo = sum(SIZES[:rank])
        # per-rank feature gradient is world_size x the full-batch one (averaging undoes it)
        torch.testing.assert_close(r_gfeat / world_size, gfeat[lo : lo + SIZES[rank]], rtol=1e-10, atol=1e-12)
        # largest tensor a rank made: gathered (N, E) features or (N_local, D_IN) rows, never
        # its N_local x N logits block
        assert max_numel <= max(n_total * E, SIZES[rank] * D_IN, TILE * TILE) < SIZES[rank] * n_total
