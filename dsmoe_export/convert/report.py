"""The conversion report: calibration.md (tables), calibration.json and calibration.png."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def report_markdown(report: dict) -> str:
    lines = [f"# Conversion report: {report['source']}", "",
             f"dsmoe: `{json.dumps(report['dsmoe'])}`; router init `{report['router_init']}`, "
             f"regroup `{report['regroup']}`, allocation `{report.get('allocation_mode', 'uniform')}`, "
             f"seed {report['seed']}; held-out {report.get('eval_tokens', 0)} tokens "
             f"in windows of {report['seq_len']}.", "",
             "| model | perplexity | vs dense | FFN active fraction |", "|---|---|---|---|",
             f"| dense | {report['dense']['ppl']:.3f} | 1.000 | 1.000 |"]
    stages = [s for s in ("converted", "calibrated") if s in report]
    for s in stages:
        r = report[s]
        label = "converted (before calibration)" if s == "converted" else "calibrated"
        lines.append(f"| {label} | {r['ppl']:.3f} | {r['ppl'] / report['dense']['ppl']:.3f} | {r['mean_active']:.3f} |")
    if "training" in report:
        t = report["training"]
        sched = "" if t.get("target_start") is None else f" (annealed from {t['target_start']:g})"
        experts = t["train_experts"] if t["train_experts"] == "none" else f"{t['train_experts']} (lr {t['expert_lr']:g})"
        done = t.get("steps_done", t["steps"])
        steps = f"{t['steps']} steps" if done == t["steps"] else f"{done} of {t['steps']} steps (time budget)"
        lines += ["", f"Calibration: {steps} x batch {t['batch']}, lr {t['lr']:g}, sparsity weight "
                      f"{t['sparsity_weight']:g}, target {t['target_active']}{sched}, bias control "
                      f"{t.get('control', False)}, distill {t['distill']}, experts trained {experts}: "
                      f"{t['seconds']:.0f}s wall, {t.get('cpu_seconds', 0):.0f}s CPU, {t.get('threads', 0)} threads."]
    lines += ["", "Active fraction per layer:", "",
              "| layer | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for i in range(len(report[stages[0]]["active"])):
        lines.append(f"| {i} | " + " | ".join(f"{report[s]['active'][i]:.3f}" for s in stages) + " |")
    if report.get("tradeoff"):
        lines += ["", "Trade-off (one router-bias shift per layer to the target on the calibration text):", "",
                  "| target | active fraction | perplexity | vs dense |", "|---|---|---|---|"]
        for p in report["tradeoff"]:
            lines.append(f"| {p['target']:.2f} | {p['mean_active']:.3f} | {p['ppl']:.3f} | "
                         f"{p['ppl'] / report['dense']['ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    (out / "calibration.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "calibration.md").write_text(report_markdown(report), encoding="utf-8")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[dsmoe-convert] matplotlib not installed: no calibration.png (pip install '.[bench]')", file=sys.stderr)
        return
    stages = [s for s in ("converted", "calibrated") if s in report]
    ncols = 2 if report.get("tradeoff") else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    for s in stages:
        ax.plot(report[s]["active"], marker="o", label=f"{s} (ppl {report[s]['ppl']:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN active fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"dense ppl {report['dense']['ppl']:.2f}")
    ax.legend()
    if report.get("tradeoff"):
        ax = axes[0][1]
        pts = sorted(report["tradeoff"], key=lambda p: p["mean_active"])
        ax.plot([p["mean_active"] for p in pts], [p["ppl"] for p in pts], marker="o", label="converted model")
        ax.axhline(report["dense"]["ppl"], color="gray", ls="--", label="dense")
        ax.axhline(1.2 * report["dense"]["ppl"], color="gray", ls=":", label="dense + 20%")
        ax.set_xlabel("FFN active fraction")
        ax.set_ylabel("held-out perplexity")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)
