"""Compile every Triton kernel of spp_kernels for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter tests check what the kernels compute but never run Triton's compiler, so a kernel
that the interpreter accepts may still fail to compile for a GPU (a dot on tiles under 16, a type
the code generator rejects, too much shared memory for a tile size). This closes that gap in two
phases:

    record:  under TRITON_INTERPRET=1, run a small workload through every op (every dtype,
             activation, bias / active / grad variant, attention mask and ragged widths) and write
             each distinct kernel specialisation that was launched (argument types + constexprs)
    compile: without the interpreter, build each one with triton.compile for GPUTarget cuda:90
             down to a cubin (Triton's bundled ptxas), and report the failures

    python tests/triton_compile_check.py record SPECS.json     (TRITON_INTERPRET=1 set first)
    python tests/triton_compile_check.py compile SPECS.json [--cover]

``--cover`` compiles only a subset in which every constexpr value and argument type of each
kernel occurs at least once (the default suite); without it every specialisation (the slow one).

The constexprs are those a GPU launch passes where they differ from the interpreter's: tiles are
not cast to fp32 for the dot (``F32_DOT``) and fp32 dots ask for IEEE precision (``IEEE``).
"""
from __future__ import annotations

import importlib
import inspect
import json
import sys

TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int32": "i32",
                   "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _is_constexpr(param) -> bool:
    ann = param.annotation
    return ann is not inspect.Parameter.empty and "constexpr" in (ann if isinstance(ann, str) else repr(ann))


def _spec(fn, args, kwargs) -> dict:
    import torch

    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    signature, constexprs = {}, {}
    tile = None
    for name, param in sig.parameters.items():
        if name not in bound.arguments:
            continue
        v = bound.arguments[name]
        if _is_constexpr(param) or v is None:
            signature[name] = "constexpr"
            constexprs[name] = v.value if hasattr(v, "value") else v
        elif isinstance(v, torch.Tensor):
            dt = str(v.dtype).replace("torch.", "")
            signature[name] = "*" + TORCH_TO_TRITON[dt]
            if tile is None and v.is_floating_point():
                tile = dt
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    # what a GPU launch passes (see spp_kernels.triton._common.dot_flags)
    if "F32_DOT" in constexprs:
        constexprs["F32_DOT"] = False
    if "IEEE" in constexprs:
        constexprs["IEEE"] = tile == "float32"
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def record(out_path: str) -> int:
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    if not getattr(importlib.import_module("spp_kernels.triton._common"), "INTERPRET"):
        raise SystemExit("record needs TRITON_INTERPRET=1 set before triton is imported")
    specs = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        s = _spec(self.fn, args, kwargs)
        specs[json.dumps(s, sort_keys=True, default=str)] = s
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        _workload(torch)
    finally:
        InterpretedFunction.run = original
    with open(out_path, "w") as fh:
        json.dump(list(specs.values()), fh, indent=1, default=str)
    print(f"{len(specs)} kernel specialisations recorded")
    return 0


def _workload(torch) -> None:
    from spp_kernels.triton import attention as A, inclusion_step as I, masked_linear as ML, pair_matmul as PM

    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32, grad=False):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype).requires_grad_(grad)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        acts = (None, "gelu", "gelu_tanh", "relu", "silu") if dtype == torch.float32 else ("gelu", "silu")
        for act in acts:
            for bias, w_grad in ((True, False), (False, True)):
                x, W = r(7, 40, dtype=dtype, grad=True), r(52, 40, dtype=dtype, grad=w_grad)
                b = r(52, dtype=dtype, grad=w_grad) if bias else None
                m = torch.rand(13, generator=g).requires_grad_()
                y = ML.masked_linear(x, W, b, m, torch.arange(52) % 13, act)
                y.float().sum().backward()
                for active in (None, torch.tensor([3, 0, 17, 9])):
                    x = r(7, 40, dtype=dtype, grad=True)
                    W1, W2 = r(24, 40, dtype=dtype, grad=w_grad), r(33, 24, dtype=dtype, grad=w_grad)
                    b1 = r(24, dtype=dtype, grad=w_grad) if bias else None
                    b2 = r(33, dtype=dtype, grad=w_grad) if bias else None
                    m = torch.rand(24, generator=g).requires_grad_()
                    PM.pair_matmul(x, W1, b1, m, W2, b2, act, active).float().sum().backward()
        for mask, causal in ((None, False), ("pad", False), (None, True)):
            q, k, v = r(2, 3, 9, 20, dtype=dtype, grad=True), r(2, 3, 9, 20, dtype=dtype, grad=True), \
                r(2, 3, 9, 13, dtype=dtype, grad=True)
            keys = None if mask is None else torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
            A.attention(q, k, v, 0.3, keys, causal).float().sum().backward()
        q, k, v = r(1, 2, 9, 20, dtype=dtype, grad=True), r(1, 2, 9, 20, dtype=dtype, grad=True), \
            r(1, 2, 9, 13, dtype=dtype, grad=True)
        A.attention_ragged(q, k, v, 0.3, torch.tensor([20, 7]), torch.tensor([5, 13])).float().sum().backward()
    n = 300
    for mode in ("nonneg", "signed"):
        for optimizer in ("adamw", "sgd"):
            for record_ in (False, True):
                st = [torch.ones(n), torch.randn(n, generator=g), torch.zeros(n), torch.zeros(n), torch.zeros(n),
                      torch.zeros(n), torch.full((n,), -1, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)]
                I.inclusion_step(*st, 3, lam=0.1, mode=mode, optimizer=optimizer, record=record_)


def cover(specs: list[dict]) -> list[dict]:
    """A subset in which, per kernel, every constexpr value and every argument type that occurs
    anywhere occurs at least once (greedy; the full set compiles in minutes on 2 cores)."""
    seen, out = set(), []
    for s in specs:
        kernel = (s["module"], s["name"])
        traits = {(kernel, "c", k, json.dumps(v, default=str)) for k, v in s["constexprs"].items()}
        traits |= {(kernel, "t", k, v) for k, v in s["signature"].items()}
        if not traits <= seen:
            seen |= traits
            out.append(s)
    return out


def compile_all(specs_path: str, subset: bool = False) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if getattr(importlib.import_module("spp_kernels.triton._common"), "INTERPRET"):
        raise SystemExit("compile must run without TRITON_INTERPRET")
    with open(specs_path) as fh:
        specs = json.load(fh)
    if subset:
        specs = cover(specs)
    target = GPUTarget("cuda", 90, 32)
    failures = []
    for s in specs:
        fn = getattr(importlib.import_module(s["module"]), s["name"])
        try:
            src = ASTSource(fn, s["signature"], constexprs=s["constexprs"])
            kernel = triton.compile(src, target=target, options=s["options"] or None)
            if not kernel.asm.get("cubin"):
                raise RuntimeError("no cubin produced")
        except Exception as exc:  # noqa: BLE001  (every failure is reported, not just the first)
            failures.append(f"{s['module']}.{s['name']} {s['constexprs']}: {type(exc).__name__}: {exc}"[:2000])
    print(f"compiled {len(specs) - len(failures)} of {len(specs)} kernel specialisations for sm_90")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) not in (2, 3) or argv[0] not in ("record", "compile") or argv[2:] not in ([], ["--cover"]):
        raise SystemExit(__doc__)
    sys.exit(record(argv[1]) if argv[0] == "record" else compile_all(argv[1], subset=argv[2:] == ["--cover"]))
