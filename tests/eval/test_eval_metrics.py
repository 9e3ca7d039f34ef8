"""Exact (hand-checked) recall@K and accuracy numbers, ties and duplicates included."""
import math

import pytest
import torch

from msclip_fast.eval.metrics import (
    classification_metrics,
    per_class_accuracy,
    recall_chance,
    retrieval_metrics,
)

# Similarity matrix S[i, j] = score(image i, text j). With one-hot text features the dot
# product reproduces S exactly, so the ranks below are computed by hand from S.
S = torch.tensor(
    [
        [0.90, 0.10, 0.75, 0.30],
        [0.80, 0.50, 0.70, 0.10],
        [0.35, 0.20, 0.30, 0.40],
        [0.40, 0.40, 0.40, 0.40],  # all tied: the true text (index 3) ranks last
    ],
    dtype=torch.float64,
)
CAPTIONS = ["a", "b", "a", "c"]  # pairs 0 and 2 share a caption


def _features():
    return S.clone(), torch.eye(4, dtype=torch.float64)


def test_recall_hand_checked():
    img, txt = _features()
    m = retrieval_metrics(img, txt, ks=(1, 2, 3))
    # i2t ranks of the diagonal: [0, 2, 2, 3]; t2i (columns): [0, 0, 3, 1]
    assert m["i2t_r1"] == 0.25 and m["i2t_r2"] == 0.25 and m["i2t_r3"] == 0.75
    assert m["t2i_r1"] == 0.5 and m["t2i_r2"] == 0.75 and m["t2i_r3"] == 0.75
    assert (m["chance_r1"], m["chance_r2"], m["chance_r3"]) == (0.25, 0.5, 0.75)
    assert m["n"] == 4
    assert not any(k.endswith("_dedup") for k in m)


def test_recall_dedup_hand_checked():
    img, txt = _features()
    m = retrieval_metrics(img, txt, captions=CAPTIONS, ks=(1, 2, 3))
    # plain recalls are unchanged by passing captions
    assert (m["i2t_r1"], m["i2t_r2"], m["i2t_r3"]) == (0.25, 0.25, 0.75)
    assert (m["t2i_r1"], m["t2i_r2"], m["t2i_r3"]) == (0.5, 0.75, 0.75)
    # i2t dedup first-hit ranks: [0, 2, 1, 3] (image 2 finds text 0, caption "a", at rank 1)
    assert (m["i2t_r1_dedup"], m["i2t_r2_dedup"], m["i2t_r3_dedup"]) == (0.25, 0.5, 0.75)
    # t2i dedup: [0, 0, 0, 1] (text 2 finds image 0, caption "a", first)
    assert (m["t2i_r1_dedup"], m["t2i_r2_dedup"], m["t2i_r3_dedup"]) == (0.75, 1.0, 1.0)
    # chance with group sizes [2, 1, 2, 1] of N=4: 1 - C(4-g, K)/C(4, K), averaged
    assert m["chance_r1_dedup"] == pytest.approx((0.5 + 0.25) / 2)
    assert m["chance_r2_dedup"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert m["chance_r3_dedup"] == pytest.approx((1.0 + 0.75) / 2)
    assert m["n_unique_captions"] == 3


def _brute_force(sim, groups, k):
    """Oracle: python loop over a stable descending sort."""
    hits = 0
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: (-float(sim[i, j]), j))
        hits += any(groups[j] == groups[i] for j in order[:k])
    return hits / sim.shape[0]


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_recall_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    n, e = 23, 8
    img = torch.nn.functional.normalize(torch.randn(n, e, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(n, e, generator=g), dim=-1)
    # quantize to create ties; duplicate some captions
    img, txt = (img * 4).round() / 4, (txt * 4).round() / 4
    caps = [i % 7 for i in range(n)]
    m = retrieval_metrics(img, txt, captions=caps, chunk_size=chunk)
    sim = img @ txt.t()
    ident = list(range(n))
    for k in (1, 5, 10):
        assert m[f"i2t_r{k}"] == pytest.approx(_brute_force(sim, ident, k))
        assert m[f"t2i_r{k}"] == pytest.approx(_brute_force(sim.t(), ident, k))
        assert m[f"i2t_r{k}_dedup"] == pytest.approx(_brute_force(sim, caps, k))
        assert m[f"t2i_r{k}_dedup"] == pytest.approx(_brute_force(sim.t(), caps, k))
        assert m[f"chance_r{k}"] == pytest.approx(k / n)


def test_recall_chance_small_n_and_errors():
    assert recall_chance(3, 10) == 1.0
    assert recall_chance(4, 1, torch.tensor([4, 4, 4, 4])) == 1.0
    with pytest.raises(ValueError, match="N=0"):
        retrieval_metrics(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="image_features"):
        retrieval_metrics(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="captions"):
        retrieval_metrics(torch.eye(3), torch.eye(3), captions=["a"])


# 6 samples, 6 classes; labels [0, 0, 0, 1, 2, 4] (classes 3 and 5 absent).
LOGITS = torch.tensor(
    [
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0 -> rank 0
        [0.2, 0.8, 0.0, 0.0, 0.0, 0.0],  # label 0 -> rank 1
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],  # label 0, tie with 1 -> lower index wins: rank 0
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],  # label 1, same tie -> rank 1
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # label 2 -> rank 0
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.6],  # label 4 -> rank 5 (outside top-5)
    ]
)
LABELS = torch.tensor([0, 0, 0, 1, 2, 4])


def test_classification_hand_checked():
    m = classification_metrics(LOGITS, LABELS)
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top5"] == pytest.approx(5 / 6)
    # per-class recall over present classes: 0 -> 2/3, 1 -> 0, 2 -> 1, 4 -> 0
    assert m["balanced_top1"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    assert m["chance_top1"] == pytest.approx(1 / 6)
    assert m["chance_top5"] == pytest.approx(5 / 6)
    assert m["chance_balanced"] == pytest.approx(1 / 6)
    assert m["majority_rate"] == pytest.approx(3 / 6)
    assert (m["n"], m["num_classes"]) == (6, 6)
    names = ["a", "b", "c", "d", "e", "f"]
    pc = per_class_accuracy(LOGITS, LABELS, names)
    assert pc == pytest.approx({"a": 2 / 3, "b": 0.0, "c": 1.0, "e": 0.0})


def test_classification_no_top5_below_five_classes():
    m = classification_metrics(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert "top5" not in m and "chance_top5" not in m
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["balanced_top1"] == pytest.approx((1 + 0.5) / 2)
    assert m["majority_rate"] == pytest.approx(2 / 3)


def test_balanced_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 7, generator=g)
    labels = torch.randint(0, 7, (200,), generator=g)
    m = classification_metrics(logits, labels)
    pred = logits.argmax(1)
    assert m["top1"] == pytest.approx(sk.accuracy_score(labels, pred))
    assert m["balanced_top1"] == pytest.approx(sk.balanced_accuracy_score(labels, pred))
    assert m["top5"] == pytest.approx(sk.top_k_accuracy_score(labels, logits.numpy(), k=5))


def test_classification_errors():
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(LOGITS, torch.tensor([0, 9, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(LOGITS, LABELS[:3])
    with pytest.raises(ValueError, match="logits"):
        classification_metrics(torch.zeros(3), LABELS[:3])
    assert math.isclose(classification_metrics(LOGITS, LABELS, 6)["top1"], 0.5)
