"""Render a bench_gpu.py results JSON as the markdown table for benchmarks/README.md.

    python -m benchmarks.render_table benchmarks/results/2026-11-25-h100-80gb-hbm3.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fmt(value, spec: str = ",.0f") -> str:
    if value is None:
        return "–"
    return format(value, ".1f" if spec == ",.0f" and value < 100 else spec)


def render_markdown(result: dict) -> str:
    v = result.get("versions", {})
    lines = [
        f"**{result['card']}**, {result['date']}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}, trl {v.get('trl')}, bitsandbytes {v.get('bitsandbytes')}; lengths: "
        f"{result.get('lengths')}",
        "",
        f"`{result.get('command')}`",
        "",
        "| bench | shape | recipe | tokens/s | ratio | peak GiB (allocated) | peak GiB (NVML) | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    ratios = result.get("ratios", {})
    for r in result["rows"]:
        key = f"{r['bench']}/{r['shape']}"
        ratio = ratios.get(key, {}).get("speedup") if r["recipe"] == "project" else None
        notes = []
        if r["bench"] == "train":
            notes.append(f"{r['examples']} ex x {r['epochs']}, {r['steps']} steps, pad {r['pad_fraction']:.0%}")
        else:
            notes.append(f"{r['questions']} q, batch {r['batch_size']}, {r['new_tokens']} new tok")
            if "exact_match" in r:
                notes.append(f"exact match {r['exact_match']:.0%} of {r['compared']}")
        if r["recipe"] == "project" and key in ratios:
            if "peak_ratio" in ratios[key]:
                notes.append(f"peak x{ratios[key]['peak_ratio']:.2f}")
            alt = ratios[key].get("vs_reference_no_ckpt")
            if alt:
                peak = f", peak x{alt['peak_ratio']:.2f}" if "peak_ratio" in alt else ""
                notes.append(f"vs reference-no-ckpt: {alt['speedup']:.1f}x speed{peak}")
        lines.append(
            f"| {r['bench']} | {r['shape']} | {r['recipe']} | {_fmt(r['tokens_per_s'])} | "
            f"{'–' if ratio is None else f'{ratio:.1f}x'} | {_fmt(r.get('peak_gib'), '.1f')} | "
            f"{_fmt(r.get('nvml_peak_gib'), '.1f')} | {'; '.join(notes)} |")
    met = []
    for k, e in ratios.items():
        if "meets_target" in e:
            verdict = "meets" if e["meets_target"] else "MISSES"
            if not e["meets_target"] and e.get("meets_speed_memory"):
                verdict = f"speed meets, exact match {e.get('exact_match', 0):.0%} misses"
            met.append(f"{k}: {verdict} ({e['target']})")
        alt = e.get("vs_reference_no_ckpt", {})
        if "meets_target" in alt:
            met.append(f"{k} vs reference-no-ckpt: {'meets' if alt['meets_target'] else 'MISSES'}")
    if met:
        lines += ["", "Targets: " + "; ".join(met) + "."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results JSON file(s)")
    args = ap.parse_args(argv)
    for path in args.results:
        print(render_markdown(json.loads(Path(path).read_text())))
        print()


if __name__ == "__main__":
    sys.exit(main())
