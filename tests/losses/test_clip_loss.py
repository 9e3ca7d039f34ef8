"""ClipLoss: agreement with open_clip on one process, and the gradient semantics across ranks."""
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from msclip_fast.losses import ClipLoss


def _feats(n=9, e=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)
    return img, txt


def test_matches_open_clip_single_process():
    open_clip = pytest.importorskip("open_clip")
    img, txt = _feats()
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = ClipLoss()(img, txt, scale)
    ref = open_clip.loss.ClipLoss()(img, txt, scale)
    torch.testing.assert_close(ours, ref)
    out = ClipLoss()(img, txt, scale, output_dict=True)
    assert set(out) == {"contrastive_loss"}


def test_logit_bias_path_and_cache_labels():
    img, txt = _feats(5)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss_fn = ClipLoss(cache_labels=True)
    a = loss_fn(img, txt, scale, logit_bias=torch.tensor(0.0, dtype=torch.float64))
    b = loss_fn(img, txt, scale)
    torch.testing.assert_close(a, b)
    assert loss_fn(img, txt, scale, logit_bias=torch.tensor(0.0, dtype=torch.float64)) == a


def test_bad_input_raises():
    img, txt = _feats(4)
    with pytest.raises(ValueError, match="row count"):
        ClipLoss()(img, txt[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)


# --- 2 gloo ranks on loopback -------------------------------------------------------------

D_IN, E = 7, 6
N_PER_RANK = (5, 3)  # full gather: uneven rows per rank on purpose
N_PER_RANK_LOCAL = (4, 4)  # local_loss averages per-rank means: equal rows needed for equality


def _full_problem():
    g = torch.Generator().manual_seed(123)
    x_img = torch.randn(sum(N_PER_RANK), D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(sum(N_PER_RANK), D_IN, generator=g, dtype=torch.float64)
    w = torch.randn(D_IN, E, generator=g, dtype=torch.float64)
    log_scale = torch.tensor(2.0, dtype=torch.float64)
    return x_img, x_txt, w, log_scale


def _loss_and_grads(x_img, x_txt, w, log_scale, loss_fn):
    """Tiny shared-weight 'model': both towers use the same W; returns loss, dW, dlog_scale, dfeat."""
    w = w.clone().requires_grad_(True)
    ls = log_scale.clone().requires_grad_(True)
    fi = F.normalize(x_img @ w, dim=-1)
    ft = F.normalize(x_txt @ w, dim=-1)
    fi.retain_grad()
    loss = loss_fn(fi, ft, ls.exp())
    loss.backward()
    return loss.detach(), w.grad, ls.grad, fi.grad


def _worker(rank, world_size, port, local_loss, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        x_img, x_txt, w, log_scale = _full_problem()
        sizes = N_PER_RANK_LOCAL if local_loss else N_PER_RANK
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world_size)
        loss, gw, gls, gfeat = _loss_and_grads(x_img[sl], x_txt[sl], w, log_scale, loss_fn)
        # what DDP / DeepSpeed do with parameter gradients: average over ranks
        for g in (gw, gls):
            dist.all_reduce(g)
            g /= world_size
        dist.all_reduce(loss)
        # numpy copies: torch tensors would be shared via fds that vanish when this process exits
        queue.put((rank, *[t.numpy().copy() for t in (loss / world_size, gw, gls, gfeat)]))
        dist.barrier()  # tear gloo down together: a rank leaving early has aborted at exit
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("local_loss", [False, True])
def test_two_ranks_gather_with_grad_equals_full_batch(local_loss):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    world_size = 2
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, local_loss, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, *vals = queue.get()
        results[rank] = vals
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    x_img, x_txt, w, log_scale = _full_problem()
    sizes = N_PER_RANK_LOCAL if local_loss else N_PER_RANK
    loss, gw, gls, gfeat = _loss_and_grads(x_img, x_txt, w, log_scale, ClipLoss())
    for rank in range(world_size):
        r_loss, r_gw, r_gls, r_gfeat = (torch.from_numpy(a) for a in results[rank])
        torch.testing.assert_close(r_loss, loss)
        torch.testing.assert_close(r_gw, gw)
        torch.testing.assert_close(r_gls, gls)
        lo = sum(sizes[:rank])
        # per-rank feature gradient is world_size x the full-batch one (averaging undoes it)
        torch.testing.assert_close(r_gfeat / world_size, gfeat[lo : lo + sizes[rank]])
