"""Tables and plots from the committed benchmark CSVs (nothing is re-measured here).

    python benchmarks/report.py                # print the markdown tables, write the PNGs
    python benchmarks/report.py --readme       # also replace the results block of README.md

Plots next to the CSVs: pair_matmul time against the kept fraction
(``kernels_<device>_pair_matmul*.png``) and the attention comparison (``attention_<device>.png``);
``bench_pruned_vs_dense.py`` draws its own; the other kernels are tables only. Rows of different
devices are never mixed: each table and plot is per device, and its title names the device.
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN, END = "<!-- results:begin (benchmarks/report.py --readme) -->", "<!-- results:end -->"


def read(path: str) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def num(v) -> float:
    return float(v)


def fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}g}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- kernels
def kernel_tables(path: str) -> list[str]:
    rows = read(path)
    by_dev = collections.defaultdict(list)
    for r in rows:
        by_dev[r["device"]].append(r)
    parts = []
    for dev, rs in by_dev.items():
        for dt in sorted({r["dtype"] for r in rs if r["op"] == "pair_matmul"}):
            pm = [r for r in rs if r["op"] == "pair_matmul" and r["metric"] == "time_ms" and r["dtype"] == dt]
            if not pm:
                continue
            shapes = sorted({r["shape"] for r in pm}, key=lambda s: -float(re.search(r"f=([\d.]+)", s).group(1)))
            provs = sorted({r["provider"] for r in pm})
            dense = {r["shape"].split(",f=")[0]: num(r["value"]) for r in pm if r["provider"] == "dense_F.linear"}
            body = []
            for s in shapes:
                f = float(s.split("f=")[1])
                base = dense.get(s.split(",f=")[0])
                cells = []
                for p in provs:
                    v = [num(r["value"]) for r in pm if r["shape"] == s and r["provider"] == p]
                    cells.append(f"{fmt(v[0])} ms" + (f" ({v[0] / base:.2f})" if v and base else "") if v else "—")
                body.append([f"{f:g}"] + cells + [f"{f + 0.15:.2f}"])
            parts.append(f"**pair_matmul** ({dev}; {shapes[0].split(',f=')[0]}, {dt}; time, in brackets ÷ dense "
                         f"F.linear pair at f = 1):\n\n" + table(["kept f"] + provs + ["target ≤"], body))
        inc = [r for r in rs if r["op"] == "inclusion_step"]
        if inc:
            body = []
            for r in inc:
                if r["metric"] in ("speedup", "bandwidth_fraction") or r["provider"].startswith("ext_vs"):
                    body.append([r["shape"], r["provider"], r["metric"], fmt(num(r["value"]))])
            if body:
                parts.append(f"**inclusion_step** ({dev}; ratios measured side by side):\n\n"
                             + table(["arena", "comparison", "metric", "value"], body))
        ml = [r for r in rs if r["op"] == "masked_linear"]
        if ml:
            body = [[r["shape"], r["dtype"], r["provider"], r["metric"], fmt(num(r["value"]))] for r in ml]
            parts.append(f"**masked_linear** ({dev}):\n\n" + table(["shape", "dtype", "provider", "metric", "value"],
                                                                     body))
        li = [r for r in rs if r["op"] == "linear" and r["metric"] == "fwd_ms"]
        if li:
            shapes = list(dict.fromkeys(r["shape"] for r in li))
            val = {(r["shape"], r["provider"]): num(r["value"]) for r in li}
            body = [[s, f"{fmt(val[s, 'F.linear'])} ms", f"{fmt(val[s, 'spp_kernels.linear'])} ms",
                     f"{val[s, 'F.linear'] / val[s, 'spp_kernels.linear']:.2f}x"]
                    for s in shapes if (s, "F.linear") in val and (s, "spp_kernels.linear") in val]
            parts.append(f"**linear** ({dev}; `spp_kernels.linear`, what pruned layers call, vs `F.linear` + activation, "
                         "side by side; T rows × K in → N out):\n\n"
                         + table(["shape", "F.linear", "spp_kernels.linear", "speed-up"], body))
        ss = [r for r in rs if r["op"] == "search_step"]
        if ss:
            body = [[r["shape"], r["provider"], r["metric"], fmt(num(r["value"]))] for r in ss]
            parts.append(f"**search step** ({dev}):\n\n" + table(["model", "backend", "metric", "value"], body))
    return parts


def kernel_plots(path: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = read(path)
    stem = os.path.splitext(path)[0]
    groups = sorted({(r["device"], r["dtype"]) for r in rows if r["op"] == "pair_matmul"})
    for dev, dt in groups:
        pm = [r for r in rows if r["device"] == dev and r["dtype"] == dt and r["op"] == "pair_matmul"
              and r["metric"] == "time_ms"]
        if not pm:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        dense = max(num(r["value"]) for r in pm if r["provider"] == "dense_F.linear") if any(
            r["provider"] == "dense_F.linear" for r in pm) else None
        for p in sorted({r["provider"] for r in pm} - {"dense_F.linear"}):
            pts = sorted((float(r["shape"].split("f=")[1]), num(r["value"])) for r in pm if r["provider"] == p)
            ax.plot([f for f, _ in pts], [v / dense if dense else v for _, v in pts], "o-", label=p)
        fs = [0.1, 1.0]
        ax.plot(fs, [f + 0.15 for f in fs], "k--", lw=1, label="target f + 0.15")
        ax.plot(fs, fs, "k:", lw=1, label="ideal f")
        ax.set_xlabel("kept fraction f")
        ax.set_ylabel("time / dense pair time" if dense else "ms")
        ax.set_title(f"pair_matmul vs kept fraction ({dt})\n{dev}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out = f"{stem}_pair_matmul.png" if len(groups) == 1 else \
            f"{stem}_pair_matmul_{dt}_{re.sub(r'[^a-z0-9]+', '_', dev.lower())}.png"
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written


# ---------------------------------------------------------------------------- attention
def attention_tables(path: str) -> list[str]:
    rows = read(path)
    parts = []
    for dev in sorted({r["device"] for r in rows}):
        rs = [r for r in rows if r["device"] == dev]
        shapes = list(dict.fromkeys(r["shape"] for r in rs))
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        for metric in [m for m in dict.fromkeys(r["metric"] for r in rs) if m.endswith("speedup")]:
            body = []
            for s in shapes:
                cells = []
                for p in provs:
                    v = [num(r["value"]) for r in rs if r["shape"] == s and r["provider"] == p and r["metric"] == metric]
                    cells.append(fmt(v[0]) if v else "—")
                if any(c != "—" for c in cells):
                    body.append([s] + cells)
            used = [i for i, p in enumerate(provs) if any(row[1 + i] != "—" for row in body)]
            body = [[row[0]] + [row[1 + i] for i in used] for row in body]
            parts.append(f"**attention, {metric}** ({dev}; ratios of times measured side by side):\n\n"
                         + table(["shape"] + [provs[i] for i in used], body))
    return parts


def attention_plot(path: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read(path) if r["metric"] == "fwd_ms"]
    if not rows:
        return []
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shapes)), 4))
    w = 0.8 / len(provs)
    for i, p in enumerate(provs):
        ys = []
        for s in shapes:
            v = [num(r["value"]) for r in rows if r["shape"] == s and r["provider"] == p]
            ys.append(v[0] if v else 0.0)
        ax.bar([j + i * w for j in range(len(shapes))], ys, width=w, label=p)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))])
    ax.set_xticklabels([s.replace(" ", "\n", 1) for s in shapes], fontsize=6, rotation=30)
    ax.set_ylabel("forward ms")
    ax.set_title(f"attention on pruned widths\n{rows[0]['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


# ---------------------------------------------------------------------------- pruned vs dense
def pruned_tables(path: str) -> list[str]:
    rows = read(path)
    if not rows:
        return []
    dev = rows[0]["device"]
    mallocs = sorted({r.get("malloc") or "not recorded" for r in rows})
    dev += f"; malloc: {', '.join(mallocs)}"
    linears = sorted({r.get("linear") or "aten (not recorded)" for r in rows})
    dev += f"; pruned layers' linears: {', '.join(linears)}"
    bursts = sorted({r.get("burst") or "1 (not recorded)" for r in rows})
    dev += f"; calls per turn: {', '.join(bursts)}"
    compiled = sorted({r.get("compile") or "" for r in rows} - {""})
    if compiled:
        dev += f"; every model under torch.compile ({', '.join(compiled)})"
    body = [[r["model"], r["dtype"], r["seq"], r["batch"], r["target"], r["round_to"], fmt(num(r["flops_ratio"])),
             fmt(num(r["dense_per_s"]), 4), fmt(num(r["pruned_per_s"]), 4), f"{num(r['speedup']):.2f}x",
             f"{num(r['ideal_speedup']):.2f}x", f"{num(r['efficiency']):.2f}", _opt(r, "efficiency_vs_full_width"), _opt(r, "proportional")] for r in rows]
    return [f"**dense vs pruned throughput** ({dev}; side by side, the models taking turns of that many "
            f"consecutive calls, each timed but the first of a turn of 2 or more; `results/{os.path.basename(path)}`; vs full width: "
            "speedup / ideal against the model through the same layers at full width; proportional: what that "
            "would be if the pairs took exactly their FLOPs share of the full-width time over the measured time "
            "of the model pruned to one unit per pair, the part that does not shrink; see `spp/bench.py`):\n\n"
            + table(["model", "dtype", "seq", "batch", "target", "round_to", "FLOPs ratio", "dense /s", "pruned /s", "speedup",
                     "ideal", "speedup / ideal", "vs full width", "proportional"], body)]


def _opt(r: dict, key: str) -> str:
    """A column older CSVs lack: '-' there (and where it is NaN)."""
    c = num(r.get(key) or "nan")
    return "-" if c != c else f"{c:.2f}"


def memory_tables(path: str) -> list[str]:
    rows = read(path)
    if not rows:
        return []
    body = [[r["model"], r["dtype"], f"{r['batch']} x {r['seq']}", r["checkpointing"], r["weights_gb"], r["peak_gb"],
             r["s_per_step"]] for r in rows]
    return [f"**search step memory** ({rows[0]['device']}):\n\n"
            + table(["model", "dtype", "batch x seq", "checkpointing", "weights GB", "peak GB", "s / step"], body)]


def compile_tables(path: str) -> list[str]:
    rows = read(path)
    if not rows:
        return []
    r0 = rows[0]
    body = [[r["model"], r["batch"], r["variant"], fmt(num(r["flops_ratio"])), fmt(num(r["eager_per_s"]), 4),
             fmt(num(r["compiled_per_s"]), 4), f"{num(r['compiled_vs_eager']):.2f}x", r["compile_s"], r["max_abs_diff"]]
            for r in rows]
    opts = r0.get("options") or ""
    return [f"**eager vs torch.compile** ({r0['device']}, {r0['dtype']}, {r0['threads']} threads, backend "
            f"{r0['backend']}{' with ' + opts if opts else ''}; each model eager and compiled side by side in one run, the compile time in its first "
            f"call; `results/{os.path.basename(path)}`, `benchmarks/bench_compile.py`):\n\n"
            + table(["model", "batch", "variant", "FLOPs ratio", "eager /s", "compiled /s", "compiled / eager",
                     "compile s", "max abs diff"], body)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="replace the results block of README.md")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args()
    parts, pngs = [], []
    for p in sorted(glob.glob(os.path.join(RESULTS, "pruned_vs_dense_*.csv"))):
        parts += pruned_tables(p)
    for p in sorted(glob.glob(os.path.join(RESULTS, "compile_*.csv"))):
        parts += compile_tables(p)
    for p in sorted(glob.glob(os.path.join(RESULTS, "kernels_*.csv"))):
        parts += kernel_tables(p)
        if not a.no_plots:
            pngs += kernel_plots(p)
    for p in sorted(glob.glob(os.path.join(RESULTS, "search_memory_*.csv"))):
        parts += memory_tables(p)
    for p in sorted(glob.glob(os.path.join(RESULTS, "attention_*.csv"))):
        parts += attention_tables(p)
        if not a.no_plots:
            pngs += attention_plot(p)
    text = "\n\n".join(parts)
    print(text)
    for p in pngs:
        print(f"wrote {os.path.relpath(p)}")
    if a.readme:
        with open(README) as fh:
            readme = fh.read()
        if BEGIN not in readme or END not in readme:
            raise SystemExit(f"README.md has no results block ({BEGIN} ... {END})")
        head, rest = readme.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(README, "w") as fh:
            fh.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        print("README.md results block updated")


if __name__ == "__main__":
    main()
