"""Evaluation metrics on cases whose answers are known."""
import csv

import pytest
import torch

from spp.evaluate import classifier_metrics, embedding_metrics, paraphrase, write_rows
from helpers import bert_batch, tiny_bert


def unit_rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_identical_embeddings_score_one():
    e = unit_rows(30, 16, 0)
    m = embedding_metrics(e, e.clone(), k=10)
    assert m == {"cosine": pytest.approx(1.0), "top1_agreement": 1.0, "recall_at_10": 1.0}


def test_unrelated_embeddings_score_near_chance():
    a, b = unit_rows(200, 64, 0), unit_rows(200, 64, 1)
    m = embedding_metrics(a, b, k=10)
    assert abs(m["cosine"]) < 0.05
    assert m["top1_agreement"] < 0.05  # chance is 1/199
    assert m["recall_at_10"] < 0.12  # chance is 10/199


def test_metrics_by_hand():
    # 4 points on a line of angles: neighbours are fixed; swapping two points' embeddings
    ang = torch.tensor([0.0, 0.1, 1.0, 1.1])
    dense = torch.stack([ang.cos(), ang.sin()], 1)
    pruned = dense[[1, 0, 2, 3]]  # rows 0 and 1 swapped
    m = embedding_metrics(pruned, dense, k=1)
    assert m["cosine"] == pytest.approx((2 * torch.cos(torch.tensor(0.1)).item() + 2) / 4, rel=1e-6)
    # nearest neighbours: dense 0->1, 1->0, 2->3, 3->2; pruned rows 0,1 swapped keep 0->1, 1->0
    assert m["top1_agreement"] == 1.0 and m["recall_at_1"] == 1.0


def test_paraphrase_is_deterministic_and_light():
    s = "Return the number of items, or None when the queue is empty."
    p = paraphrase(s, seed=3)
    assert p == paraphrase(s, seed=3) and p != s.lower()
    assert sorted(p.split()) == sorted(w for w in p.split())
    assert set(p.split()) == {"return", "the", "number", "of", "items", "or", "none", "when", "queue", "is", "empty"}


def test_classifier_metrics():
    model = tiny_bert(seed=0, cls="BertForSequenceClassification")
    other = tiny_bert(seed=1, cls="BertForSequenceClassification")
    batches = []
    for s in range(3):
        b = bert_batch(seed=s, batch=5)
        batches.append((b, model(**b).logits.argmax(-1)))  # labels = the model's own predictions
    m = classifier_metrics(model, model, batches)
    assert m == {"accuracy": 1.0, "dense_agreement": 1.0, "examples": 15}
    m2 = classifier_metrics(other, model, batches)
    assert m2["accuracy"] == m2["dense_agreement"] < 1.0
    with pytest.raises(ValueError, match="empty"):
        classifier_metrics(model, model, [])


def test_write_rows(tmp_path):
    rows = [{"method": "spp", "cosine": 0.5, "widths": {"a": 1}}, {"method": "random", "cosine": 0.25, "extra": 3}]
    write_rows(rows, str(tmp_path), "t")
    with open(tmp_path / "t.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["method"] for r in got] == ["spp", "random"] and got[1]["extra"] == "3"
    assert "widths" not in got[0]
