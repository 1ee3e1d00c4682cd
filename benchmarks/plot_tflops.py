"""Effective TFLOP/s against sequence length, one panel per benchmark pattern, attnc beside
FlexAttention (and SDPA's cuDNN / flash backends on dense causal), forward and forward+backward.

    python3 benchmarks/plot_tflops.py benchmarks/runs/RUN_A.jsonl [RUN_B.jsonl ...] --out tflops_vs_seq.png

Reads the rows ``benchmarks/bench_all.py`` writes (``bench.jsonl``); when a (pattern, N) appears in
several files the last one wins, so a later run can replace some lengths of an earlier one. Rows whose
correctness check failed are not drawn; rows timed without a check (``--no-check``) are.
"""
import argparse
import json
from pathlib import Path

SERIES = [  # (row key prefix, label, colour, line style)
    ("attnc", "attnc", "tab:blue", "-"),
    ("flex", "FlexAttention", "tab:orange", "--"),
    ("cudnn", "SDPA cuDNN (causal)", "tab:green", ":"),
    ("flash", "SDPA flash (causal)", "tab:red", ":"),
]


def load_rows(paths: list[Path]) -> dict:
    rows = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("check", "ok") not in ("ok", "skipped") or "pattern" not in row:
                continue
            rows[(row["pattern"], row["N"])] = row
    return rows


def plot(rows: dict, out: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(p for p, _ in sorted(rows, key=lambda x: x[1])))
    fig, axes = plt.subplots(2, len(patterns), figsize=(3.1 * len(patterns), 6.4), squeeze=False)
    for col, pattern in enumerate(patterns):
        lengths = sorted(n for p, n in rows if p == pattern)
        for line, kind in enumerate(("fwd", "fwdbwd")):
            ax = axes[line][col]
            for key, label, colour, style in SERIES:
                ys = [rows[(pattern, n)].get(f"{key}_{kind}_tflops") for n in lengths]
                pts = [(n, y) for n, y in zip(lengths, ys) if y]
                if pts:
                    ax.plot(*zip(*pts), style, color=colour, marker="o", ms=3.5, lw=1.6, label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths)
            ax.set_xticklabels([f"{n // 1024}k" for n in lengths], fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            if line == 0:
                dens = rows[(pattern, lengths[-1])].get("density")
                ax.set_title(f"{pattern}\n(density {dens:.3f} at {lengths[-1] // 1024}k)" if dens else pattern,
                             fontsize=9)
            if col == 0:
                ax.set_ylabel(("forward" if kind == "fwd" else "forward + backward") + "\neffective TFLOP/s")
            if line == 1:
                ax.set_xlabel("sequence length (batch x length = 32k tokens)", fontsize=8)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    if title:
        fig.suptitle(title, y=0.005, va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))
    fig.savefig(out, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jsonl", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("tflops_vs_seq.png"))
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    rows = load_rows(args.jsonl)
    if not rows:
        raise SystemExit("no rows with a passing check in " + ", ".join(map(str, args.jsonl)))
    plot(rows, args.out, args.title)
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
