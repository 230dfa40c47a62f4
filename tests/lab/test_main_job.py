"""The README's main job at CI size in a fresh folder — the world's data and judge made from their seeds, the
committed generator, backbone and two-stage encoders (lab/weights, hash-checked) evaluated — and composed by a live
ComfyUI through the headless client.

Slow (about 12 minutes on 2 cores with the oracle diagnostic and the evaluation command). Asserted: the main
job's outputs are complete and it used the committed world, whose encoder stages still train (a smoke); the
laboratory is sound (the judge reads world images, the generator draws what its prompts name, the encoders
see the image); the contrastive loss makes the embedding follow the attribute text (the paper's Δ ablation:
without Lcon it is ≈ 0); Omni-Attribute's tokens transfer the asked attribute into generation without
copying the rest (issue 12), and so do oracle tokens through the same IP path and flow-blend rule.
Thresholds sit below the values measured at two training seeds (BENCHMARKS.md), never at exact numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lab.world.pipeline import OMNI

pytestmark = [pytest.mark.host, pytest.mark.lab_run, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
# the smallest selectivity gap asserted: below the gaps measured at two training seeds (0.023 at the least;
# see the selectivity test), far above the 0.00 of an encoder that ignores the attribute text
MARGIN = 0.01
VARIANTS = {OMNI, "generative loss only", "contrastive loss only", "holistic encoder"}


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("main-job")
    result = subprocess.run([sys.executable, "-m", "lab.demo", "--out", str(root / "out"),
                             "--work", str(root / "work"), "--size", "ci", "--cases", "2"],
                            capture_output=True, text=True, timeout=3300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root, result.stdout, json.loads((root / "work" / "results.json").read_text())


def test_main_job_writes_the_grid_the_cases_and_the_table(main_job):
    root, stdout, report = main_job
    grid = Image.open(root / "out" / "tiny_world_grid.png")
    assert grid.width == 4 * 128 and grid.height >= 2 * 128
    cases = json.loads((root / "out" / "tiny_world_cases.json").read_text())
    assert len(cases) == 2
    for case in cases:
        assert set(case["omni"]) == set(case["text_only"]) == set(case["target"])
    outputs = sorted((root / "out" / "outputs").iterdir())
    assert len(outputs) == 4 and all(Image.open(p).size == (128, 128) for p in outputs)
    assert set(report["rows"]) == VARIANTS
    assert "| Omni-Attribute (Lgen + Lcon) |" in stdout and "both asked attributes transferred" in stdout


def test_the_main_job_uses_the_committed_world_and_the_encoder_stages_still_train(main_job):
    """CI evaluates the committed backbone, generator and encoders, both stages of each (lab/weights,
    hash-checked; their training takes longer than CI can afford) — and still runs the encoder stages' training
    path: the same stage code and the real trainer for 3 steps each on the same data (the first stage on the
    world's pairs, the second on its own), new stage folders, the second stage's adapter (the one evaluated)
    loaded by the encoder."""
    import random

    from lab.world.evaluate import attribute_tokens
    from lab.world.factors import sample_assignment
    from lab.world.pipeline import SIZES, VARIANTS as TRAINED, render_batch, train_world
    from omni_attribute.encoder import load_encoder

    root, stdout, report = main_job
    assert report["stages"]["generator"]["source"] == "committed"
    slugs = ("omni-attribute", "generative-loss-only", "contrastive-loss-only", "holistic-encoder")
    for stage in ("backbone", *(f"{kind}-{slug}" for kind in ("encoder", "ip") for slug in slugs)):
        assert f"[{stage}] committed weights: " in stdout, stage
    log: list[str] = []
    models, info = train_world("ci", root / "work", variants={OMNI: TRAINED[OMNI]}, encoder_steps=3, log=log.append)
    for stage in ("encoder-omni-attribute", "ip-omni-attribute"):  # both stages of the recipe train
        assert any(line.startswith(f"[{stage}] running: ") for line in log), log
        assert info["settings"][stage]["steps"] == 3
        summary = json.loads((info["models"][stage] / "summary.json").read_text())
        assert summary["steps"] == 3, summary
    assert models.adapters[OMNI] == info["models"]["ip-omni-attribute"] / "adapter.safetensors"
    for stage, pairs in (("encoder-omni-attribute", SIZES["ci"]["pairs"]), ("ip-omni-attribute", SIZES["ci"]["ip_pairs"])):
        trained_on = json.loads((info["models"][stage] / "config.json").read_text())["data"]["pairs"]
        assert len(Path(trained_on).read_text().splitlines()) == pairs, (stage, trained_on)  # the second its own
    encoder = load_encoder(models.backbone, models.adapters[OMNI])
    tokens = attribute_tokens(encoder, render_batch([sample_assignment(random.Random(0))]), ["color"])
    assert tokens.shape == (1, 8, encoder.metadata.connector.out_dim) and bool(tokens.isfinite().all())


def test_the_laboratory_is_sound(main_job):
    _, _, report = main_job
    judge = report["stages"]["judge"]["held_out_accuracy"]
    assert min(judge.values()) > 0.8, judge                            # measured 1.00 every factor
    drawn = report["stages"]["generator"]["text_fidelity_of_captions"]
    assert drawn["color"] > 0.8 and drawn["background"] > 0.8, drawn   # measured 1.00, 1.00
    partial = report["stages"]["generator"]["text_fidelity_of_partial_prompts"]
    assert partial["color"] > 0.8 and partial["background"] > 0.8, partial  # measured 1.00, 0.96
    for name, row in report["rows"].items():
        s = row["summary"]
        # every encoder sees the image: its factors are retrieved above chance (mean over the six factors, measured
        # +0.20 for the Lgen-only encoders, +0.45 with Lcon; one factor alone varies with the training length:
        # the Lgen-only encoders' background fell from 0.56-0.58 at 200 steps to 0.43-0.52 at 1000)
        assert s["retrieval_precision"] > s["retrieval_chance"] + 0.1, (name, row["retrieval"])
        # generation from a prompt that leaves one factor out keeps the prompt's factors
        assert row["personalization"]["text_fidelity"] > 0.5, (name, row["personalization"])  # 0.89–1.00; chance ≈ 0.28


def test_the_contrastive_loss_makes_the_embedding_follow_the_attribute_text(main_job):
    """Selectivity: how much more an embedding under a factor's name retrieves that factor than the
    other factors (both above chance). The holistic encoder is 0 by construction. Measured at CI size
    (BENCHMARKS.md), the committed 1000-step encoders (training seed 0): Omni-Attribute 0.296, contrastive only
    0.312, generative only 0.000 (seed 1: Omni-Attribute 0.289, generative only 0.002); at 200 steps, seed
    0: 0.249, 0.189, 0.000 (seed 1: 0.248, 0.264); with captioning alone, seed 0: 0.098, 0.097, 0.004;
    with the earlier generator, seed 0 / seed 1 of the encoders: 0.063 / 0.025,
    0.108 / 0.068, 0.003 / 0.002; bootstrap spread over the held-out queries ≤ 0.006. The training seed moves
    the gaps by about 0.04; the margin sits below the smallest gap measured."""
    _, _, report = main_job
    rows = {name: row["summary"] for name, row in report["rows"].items()}
    omni, generative = rows["Omni-Attribute (Lgen + Lcon)"], rows["generative loss only"]
    contrastive, holistic = rows["contrastive loss only"], rows["holistic encoder"]
    assert abs(holistic["selectivity"]) < 1e-6, holistic  # the same embedding under every name

    def above(a: dict, b: dict) -> bool:
        margin = max(MARGIN, 3 * (a["selectivity_spread"] ** 2 + b["selectivity_spread"] ** 2) ** 0.5)
        return a["selectivity"] > b["selectivity"] + margin

    assert above(omni, holistic), (omni, holistic)            # the attribute encoder is not a holistic one
    assert above(omni, generative), (omni, generative)        # ... because of Lcon
    assert above(contrastive, generative), (contrastive, generative)


def test_omni_attribute_transfers_the_asked_attribute_without_copying_the_rest(main_job):
    """Issue 12's generation claim, on the committed two-stage encoders (1000 steps jointly, then 1000 of the
    IP-Adapter alone), sampled at the attribute weight w = 6 (ATTRIBUTE_SCALE, chosen on validation cases).
    Since 2026-12-08 the second stage trains on 4000 pairs of its own (seed 0: attribute fidelity 0.576 against
    0.271, +0.306 ± 0.044; copy-paste 0.026; composition 0.483 against 0.292, both asked 0.236; text fidelity
    0.956; generative only 0.340, contrastive only 0.458). Its seed-1 twin is not measured yet, so the margins
    stay those of the 800-pair recipe's two seeds below — they hold at that recipe's seed 1.
    Measured at CI size (BENCHMARKS.md; 144 cases; both stages at training seed 0, the committed ones, and at
    seed 1): attribute fidelity 0.514 / 0.368 against text only 0.271 on the same prompts and seeds (gaps
    +0.243 ± 0.049 / +0.097 ± 0.040); copy-paste 0.022 / 0.011 against 0.000; composition with two references,
    per asked attribute, 0.462 / 0.396 against 0.309 (both asked: 0.208 / 0.125 against 0.097 — not a claim at
    seed 1, so not asserted); text fidelity 0.958 / 0.965; selectivity 0.296 / 0.306, pattern retrieved at 1.00
    and lighting at 0.34 / 0.40 (chance 0.33 and 0.25). The generative-only encoder with the same two stages:
    0.347 / 0.333. The margins sit below the smaller seed's gap: fidelity +0.05 (and two paired standard errors),
    composition +0.03, over generative only +0.03 (its seed-1 gap, 0.035, is thin)."""
    _, _, report = main_job
    row = report["rows"][OMNI]
    omni, text_only = row["summary"], row["text_only_baseline"]
    gap = omni["attribute_fidelity"] - text_only["attribute_fidelity"]
    assert gap > max(0.05, 2 * omni["attribute_fidelity_gap_spread"]), (omni, text_only)
    assert omni["copy_paste"] <= text_only["copy_paste"] + 0.05, (omni, text_only)
    assert omni["composition_2"] > text_only["composition_2"] + 0.03, (omni, text_only)
    assert omni["text_fidelity"] > 0.9, omni  # the prompt's factors stay (measured 0.958 / 0.965)
    generative = report["rows"]["generative loss only"]["summary"]
    assert omni["attribute_fidelity"] > generative["attribute_fidelity"] + 0.03, (omni, generative)  # Lcon's doing
    assert omni["selectivity"] >= 0.25, omni
    for factor, margin in (("pattern", 0.3), ("lighting", 0.05)):
        retrieved = row["retrieval"][factor]
        assert retrieved["precision"] > retrieved["chance"] + margin, (factor, retrieved)


def test_the_attribute_weight_sweep_reaches_the_sampler(main_job):
    """benchmarks/attribute_weight.py, the sweep ATTRIBUTE_SCALE was chosen by, on the main job's world and on
    validation cases: at w = 0 every attribute term is 0·(v(E,∅) − v(∅,∅)), so the samples and what the judge
    reads are text only's exactly; at the table's w they are not."""
    from benchmarks.attribute_weight import render, sweep
    from lab.world.pipeline import ATTRIBUTE_SCALE

    root, _, _ = main_job
    report = sweep("ci", root / "work", [0.0, ATTRIBUTE_SCALE], [OMNI], case_seed=100, cases=24)
    base, rows = report["text_only_baseline"], report["rows"][OMNI]
    keys = ("attribute_fidelity", "text_fidelity", "copy_paste")
    assert [rows["0.0"][k] for k in keys] == [base[k] for k in keys], (rows["0.0"], base)
    assert rows["0.0"]["composition_2"] == base["composition_2"], (rows["0.0"], base)
    weighted = rows[str(ATTRIBUTE_SCALE)]
    assert [weighted[k] for k in (*keys, "composition_2")] != [base[k] for k in (*keys, "composition_2")], weighted
    assert f"| {OMNI} | {ATTRIBUTE_SCALE:g} |" in render(report)


def test_oracle_tokens_transfer_the_asked_attribute_through_the_ip_path(main_job):
    """The generation half without the encoder (issue 12's oracle diagnostic): ground-truth tokens of the
    reference's asked factor, only the IP-Adapter trained with Lgen (1500 steps, ~2 minutes), sampled with the
    flow-blend rule at w = 6. Measured (BENCHMARKS.md, 144 cases, training seeds 0 / 1): attribute fidelity
    0.861 / 0.806 against text only 0.271, composition with 2 references 0.691 / 0.642 against 0.309 text only,
    copy-paste 0.020 / 0.030 against 0.000, text fidelity 0.947 / 0.929. The asserted gaps (0.3 and 0.2) are the
    issue's transfer goal and lie more than 3 binomial standard errors (≤ 0.04 each) below the smaller measured gap."""
    from benchmarks.tiny_world_diagnostics import run

    root, _, _ = main_job
    report = run(["oracle"], "ci", root / "work", None, 0, log=print)
    oracle, text_only = report["experiments"]["oracle"]["summary"], report["text_only_baseline"]
    assert oracle["attribute_fidelity"] > text_only["attribute_fidelity"] + 0.3, (oracle, text_only)
    assert oracle["composition_2"] > text_only["composition_2"] + 0.2, (oracle, text_only)
    assert oracle["copy_paste"] <= text_only["copy_paste"] + 0.05, (oracle, text_only)
    assert oracle["text_fidelity"] > 0.9, oracle  # the prompt's factors stay (measured 0.947 / 0.929)


def test_the_evaluation_command_reproduces_the_world_benchmark_personalization(main_job, tmp_path):
    """Issue 16: ``omni-attribute-eval personalization`` on the trained world — 48 cases (6 factors × 4
    references × 2 prompts) generated by a live ComfyUI from the world's workflow with one reference, judged
    through an OpenAI-compatible server whose answers are the world judge's readings (attribute fidelity 10
    when the asked factor reads as the reference's, text fidelity 10 × the share of the prompt's factors read
    right, naturalness 10: the world has none). The command's table equals the world's metrics computed here
    from the same images, and its attribute fidelity agrees with the world benchmark's Omni-Attribute row
    (lab sampling, 144 other cases) within three binomial standard errors of the difference."""
    import io
    import math
    import random
    import re

    import torch

    from devtools.comfy_host import LAB_NODES, ComfyServer
    from lab.demo import ADAPTER, BACKBONE, GENERATOR, WORKFLOW, read_back
    from lab.world.evaluate import personalization_scores
    from lab.world.factors import FACTORS, HELD_OUT_PHRASINGS, Assignment, caption_without, sample_assignment
    from lab.world.judge import load_judge
    from lab.world.pipeline import ATTRIBUTE_SCALE
    from lab.world.render import render
    from tests.fixtures.oracle_judge import PROMPT, OracleJudge

    root, _, report = main_job
    (judge_file,) = (root / "work").glob("judge*/judge.safetensors")
    judge = load_judge(judge_file)
    factor_of = {HELD_OUT_PHRASINGS[f]: f for f in FACTORS}
    rng = random.Random(16)
    attributes, truth_of, target_of = [], {}, {}
    for factor in FACTORS:
        references = []
        for j in range(4):
            ref = sample_assignment(rng)
            path = tmp_path / f"{factor}-{j}.png"
            render(ref).save(path)
            references.append(path.name)
            truth_of[path.name] = ref
        prompts = []
        for _ in range(2):
            target = sample_assignment(rng)
            prompts.append(caption_without(target, {factor}))
            target_of[prompts[-1]] = target
        attributes.append({"attribute": HELD_OUT_PHRASINGS[factor], "references": references, "prompts": prompts})

    def seen(images: list[bytes]) -> list[dict]:
        return judge.predict(torch.stack([read_back(io.BytesIO(png)) for png in images]))

    def world_scorer(criterion: str, text: str, images: list[bytes]) -> int:
        if criterion == "attribute_fidelity":
            factor = factor_of[re.search(r'reference\'s "(.*?)"', text).group(1)]
            reference, generated = seen(images)
            return 10 * (generated[factor] == reference[factor])
        if criterion == "text_fidelity":
            factor = factor_of[re.search(r'take its "(.*?)" from', text).group(1)]
            target, (generated,) = target_of[PROMPT.search(text).group(1)], seen(images)
            others = [g for g in FACTORS if g != factor]
            return round(10 * sum(generated[g] == target[g] for g in others) / len(others))
        return 10

    workflow = json.loads(WORKFLOW.read_text())
    for node in ("3", "6", "8"):  # one reference: the second Encode and Stack go
        del workflow[node]
    workflow["11"]["inputs"]["stack"] = ["7", 0]
    for node, key, value in (("1", "generator", GENERATOR), ("4", "backbone", BACKBONE), ("4", "adapter", ADAPTER),
                             ("11", "adapter", ADAPTER), ("7", "weight", ATTRIBUTE_SCALE)):
        workflow[node]["inputs"][key] = value
    (tmp_path / "world.api.json").write_text(json.dumps(workflow))
    with ComfyServer(root / "out" / "comfy-base", custom_nodes=LAB_NODES) as server, \
            OracleJudge(model="world-judge", scorer=world_scorer) as judge_server:
        config = {"workflow": "world.api.json", "server": server.url, "seeds": [0], "attributes": attributes,
                  "inputs": {"reference": "2.image", "attribute": "5.attributes", "prompt": "9.text",
                             "seed": "12.noise_seed"},
                  "judge": {"base_url": judge_server.url, "model": "world-judge", "api_key_env": None,
                            "concurrency": 4}}
        (tmp_path / "bench.json").write_text(json.dumps(config))
        result = subprocess.run([sys.executable, "-m", "omni_attribute.evaluation.cli", "personalization", "--config",
                                 str(tmp_path / "bench.json"), "--out", str(tmp_path / "out")], cwd=REPO,
                                capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    assert len(records) == 48
    generated = seen([(tmp_path / "out" / r["image"]).read_bytes() for r in records])
    references = seen([Path(r["reference"]).read_bytes() for r in records])
    asked = [factor_of[r["attribute"]] for r in records]
    by_judge = personalization_scores(generated, [Assignment.of(r) for r in references],
                                      [target_of[r["prompt"]] for r in records], asked)
    table = json.loads((tmp_path / "out" / "results.json").read_text())["table"]
    overall = table["all"]
    assert overall["attribute_fidelity"] == pytest.approx(by_judge["attribute_fidelity"])
    assert overall["text_fidelity"] == pytest.approx(by_judge["text_fidelity"])
    world = personalization_scores(generated, [truth_of[Path(r["reference"]).name] for r in records],
                                   [target_of[r["prompt"]] for r in records], asked)["attribute_fidelity"]
    benchmark = report["rows"][OMNI]["summary"]["attribute_fidelity"]
    spread = math.sqrt(world * (1 - world) / 48 + benchmark * (1 - benchmark) / 144)
    assert abs(world - benchmark) <= 3 * max(spread, 0.05), (world, benchmark, spread)


def test_the_backbone_sees_every_factor_and_lighting_is_lost_to_its_held_out_word(main_job):
    """benchmarks/tiny_world_probes.py on the main job's world (the committed backbone and Omni-Attribute
    encoder). Measured (BENCHMARKS.md): a linear probe of the backbone's image states in place reads every
    factor at 0.97–1.00 (shape 0.97, lighting 0.98); the encoder retrieves lighting at 0.74–0.75 under its
    three training phrasings and 0.34 under the held-out "illumination"; its shape embedding is nearly the
    same for every image (mean cosine 0.65 under a training phrasing, colour's 0.13)."""
    from benchmarks.tiny_world_probes import probe

    root, _, _ = main_job
    report = probe("ci", root / "work", [OMNI])
    in_place = report["states"]["in place"]
    assert min(in_place.values()) > 0.9, in_place
    assert in_place["shape"] > report["states"]["mean"]["shape"] + 0.15, report["states"]  # the outline is in place
    training, *_, held_out = report["encoders"][OMNI]
    assert held_out["held_out"] and not training["held_out"]
    assert training["precision"]["lighting"] > held_out["precision"]["lighting"] + 0.2, (training, held_out)
    assert training["mean_cosine"]["shape"] > training["mean_cosine"]["color"] + 0.3, training
