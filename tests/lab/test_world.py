"""The tiny attribute world: ground truth, pairs, judge, generator and backbone stages (small sizes)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lab.world.evaluate import (
    composition_all_hits,
    paired_gap_spread,
    personalization_scores,
    retrieval,
    selectivity,
    selectivity_spread,
)
from lab.world.factors import (
    FACTORS,
    HELD_OUT_PHRASINGS,
    TRAIN_PHRASINGS,
    Assignment,
    caption,
    caption_without,
    sample_assignment,
    vary,
)
from lab.world.generator import training_caption
from lab.world.judge import accuracy, train_judge
from lab.world.pairs import make_images, make_pairs, read_images
from lab.world.render import render
from omni_attribute.images import load_rgb_batch
from omni_attribute.train.data import parse_record


def test_assignments_and_captions():
    rng = random.Random(0)
    a = sample_assignment(rng)
    b = vary(a, ["color", "shape"], rng)
    assert b["color"] != a["color"] and b["shape"] != a["shape"] and b["size"] == a["size"]
    text = caption(a)
    assert a["color"] in text and a["shape"] in text and a["background"] in text
    assert "background" not in caption_without(a, {"background"}) and a["shape"] not in caption_without(a, {"shape"})
    with pytest.raises(ValueError, match="one known value per factor"):
        Assignment.of({"shape": "hexagon"})
    assert not set(HELD_OUT_PHRASINGS.values()) & {p for v in TRAIN_PHRASINGS.values() for p in v}


def test_generator_training_captions_leave_factors_out():
    a = sample_assignment(random.Random(3))
    rng = random.Random(0)
    assert training_caption(a, rng, drop_caption=0.0, drop_factor=0.0) == caption(a)
    assert training_caption(a, rng, drop_caption=1.0, drop_factor=0.0) == ""
    assert training_caption(a, rng, drop_caption=0.0, drop_factor=1.0) == caption_without(a, set(FACTORS))
    partial = {training_caption(a, rng, drop_caption=0.0, drop_factor=0.5) for _ in range(200)}
    assert caption(a) in partial and len(partial) > 20  # every subset of named factors occurs


def test_every_factor_changes_the_picture():
    base = Assignment.of({f: v[0] for f, v in FACTORS.items()})
    reference = torch.tensor(list(render(base).getdata()), dtype=torch.float32)
    for factor, values in FACTORS.items():
        other = Assignment.of({**base.as_dict(), factor: values[1]})
        changed = torch.tensor(list(render(other).getdata()), dtype=torch.float32)
        assert (changed - reference).abs().mean() > 1.0, factor


def test_the_second_stage_draws_pairs_of_its_own_once(tmp_path):
    """own_pairs: another seed than the world's pairs (seed + 4), one cached folder per (count, seed)."""
    from lab.world.pipeline import own_pairs

    log: list[str] = []
    path = own_pairs(tmp_path, 6, seed=0, log=log.append)
    assert len(path.read_text().splitlines()) == 6 and log[-1].startswith("[pairs] running: ")
    assert own_pairs(tmp_path, 6, seed=0, log=log.append) == path and log[-1].startswith("[pairs] cached: ")
    world = make_pairs(tmp_path / "world", 6, seed=4)
    assert path.read_text() != world.read_text()
    assert own_pairs(tmp_path, 6, seed=1, log=log.append) != path


def test_pairs_follow_the_schema_and_the_ground_truth(tmp_path):
    path = make_pairs(tmp_path / "w", 30, seed=7)
    again = make_pairs(tmp_path / "w2", 30, seed=7)
    assert path.read_text() == again.read_text()
    assert (tmp_path / "w" / "pairs" / "000003_a.png").read_bytes() == (tmp_path / "w2" / "pairs" / "000003_a.png").read_bytes()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        data = json.loads(line)
        record = parse_record(data, f"pairs.jsonl:{number}", path.parent)
        a, b = data["factors_a"], data["factors_b"]
        assert {f for f in FACTORS if a[f] == b[f]} == set(data["shared"])
        if "color" in data["shared"]:  # captions leave the shared factors to the reference
            assert a["color"] not in data["caption_a"] and b["color"] not in data["caption_b"]
        else:
            assert a["color"] in data["caption_a"]
        assert len(record.positive_attributes) == len(data["shared"])
        assert len(record.negative_attributes) == len(FACTORS) - len(data["shared"])
        assert all(p in sum(TRAIN_PHRASINGS.values(), ()) for p in record.positive_attributes + record.negative_attributes)


def test_judge_reads_every_factor(tmp_path):
    train_rows = read_images(make_images(tmp_path / "train", 1500, seed=1))
    test_rows = read_images(make_images(tmp_path / "test", 200, seed=2))
    judge = train_judge(load_rgb_batch([p for p, _, _ in train_rows]), [a for _, a, _ in train_rows], epochs=6)
    scores = accuracy(judge, load_rgb_batch([p for p, _, _ in test_rows]), [a for _, a, _ in test_rows])
    assert min(scores.values()) > 0.8, scores


def test_retrieval_metric_on_known_embeddings():
    rng = random.Random(3)
    assignments = [sample_assignment(rng) for _ in range(120)]
    onehot = {f: torch.nn.functional.one_hot(torch.tensor([FACTORS[f].index(a[f]) for a in assignments]),
                                              len(FACTORS[f])).float() + 0.01 * torch.randn(120, len(FACTORS[f]))
              for f in FACTORS}
    perfect = retrieval(onehot, assignments)
    for f, row in perfect.items():
        assert row["precision"] == 1.0 and abs(row["leakage"] - row["leakage_chance"]) < 0.1
    blind = retrieval({f: torch.randn(120, 8) for f in FACTORS}, assignments)
    assert all(abs(row["precision"] - row["chance"]) < 0.15 for row in blind.values())
    assert selectivity(perfect) > 0.6
    holistic = torch.cat(list(onehot.values()), dim=1)  # sees every factor, the same under every name
    assert abs(selectivity(retrieval({f: holistic for f in FACTORS}, assignments))) < 1e-6
    assert selectivity_spread({f: holistic for f in FACTORS}, assignments) < 1e-6  # 0 for every query
    assert 0.0 < selectivity_spread(onehot, assignments) < 0.1


def test_mean_cosine_between_images_tells_a_constant_embedding_from_an_image_dependent_one():
    """1 when every image gets the same embedding under a name (the attribute is not encoded), near 0 for
    embeddings that differ from image to image."""
    from lab.world.evaluate import mean_cosine_between_images

    constant = torch.randn(1, 16).repeat(50, 1) * torch.rand(50, 1)  # one direction, any norm
    scores = mean_cosine_between_images({"shape": constant, "color": torch.randn(50, 16)})
    assert scores["shape"] == pytest.approx(1.0, abs=1e-5)
    assert abs(scores["color"]) < 0.1


def test_generator_stage_reloads_with_its_own_tokenizer_and_samples_deterministically(world_generator, tiny_backbone):
    from lab.world.generator import sample_images
    from omni_attribute.train.generator import load_tiny_generator

    transformer, text, layout = load_tiny_generator(world_generator)  # tokenizer/ saved beside the weights
    captions = ["a small plain red circle on a gray background, lit from above", ""]
    out = sample_images(transformer, text, layout, captions, steps=2)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert torch.equal(out, sample_images(transformer, text, layout, captions, steps=2))


def test_composition_with_reused_attribute_differences(world_generator):
    """sample_composed's reuse rule (the guider's "reuse Δ every k steps", the library's DeltaReuse):
    k = 1 is the exact rule bit for bit; k = 2 evaluates the attributes every second step only."""
    from lab.world.generator import sample_composed
    from omni_attribute.ip_adapter import IPAdapter, IPAdapterConfig, attach_to_diffusers
    from omni_attribute.train.generator import load_tiny_generator

    transformer, text, layout = load_tiny_generator(world_generator)
    torch.manual_seed(3)
    ip = IPAdapter(IPAdapterConfig.for_layout(layout, "all", "none", context_dim=8))
    with torch.no_grad():
        for block in ip.double_blocks.values():
            block.to_v.weight.normal_(0, 0.3)
    attach_to_diffusers(transformer, ip)
    captions = ["a small plain red circle", "a large striped blue square"]
    tokens = [torch.randn(2, 4, 8), torch.randn(2, 4, 8)]
    calls = []
    hook = transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        exact = sample_composed(transformer, text, layout, captions, tokens, [0.8, 1.2], steps=4)
        exact_calls, calls[:] = len(calls), []
        every_step = sample_composed(transformer, text, layout, captions, tokens, [0.8, 1.2], steps=4, reuse_every=1)
        calls.clear()
        reused = sample_composed(transformer, text, layout, captions, tokens, [0.8, 1.2], steps=4, reuse_every=2)
    finally:
        hook.remove()
    assert torch.equal(every_step, exact)
    assert exact_calls == 4 * 4 and len(calls) == 2 * 4 + 2 * 1  # refresh steps: c, ∅, E_1, E_2; others: c
    assert not torch.equal(reused, exact) and (reused - exact).abs().max() < 0.5


def test_generator_folder_loads_as_comfyui_flux_with_the_same_velocities(world_generator, comfy_in_process):
    from devtools.comfy_flux import comfy_flux_forward
    from lab.comfy_nodes import load_for_comfy
    from omni_attribute.flux_models import diffusers_flux_forward
    from omni_attribute.train.generator import load_tiny_generator

    transformer, text, layout = load_tiny_generator(world_generator)
    comfy_model, comfy_text = load_for_comfy(world_generator)
    assert comfy_model.model_sampling.shift == 1.0  # the linear schedule the world's sampler uses
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 16, 16, 16, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    context, pooled = text(["a large striped blue square on a teal background, lit from the left", ""])
    assert torch.equal(context, comfy_text(["a large striped blue square on a teal background, lit from the left", ""])[0])
    guidance = torch.ones(2)
    with torch.no_grad():
        expected = diffusers_flux_forward(transformer, latent, sigma, context, pooled, guidance)
        got = comfy_flux_forward(comfy_model, latent, sigma, context, pooled, guidance)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


def test_personalization_and_composition_scores_case_by_case():
    rng = random.Random(5)
    refs, targets = [sample_assignment(rng) for _ in range(12)], [sample_assignment(rng) for _ in range(12)]
    asked = [list(FACTORS)[i % 6] for i in range(12)]
    # an image that takes the asked factor from the reference in the first 6 cases, the rest from the prompt
    judged = [{**t.as_dict(), f: (r[f] if i < 6 else t[f])} for i, (r, t, f) in enumerate(zip(refs, targets, asked))]
    scores = personalization_scores(judged, refs, targets, asked)
    expected = [1] * 6 + [int(r[f] == t[f]) for r, t, f in zip(refs[6:], targets[6:], asked[6:])]
    assert scores["hits"] == expected and scores["attribute_fidelity"] == sum(expected) / 12
    assert scores["text_fidelity"] == 1.0 and scores["copy_paste"] == 0.0
    assert scores["attribute_fidelity_by_factor"] == {f: (1 + expected[6 + i]) / 2 for i, f in enumerate(FACTORS)}
    pairs = [[refs[i], refs[i + 1]] for i in range(0, 12, 2)]
    picks = [["color", "background"]] * 6
    both = [{"color": p[0]["color"], "background": p[1]["background"] if i % 2 else "none"} for i, p in enumerate(pairs)]
    assert composition_all_hits(both, pairs, picks) == [0, 1, 0, 1, 0, 1]


def test_paired_gap_spread_is_the_standard_error_of_the_per_case_difference():
    assert paired_gap_spread([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.25)  # d = 0,1,0,0: var 0.25, n 4
    assert paired_gap_spread([1, 0, 1, 0], [1, 0, 1, 0]) == 0.0                  # the same images: no spread
    with pytest.raises(ValueError):
        paired_gap_spread([1, 0], [1])


def test_captioner_stage_trains_and_reloads(tmp_path, tiny_backbone):
    from lab.world.captioner import pretrain_captioner
    from omni_attribute.backbone import load_backbone

    rows = read_images(make_images(tmp_path / "img", 8, seed=4))
    losses = []
    pretrained = pretrain_captioner(tiny_backbone, tmp_path / "bb", load_rgb_batch([p for p, _, _ in rows]),
                                    [a for _, a, _ in rows], steps=2, batch_size=2,
                                    progress=lambda s, n, loss: losses.append(loss))
    assert len(losses) == 2 and all(abs(loss - 11.93) < 1.0 for loss in losses), losses  # untrained: ≈ ln(151936 tokens)
    assert load_backbone(pretrained).info()["hidden_size"] == 64


def test_captioner_factor_read_out_adds_one_classification_loss_per_factor(tmp_path, tiny_backbone):
    """With ``factor_weight`` the first step's loss is the caption loss plus the untrained read-outs'
    cross-entropy, about the mean over factors of ln(number of values)."""
    import math

    from lab.world.captioner import pretrain_captioner
    from lab.world.factors import FACTORS

    rows = read_images(make_images(tmp_path / "img", 8, seed=4))
    first = {}
    for weight in (0.0, 1.0):
        losses = []
        pretrain_captioner(tiny_backbone, tmp_path / f"bb{weight}", load_rgb_batch([p for p, _, _ in rows]),
                           [a for _, a, _ in rows], steps=1, batch_size=2, factor_weight=weight,
                           progress=lambda s, n, loss: losses.append(loss))
        first[weight] = losses[0]
    uniform = sum(math.log(len(values)) for values in FACTORS.values()) / len(FACTORS)
    assert abs(first[1.0] - first[0.0] - uniform) < 0.5, (first, uniform)


def test_backbone_read_back_scores_the_likeliest_value_of_each_factor(tmp_path, tiny_backbone):
    """The read-back picks, per factor, the value whose words the backbone finds likeliest: on an untrained
    backbone it is a fraction in [0, 1] for every factor, and the same on a second call (no sampling)."""
    from lab.world.captioner import read_back

    rows = read_images(make_images(tmp_path / "img", 6, seed=5))
    images, truth = load_rgb_batch([p for p, _, _ in rows]), [a for _, a, _ in rows]
    first = read_back(tiny_backbone, images, truth)
    assert set(first) == set(FACTORS) and all(v * len(truth) == round(v * len(truth)) for v in first.values())
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert read_back(tiny_backbone, images, truth) == first


def test_backbone_pre_training_asks_with_the_held_out_words_only_when_told():
    """The committed backbone's pre-training never names a factor by its held-out phrasing; backbone_words="all"
    (the words a real MLLM knows) does, and is its own stage — the committed backbone's settings are unchanged."""
    from lab.world.captioner import caption_or_request
    from lab.world.factors import HELD_OUT_PHRASINGS, PHRASINGS
    from lab.world.pipeline import backbone_settings

    rng, a = random.Random(0), sample_assignment(random.Random(1))
    held_out = {f"Describe the {p}:" for p in HELD_OUT_PHRASINGS.values()}
    assert not held_out & {caption_or_request(a, rng)[0] for _ in range(2000)}
    assert held_out <= {caption_or_request(a, rng, PHRASINGS)[0] for _ in range(2000)}
    assert "words" not in backbone_settings("ci") and backbone_settings("ci", backbone_words="all")["words"] == "all"
    with pytest.raises(ValueError, match="backbone_words"):
        backbone_settings("ci", backbone_words="everything")


def test_image_states_are_each_images_own_whatever_the_batch(tmp_path, tiny_backbone):
    """One row of image-token states per image, [N, tokens, width]; batching does not change them (each image
    is read on its own in the causal MLLM), and different images give different states."""
    from lab.world.captioner import image_states

    rows = read_images(make_images(tmp_path / "img", 5, seed=5))
    images = load_rgb_batch([p for p, _, _ in rows])
    together, apart = image_states(tiny_backbone, images), image_states(tiny_backbone, images, batch_size=2)
    assert together.shape[0] == 5 and together.shape[1] > 1
    assert torch.allclose(together, apart, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_generator_trains_and_samples_under_bf16_autocast(tmp_path, tiny_backbone, world_generator):
    """--bf16 of the laboratory: the same code path under bf16 autocast (here on the CPU) trains with a finite
    loss and samples images close to the fp32 ones from the same noise."""
    from transformers import AutoTokenizer

    from lab.world.generator import sample_images, train_world_generator
    from omni_attribute.train.generator import load_tiny_generator

    rows = read_images(make_images(tmp_path / "img", 8, seed=6))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone), fix_mistral_regex=False)
    losses = []
    train_world_generator(load_rgb_batch([p for p, _, _ in rows]), [a for _, a, _ in rows], tokenizer,
                          tmp_path / "bf16-world", steps=2, batch_size=2, bf16=True,
                          progress=lambda s, n, loss: losses.append(loss))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    transformer, text, layout = load_tiny_generator(world_generator)
    captions = ["a small plain red circle", "a large striped blue square"]
    full = sample_images(transformer, text, layout, captions, steps=4)
    half = sample_images(transformer, text, layout, captions, steps=4, bf16=True)
    assert half.dtype == torch.float32 and half.device.type == "cpu"
    assert 0 < (half - full).abs().mean() < 0.05, (half - full).abs().mean()


def test_compute_options_of_the_laboratory_commands():
    import argparse

    from lab.world.pipeline import CPU, Compute, add_compute_arguments, compute_from

    parser = argparse.ArgumentParser()
    add_compute_arguments(parser)
    assert compute_from(parser.parse_args([]), parser) == CPU == Compute("cpu", False)
    assert compute_from(parser.parse_args(["--bf16"]), parser) == Compute("cpu", True)
    assert Compute("cpu", True).trainer_overrides()[0] == "runtime.mixed_precision=bf16"
    for bad in (["--device", "nonsense"], ["--device", "meta"]) + ((["--device", "cuda"],) if not torch.cuda.is_available() else ()):
        with pytest.raises(SystemExit):
            compute_from(parser.parse_args(bad), parser)
