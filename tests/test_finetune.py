"""spp.finetune: a short distillation fine-tune lowers the held-out distillation loss."""
import copy
import math

import pytest
import torch

import spp
from spp.baselines import random_path
from spp.finetune import FinetuneConfig, evaluate_distill, finetune
from helpers import bert_batch, tiny_bert, tiny_vit, vit_batch


def pruned_pair(family):
    if family == "bert":
        dense = tiny_bert(seed=0)
        train = [bert_batch(seed=s, batch=8) for s in range(12)]
        held = [bert_batch(seed=100 + s, batch=4) for s in range(3)]
    else:
        dense = tiny_vit(seed=0)
        train = [vit_batch(seed=s, batch=4) for s in range(6)]
        held = [vit_batch(seed=100 + s, batch=4) for s in range(3)]
    h = spp.attach(dense)
    small = spp.prune(dense, random_path(h, seed=1).masks(keep=0.25, values="ones"))
    spp.detach(dense)
    return dense, small, train, held


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_short_finetune_lowers_heldout_distillation_loss(family):
    dense, small, train, held = pruned_pair(family)
    teacher_state = copy.deepcopy(dense.state_dict())
    widths = dict(small.__dict__["_spp_pruned"]["widths"])
    before = evaluate_distill(small, held, dense)
    hist = finetune(small, train, dense, steps=40, lr=1e-3, progress=False)
    after = evaluate_distill(small, held, dense)
    assert after < 0.8 * before, (before, after)
    assert len(hist["loss"]) == 40 and all(math.isfinite(v) for v in hist["loss"])
    # the teacher is untouched and the pruned structure is kept
    for k, v in dense.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert spp.find_adapter(small).widths(small) == widths


def test_attached_teacher_runs_dense():
    dense, small, train, held = pruned_pair("bert")
    h = spp.attach(dense)
    h.set_masks(random_path(h, seed=5).masks(keep=0.3))  # must not leak into the teacher
    loss_attached = evaluate_distill(small, held, dense)
    spp.detach(dense)
    assert loss_attached == pytest.approx(evaluate_distill(small, held, dense), rel=1e-6)


def test_schedule_warmup_then_cosine():
    cfg = FinetuneConfig(steps=100, lr=1e-3, warmup_frac=0.1)
    assert cfg.lr_at(1) == pytest.approx(1e-4)
    assert cfg.lr_at(10) == pytest.approx(1e-3)
    assert cfg.lr_at(55) == pytest.approx(0.5e-3)  # half way through the cosine
    assert cfg.lr_at(100) == pytest.approx(0.0, abs=1e-12)


def test_checkpoints_are_loadable(tmp_path):
    dense, small, train, _ = pruned_pair("bert")
    finetune(small, train, dense, steps=4, lr=1e-3, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    again = spp.load_pruned(str(tmp_path))
    b = train[0]
    torch.testing.assert_close(again(**b).last_hidden_state, small(**b).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("kw, err, needle", [
    (dict(steps=0), ValueError, "steps"), (dict(lr=0.0), ValueError, "lr"),
    (dict(hidden_weight=-1.0), ValueError, "hidden_weight"), (dict(warmup_frac=1.0), ValueError, "warmup_frac"),
    (dict(teacher="dense"), TypeError, "teacher"),
])
def test_bad_arguments(kw, err, needle):
    dense, small, train, _ = pruned_pair("bert")
    args = {"steps": 3, "lr": 1e-3, "teacher": dense, **kw}
    with pytest.raises(err, match=needle):
        finetune(small, train, progress=False, **args)


def test_attached_student_is_refused():
    dense, _, train, _ = pruned_pair("bert")
    other = tiny_bert(seed=0)
    spp.attach(other)
    with pytest.raises(ValueError, match="attached"):
        finetune(other, train, dense, steps=2, progress=False)
