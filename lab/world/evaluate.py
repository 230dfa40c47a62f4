"""Measuring what the paper claims, in the tiny world, against ground truth."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from omni_attribute.prompt import format_instruction

from .factors import FACTORS, HELD_OUT_PHRASINGS, Assignment


@torch.no_grad()
def embed_by_factor(encoder, images: torch.Tensor, phrasings: dict[str, str] = HELD_OUT_PHRASINGS,
                    batch_note=None) -> dict[str, torch.Tensor]:
    """Pooled embeddings of every image under every factor's name: {factor: [N, D]} (one MLLM prefix
    pass per image thanks to the shared prefix)."""
    template = encoder.metadata.prompt_template
    instructions = [format_instruction([phrasings[f]], template) for f in FACTORS]
    rows = []
    for i in range(images.shape[0]):
        _, pooled = encoder.encode_image(images[i:i + 1].to(encoder.compute_device), instructions)
        rows.append(pooled.float().cpu())
        if batch_note:
            batch_note(i + 1, images.shape[0])
    stacked = torch.stack(rows)  # [N, F, D]
    return {f: stacked[:, k] for k, f in enumerate(FACTORS)}


def _query_hits(embeddings: dict[str, torch.Tensor], assignments: list[Assignment], k: int
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """hits[f][g][q]: the fraction of query q's k nearest neighbours under f's name that share q's value
    of g; chance[g]: that fraction for a retrieval blind to g."""
    n = len(assignments)
    values = {g: torch.tensor([FACTORS[g].index(a[g]) for a in assignments]) for g in FACTORS}
    same = {g: (values[g][:, None] == values[g][None, :]).float() for g in FACTORS}
    chance = {g: float((same[g].sum() - n) / (n * (n - 1))) for g in FACTORS}
    hits = {}
    for f, emb in embeddings.items():
        unit = F.normalize(emb, dim=-1)
        sim = unit @ unit.T
        sim.fill_diagonal_(-2.0)
        top = sim.topk(k, dim=-1).indices
        hits[f] = {g: same[g].gather(1, top).mean(dim=1) for g in FACTORS}
    return hits, chance


def mean_cosine_between_images(embeddings: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per factor, the mean cosine between the pooled embeddings of two different images under its name: near
    1 when the encoder gives (nearly) the same embedding whatever the image — the attribute is not encoded."""
    out = {}
    for f, emb in embeddings.items():
        unit = F.normalize(emb.float(), dim=-1)
        n = unit.shape[0]
        out[f] = float(((unit @ unit.T).sum() - n) / (n * (n - 1)))
    return out


def retrieval(embeddings: dict[str, torch.Tensor], assignments: list[Assignment], k: int = 10) -> dict[str, dict]:
    """For each factor f: precision@k of retrieving images with the query's value of f when embedding
    under f's name; leakage = the same precision measured on every other factor g (averaged), with
    its chance level (what a retrieval blind to g would score)."""
    hits, chance = _query_hits(embeddings, assignments, k)
    results = {}
    for f in embeddings:
        others = [g for g in FACTORS if g != f]
        results[f] = {"precision": float(hits[f][f].mean()), "chance": chance[f],
                      "leakage": sum(float(hits[f][g].mean()) for g in others) / len(others),
                      "leakage_chance": sum(chance[g] for g in others) / len(others)}
    return results


def selectivity_spread(embeddings: dict[str, torch.Tensor], assignments: list[Assignment], k: int = 10,
                       rounds: int = 1000, seed: int = 0) -> float:
    """Standard deviation of ``selectivity`` over bootstrap resamples of the queries: how much of it is
    the luck of which held-out images were drawn (not the spread over training seeds)."""
    hits, chance = _query_hits(embeddings, assignments, k)
    per_query = torch.stack([(hits[f][f] - chance[f]) - sum(hits[f][g] - chance[g] for g in FACTORS if g != f)
                             / (len(FACTORS) - 1) for f in embeddings]).mean(dim=0)
    draws = torch.randint(0, len(per_query), (rounds, len(per_query)), generator=torch.Generator().manual_seed(seed))
    return float(per_query[draws].mean(dim=1).std())


@torch.no_grad()
def attribute_tokens(encoder, images: torch.Tensor, factors: list[str], phrasings: dict[str, str] = HELD_OUT_PHRASINGS
                     ) -> torch.Tensor:
    """Tokens of image i under factor i's name: [B, M, D]."""
    template = encoder.metadata.prompt_template
    rows = [encoder.encode_image(images[i:i + 1].to(encoder.compute_device),
                                 [format_instruction([phrasings[f]], template)])[0][0].float().cpu()
            for i, f in enumerate(factors)]
    return torch.stack(rows)


def personalization_scores(judged: list[dict], references: list[Assignment], targets: list[Assignment],
                           asked: list[str]) -> dict[str, float]:
    """attribute fidelity: the asked factor has the reference's value (also per asked factor, and case by
    case: ``hits``); text fidelity: the other factors have the prompt's values; copy-paste: where reference
    and prompt differ on another factor, how often the image shows the reference's value instead."""
    text, copied, copy_cases = 0.0, 0.0, 0
    hits = [int(seen[f] == ref[f]) for seen, ref, f in zip(judged, references, asked)]
    by_factor = {g: [h for h, f in zip(hits, asked) if f == g] for g in FACTORS}
    for seen, ref, target, f in zip(judged, references, targets, asked):
        others = [g for g in FACTORS if g != f]
        text += sum(seen[g] == target[g] for g in others) / len(others)
        for g in others:
            if ref[g] != target[g]:
                copy_cases += 1
                copied += seen[g] == ref[g]
    n = len(judged)
    return {"attribute_fidelity": sum(hits) / n, "text_fidelity": text / n, "copy_paste": copied / max(1, copy_cases),
            "attribute_fidelity_by_factor": {g: sum(h) / len(h) for g, h in by_factor.items() if h}, "hits": hits}


def paired_gap_spread(hits: list[int], baseline_hits: list[int]) -> float:
    """Standard error of the mean per-case difference of two hit lists on the same cases (the spread of a
    fidelity gap over a baseline sampled with the same prompts and seeds: smaller than the two binomial errors)."""
    differences = [a - b for a, b in zip(hits, baseline_hits, strict=True)]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / max(1, len(differences) - 1)
    return math.sqrt(variance / len(differences))


def composition_scores(judged: list[dict], references: list[list[Assignment]], asked: list[list[str]]) -> float:
    """Fraction of asked attributes (one per reference) that the generated image carries."""
    hits = [seen[f] == ref[f] for seen, refs, fs in zip(judged, references, asked) for ref, f in zip(refs, fs)]
    return sum(hits) / len(hits)


def composition_all_hits(judged: list[dict], references: list[list[Assignment]], asked: list[list[str]]) -> list[int]:
    """Per case: 1 when the generated image carries every asked attribute at once."""
    return [int(all(seen[f] == ref[f] for ref, f in zip(refs, fs))) for seen, refs, fs in zip(judged, references, asked)]


def selectivity(retrieval_rows: dict[str, dict]) -> float:
    """How much more the embedding under a factor's name retrieves that factor than the others, both
    measured above chance, averaged over factors. 0 for an encoder blind to the attribute text (the
    holistic one: the same embedding under every name); 1 − chance at best."""
    gaps = [(r["precision"] - r["chance"]) - (r["leakage"] - r["leakage_chance"]) for r in retrieval_rows.values()]
    return sum(gaps) / len(gaps)
