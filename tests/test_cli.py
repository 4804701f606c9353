"""The spp command line: real runs and one-line errors without tracebacks."""
import subprocess
import sys

import pytest


def spp(*args, timeout=300, cwd=None):
    return subprocess.run([sys.executable, "-m", "spp", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def test_info_lists_backends_and_families():
    r = spp("info")
    assert r.returncode == 0, r.stderr
    for op in ("masked_linear", "pair_matmul", "inclusion_step"):
        assert op in r.stdout
    assert "bert" in r.stdout and "timm_vit" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["prune", "--path", "/nonexistent/path", "--out", "/tmp/x", "--params", "0.5"], "no such file"),
    (["prune", "--path", "p", "--out", "o", "--params", "1.5"], "(0, 1]"),
    (["prune", "--path", "p", "--out", "o", "--keep", "abc"], "(0, 1]"),
    (["prune", "--path", "p", "--out", "o"], "one of the arguments"),
    (["search", "--out", "o", "--steps", "0"], "positive integer"),
    (["search", "--out", "o", "--text", "/nonexistent.txt"], "--text"),
    (["search", "--out", "o", "--model", "/nonexistent_model_dir"], "--model"),
    (["demo", "--bogus"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_one_line_no_traceback(args, needle, tmp_path):
    r = spp(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert list(tmp_path.iterdir()) == []  # a rejected command leaves no output folder behind
    assert "Traceback" not in r.stderr
    assert needle in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(("spp", "usage")) or "error" in r.stderr


def test_search_then_prune_roundtrip(tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("\n".join(f"Sentence number {i} talks about parsing files and {i % 7} modules." for i in range(40)))
    r = spp("search", "--text", str(text), "--out", str(tmp_path / "path"), "--steps", "12", "--sentences", "32",
            "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "units entered" in r.stdout
    r = spp("prune", "--path", str(tmp_path / "path"), "--out", str(tmp_path / "small"), "--params", "0.5",
            "--round-to", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    import spp as lib
    small = lib.load_pruned(str(tmp_path / "small"))
    widths = small.__dict__["_spp_pruned"]["widths"]
    assert all(w % 8 == 0 for w in widths.values())
    # a folder that is not a Hugging Face checkpoint: a one-line error, no traceback
    r = spp("prune", "--path", str(tmp_path / "path"), "--out", str(tmp_path / "x"), "--params", "0.5",
            "--model", str(tmp_path / "small"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_prune_finetune_eval_flow(tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("\n".join(f"Function {i} returns the parsed value of field {i % 5} or raises an error." for i in range(80)))
    assert spp("search", "--text", str(text), "--out", str(tmp_path / "path"), "--steps", "8", "--sentences", "32",
               "--no-progress").returncode == 0
    small = tmp_path / "spp@0.5"
    assert spp("prune", "--path", str(tmp_path / "path"), "--out", str(small), "--params", "0.5").returncode == 0
    tuned = tmp_path / "spp@0.5-ft"
    r = spp("finetune", "--pruned", str(small), "--out", str(tuned), "--text", str(text), "--steps", "4",
            "--batch-size", "8", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out distillation loss" in r.stdout
    r = spp("eval", "--pruned", str(small), str(tuned), "--out", str(tmp_path / "ev"), "--text", str(text),
            "--sentences", "24", "--repeats", "1", "--bench-batch", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    rows = json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"]
    assert [(r["name"], r["stage"]) for r in rows] == [("spp@0.5", "pruned"), ("spp@0.5-ft", "finetuned")]
    for r in rows:
        assert abs(r["pair_params_kept"] - 0.5) < 0.01 and 0 < r["cosine"] <= 1.0 and r["speedup"] > 0
    assert (tmp_path / "ev" / "eval.png").stat().st_size > 0 and (tmp_path / "ev" / "eval.csv").stat().st_size > 0
    r = spp("eval", "--pruned", str(tmp_path / "nope"), "--out", str(tmp_path / "ev2"))
    assert r.returncode == 2 and "--pruned" in r.stderr and "Traceback" not in r.stderr
