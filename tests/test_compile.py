"""Pruned models under torch.compile, torch.export and torch.jit.trace.

Every family compiles as one graph (``fullgraph=True``) and exports, and both agree with the eager
model; an exported program holds ATen ops only and keeps reading its masks (a batch padded
differently from the one it was exported with gives the eager result); so does a jit trace made
on an unpadded batch; an export with dynamic batch / sequence dims serves other sizes, and
Llama / OPT generate through a compiled forward with their KV cache. fp32 CPU inference under torch.compile runs the attention core and the
large products as the opaque ops ``spp_layers::attention`` / ``spp_kernels::linear`` (the eager
kernels: the extension's attention, oneDNN products); with gradients the graph traces through
them, and the gradients agree with eager ones.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import spp
import spp_kernels
import spp_kernels._linear as lin_mod
import tiny_models as tm
from helpers import bert_batch, make, quiet_search

ONEDNN = lin_mod.onednn_status()[0]
FAMILIES = ("bert", "vit", "swin", "llama", "opt", "clip")
TOL = dict(atol=2e-5, rtol=2e-5)  # fp32; routes differ (SDPA vs the chunked / fused attention)


def _build(family: str):
    """(model, batch, another batch with other padding) for one family."""
    if family in ("bert", "vit"):
        model, batch = make(family)
        if family == "vit":
            return model, batch, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        other = bert_batch(5)
        other["attention_mask"][0, 4:] = 0
        other["attention_mask"][1] = 1
        return model, batch, other
    if family == "swin":
        return tm.tiny_swin(), tm.image_batch(), tm.image_batch(3)
    if family in ("llama", "opt"):
        model = tm.tiny_llama() if family == "llama" else tm.tiny_opt()
        other = tm.token_batch(4)
        other["attention_mask"][0, 7:] = 0
        other["attention_mask"][1] = 1
        return model, tm.token_batch(), other
    model, batch = tm.tiny_clip(), tm.clip_batch()
    other = tm.clip_batch(2)
    other["attention_mask"][0, 5:] = 0
    return model, batch, other


def _kwargs(family: str, batch):
    if not isinstance(batch, dict):
        return (batch,), {}
    if family in ("llama", "opt"):  # a cache object is no tensor output: export refuses it
        return (), dict(batch, use_cache=False)
    return (), dict(batch)


def _tensors(family: str, out, batch) -> list[torch.Tensor]:
    """The outputs to compare; token outputs at real (not padded) positions only."""
    if isinstance(out, torch.Tensor):
        return [out]
    if family == "clip":
        return [out.logits_per_image, out.text_embeds, out.image_embeds]
    keep = batch["attention_mask"].bool()
    if family == "bert":
        return [out.last_hidden_state[keep], out.pooler_output]
    return [out.logits[keep]]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)


def _prune_half(model, batch):
    """``model`` (left unattached) pruned to half its units, read off a short search on ``batch``."""
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=12)
    small = spp.prune(model, path.masks(keep=0.5))
    spp.detach(model)
    return small


@pytest.fixture(scope="module", params=FAMILIES)
def pruned(request):
    family = request.param
    model, batch, other = _build(family)
    small = _prune_half(model, batch).eval()
    return family, small, batch, other


def _run(family, m, batch):
    args, kw = _kwargs(family, batch)
    return _tensors(family, m(*args, **kw), batch)


def _ops(graphs) -> set[str]:
    return {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}


def _recording(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_compiles_as_one_graph_and_matches_eager(pruned):
    family, small, batch, other = pruned
    torch._dynamo.reset()
    graphs: list = []
    c = torch.compile(small, backend=_recording(graphs), fullgraph=True)
    with torch.no_grad():
        for b in (batch, other):
            _close(_run(family, c, b), _run(family, small, b))
    ops = _ops(graphs)
    if family in ("bert", "vit", "swin"):  # MaskedAttention's core, opaque: the eager kernels
        assert "spp_layers.attention" in ops, sorted(ops)
    else:  # Hugging Face's attention function: traced through (SDPA on the model's mask)
        assert not any("spp_layers" in o for o in ops), sorted(ops)
    # BERT's encoder hands all its layers one built mask, once per forward (graph per batch shape)
    one = [n for g in graphs for n in g.graph.nodes if "spp_layers.one_mask" in str(n.target)]
    assert len(one) == (len(graphs) if family == "bert" else 0), (len(one), len(graphs))


def test_aot_compiled_outputs_match_eager(pruned):
    family, small, batch, other = pruned
    torch._dynamo.reset()
    c = torch.compile(small, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for b in (batch, other):
            _close(_run(family, c, b), _run(family, small, b))


def test_exports_to_aten_and_keeps_reading_masks(pruned):
    family, small, batch, other = pruned
    args, kw = _kwargs(family, batch)
    with torch.no_grad():
        ep = torch.export.export(small, args, kw)
        ops = _ops([ep.graph_module])
        assert not any("spp" in o for o in ops), sorted(ops)
        for b in (batch, other):  # `other` pads differently: the program must not hold batch's mask
            _close(_run(family, ep.module(), b), _run(family, small, b))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_export_with_dynamic_batch_and_sequence_serves_other_sizes(family):
    """torch.export with the batch and sequence dims dynamic: one program serves batches of other
    sizes and padding (checked against eager at the real tokens)."""
    model, batch, _ = _build(family)
    small = _prune_half(model, batch).eval()
    args, kw = _kwargs(family, batch)
    B, N = torch.export.Dim("B", min=1, max=16), torch.export.Dim("N", min=2, max=24)
    dims = {k: ({0: B, 1: N} if isinstance(v, torch.Tensor) else None) for k, v in kw.items()}
    with torch.no_grad():
        ep = torch.export.export(small, args, kw, dynamic_shapes=dims)
        for b_, n in ((5, 17), (2, 6), (4, 11)):
            other = bert_batch(b_, batch=b_, seq=n) if family == "bert" else tm.token_batch(b_, batch=b_, seq=n)
            other["attention_mask"][0, n // 2:] = 0
            _close(_run(family, ep.module(), other), _run(family, small, other))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compiled_generate_with_a_kv_cache_matches_eager(family):
    """Greedy generation with the KV cache (a left-padded row: batched generation) through a
    compiled forward gives the eager tokens: prefill and every cached decode step trace."""
    model, batch, _ = _build(family)
    small = _prune_half(model, batch).eval()
    ids = batch["input_ids"][:2, :6]
    am = torch.ones_like(ids)
    am[1, :2] = 0
    with torch.no_grad():
        want = small.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=False)
        torch._dynamo.reset()
        small.forward = torch.compile(small.forward, backend="aot_eager", fullgraph=True)
        got = small.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=False)
    assert got.shape == (2, 11) and torch.equal(got, want)


def test_jit_trace_on_an_unpadded_batch_keeps_the_mask_live():
    """A trace reads no mask value: one made on a batch without padding (where the eager layers
    would drop the mask as 'masks nothing') still applies a later batch's padding."""
    model, batch = make("bert")
    small = _prune_half(model, batch).eval()
    small.config.return_dict = False
    ids, am = batch["input_ids"], batch["attention_mask"]
    assert not bool(am.all())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values
        traced = torch.jit.trace(small, (ids, torch.ones_like(am)), strict=False)
        got, want = traced(ids, am)[0], small(ids, am)[0]
    keep = am.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL)


def test_compiled_training_step_traces_through_and_matches_eager_gradients():
    model, batch = make("bert")
    small = _prune_half(model, batch).train()
    keep = batch["attention_mask"].bool()

    def loss_of(m):
        out = m(**batch)
        return out.last_hidden_state[keep].square().mean() + out.pooler_output.sum()

    params = [p for p in small.parameters() if p.requires_grad]
    eager = torch.autograd.grad(loss_of(small), params)
    torch._dynamo.reset()
    graphs: list = []
    c = torch.compile(small, backend=_recording(graphs), fullgraph=True)
    got = torch.autograd.grad(loss_of(c), params)
    assert not any("spp_layers" in o or "spp_kernels" in o for o in _ops(graphs))  # no backward there
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


# --- spp_kernels.linear under torch.compile -------------------------------------------------------

BIG = (3, 37, 200, 300)  # 111 rows x 300 outputs x 200 inputs = 6.7M multiply-adds >= MIN_MACS
SMALL = (2, 5, 24, 40)


def _linear_inputs(shape, seed=0, residual=False):
    B, N, K, O = shape
    g = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(B, N, K, generator=g), torch.randn(O, K, generator=g), torch.randn(O, generator=g)
    r = torch.randn(B, N, O, generator=g) if residual else None
    return x, W, b, r


@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("residual", [False, True])
def test_linear_compiled_is_the_eager_op(act, residual):
    x, W, b, r = _linear_inputs(BIG, 1, residual)
    torch._dynamo.reset()
    graphs: list = []
    f = torch.compile(lambda *a: spp_kernels.linear(*a), backend=_recording(graphs), fullgraph=True)
    with torch.no_grad():
        got = f(x, W, b, act, r)
        want = spp_kernels.linear(x, W, b, act, r)
    assert ("spp_kernels.linear" in _ops(graphs)) == ONEDNN
    assert torch.equal(got, want)  # the same primitive, called eagerly inside the op


def test_linear_compiled_small_or_with_gradients_is_traced_through():
    torch._dynamo.reset()
    graphs: list = []
    f = torch.compile(lambda *a: spp_kernels.linear(*a), backend=_recording(graphs), fullgraph=True)
    x, W, b, _ = _linear_inputs(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(f(x, W, b, "gelu"), spp_kernels.linear(x, W, b, "gelu"), **TOL)
    x, W, b, _ = _linear_inputs(BIG)
    W.requires_grad_(True)
    f(x, W, b, "relu").sum().backward()
    W2 = W.detach().clone().requires_grad_(True)
    spp_kernels.linear(x, W2, b, "relu").sum().backward()
    torch.testing.assert_close(W.grad, W2.grad, atol=1e-3, rtol=1e-4)
    assert not any("spp_kernels" in o for o in _ops(graphs)), sorted(_ops(graphs))


def test_custom_ops_pass_opcheck():
    x, W, b, r = _linear_inputs(BIG, 2, residual=True)
    torch.library.opcheck(torch.ops.spp_kernels.linear.default, (x, W, b, "gelu", None))
    torch.library.opcheck(torch.ops.spp_kernels.linear.default, (x, W, b, "none", r))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, d, generator=g) for d in (5, 5, 6))
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    hf_mask = torch.zeros(2, 1, 1, 7).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    for mask in (None, keep[:, None, None, :], hf_mask):
        torch.library.opcheck(torch.ops.spp_layers.attention.default, (q, k, v, mask, None, 0.4, False))
    bias = torch.randn(1, 3, 7, 7, generator=g)
    torch.library.opcheck(torch.ops.spp_layers.attention.default, (q, k, v, None, bias, 0.4, True))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "swin"])
def test_inductor_compiled_model_matches_eager(family):
    """The default backend (Inductor, C++ code generated and built here) on a pruned model, with a
    product large enough for the oneDNN op."""
    model, batch, other = _build(family)
    small = _prune_half(model, batch).eval()
    torch._dynamo.reset()
    c = torch.compile(small, fullgraph=True)
    with torch.no_grad():
        for b in (batch, other):
            _close(_run(family, c, b), _run(family, small, b))
        x, W, b_, r = _linear_inputs(BIG, 4, residual=True)
        f = torch.compile(lambda *a: spp_kernels.linear(*a), fullgraph=True)
        torch.testing.assert_close(f(x, W, b_, None, r), spp_kernels.linear(x, W, b_, None, r), **TOL)


def test_ops_do_not_recurse_when_the_compile_flag_is_set_elsewhere(monkeypatch):
    """torch's compile flag is process-wide: an eager call can see it set while another thread
    compiles. The public functions then call the ops, whose bodies must not call them again."""
    x, W, b, r = _linear_inputs(BIG, 5, residual=True)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 7, d, generator=g) for d in (5, 5, 6))
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[1, ..., 4:] = False
    with torch.no_grad():
        want_lin = spp_kernels.linear(x, W, b, "gelu", None)
        want_res = spp_kernels.linear(x, W, b, None, r)
        want_att = spp.layers.attention_core(q, k, v, keep, False, None, 0.4)
        monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
        assert torch.compiler.is_compiling()
        got_lin = spp_kernels.linear(x, W, b, "gelu", None)
        got_res = spp_kernels.linear(x, W, b, None, r)
        got_att = spp.layers.attention_core(q, k, v, keep, False, None, 0.4)
    torch.testing.assert_close(got_lin, want_lin, atol=1e-4, rtol=1e-4)  # F.linear inside the op there
    torch.testing.assert_close(got_res, want_res, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_att, want_att, **TOL)


def test_compiled_model_runs_its_products_as_the_linear_op(monkeypatch):
    """With the size threshold lowered, a tiny pruned BERT's products (the residual ones in the
    GEMM's epilogue included) are spp_kernels::linear nodes of the compiled graph."""
    if not ONEDNN:
        pytest.skip(lin_mod.onednn_status()[1])
    monkeypatch.setattr(lin_mod, "MIN_MACS", 1)
    model, batch, other = _build("bert")
    small = _prune_half(model, batch).eval()
    torch._dynamo.reset()
    graphs: list = []
    c = torch.compile(small, backend=_recording(graphs), fullgraph=True)
    with torch.no_grad():
        for b in (batch, other):
            _close(_run("bert", c, b), _run("bert", small, b))
    nodes = [n for g in graphs for n in g.graph.nodes if "spp_kernels.linear" in str(n.target)]
    # q, k, v, o and fc1, fc2 in each of 2 layers; o and fc2 add their block's input
    assert len(nodes) == 12, len(nodes)
    assert sum(n.args[4] is not None for n in nodes) == 4


def test_dynamic_shapes_compile_once_for_other_batch_and_sequence_sizes():
    model, batch = make("bert")
    small = _prune_half(model, batch).eval()
    torch._dynamo.reset()
    c = torch.compile(small, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for b_, n in ((3, 11), (5, 9), (2, 13)):
            x = bert_batch(b_, batch=b_, seq=n)
            _close(_run("bert", c, x), _run("bert", small, x))


def test_bert_encoder_mask_hook_is_on_pruned_models_and_survives_save_and_load(tmp_path):
    model, batch, _ = _build("bert")
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=12)
    small = spp.prune(model, path.masks(keep=0.5))
    spp.detach(model)

    def hooks(m):
        return [h for h in m.encoder._forward_pre_hooks.values() if h.__name__ == "_one_mask_hook"]

    assert len(hooks(small)) == 1 and not hooks(model)  # the dense model is left as it was
    spp.save_pruned(small, str(tmp_path / "p"))
    loaded = spp.load_pruned(str(tmp_path / "p")).eval()
    assert len(hooks(loaded)) == 1
    torch._dynamo.reset()
    graphs: list = []
    c = torch.compile(loaded, backend=_recording(graphs), fullgraph=True)
    with torch.no_grad():
        _close(_run("bert", c, batch), _run("bert", small.eval(), batch))
    assert sum("spp_layers.one_mask" in o for o in _ops(graphs)) == 1
    with torch.no_grad():  # eager: the hook changes nothing (the mask reaches the layers as it was)
        seen = []
        h = loaded.encoder.layer[0].attention.self.register_forward_pre_hook(
            lambda mod, args, kw: seen.append(kw.get("attention_mask", args[1] if len(args) > 1 else None)),
            with_kwargs=True)
        loaded(**batch)
        h.remove()
    assert seen and seen[0].dtype == torch.bool and seen[0].shape[-1] == batch["input_ids"].shape[1]
