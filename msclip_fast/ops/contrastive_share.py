"""One rank's share of the global CLIP contrastive loss, tiled: the memory-lean distributed mode
of :class:`msclip_fast.losses.ClipLoss` (``fused_distributed=True``).

A rank holds its ``n`` local pairs ``(img, txt)`` and the gathered ``(N, D)`` features of all
ranks. The symmetric loss over the global batch is a sum of per-pair terms::

    L = Σ_i [ lse_j(s·I_i·T_j) − s·I_i·T_i  +  lse_j(s·T_i·I_j) − s·T_i·I_i ] / (2N)

(the column LSE of text i in ``s·I·Tᵀ`` is the row LSE of ``s·T_i·Iᵀ``), so each rank computes
the terms of its own pairs, image rows against all texts and text rows against all images, and
``Σ_ranks share = L`` with no cross-rank LSE merge. The ``n x N`` logits are never held: rows and
columns are swept in ``tile x tile`` blocks (forward merges the row LSE online; backward
recomputes each block once). Plain PyTorch, so it runs on any device and dtype (float16/bfloat16
are computed in float32, float64 in float64).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

DEFAULT_TILE = 2048


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_lse(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, tile: int) -> torch.Tensor:
    """``(n,)`` log Σ_j exp(s·a_i·b_j) over blocks of ``tile`` rows of a and b (online merge)."""
    acc = _acc_dtype(a.dtype)
    out = torch.empty(a.shape[0], dtype=acc, device=a.device)
    for r0 in range(0, a.shape[0], tile):
        ar = a[r0 : r0 + tile].to(acc)
        m = torch.full((ar.shape[0],), float("-inf"), dtype=acc, device=a.device)
        l = torch.zeros_like(m)
        for c0 in range(0, b.shape[0], tile):
            x = (ar @ b[c0 : c0 + tile].to(acc).t()).mul_(s)
            m_new = torch.maximum(m, x.amax(dim=1))
            l = l * torch.exp(m - m_new) + torch.exp(x.sub_(m_new[:, None])).sum(dim=1)
            m = m_new
        out[r0 : r0 + tile] = m + torch.log(l)
    return out


def _row_grads(a, b, s, lse, coef, tile, da, db):
    """Accumulate ``da += s·coef·P·b`` and ``db += s·coef·Pᵀ·a`` with ``P = exp(s·a·bᵀ − lse)``,
    block by block (da, db: accumulation-dtype buffers); returns ``coef·Σ P ∘ (a·bᵀ)``.
    ``s`` and ``coef`` stay 0-d tensors (no host sync on GPUs)."""
    acc = da.dtype
    ds = torch.zeros((), dtype=acc, device=a.device)
    w = s * coef
    for r0 in range(0, a.shape[0], tile):
        ar = a[r0 : r0 + tile].to(acc)
        lr = lse[r0 : r0 + tile, None]
        for c0 in range(0, b.shape[0], tile):
            bc = b[c0 : c0 + tile].to(acc)
            raw = ar @ bc.t()
            p = torch.exp(raw * s - lr)
            ds += (p * raw).sum()
            p.mul_(w)
            da[r0 : r0 + tile].addmm_(p, bc)
            db[c0 : c0 + tile].addmm_(p.t(), ar)
    return ds * coef


class ContrastiveShare(torch.autograd.Function):
    """``(img (n, D), txt (n, D), all_img (N, D), all_txt (N, D), scale, tile) -> share`` 0-d.

    Saves the inputs and 2n LSE values; backward recomputes the blocks. Gradients flow to the
    local features directly and to the gathered ones (whose backward, the gather's, routes them
    to their owner ranks)."""

    @staticmethod
    def forward(ctx, img, txt, all_img, all_txt, scale, tile):
        acc = _acc_dtype(img.dtype)
        s = scale.detach().to(device=img.device, dtype=acc).reshape(())
        n_total = all_img.shape[0]
        lse_i = _row_lse(img, all_txt, s, tile)  # image rows against every text
        lse_t = _row_lse(txt, all_img, s, tile)  # text rows against every image
        diag = (img.to(acc) * txt.to(acc)).sum(dim=1)  # this rank's positive pairs
        share = (lse_i.sum() + lse_t.sum() - 2.0 * s * diag.sum()) / (2.0 * n_total)
        ctx.save_for_backward(img, txt, all_img, all_txt, s, lse_i, lse_t)
        ctx.tile = tile
        ctx.scale_meta = (scale.dtype, scale.shape, scale.device)
        return share

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        img, txt, all_img, all_txt, s, lse_i, lse_t = ctx.saved_tensors
        acc, tile = s.dtype, ctx.tile
        coef = grad.to(acc).reshape(()) / (2.0 * all_img.shape[0])
        d_img = torch.zeros(img.shape, dtype=acc, device=img.device)
        d_txt = torch.zeros(txt.shape, dtype=acc, device=txt.device)
        d_all_img = torch.zeros(all_img.shape, dtype=acc, device=img.device)
        d_all_txt = torch.zeros(all_txt.shape, dtype=acc, device=img.device)
        ds = _row_grads(img, all_txt, s, lse_i, coef, tile, d_img, d_all_txt)
        ds += _row_grads(txt, all_img, s, lse_t, coef, tile, d_txt, d_all_img)
        # the two −s·I_i·T_i terms of each local pair
        img_a, txt_a = img.to(acc), txt.to(acc)
        d_img.sub_(txt_a * (2.0 * s * coef))
        d_txt.sub_(img_a * (2.0 * s * coef))
        ds -= 2.0 * coef * (img_a * txt_a).sum()
        dtype, shape, device = ctx.scale_meta
        needs = ctx.needs_input_grad
        return (
            d_img.to(img.dtype) if needs[0] else None,
            d_txt.to(txt.dtype) if needs[1] else None,
            d_all_img.to(all_img.dtype) if needs[2] else None,
            d_all_txt.to(all_txt.dtype) if needs[3] else None,
            ds.to(device=device, dtype=dtype).reshape(shape) if needs[4] else None,
            None,
        )


def contrastive_loss_share(img, txt, all_img, all_txt, scale, tile: int = DEFAULT_TILE):
    """This rank's share of the global symmetric InfoNCE loss, never holding ``n x N`` logits.

    Args:
        img, txt: ``(n, D)`` this rank's pairs (row i of img matches row i of txt), n >= 1.
        all_img, all_txt: ``(N, D)`` the features of every rank (this rank's rows included,
            normally from ``losses.all_gather_with_grad``), N >= n.
        scale: 1-element tensor ``exp(logit_scale)``; receives a gradient.
        tile: rows and columns per block (memory ``tile x tile`` per block; >= 1).
    Returns:
        0-d tensor (float32, float64 for float64 inputs)
        ``Σ_{i local} [lse(s·img_i·all_txtᵀ) + lse(s·txt_i·all_imgᵀ) − 2·s·img_i·txt_i] / (2N)``;
        summed over ranks it is the full-batch loss of :func:`contrastive_loss`.
    Raises:
        ValueError: shapes, dtypes or tile as above.
    """
    for name, t in (("img", img), ("txt", txt), ("all_img", all_img), ("all_txt", all_txt)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor, got {getattr(t, 'shape', t)!r}")
    if img.shape != txt.shape or img.shape[0] < 1:
        raise ValueError(f"img and txt must both be (n, D) with n >= 1, got {tuple(img.shape)} and {tuple(txt.shape)}")
    if all_img.shape != all_txt.shape or all_img.shape[1] != img.shape[1] or all_img.shape[0] < img.shape[0]:
        raise ValueError(f"all_img and all_txt must both be (N, {img.shape[1]}) with N >= {img.shape[0]}, "
                         f"got {tuple(all_img.shape)} and {tuple(all_txt.shape)}")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise ValueError(f"scale must be a 1-element tensor (exp(logit_scale)), got {scale!r}")
    if int(tile) < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    return ContrastiveShare.apply(img, txt, all_img, all_txt, scale, int(tile))
