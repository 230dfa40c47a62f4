"""Why the generation half does (not) transfer: the diagnostics of issue 12, in the tiny attribute world.

    python benchmarks/tiny_world_diagnostics.py [--experiment NAME ...] [--steps N] [--start-steps N] [--size ci|full|gpu]
                                                [--work DIR] [--reuse-every K ...] [--caption-steps N] [--pairs N]
                                                [--second-stage-pairs N]
                                                [--backbone-words training|all] [--device D] [--bf16]

Every experiment trains with omni-attribute-train's trainer on the world's frozen generator (the stages of
benchmarks/tiny_world.py, cached in the same --work folder and shared with it), with the IP statistics on
(runtime.log_ip_stats), then evaluates personalization and composition with the world's judge:

- oracle: the encoder replaced by ground-truth tokens (loss.oracle_tokens: one learned vector per
  (factor, value) of the reference's shared factors, the adapter's token count and width); only the
  IP-Adapter and that table train, with Lgen. What the generation path can carry at all.
- oracle-reconstruction: the same with reference = target (loss.reconstruct=1).
- reconstruction: the real encoder, Lgen only, reference = target (the original IP-Adapter recipe).
- omni: the Omni-Attribute recipe of the benchmark table (Lgen + Lcon) at 200 steps, for comparison;
  contrastive-only and generative-only: the table's Lcon-only and Lgen-only rows at 200 steps (with
  --train-seed: the gaps between them at another training seed; --steps 1000 for the table's committed
  1000-step encoders).
- recipe candidates, each the omni recipe with one change: omni-from-oracle (the IP-Adapter starts from the
  oracle run's, through adapter.init_from: an IP path that already listens to tokens), omni-ip-lr (the
  IP-Adapter's learning rate ×10 instead of ×3), omni-long (1000 steps instead of 200: the recipe of the
  committed CI encoders; with --train-seed 1 the other seed of CI's margins), omni-low-ip-lr (the joint stage
  at the second stage's IP learning rate, 3e-4 instead of 3e-3) and omni-low-ip-lr-then-ip (its second stage).
- omni-then-ip: a second stage after omni — its encoder frozen (adapter.freeze_encoder), only its IP-Adapter
  trained on, with Lgen: the oracle's situation (tokens that hold still) with the real encoder, and the
  pipeline's second stage (IP_STAGE); omni-then-ip-lr3, -lr01 and -text-dropout: the same at the first stage's
  IP learning rate (3e-3), at 1e-4, and with the caption dropped half the time. With --steps 1000 they start
  from the committed Omni-Attribute encoder's recipe (omni at 1000 steps); generative-only-then-ip: the
  same second stage after generative-only, contrastive-only-then-ip after contrastive-only (the table's two
  stages of those rows, e.g. at another --train-seed).
  --start-steps N trains the second stage --steps but starts it from the first stage at N steps (e.g.
  --start-steps 1000 --steps 3000: three times the pipeline's second stage after the committed encoder).
- the leakage claim: holistic (the table's holistic row: the whole-image prompt, Lgen only) and its second
  stages — holistic-then-ip as the pipeline trains it, holistic-then-reconstruction with the target the
  reference itself (the original IP-Adapter recipe, how the paper's holistic baselines learn);
  holistic-both-losses (+ -then-ip): Omni-Attribute's recipe, both losses, with the whole-image prompt instead
  of the attribute text (measured: its Lcon stays at ln 4 — the contrastive candidates differ only by their
  attribute text, so for an encoder blind to it Lcon has no gradient).
- omni-in-batch (+ -then-ip): Omni-Attribute's recipe with the trainer's in-batch negatives
  (loss.in_batch_negatives: the other pairs' E(·, a+) as extra negatives), against the constant embedding the
  paper's Lcon allows for an attribute hard to read (measured: shape's embedding stays nearly constant).
- committed-omni-then-ip: the pipeline's second stage after the committed Omni-Attribute first stage
  (lab/weights: nothing retrained before it). With --pairs N every experiment trains on N pairs of its own,
  drawn with another seed, instead of the world's 800: what more pairs give an IP-Adapter that learns to draw a
  frozen encoder's tokens (3000 steps on the 800 fitted them and lost background). With --second-stage-pairs N
  only the second stages do, the first stages train on the world's: the pipeline's split (its "ip_pairs"), e.g.
  --experiment omni-then-ip --steps 1000 --train-seed 1 --second-stage-pairs 4000 for the committed two stages'
  twin at another training seed.

Before the experiments, the backbone's read-back: how often the tiny MLLM finds the right value of each factor
of a held-out image the likeliest, in a caption ("Describe the image:") and in the answer to the factor's
held-out phrasing — what any encoder on it can carry at most.
``--caption-steps N`` runs the experiments on a backbone pre-trained longer (its own stage and run folders).
``--backbone-words all`` runs them on a backbone whose pre-training also asks with the held-out phrasings (the
words a real MLLM knows); the encoders' training pairs still name the factors with the training phrasings only.

For each: attribute fidelity (± its binomial standard error), copy-paste and composition against the
text-only baseline and the text ceiling (prompts that name the reference's value); Lgen on training pairs
with the tokens and with them dropped (how much of Lgen the tokens explain); over training, the IP term's
norm relative to the attention output per block, the IP gradient norm and the value projections' norm.
Writes diagnostics.json into --work and prints a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import argparse
import copy
import json
import time

import torch
from safetensors.torch import load_file

from lab.world.captioner import read_back
from lab.world.judge import load_judge
from lab.world.pairs import read_images
from lab.world.pipeline import (
    CPU,
    ENCODER_SETTINGS,
    HOLISTIC_TEMPLATE,
    IP_STAGE,
    OMNI,
    SIZES,
    TRAIN_CONFIG,
    VARIANTS,
    Compute,
    add_compute_arguments,
    compute_from,
    default_work,
    evaluate,
    own_pairs,
    train_world,
    variant_slug,
)
from omni_attribute.images import load_rgb_batch
from omni_attribute.train.config import load_config
from omni_attribute.train.data import PairDataset
from omni_attribute.train.oracle import ORACLE_FILE
from omni_attribute.train.trainer import (
    build_model,
    latest_checkpoint,
    preflight,
    train,
)

LGEN_ONLY = ["loss.lambda_gen=1.0", "loss.lambda_con=0.0"]
EXPERIMENTS: dict[str, tuple[list[str], int]] = {  # overrides, default steps
    "oracle": ([*LGEN_ONLY, "loss.oracle_tokens=true"], 1500),
    "oracle-reconstruction": ([*LGEN_ONLY, "loss.oracle_tokens=true", "loss.reconstruct=1"], 1500),
    "reconstruction": ([*LGEN_ONLY, "loss.reconstruct=1"], 200),
    "omni": (VARIANTS[OMNI], 200),
    "contrastive-only": (VARIANTS["contrastive loss only"], 200),  # the table's row, e.g. at another --train-seed
    "generative-only": (VARIANTS["generative loss only"], 200),    # likewise
    # recipe candidates (item 2), each the omni recipe with one change
    "omni-from-oracle": (VARIANTS[OMNI], 200),  # the IP-Adapter starts from the oracle run's (adapter.init_from)
    "omni-ip-lr": ([*VARIANTS[OMNI], "optim.ip_lr_scale=10"], 200),
    "omni-long": (VARIANTS[OMNI], 1000),
    "omni-low-ip-lr": ([*VARIANTS[OMNI], "optim.ip_lr_scale=0.3"], 200),  # the joint stage at the second stage's IP rate
    # a second stage: the omni run's encoder frozen, only its IP-Adapter trained further with Lgen — the
    # pipeline's recipe (IP_STAGE: the IP learning rate 3e-4), and that recipe with one change each
    "omni-then-ip": (IP_STAGE, 1000),
    "omni-then-ip-lr3": ([*IP_STAGE, "optim.ip_lr_scale=3"], 1000),  # the first stage's IP learning rate, 3e-3
    "omni-then-ip-lr01": ([*IP_STAGE, "optim.ip_lr_scale=0.1"], 1000),  # 1e-4
    "omni-then-ip-text-dropout": ([*IP_STAGE, "loss.drop_text=0.5"], 1000),  # D(E, ∅), which the guider uses, 5× as often
    "generative-only-then-ip": (IP_STAGE, 1000),  # the table's Lgen-only row with its second stage
    "contrastive-only-then-ip": (IP_STAGE, 1000),  # likewise the Lcon-only row (its IP-Adapter's only training)
    "omni-low-ip-lr-then-ip": (IP_STAGE, 1000),
    # the leakage claim: the holistic row (no attribute text, no Lcon) with its second stage as the pipeline
    # trains it, and with the original IP-Adapter recipe instead — the target is the reference itself
    "holistic": (VARIANTS["holistic encoder"], 200),
    "holistic-then-ip": (IP_STAGE, 1000),
    "holistic-then-reconstruction": ([*IP_STAGE, "loss.reconstruct=1"], 1000),
    # Omni-Attribute's recipe (both losses) with the attribute text replaced by the whole-image prompt: the one
    # difference from Omni-Attribute is the attribute text
    "holistic-both-losses": ([*VARIANTS[OMNI], HOLISTIC_TEMPLATE], 200),
    "holistic-both-losses-then-ip": (IP_STAGE, 1000),
    # the paper's Lcon is met by E(·, a+) constant over images for an attribute hard to read (the other three
    # candidates still differ): in-batch negatives (the other pairs' E(·, a+)) forbid that
    "omni-in-batch": ([*VARIANTS[OMNI], "loss.in_batch_negatives=true"], 200),
    "omni-in-batch-then-ip": (IP_STAGE, 1000),
    # the pipeline's second stage after the committed Omni-Attribute first stage (lab/weights, no retraining): with
    # --pairs, what more training pairs give the IP-Adapter that learns to draw the frozen encoder's tokens
    "committed-omni-then-ip": (IP_STAGE, 1000),
}
COMMITTED = "the committed first stage"
# experiment → the experiment whose trained adapter it starts from (trained first if it is not cached)
STARTS_FROM = {"omni-from-oracle": "oracle", "generative-only-then-ip": "generative-only",
               "contrastive-only-then-ip": "contrastive-only", "omni-low-ip-lr-then-ip": "omni-low-ip-lr",
               **{name: "holistic" for name in EXPERIMENTS if name.startswith("holistic-then-")},
               "holistic-both-losses-then-ip": "holistic-both-losses", "omni-in-batch-then-ip": "omni-in-batch",
               **{name: "omni" for name in EXPERIMENTS if name.startswith("omni-then-ip")},
               "committed-omni-then-ip": COMMITTED}


def lgen_with_and_without_tokens(config, pairs: int = 64) -> dict[str, float]:
    """Lgen of the trained model on the first training pairs, the same noise and timesteps, with the reference
    tokens at weight 1 and at weight 0: the gap is the part of Lgen the tokens explain."""
    records, info = preflight(config)
    model = build_model(config, info, records)
    model.load_state_dict(load_file(str(latest_checkpoint(config) / "trainable.safetensors")), strict=False)
    dataset = PairDataset(records[:pairs], config.data.image_size)
    out = {}
    for name, drop in (("lgen_with_tokens", 0.0), ("lgen_without_tokens", 1.0)):
        model.config = copy.deepcopy(config)
        model.config.loss.drop_tokens = drop  # 1.0 is outside what a config may say: every row's tokens dropped
        with torch.no_grad():
            losses = [float(model([dataset[i], dataset[i + 1]], step_seed=4321 + i)["lgen"])
                      for i in range(0, len(dataset) - 1, 2)]
        out[name] = sum(losses) / len(losses)
    return out


def ip_curve(metrics_path: Path, points: int = 5) -> list[dict]:
    """A few evenly spaced rows of the run's metrics: step, Lgen, mean IP ratio over blocks, IP grad and value norm."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    picked = [rows[round(i * (len(rows) - 1) / (points - 1))] for i in range(points)] if len(rows) >= points else rows
    curve = []
    for r in picked:
        ratios = [v for k, v in r.items() if k.startswith("ip_ratio_")]
        curve.append({"step": r["step"], "lgen": r["lgen"], "ip_ratio": sum(ratios) / max(1, len(ratios)),
                      "ip_ratio_max": max(ratios, default=0.0), "ip_grad_norm": r.get("ip_grad_norm"),
                      "ip_value_norm": r.get("ip_value_norm")})
    return curve


def run(names: list[str], size_name: str, work: Path, steps: int | None, seed: int, log=print,
        train_seed: int | None = None, out: Path | None = None, reuse_every: list[int] = (),
        compute: Compute = CPU, caption_steps: int | None = None, start_steps: int | None = None,
        backbone_words: str = "training", pairs: int | None = None, second_stage_pairs: int | None = None) -> dict:
    """``seed``: the world's stages (data, generator, …); ``train_seed``: the experiments' training (default: seed);
    ``reuse_every``: each experiment is also evaluated, on the same cases, with the guider's approximate
    "reuse Δ every k steps" rule for each k (issue 13: its composition score against the exact rule's);
    ``caption_steps``: the experiments run on a backbone pre-trained for this many steps instead of the size's;
    ``start_steps``: the steps of the experiment a second stage starts from (default: ``steps``);
    ``backbone_words``: "all" runs them on a backbone pre-trained with every phrasing (the held-out ones too);
    ``pairs``: the experiments train on this many pairs of their own (another seed) instead of the world's;
    ``second_stage_pairs``: the second stages (after a first) train on this many pairs of their own, as the pipeline's
    second stage does (SIZES' "ip_pairs"), and the first stages on the world's (or ``pairs``)."""
    train_seed = seed if train_seed is None else train_seed
    committed = any(STARTS_FROM.get(name) == COMMITTED for name in names)
    models, info = train_world(size_name, work, seed, variants={OMNI: VARIANTS[OMNI]} if committed else {}, log=log,
                               compute=compute, caption_steps=caption_steps, backbone_words=backbone_words)
    size = SIZES[size_name]
    data = Path(info["held_out"]).parents[1]
    pairs_file = data / "pairs" / "pairs.jsonl"
    if pairs:
        pairs_file = own_pairs(work, pairs, seed, log)
    second_pairs_file = own_pairs(work, second_stage_pairs, seed, log) if second_stage_pairs else pairs_file
    held_out = read_images(Path(info["held_out"]))
    judge = load_judge(models.judge)
    images, truth = load_rgb_batch([p for p, _, _ in held_out]), [a for _, a, _ in held_out]
    report = {"size": size_name, "seed": seed, "train_seed": train_seed, "stages": info["stages"], "experiments": {},
              "caption_steps": caption_steps or size["caption_steps"], "backbone_words": backbone_words}
    report["backbone_read_back"] = {ask: read_back(models.backbone, images[:96], truth[:96], device=compute.device, ask=ask)
                                    for ask in ("caption", "held-out phrasing")}
    log(f"[backbone] read back per factor: {json.dumps(report['backbone_read_back'])}")
    text_only = None

    def trained(name: str, own_steps: int | None = None):
        """(config, run folder) of an experiment, trained unless cached (after what it starts from)."""
        overrides, default_steps = EXPERIMENTS[name]
        n = own_steps or steps or default_steps
        start = f"-from{start_steps}" if name in STARTS_FROM and start_steps and start_steps != n else ""
        run_dir = work / (f"diagnostic-{name}-{n}{start}" + ("" if train_seed == seed else f"-seed{train_seed}")
                          + (f"-caption{caption_steps}" if caption_steps else "")
                          + ("" if backbone_words == "training" else f"-words-{backbone_words}")
                          + (f"-pairs{pairs}" if pairs else "")
                          + (f"-second{second_stage_pairs}" if second_stage_pairs and name in STARTS_FROM else ""))
        if name in STARTS_FROM:
            first = STARTS_FROM[name]
            start_dir = info["models"][f"encoder-{variant_slug(OMNI)}"] if first == COMMITTED else trained(first, start_steps)[1]
            overrides = [*overrides, f"adapter.init_from={start_dir / 'adapter.safetensors'}"]
        config = load_config(TRAIN_CONFIG, [
            f"output_dir={run_dir}", f"data.pairs={second_pairs_file if name in STARTS_FROM else pairs_file}",
            "data.validation_pairs=null",
            f"backbone.path={models.backbone}", "generator.kind=tiny", f"generator.path={models.generator}",
            f"optim.max_steps={n}", f"optim.batch_size={size['encoder_batch']}", "runtime.validate_every=0",
            f"runtime.checkpoint_every={n}", "runtime.log_every=25", "runtime.log_ip_stats=true", f"seed={train_seed}",
            *ENCODER_SETTINGS, *overrides, *compute.trainer_overrides()])
        if not (run_dir / "summary.json").is_file():
            log(f"[{name}] training {n} steps in {run_dir}")
            train(config, resume=False, progress=False)
        else:
            log(f"[{name}] cached: reusing {run_dir}")
        return config, run_dir

    for name in names:
        started = time.time()
        config, run_dir = trained(name)
        n, overrides = config.optim.max_steps, EXPERIMENTS[name][0]
        oracle = run_dir / ORACLE_FILE if config.loss.oracle_tokens else None
        row = evaluate(run_dir / "adapter.safetensors", models.backbone, models.generator, judge, images, truth,
                       size["eval_cases"], seed, text_only, oracle, compute=compute)
        text_only = row["text_only_baseline"]
        row.update(steps=n, overrides=overrides, seconds=round(time.time() - started),
                   lgen=lgen_with_and_without_tokens(config), curve=ip_curve(run_dir / "metrics.jsonl"))
        row["approximate"] = {}
        for k in reuse_every:
            approximate = evaluate(run_dir / "adapter.safetensors", models.backbone, models.generator, judge, images,
                                   truth, size["eval_cases"], seed, text_only, oracle, reuse_every=k, compute=compute)
            row["approximate"][str(k)] = approximate["summary"]
            log(f"[{name}, reuse Δ every {k} steps] {json.dumps(approximate['summary'])}")
        report["experiments"][name] = row
        log(f"[{name}] {json.dumps(row['summary'])}")
    report["text_only_baseline"] = text_only
    (out or work / "diagnostics.json").write_text(json.dumps(report, indent=2))
    return report


def _number(value: float | None) -> str:
    """A logged statistic, or — where the run has none (no IP gradient without Lgen)."""
    return "—" if value is None else f"{value:.3g}"


def render(report: dict) -> str:
    base = report["text_only_baseline"]
    lines = [f"Generation diagnostics — tiny world size {report['size']}, seed {report['seed']}, training seed "
             f"{report.get('train_seed', report['seed'])}", "",
             f"Text only: attribute fidelity {base['attribute_fidelity']:.3f}, copy-paste {base['copy_paste']:.3f}; "
             f"text ceiling (prompt names the value) {base['text_ceiling']:.3f}; composition 2 refs "
             f"{base['composition_2']:.3f} (both {base['composition_2_all']:.3f}).", "",
             "| experiment | steps | attribute fidelity | copy-paste | composition 2 refs (both) | Lgen with / without tokens "
             "| IP ratio mean (max) at end | IP grad norm | IP value norm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["experiments"].items():
        s, end, lg = row["summary"], row["curve"][-1], row["lgen"]
        lines.append(f"| {name} | {row['steps']} | {s['attribute_fidelity']:.3f} ± {s['attribute_fidelity_spread']:.3f} | "
                     f"{s['copy_paste']:.3f} | {s['composition_2']:.3f} ({s['composition_2_all']:.3f}) | "
                     f"{lg['lgen_with_tokens']:.4f} / {lg['lgen_without_tokens']:.4f} | {end['ip_ratio']:.3f} "
                     f"({end['ip_ratio_max']:.3f}) | {_number(end['ip_grad_norm'])} | {_number(end['ip_value_norm'])} |")
    approximate = [(name, k, s) for name, row in report["experiments"].items()
                   for k, s in row.get("approximate", {}).items()]
    if approximate:
        lines += ["", "Exact flow blend against the approximate \"reuse Δ every k steps\" rule (same cases; personalization "
                  "has N = 1 attribute, composition N = 2 and 3):", "",
                  "| experiment | rule | attribute fidelity | composition 2 refs (both) | composition 3 refs |",
                  "| --- | --- | --- | --- | --- |"]
        rows = [(name, "exact", row["summary"]) for name, row in report["experiments"].items() if row.get("approximate")]
        for name, rule, s in [*rows, *((n, f"reuse every {k}", s) for n, k, s in approximate)]:
            lines.append(f"| {name} | {rule} | {s['attribute_fidelity']:.3f} ± {s['attribute_fidelity_spread']:.3f} | "
                         f"{s['composition_2']:.3f} ± {s['composition_2_spread']:.3f} ({s['composition_2_all']:.3f}) | "
                         f"{s['composition_3']:.3f} |")
    if "backbone_read_back" in report:
        lines += ["", f"Backbone read-back ({report.get('caption_steps', '?')} pre-training steps; 96 held-out images, "
                  "the value whose words it finds likeliest):", ""]
        for ask, scores in report["backbone_read_back"].items():
            lines.append(f"- {ask}: " + ", ".join(f"{f} {v:.2f}" for f, v in scores.items()))
    lines += ["", "Over training (step: Lgen, mean IP ratio, IP grad norm, IP value norm):", ""]
    for name, row in report["experiments"].items():
        points = "; ".join(f"{c['step']}: {c['lgen']:.4f}, {c['ip_ratio']:.3f}, {_number(c['ip_grad_norm'])}, "
                           f"{_number(c['ip_value_norm'])}" for c in row["curve"])
        lines.append(f"- {name}: {points}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", action="append", choices=list(EXPERIMENTS), default=None,
                        help="repeat for several (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every experiment (default: its own)")
    parser.add_argument("--start-steps", type=int, default=None, metavar="N",
                        help="training steps of the experiment a second stage starts from (default: --steps)")
    parser.add_argument("--size", choices=list(SIZES), default="ci")
    parser.add_argument("--work", type=Path, default=None, help="stage cache (default runs/tiny-world-ci or runs/tiny-world)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world's stages")
    parser.add_argument("--train-seed", type=int, default=None, help="seed of the experiments' training (default: --seed)")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes (default: WORK/diagnostics.json)")
    parser.add_argument("--caption-steps", type=int, default=None, metavar="N",
                        help="pre-train the backbone for N steps instead of the size's (its own cached stage)")
    parser.add_argument("--backbone-words", choices=["training", "all"], default="training",
                        help="the phrasings the backbone's pre-training asks with: the training ones (the committed "
                             "backbone) or all, the held-out ones too (the words a real MLLM knows; its own stage)")
    parser.add_argument("--reuse-every", type=int, action="append", default=[], metavar="K",
                        help="also evaluate with the approximate 'reuse Δ every K steps' rule (repeat for several)")
    parser.add_argument("--pairs", type=int, default=None, metavar="N",
                        help="train the experiments on N pairs of their own (drawn with another seed) instead of the "
                             "world's (800 at ci size)")
    parser.add_argument("--second-stage-pairs", type=int, default=None, metavar="N",
                        help="train the second stages on N pairs of their own, the first stages on the world's (or "
                             "--pairs): the pipeline's split (4000 at ci size)")
    add_compute_arguments(parser)
    args = parser.parse_args()
    for flag, value in (("--pairs", args.pairs), ("--second-stage-pairs", args.second_stage_pairs)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: give at least 1 pair")
    compute = compute_from(args, parser)
    work = (args.work or default_work(args.size)).resolve()
    report = run(args.experiment or list(EXPERIMENTS), args.size, work, args.steps, args.seed,
                 log=lambda m: print(m, flush=True), train_seed=args.train_seed, out=args.out, reuse_every=args.reuse_every,
                 compute=compute, caption_steps=args.caption_steps, start_steps=args.start_steps,
                 backbone_words=args.backbone_words, pairs=args.pairs, second_stage_pairs=args.second_stage_pairs)
    print(render(report))


if __name__ == "__main__":
    main()
