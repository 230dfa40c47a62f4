"""The attribute weight w of the flow-blend rule, measured on validation cases of the tiny attribute world.

    python benchmarks/attribute_weight.py [--weight W ...] [--variant NAME ...] [--case-seed N] [--cases N]
                                          [--size ci|full|gpu] [--work DIR] [--device D] [--bf16]

w scales every attribute's term w·(v(E_i,∅) − v(∅,∅)) against the prompt's s_T·(v(T,∅) − v(∅,∅)). The table's
evaluation uses one w for every encoder and baseline (ATTRIBUTE_SCALE in lab/world/pipeline.py). Choosing it on
the evaluation's own cases would fit the table to them, so this sweep draws *other* cases and noise (--case-seed,
default 100; the table uses the world's seed, 0) and evaluates personalization and composition of each trained
encoder (default: Omni-Attribute, the committed two-stage weights in --work) at each w. Text only does not depend
on w: it is sampled once. ``--phrasing K`` asks the encoders with each factor's K-th phrasing (0-2: those of the
training pairs) instead of the held-out one the table uses: what the held-out words cost. Writes
attribute-weight.json into --work and prints a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import argparse
import json
import time

from lab.world.factors import HELD_OUT_PHRASINGS, PHRASINGS
from lab.world.judge import load_judge
from lab.world.pipeline import (
    CPU,
    OMNI,
    SIZES,
    TEXT_SCALE,
    VARIANTS,
    Compute,
    add_compute_arguments,
    compute_from,
    default_work,
    encoder_tokens,
    evaluate_generation,
    train_world,
)
from omni_attribute.encoder import load_encoder

WEIGHTS = (2.0, 3.0, 4.0, 6.0, 8.0)


def sweep(size_name: str, work: Path, weights: list[float], variants: list[str], case_seed: int, compute: Compute = CPU,
          log=print, cases: int | None = None, phrasing: int | None = None) -> dict:
    """{variant: {w: summary}} on ``case_seed``'s cases (``cases`` of them; default: the size's evaluation count),
    with the text-only baseline of the same cases. ``phrasing``: the index of the factors' phrasing the encoders
    are asked with (default: the held-out one)."""
    phrasings = HELD_OUT_PHRASINGS if phrasing is None else {f: PHRASINGS[f][phrasing] for f in PHRASINGS}
    models, _ = train_world(size_name, work, 0, variants={v: VARIANTS[v] for v in variants}, log=log, compute=compute)
    judge = load_judge(models.judge)
    cases = cases or SIZES[size_name]["eval_cases"]
    report: dict = {"size": size_name, "case_seed": case_seed, "cases": cases, "text_scale": TEXT_SCALE,
                    "phrasings": phrasings, "rows": {}}
    text_only = None
    for variant in variants:
        adapter = models.adapters[variant]
        tokens_of = encoder_tokens(load_encoder(models.backbone, adapter, device=compute.device), phrasings)
        report["rows"][variant] = {}
        for w in weights:
            started = time.time()
            result = evaluate_generation(tokens_of, adapter, models.generator, judge, cases, case_seed, text_only,
                                         compute=compute, attribute_scale=w)
            text_only = result["text_only_baseline"]
            summary = {k: v for k, v in result["summary"].items() if k != "attribute_fidelity_by_factor"}
            summary["by_factor"] = result["personalization"]["attribute_fidelity_by_factor"]
            report["rows"][variant][str(w)] = summary
            log(f"[{variant}, w = {w:g}] {json.dumps(summary)} ({time.time() - started:.0f} s)")
    report["text_only_baseline"] = {k: v for k, v in text_only.items() if not k.endswith("hits")}
    return report


def render(report: dict) -> str:
    base = report["text_only_baseline"]
    which = "the table's cases" if report["case_seed"] == 0 else "validation cases"
    title = (f"Attribute weight w — tiny world size {report['size']}, {which} (case seed "
             f"{report['case_seed']}, {report['cases']} cases), s_T = {report['text_scale']:g}; asked as "
             + ", ".join(f"{f} '{p}'" for f, p in report["phrasings"].items()))
    baseline = (f"Text only: attribute fidelity {base['attribute_fidelity']:.3f}, text fidelity "
                f"{base['text_fidelity']:.3f}, copy-paste {base['copy_paste']:.3f}; composition 2 refs "
                f"{base['composition_2']:.3f} (both {base['composition_2_all']:.3f}).")
    header = ("| encoder | w | attribute fidelity | gap over text only | text fidelity | copy-paste "
              "| composition 2 refs (both) | composition 3 refs |")
    lines = [title, "", baseline, "", header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant, rows in report["rows"].items():
        for w, s in rows.items():
            lines.append(f"| {variant} | {float(w):g} | {s['attribute_fidelity']:.3f} ± {s['attribute_fidelity_spread']:.3f} "
                         f"| {s['attribute_fidelity'] - base['attribute_fidelity']:+.3f} ± "
                         f"{s['attribute_fidelity_gap_spread']:.3f} | {s['text_fidelity']:.3f} | {s['copy_paste']:.3f} | "
                         f"{s['composition_2']:.3f} ({s['composition_2_all']:.3f}) | {s['composition_3']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", type=float, action="append", default=None, help=f"repeat (default {WEIGHTS})")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), default=None,
                        help=f"repeat (default {OMNI!r})")
    parser.add_argument("--case-seed", type=int, default=100, help="seed of the validation cases (the table's: 0)")
    parser.add_argument("--cases", type=int, default=None, help="cases per weight (default: the size's evaluation count)")
    parser.add_argument("--phrasing", type=int, choices=range(len(PHRASINGS["shape"])), default=None, metavar="K",
                        help="ask with each factor's K-th phrasing (0-2: the training pairs'; default: the held-out one, 3)")
    parser.add_argument("--size", choices=list(SIZES), default="ci")
    parser.add_argument("--work", type=Path, default=None, help="stage cache (default runs/tiny-world-ci or runs/tiny-world)")
    add_compute_arguments(parser)
    args = parser.parse_args()
    compute = compute_from(args, parser)
    for w in args.weight or ():
        if not 0.0 <= w <= 30.0:  # NaN fails this too
            parser.error(f"--weight {w}: give a number from 0 to 30")
    if args.cases is not None and args.cases < 1:
        parser.error(f"--cases {args.cases}: give at least 1")
    work = (args.work or default_work(args.size)).resolve()
    report = sweep(args.size, work, args.weight or list(WEIGHTS), args.variant or [OMNI], args.case_seed, compute,
                   log=lambda m: print(m, flush=True), cases=args.cases, phrasing=args.phrasing)
    (work / "attribute-weight.json").write_text(json.dumps(report, indent=2))
    print(render(report))


if __name__ == "__main__":
    main()
