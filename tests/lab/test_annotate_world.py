"""The tiny world annotated through the pipeline: the world's pairs sent to the oracle server (which answers
from the ground truth, with faults injected), the output compared with the world's own pairs file, and the
trainer run on it. (The full benchmark table from annotated pairs is not computed here: that would train the
laboratory's four encoders again, ~35 minutes; what this shows is that the annotated file is the world's file, so the table would be too.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.world.factors import FACTORS, PHRASINGS
from lab.world.pairs import make_pairs
from omni_attribute.annotate.cli import main
from omni_attribute.train.config import load_config
from omni_attribute.train.trainer import train
from tests.fixtures.oracle_vlm_server import OracleServer, build_table, world_images

REPO = Path(__file__).resolve().parents[2]
FACTOR_OF = {phrase: factor for factor, phrases in PHRASINGS.items() for phrase in phrases}


def factors(names: list[str]) -> set[str]:
    return {FACTOR_OF[name] for name in names}


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, tokenizer_dir):
    """(the world's pairs file, the annotated pairs file) for 40 world pairs."""
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("annotate-world")
    world = make_pairs(base / "world", 40, seed=21)
    out = base / "annotated" / "pairs.jsonl"
    table = build_table(world_images(world), 56 * 56, 448 * 448)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    with OracleServer(table, tokenizer=tokenizer) as server:
        server.fault_next(["500", "429:1", "malformed", "truncated", "schema", "timeout", "repairable"])
        sets = ["endpoint.base_url=" + server.url, "endpoint.model=oracle-teacher", "endpoint.concurrency=4",
                "endpoint.timeout_s=1", "endpoint.backoff_base_s=0.02", "endpoint.api_key_env=", "run.progress=false"]
        code = main(["run", "--pairs", str(world), "--out", str(out), "--config",
                     str(REPO / "configs" / "annotate_teacher.yaml"), *[a for s in sets for a in ("--set", s)]])
        assert code == 0
    return world, out


def test_phrasings_name_one_factor_each():
    assert len(FACTOR_OF) == sum(len(p) for p in PHRASINGS.values())


def test_the_annotated_file_is_the_worlds_own(annotated):
    world, out = annotated
    mine = {r["id"]: r for r in map(json.loads, world.read_text().splitlines())}
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len({r["id"] for r in got}) == len(mine)
    for record in got:
        truth = mine[record["id"]]
        for key in ("image_a", "image_b"):
            assert (out.parent / record[key]).resolve() == (world.parent / truth[key]).resolve()
        assert factors(record["positive_attributes"]) == factors(truth["positive_attributes"]) == set(truth["shared"])
        assert factors(record["negative_attributes"]) == factors(truth["negative_attributes"]) \
            == set(FACTORS) - set(truth["shared"])
        assert (record["caption_a"], record["caption_b"]) == (truth["caption_a"], truth["caption_b"])
    summary = json.loads(out.with_name("pairs.summary.json").read_text())
    assert summary["done"] == 40 and summary["rejected"] == 0 and sum(summary["retries"].values()) == 4


def test_the_trainer_reads_the_annotated_file(annotated, tiny_backbone, tmp_path):
    from omni_attribute.train.cli import main as train_main

    _, out = annotated
    config_path = str(REPO / "configs" / "train_tiny.yaml")
    sets = [f"data.pairs={out}", f"data.validation_pairs={out}", f"backbone.path={tiny_backbone}",
            f"output_dir={tmp_path / 'run'}"]
    assert train_main(["--config", config_path, "--dry-run", *[a for s in sets for a in ("--set", s)]]) == 0
    config = load_config(config_path, [*sets, "optim.max_steps=2", "runtime.validate_every=0", "runtime.checkpoint_every=2"])
    adapter = train(config, progress=False)
    assert adapter.is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and metrics[-1]["skipped_samples"] == 0
