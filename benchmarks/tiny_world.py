"""The tiny attribute world benchmark: train everything on two CPU cores and measure the paper's claims.

    python benchmarks/tiny_world.py [--size ci|full|gpu] [--work DIR] [--force STAGE] [--seed N] [--device D] [--bf16]

--size ci (the default; about 7 minutes on 2 cores with the committed generator, backbone and encoders of
lab/weights — python -m lab.world.weights re-creates them, about 70 minutes —, cached in runs/tiny-world-ci,
shared with the main job), full (a larger world trained from scratch, cached in runs/tiny-world; 40 minutes on
2 cores) or gpu (the ci world with twice the encoder steps at twice the batch, a backbone pre-trained four
times longer, five times the pairs and twice the cases, all trained, cached in runs/tiny-world-gpu; meant for
--device cuda --bf16 on a lent GPU, not run yet).
--device picks the torch device of every stage (cpu by default: what CI runs); --bf16 trains and samples
under bf16 autocast / mixed precision. A stage cached on one device is reused on another.

Stages (each cached under --work, keyed by its settings; a cached stage is reused and says so):
data → judge → backbone (tiny Qwen2.5-VL, captioning + attribute-request pre-training, then frozen) →
generator (tiny FLUX trained from scratch, then frozen) → four encoders trained with
omni-attribute-train's trainer on the same generator: Omni-Attribute (Lgen + Lcon), generative loss
only, contrastive loss only, and a holistic encoder (same backbone, no attribute text, no contrastive
loss) → evaluation on held-out images and the held-out phrasings: attribute retrieval (precision@10 and
leakage), personalization (attribute fidelity, text fidelity, copy-paste), composition with 2 and 3
references. Writes results.json and results.md into --work and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import argparse

from lab.world.pipeline import (
    SIZES,
    add_compute_arguments,
    compute_from,
    default_work,
    render_table,
    run_benchmark,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="ci")
    parser.add_argument("--work", type=Path, default=None, help="stage cache (default runs/tiny-world-ci or runs/tiny-world)")
    parser.add_argument("--force", action="append", default=[], help="re-run this stage even if cached")
    parser.add_argument("--seed", type=int, default=0)
    add_compute_arguments(parser)
    args = parser.parse_args()
    compute = compute_from(args, parser)
    work = args.work or default_work(args.size)
    _, report = run_benchmark(args.size, work, args.seed, set(args.force), log=lambda m: print(m, flush=True),
                              compute=compute)
    print(render_table(report))


if __name__ == "__main__":
    main()
