"""omni-attribute-eval personalization end to end: the shipped personalize_attribute workflow (FLUX swapped for
the tiny test fixtures, as in test_workflows.py) run on the live server for every case, judged by the oracle
judge on 127.0.0.1; the command's table equals the numbers computed from the generated images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.oracle_judge import OracleJudge, oracle_scores
from tests.host.test_workflows import API_WORKFLOWS, tiny_version

pytestmark = pytest.mark.host
REPO = Path(__file__).resolve().parents[2]


def test_personalization_benchmark_on_the_live_server(comfy_server, tmp_path):
    (tmp_path / "workflow.api.json").write_text(
        json.dumps(tiny_version(json.loads((API_WORKFLOWS / "personalize_attribute.api.json").read_text()))))
    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    with OracleJudge() as judge:
        config = {"workflow": "workflow.api.json", "server": comfy_server.url,
                  # the tiny FLUX has no text encoder (the prompt node is a fixture): the prompt goes into the
                  # saved file's name, so it still reaches the workflow
                  "inputs": {"reference": "4.image", "attribute": "6.attributes", "prompt": "17.filename_prefix",
                             "seed": "11.noise_seed"},
                  "seeds": [3],
                  "judge": {"base_url": judge.url, "model": "oracle-judge", "api_key_env": None, "concurrency": 2},
                  "attributes": [{"attribute": "dog identity", "references": ["a.png", "b.png"],
                                  "prompts": ["a dog astronaut"]}]}
        (tmp_path / "bench.json").write_text(json.dumps(config))
        result = subprocess.run([sys.executable, "-m", "omni_attribute.evaluation.cli", "personalization", "--config",
                                 str(tmp_path / "bench.json"), "--out", str(tmp_path / "out")], cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr + result.stdout
        assert len(judge.log) == 6
    generated = sorted((tmp_path / "out" / "images").glob("*.png"))
    assert len(generated) == 2 and Image.open(generated[0]).size == (64, 64)  # the tiny FLUX's 64 px images
    records = {r["case"]: r for r in map(json.loads, (tmp_path / "out" / "judgements.jsonl").read_text().splitlines())}
    expected = []
    for record in records.values():
        s = oracle_scores(Path(record["reference"]).read_bytes(), (tmp_path / "out" / record["image"]).read_bytes(),
                          record["prompt"])
        expected.append({k: v / 10 for k, v in s.items()})
    table = json.loads((tmp_path / "out" / "results.json").read_text())["table"]
    for key in ("attribute_fidelity", "text_fidelity", "naturalness"):
        assert table["dog identity"][key] == pytest.approx(np.mean([e[key] for e in expected]))
    assert "| dog identity | 2 |" in result.stdout
