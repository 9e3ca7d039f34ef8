"""Random L2-normalized feature pairs shared by the contrastive-loss backend tests."""
import torch
import torch.nn.functional as F


def features(n, d, dtype, seed, dup=False, device="cpu"):
    """``(img, txt)`` of shape ``(n, d)``, drawn in float64 then cast; with ``dup`` the second
    half repeats the first half (duplicated pairs)."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    if dup:
        h = n // 2
        img[h : 2 * h], txt[h : 2 * h] = img[:h], txt[:h]
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)
