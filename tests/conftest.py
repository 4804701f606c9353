"""Hypothesis profiles for the fuzz tests (tests/test_fuzz.py).

``quick`` (the default, used by ``make test``): a few examples per property, derandomized so the
default suite is deterministic and fast. ``slow`` (``SPP_HYPOTHESIS_PROFILE=slow``, set by
``make test-slow``): >= 200 random examples per property.

``bert_dir``: a tiny BERT saved as a Hugging Face folder, with the CLI's inputs around it.
"""
# Triton runs on CPU only under its interpreter, which must be chosen before triton is imported
# (spp_kernels imports it): set it here, first, when no CUDA device is available.
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
# prune's default rounding is 8 units on machines with CUDA, 1 elsewhere: the tests expect 1
_os.environ.setdefault("SPP_ROUND_TO", "1")

import os
import warnings

import pytest
import torch

try:  # the fuzz tests need hypothesis; a machine without it (a bare GPU image) still runs the rest
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
if settings is not None:
    _COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   print_blob=True)
    settings.register_profile("quick", max_examples=20, derandomize=True, database=None, **_COMMON)
    settings.register_profile("slow", max_examples=250, **_COMMON)
    settings.load_profile(os.environ.get("SPP_HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A tiny BERT with the embedded model's tokenizer, saved as a Hugging Face folder."""
    import transformers

    from spp import cli
    from spp.embedded import minilm_dir

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(d / "bert"))
    tok.save_pretrained(str(d / "bert"))
    torch.manual_seed(0)
    transformers.BertModel(cfg).double().save_pretrained(str(d / "bert64"))
    tok.save_pretrained(str(d / "bert64"))
    gcfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    transformers.GPT2Model(gcfg).save_pretrained(str(d / "gpt2"))
    tok.save_pretrained(str(d / "gpt2"))
    text = d / "s.txt"
    text.write_text("\n".join(f"Sentence {i} is about reading files and parsing {i % 5} modules." for i in range(40)))
    (d / "empty.txt").write_text("\n\n")
    (d / "a-file").write_text("x")
    # a finished search of the tiny BERT, to resume with other settings and to prune
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degenerate", category=RuntimeWarning)
        code = cli.main(["search", "--model", str(d / "bert"), "--text", str(text), "--out", str(d / "done"),
                         "--steps", "4", "--sentences", "16", "--no-progress"])
    assert code == 0
    (d / "corrupt").mkdir()
    (d / "corrupt" / "path.json").write_bytes(b"{\"format\": \"spp-path\", \"vers")
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny GEMMs on a shared 2-core box: waking a second thread costs more than the work."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
