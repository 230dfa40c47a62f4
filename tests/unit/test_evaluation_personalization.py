"""The personalization benchmark (omni-attribute-eval personalization) against a local oracle judge on 127.0.0.1:
judge-based numbers reproduced, retries on 429/5xx/timeouts, a killed run resumed without duplicates, clear
errors without retry storms. Generation goes through a stand-in for the ComfyUI run here (the host test runs the
real workflow on a live server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import omni_attribute.headless as headless
from omni_attribute.evaluation import personalization as p
from omni_attribute.evaluation.cli import main as eval_main
from omni_attribute.evaluation.retrieval import EvaluationError
from omni_attribute.openai_client import AuthenticationError, EndpointUnreachableError, ModelNotFoundError
from tests.fixtures.oracle_judge import OracleJudge, oracle_scores

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = {
    "4": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
    "5": {"class_type": "OmniAttributeEncode", "inputs": {"attributes": "x", "encoder": ["3", 0], "image": ["4", 0]}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}, "_meta": {"title": "Prompt"}},
    "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
}


def make_bench(tmp_path: Path, judge_url: str, concurrency: int = 2, timeout: float = 5.0, model="oracle-judge",
               api_key_env: str | None = None) -> Path:
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("dog", "cat", "vase"):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(refs / f"{name}.png")
    (tmp_path / "workflow.api.json").write_text(json.dumps(WORKFLOW))
    config = {
        "workflow": "workflow.api.json", "server": "http://127.0.0.1:1",
        "inputs": {"reference": "4.image", "attribute": "5.attributes", "prompt": "Prompt.text", "seed": "11.noise_seed"},
        "seeds": [0, 1],
        "judge": {"base_url": judge_url, "model": model, "api_key_env": api_key_env, "concurrency": concurrency,
                  "timeout": timeout, "max_retries": 4, "backoff_base": 0.05, "backoff_max": 2.0},
        "attributes": [
            {"attribute": "animal identity", "references": ["refs/dog.png", "refs/cat.png"],
             "prompts": ["an astronaut", "a watercolor painting in a garden"]},
            {"attribute": "object material", "references": ["refs/vase.png"], "prompts": ["a chair"]},
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(config))
    return path


def fake_comfy(monkeypatch, calls: list | None = None):
    """Stands in for running the workflow: the 'generated' image is the reference blended with seeded noise."""
    def run_workflow(client, prompt, out_dir):
        reference = np.asarray(Image.open(prompt["4"]["inputs"]["image"]).convert("RGB"), dtype=np.float64)
        seed = prompt["11"]["inputs"]["noise_seed"] * 1000 + len(prompt["6"]["inputs"]["text"])
        noise = np.random.default_rng(seed).integers(0, 255, reference.shape)
        image = (0.6 * reference + 0.4 * noise).astype(np.uint8)
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out_dir / "ComfyUI_00001_.png")
        if calls is not None:
            calls.append(prompt["5"]["inputs"]["attributes"])
        return [out_dir / "ComfyUI_00001_.png"]
    monkeypatch.setattr(headless, "run_workflow", run_workflow)


def expected_table(out: Path, config) -> dict:
    rows = {}
    for case in config.cases():
        scores = oracle_scores(case.reference.read_bytes(), (out / "images" / f"{case.id}.png").read_bytes(),
                               case.prompt)
        s = {k: v / 10 for k, v in scores.items()}
        s["conditioning_fidelity"] = (s["attribute_fidelity"] + s["text_fidelity"]) / 2
        rows.setdefault(case.attribute, []).append(s)
    rows["all"] = [s for k in list(rows) for s in rows[k]]
    return {a: {k: float(np.mean([s[k] for s in ss])) for k in p.SCORES} for a, ss in rows.items()}


def check_results(out: Path, config) -> None:
    table = json.loads((out / "results.json").read_text())["table"]
    for attribute, want in expected_table(out, config).items():
        for key, value in want.items():
            assert table[attribute][key] == pytest.approx(value, abs=1e-9), (attribute, key)
    lines = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert sorted(r["case"] for r in lines) == sorted(c.id for c in config.cases())  # each case exactly once


def test_judge_based_numbers_are_reproduced(tmp_path, monkeypatch, capsys):
    calls = []
    fake_comfy(monkeypatch, calls)
    with OracleJudge(delay_s=0.02) as judge:
        path = make_bench(tmp_path, judge.url, concurrency=3)
        assert eval_main(["personalization", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
        config = p.load_config(path)
        assert len(config.cases()) == 10 and len(calls) == 10
        check_results(tmp_path / "out", config)
        assert judge.max_in_flight <= 3 and len(judge.log) == 30
    printed = capsys.readouterr().out
    assert "| **all** | 10 |" in printed and "| animal identity | 8 |" in printed
    assert (tmp_path / "out" / "results.md").read_text().startswith("| attribute | cases | attribute fidelity")
    # run again: nothing is generated or judged twice
    with OracleJudge() as judge:
        make_bench(tmp_path, judge.url)
        assert eval_main(["personalization", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
        assert len(judge.log) == 0 and len(calls) == 10


def test_rate_limits_server_errors_and_timeouts_are_retried(tmp_path, monkeypatch):
    fake_comfy(monkeypatch)
    faults = ["429:1", "500", "timeout", "503", "garbled"]
    with OracleJudge(faults=faults, timeout_sleep_s=1.5) as judge:
        path = make_bench(tmp_path, judge.url, concurrency=1, timeout=0.5)
        config = p.load_config(path)
        p.generate(config, tmp_path / "out", log=lambda _: None, client=object())
        p.judge(config, tmp_path / "out", log=lambda _: None)
        p.report(config, tmp_path / "out")
        check_results(tmp_path / "out", config)
        statuses = [r.get("status") for r in judge.log]
        assert statuses[:5] == [429, 500, "timeout", 503, 200] and len(judge.log) == 30 + 5
        # the request after the 429 waited for its Retry-After (1 s); backoff for the others is ~0.05–0.2 s
        assert judge.log[1]["time"] - judge.log[0]["time"] >= 0.95


def test_a_killed_run_resumes_without_duplicates(tmp_path, monkeypatch):
    fake_comfy(monkeypatch)
    with OracleJudge(hold_after=7) as judge:
        path = make_bench(tmp_path, judge.url, concurrency=2)
        config = p.load_config(path)
        out = tmp_path / "out"
        p.generate(config, out, log=lambda _: None, client=object())
        ledger = out / "judgements.jsonl"
        process = subprocess.Popen([sys.executable, "-m", "omni_attribute.evaluation.cli", "personalization",
                                    "--config", str(path), "--out", str(out), "--stage", "judge"], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline and not (ledger.is_file() and ledger.read_text().count("\n") >= 2):
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        before = ledger.read_text().count("\n")
        assert 2 <= before < 10, before
        with open(ledger, "a") as handle:   # a torn last line, as a kill in the middle of a write leaves
            handle.write('{"case": "animal-identity__dog')
        judge.release()
        judge.hold_after = None
        p.judge(config, out, log=lambda _: None)
        p.report(config, out)
        check_results(out, config)
        assert ledger.read_text().count("\n") == 10


def test_errors_are_clear_and_stop_at_once(tmp_path, monkeypatch, capsys):
    fake_comfy(monkeypatch)
    with OracleJudge(api_key="right-key") as judge:
        monkeypatch.setenv("ORACLE_KEY", "wrong-key")
        path = make_bench(tmp_path, judge.url, concurrency=3, api_key_env="ORACLE_KEY")
        config = p.load_config(path)
        p.generate(config, tmp_path / "out", log=lambda _: None, client=object())
        with pytest.raises(AuthenticationError, match="refused the request \\(401: Incorrect API key.*ORACLE_KEY"):
            p.judge(config, tmp_path / "out", log=lambda _: None)
        assert len(judge.log) <= 3  # the requests already in flight, and no retry
        monkeypatch.setenv("ORACLE_KEY", "right-key")
        make_bench(tmp_path, judge.url, model="gpt-7", api_key_env="ORACLE_KEY")
        judge.log.clear()
        with pytest.raises(ModelNotFoundError, match="check the model name 'gpt-7'"):
            p.judge(p.load_config(path), tmp_path / "out", log=lambda _: None)
        assert sum(r.get("status") == 404 for r in judge.log) <= 2, judge.log  # (a late 401 of the run above may land)
        assert eval_main(["personalization", "--config", str(path), "--out", str(tmp_path / "out"),
                          "--stage", "judge"]) == 1
        assert "error: " in capsys.readouterr().err
    make_bench(tmp_path, "http://127.0.0.1:9/v1")
    started = time.time()
    with pytest.raises(EndpointUnreachableError, match="cannot reach http://127.0.0.1:9/v1/chat/completions"):
        p.judge(p.load_config(path), tmp_path / "out", log=lambda _: None)
    assert time.time() - started < 5  # no retries against a closed port


def test_config_problems_are_listed(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"workflow": "missing.api.json", "inputs": {"reference": "4.image"},
                                                     "attributes": [{"attribute": "x", "references": ["no.png"],
                                                                     "prompts": []}],
                                                     "judge": {"modle": "gpt-4o"}}))
    with pytest.raises(EvaluationError) as caught:
        p.load_config(tmp_path / "bench.json")
    message = str(caught.value)
    (tmp_path / "workflow.api.json").write_text(json.dumps(WORKFLOW))
    bad = json.loads((tmp_path / "bench.json").read_text())
    bad.update(workflow="workflow.api.json", inputs={"reference": "4.image", "attribute": "5.attributes",
                                                     "prompt": "Prompt.txt", "seed": "99.noise_seed"})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(EvaluationError) as caught_inputs:
        p.load_config(tmp_path / "bad.json")
    assert "inputs.prompt: --set Prompt.txt: node 6 (CLIPTextEncode) has no input 'txt'" in str(caught_inputs.value)
    assert "inputs.seed: --set 99.noise_seed: expected NODE.INPUT where NODE is one node id" in str(caught_inputs.value)
    for part in ("inputs.attribute missing", "inputs.seed missing", "attributes[0].prompts missing or empty",
                 "reference image 'no.png' does not exist", "workflow 'missing.api.json' does not exist",
                 "judge: unknown key(s) ['modle']"):
        assert part in message, part
    with pytest.raises(EvaluationError, match="nothing to judge"):
        make_bench(tmp_path, "http://127.0.0.1:9/v1")
        p.judge(p.load_config(tmp_path / "bench.json"), tmp_path / "empty", log=lambda _: None)


def test_a_damaged_ledger_line_is_named(tmp_path):
    ledger = tmp_path / "judgements.jsonl"
    ledger.write_text('{"case": "a"}\n{"case": oops\n{"case": "c"}\n')
    with pytest.raises(EvaluationError, match="judgements.jsonl line 2 is damaged .*delete that line"):
        p.read_jsonl(ledger)
    ledger.write_text('{"case": "a"}\n{"case": "b"')  # torn last line: cut off, not an error
    assert list(p.read_jsonl(ledger)) == ["a"] and ledger.read_text() == '{"case": "a"}\n'
