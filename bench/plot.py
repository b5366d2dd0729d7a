"""The benchmark plot, read at a glance: per loss, bars of the speed-up over eager PyTorch
(forward, and forward+backward) and of the peak extra memory as a fraction of eager's, on
linear axes from zero, every bar labelled with its value; eager is the dashed line at 1.

    python bench/plot.py bench/results/cpu-....json [-o out.png]   # (re)draw from a results JSON
"""
import argparse
import json
from pathlib import Path

PANELS = (  # (row key, title, value of a row given eager's row)
    ("fwd_ms", "forward: speed-up over eager (x, higher is better)", lambda r, e: e["fwd_ms"] / r["fwd_ms"]),
    ("fwdbwd_ms", "forward+backward: speed-up over eager (x, higher is better)",
     lambda r, e: e["fwdbwd_ms"] / r["fwdbwd_ms"]),
    ("peak_bytes", "fwd+bwd peak extra memory / eager's (lower is better)",
     lambda r, e: r["peak_bytes"] / e["peak_bytes"] if e["peak_bytes"] > 0 else None),
)


def _bar_label(v, key):
    return f"{v:.2f}" if key == "peak_bytes" else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.patches
    import matplotlib.pyplot as plt

    losses = [name for name, v in results["losses"].items() if any("fwd_ms" in r for r in v["rows"])]
    if not losses:
        return
    # one colour per implementation across every panel
    impls_all = list(dict.fromkeys(r["impl"] for name in losses for r in results["losses"][name]["rows"]
                                   if "fwd_ms" in r and r["kind"] != "eager"))
    colour = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls_all)}
    height = 3.6 * len(losses) + 0.8  # + the title and legend band
    fig, axes = plt.subplots(len(losses), len(PANELS), figsize=(6.2 * len(PANELS), height), squeeze=False)
    for ax_row, name in zip(axes, losses):
        rows = [r for r in results["losses"][name]["rows"] if "fwd_ms" in r]
        cases = list(dict.fromkeys(f"{r['case']} {r['dtype']}" for r in rows))
        eager = {f"{r['case']} {r['dtype']}": r for r in rows if r["kind"] == "eager"}
        impls = [i for i in impls_all if any(r["impl"] == i for r in rows)]
        width = 0.8 / max(len(impls), 1)
        for ax, (key, title, value) in zip(ax_row, PANELS):
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, case in enumerate(cases):
                    r = next((r for r in rows if r["impl"] == impl and f"{r['case']} {r['dtype']}" == case), None)
                    v = value(r, eager[case]) if (r is not None and case in eager) else None
                    if v is not None:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(v)
                bars = ax.bar(xs, ys, width, label=impl, color=colour[impl])
                ax.bar_label(bars, labels=[_bar_label(v, key) for v in ys], fontsize=6, padding=1)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
            ax.set_ylim(bottom=0)
            ax.margins(y=0.12)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, fontsize=8)
            ax.set_title(f"{name}: {title}", fontsize=9)
    env = results["environment"]
    fig.suptitle(f"fusedloss on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, {env['date']}"
                 + ("  DRY RUN: not figures" if results.get("config", {}).get("dry_run") else ""), fontsize=10,
                 y=1 - 0.15 / height)
    handles = [matplotlib.patches.Patch(color=colour[i], label=i) for i in impls_all]
    handles.append(matplotlib.lines.Line2D([], [], color="black", linestyle="--", linewidth=0.8, label="eager = 1"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.4 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="a results JSON of run_all.py / a bench_*.py / gpu_bench.py")
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: the JSON's, .png)")
    args = p.parse_args()
    out = args.out or args.json.with_suffix(".png")
    plot(json.loads(args.json.read_text()), out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
