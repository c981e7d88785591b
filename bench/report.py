"""The results file (bench/results/latest.json), the table printed at the end, and the plots."""
from __future__ import annotations

import json
from pathlib import Path


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def table(results: dict) -> str:
    lines = [f"splitserve bench — {results['date']} — {results['machine']} — {results['model']} "
             f"{results['dtype']} on {results['device']}", ""]
    limits = results.get("limits")
    if limits:
        rates = ", ".join(f"{k} {v:.4g}" for k, v in limits["fma_gflops"].items())
        lines += ["[limits] (figures below: [x% roof] = the floor this CPU allows ÷ the measured time)",
                  f"  memory bandwidth {limits['memory_bandwidth_gb_s']:.4g} GB/s (copy); fp32 GFLOP/s: {rates}",
                  f"  weights a batch-1 decode step reads {limits['model']['weight_bytes'] / 1e6:.1f} MB: floor "
                  f"{limits['batch1_floor_ms']:.3g} ms/token; compute ceiling "
                  f"{limits['compute_ceiling_tokens_per_s']:.4g} tokens/s", ""]
    for name, scenario in results["scenarios"].items():
        lines.append(f"[{name}]")
        if scenario.get("llama_server_missing"):
            lines.append(f"  llama-server: n/a ({scenario['llama_server_missing']})")
        if scenario.get("error"):
            lines.append(f"  failed: {scenario['error']}")
        roofline = scenario.get("roofline") or {}
        for system, figures in scenario["systems"].items():
            fractions = roofline.get(system) or {}
            shown = ", ".join(f"{k}={_fmt(v)}{_roof(fractions.get(k))}" for k, v in figures.items()
                              if not k.endswith("_spread")) if figures else "not installed"
            lines.append(f"  {system:<28} {shown}")
            spreads = ", ".join(f"{k.removesuffix('_spread')} {_fmt(v[0])}-{_fmt(v[1])}"
                                for k, v in (figures or {}).items() if k.endswith("_spread"))
            if spreads:
                lines.append(f"  {'':<28} spread over rounds: {spreads}")
        for key, value in scenario["ratios"].items():
            lines.append(f"  ratio {key:<40} {_fmt(value)}")
        lines.append("")
    return "\n".join(lines)


def _roof(fraction: float | None) -> str:
    return "" if fraction is None else f" [{fraction:.0%} roof]"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def plot(results: dict, folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    concurrency = {int(name.split("_")[1]): s for name, s in results["scenarios"].items()
                   if name.startswith("concurrency_")}
    if concurrency:
        fig, ax = plt.subplots(figsize=(6, 4))
        levels = sorted(concurrency)
        for system in ("splitserve", "hf_static_batch", "hf_continuous_batching", "hf_generate_bs1"):
            values = [concurrency[c]["systems"].get(system, {}).get("tokens_per_s") for c in levels]
            if any(v is not None for v in values):
                ax.plot(levels, values, marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("output tokens / s")
        ax.set_title("Throughput vs concurrency")
        ax.legend()
        fig.tight_layout()
        written.append(folder / "throughput_vs_concurrency.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    lengths = results["scenarios"].get("ttft_vs_prompt_length")
    if lengths:
        fig, ax = plt.subplots(figsize=(6, 4))
        for system, figures in lengths["systems"].items():
            points = sorted((int(k.split("_")[1]), v) for k, v in figures.items())
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (s)")
        ax.set_title("Time to first token vs prompt length")
        ax.legend()
        fig.tight_layout()
        written.append(folder / "ttft_vs_prompt_length.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
