"""omni-attribute-eval: the paper's two benchmarks.

    # attribute retrieval: an index (omni-attribute-index build) scored against per-image labels
    omni-attribute-eval retrieval --index faces.index --labels list_attr_celeba.txt --preset celeba --k 10 --out results/
    omni-attribute-eval retrieval --index world.index --labels labels.csv --group "object color=color" --out results/

    # personalization: generate with a ComfyUI workflow, judge with a vision model, tabulate (resumable)
    omni-attribute-eval personalization --config bench.yaml --out results/ [--stage generate|judge|report|all]

Exit status: 0 done, 1 the inputs, the server or the judge failed (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..command_line import run_command
from ..errors import OmniAttributeError


def _groups(values: list[str], preset: str | None) -> dict[str, list[str]] | None:
    from .retrieval import CELEBA_GROUPS, EvaluationError

    groups = dict(CELEBA_GROUPS) if preset == "celeba" else {}
    for value in values:
        attribute, sep, columns = value.partition("=")
        if not sep or not attribute.strip() or not columns.strip():
            raise EvaluationError(f"--group {value!r}: write ATTRIBUTE=COLUMN[,COLUMN...], e.g. \"hairstyle=Bald,Bangs\"")
        groups[attribute.strip()] = [c.strip() for c in columns.split(",") if c.strip()]
    return groups or None


def cmd_retrieval(args) -> int:
    from ..retrieval.store import AttributeIndex
    from .retrieval import evaluate_index, markdown_table, read_labels, write_results

    index = AttributeIndex.open(args.index)
    results, info = evaluate_index(index, read_labels(args.labels), _groups(args.group, args.preset), args.k,
                                   args.queries, args.seed)
    print(f"[eval] {info['labelled']} of {info['images']} indexed images are labelled; {info['queries']} queries, "
          f"k = {args.k}")
    print(markdown_table(results, args.k))
    if args.out:
        write_results(args.out, results, info)
        print(f"[eval] wrote {args.out / 'retrieval.md'} and retrieval.json")
    return 0


def cmd_personalization(args) -> int:
    from . import personalization as p

    config = p.load_config(args.config, server=args.server)
    if args.concurrency:
        config.judge.concurrency = args.concurrency
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("generate", "all"):
        from ..headless import ComfyError

        try:
            p.generate(config, args.out)
        except ComfyError as exc:
            raise p.EvaluationError(f"ComfyUI could not run the workflow: {exc}; generated cases are kept") from exc
        except OSError as exc:
            raise p.EvaluationError(f"cannot reach ComfyUI at {config.server}: {exc}. Is the server running?") from exc
    if args.stage in ("judge", "all"):
        p.judge(config, args.out)
    if args.stage in ("report", "all", "judge"):
        table = p.report(config, args.out)
        print(p.markdown(table))
        print(f"[eval] wrote {args.out / 'results.md'} and results.json")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="omni-attribute-eval", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    r = sub.add_parser("retrieval", help="precision@k and leakage of an index against labels")
    r.add_argument("--index", required=True, type=Path)
    r.add_argument("--labels", required=True, type=Path, help="CSV (image,label1,...) or CelebA's list_attr_celeba.txt")
    r.add_argument("--group", action="append", default=[], metavar="ATTRIBUTE=COL[,COL]",
                   help="the label column(s) an attribute line is scored on (default: the column named like it)")
    r.add_argument("--preset", choices=["celeba"], help="CelebA columns for hairstyle, facial expression, clothing")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--queries", type=int, default=0, help="score this many random queries (default: every image)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path)
    r.set_defaults(run=cmd_retrieval)
    p = sub.add_parser("personalization", help="generate, judge and tabulate the personalization benchmark")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stage", choices=["all", "generate", "judge", "report"], default="all")
    p.add_argument("--server", help="ComfyUI address (overrides the config's)")
    p.add_argument("--concurrency", type=int, default=0, help="judge requests in flight (overrides the config's)")
    p.set_defaults(run=cmd_personalization)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "k", 1) < 1:
        print("error: --k must be at least 1", file=sys.stderr)
        return 2
    return run_command(lambda: args.run(args), [(OmniAttributeError, 1)],
                       "interrupted: finished cases are saved; run the same command again to go on")


if __name__ == "__main__":
    sys.exit(main())
