"""Expert distillation on the tiny Qwen2.5-VL: teacher answers → conversations → LoRA fine-tuning (the loss
falls, a killed run resumes exactly, the adapter is a PEFT folder) → annotation through transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lab.world.factors import Assignment
from lab.world.pairs import make_pairs
from omni_attribute.annotate.cli import main
from omni_attribute.annotate.config import load_annotate_config, load_finetune_config
from omni_attribute.annotate.errors import AnnotateError
from omni_attribute.annotate.finetune import (
    AnswerLoss,
    finetune,
    load_expert,
    merge_adapter,
    read_peft_adapter,
)
from omni_attribute.annotate.images import encode_image, fit_size
from omni_attribute.annotate.pairs import read_pair_list
from omni_attribute.annotate.prompts import EXPERT_PROMPT, build_messages
from omni_attribute.annotate.run import annotate
from omni_attribute.annotate.sft import (
    IGNORE,
    build_inputs,
    collate,
    export_conversations,
    read_conversations,
)
from tests.fixtures.oracle_vlm_server import oracle_answer, oracle_reasoning

REPO = Path(__file__).resolve().parents[2]
PIXELS = (3136, 3136)    # the tiny config's image budget: world images (32 x 32) go in at 56 x 56 (4 tokens)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """What a teacher run writes for 8 world pairs (the oracle's answers, with reasoning)."""
    folder = tmp_path_factory.mktemp("teacher")
    world = make_pairs(folder / "world", 8, seed=11)
    out = folder / "annotated" / "pairs.jsonl"
    out.parent.mkdir()
    lines = []
    for line in (json.loads(x) for x in world.read_text().splitlines()):
        a, b = Assignment.of(line["factors_a"]), Assignment.of(line["factors_b"])
        lines.append(json.dumps({"id": line["id"], "image_a": f"../world/{line['image_a']}",
                                 "image_b": f"../world/{line['image_b']}", **oracle_answer(a, b),
                                 "reasoning": oracle_reasoning(a, b), "source": "annotate:oracle-teacher"}))
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def sft(teacher_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "expert_sft.jsonl"
    counts = export_conversations([teacher_file], out)
    assert counts["train"] == 8 and counts["skipped"] == 0
    return out


def tiny_finetune_config(tmp: Path, sft: Path, backbone: Path, *extra: str):
    return load_finetune_config(REPO / "configs" / "annotate_expert_tiny.yaml", [
        f"output_dir={tmp}", f"data.conversations={sft}", f"backbone.path={backbone}", *extra])


def test_exported_conversations_are_the_requests_the_server_gets(sft, teacher_file, tiny_backbone):
    conversations = read_conversations(str(sft))
    first = json.loads(sft.read_text().splitlines()[0])
    teacher = json.loads(teacher_file.read_text().splitlines()[0])
    assert first["messages"][0]["content"][2] == {"type": "text", "text": EXPERT_PROMPT}
    answer = json.loads(first["messages"][1]["content"][0]["text"])
    assert answer == {k: teacher[k] for k in ("positive_attributes", "negative_attributes", "caption_a", "caption_b")}
    assert "reasoning" not in answer
    from omni_attribute.backbone import load_backbone

    backbone = load_backbone(tiny_backbone)
    conversation = conversations[0]
    trained = build_inputs(backbone, conversation.messages, conversation.answer, *PIXELS)
    # the same pair as an OpenAI request (data URLs at the same size), as the expert is asked when serving
    a, b = (encode_image(p, *PIXELS) for p in conversation.image_paths())
    served = build_inputs(backbone, build_messages("expert", a.url, b.url), None, *PIXELS)
    n = trained["prompt_length"]
    assert torch.equal(trained["input_ids"][:n], served["input_ids"])
    assert torch.equal(trained["pixel_values"], served["pixel_values"])
    pads = int((served["input_ids"] == backbone.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    w, h = fit_size(32, 32, *PIXELS)
    assert pads == 2 * (w // 28) * (h // 28) == 8                    # (H/28)·(W/28) tokens per image
    labels = trained["labels"]
    assert (labels[:n] == IGNORE).all() and (labels[n:] != IGNORE).all()
    target = backbone.tokenizer.decode(labels[n:])
    assert target == conversation.answer + "<|im_end|>"


def test_bad_conversations_are_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}]}\n')
    with pytest.raises(AnnotateError, match=r"c.jsonl:1: content items are"):
        read_conversations(str(path))
    with pytest.raises(AnnotateError, match="does not exist: write it with omni-attribute-annotate export"):
        read_conversations(str(tmp_path / "none.jsonl"))


def answer_loss(model, backbone, conversations) -> float:
    scorer = AnswerLoss(model)
    with torch.no_grad():
        batch = collate([build_inputs(backbone, c.messages, c.answer, *PIXELS) for c in conversations],
                        backbone.tokenizer.pad_token_id)
        return float(scorer(**batch))


def test_finetuning_lowers_the_loss_and_writes_a_peft_adapter(tmp_path, sft, tiny_backbone):
    config = tiny_finetune_config(tmp_path / "run", sft, tiny_backbone, f"data.validation={sft}", "optim.max_steps=12",
                                  "optim.lr=0.01", "runtime.checkpoint_every=6")
    adapter = finetune(config, progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print("expert fine-tuning, answer loss before/after:", summary["val_loss_start"], summary["val_loss"])
    assert summary["val_loss"] < summary["val_loss_start"] - 0.2, summary
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0], losses
    # the folder is a standard PEFT LoRA: peft loads it onto the plain model with the same function
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    ours = load_expert(tiny_backbone, adapter)
    conversations = read_conversations(str(sft))[:2]
    batch = collate([build_inputs(ours, c.messages, c.answer, *PIXELS) for c in conversations], ours.tokenizer.pad_token_id)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_backbone), dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        expected = ours.model(**batch).logits
        assert torch.allclose(theirs(**batch).logits, expected, atol=1e-5)
        plain = load_expert(tiny_backbone, None)
        assert not torch.allclose(plain.model(**batch).logits, expected, atol=1e-3)   # the LoRA does act
        merged = merge_adapter(tiny_backbone, adapter, tmp_path / "merged")
        again = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32).eval()
        assert torch.allclose(again(**batch).logits, expected, atol=1e-4)
    lora, tensors = read_peft_adapter(adapter)
    assert lora["r"] == 8 and all(k.startswith("model.language_model.layers.") for k in tensors)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni_attribute.annotate.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_a_killed_finetuning_resumes_exactly(tmp_path, sft, tiny_backbone):
    config = str(REPO / "configs" / "annotate_expert_tiny.yaml")
    common = [f"data.conversations={sft}", f"backbone.path={tiny_backbone}", "optim.max_steps=4",
              "runtime.checkpoint_every=2", "lora.dropout=0.1"]
    sets = lambda out, *more: [a for s in (f"output_dir={out}", *common, *more) for a in ("--set", s)]
    whole = run_cli("finetune", "--config", config, "--quiet", *sets(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = run_cli("finetune", "--config", config, "--quiet", *sets(tmp_path / "killed", "runtime.crash_after_step=3"))
    assert killed.returncode == -9, killed.stderr          # SIGKILL after step 3; the newest checkpoint is step 2
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step-0000002"
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = run_cli("finetune", "--config", config, "--quiet", *sets(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)       # it did train
    dry = run_cli("finetune", "--config", config, "--dry-run", *sets(tmp_path / "dry", f"data.conversations={tmp_path}/x.jsonl"))
    assert dry.returncode == 2 and "x.jsonl' does not exist" in dry.stderr


def test_annotation_through_transformers_counts_what_the_model_reads(tmp_path, sft, teacher_file, tiny_backbone):
    """The local backend runs the same loop (an untrained tiny model writes no JSON: its answers are rejected
    with a reason); prompt tokens are the model's own input length."""
    pairs = tmp_path / "todo.jsonl"
    lines = [json.loads(x) for x in teacher_file.read_text().splitlines()[:2]]
    pairs.write_text("\n".join(json.dumps({"id": x["id"], "image_a": str(teacher_file.parent / x["image_a"]),
                                           "image_b": str(teacher_file.parent / x["image_b"])}) for x in lines))
    summaries = {}
    for style in ("teacher", "expert"):
        config = load_annotate_config(None, ["endpoint.backend=transformers", f"local.model_path={tiny_backbone}",
                                             f"prompt.style={style}", "prompt.max_rejections=1", "endpoint.max_tokens=6",
                                             f"image.min_pixels={PIXELS[0]}", f"image.max_pixels={PIXELS[1]}",
                                             "run.progress=false"])
        summaries[style] = annotate(read_pair_list(pairs), tmp_path / f"{style}.jsonl", config)
    from omni_attribute.backbone import load_backbone

    backbone = load_backbone(tiny_backbone)
    for style, summary in summaries.items():
        assert summary["done"] == 0 and summary["rejected"] == 2 and summary["requests"] == 4
        assert sum(summary["rejected_reasons"].values()) == 2
        first = read_pair_list(pairs)[0]
        a, b = (encode_image(p, *PIXELS) for p in (first.image_a, first.image_b))
        length = len(build_inputs(backbone, build_messages(style, a.url, b.url), None, *PIXELS)["input_ids"])
        assert summary["tokens"]["prompt"] > 4 * length - 1           # 2 pairs x 2 asks; re-asks are longer
        assert summary["tokens"]["completion"] <= 4 * 6
    print("tiny model, prompt tokens teacher/expert:", summaries["teacher"]["tokens"]["prompt"],
          summaries["expert"]["tokens"]["prompt"], "latency p50 (s):", summaries["teacher"]["request_latency_s"]["p50"],
          summaries["expert"]["request_latency_s"]["p50"])
    rejected = [json.loads(x) for x in (tmp_path / "expert.rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 2 and all(r["reason"] for r in rejected)
    assert main(["run", "--pairs", str(pairs), "--out", str(tmp_path / "x.jsonl"), "--set", "endpoint.backend=transformers",
                 "--set", f"local.model_path={tmp_path}/nothing"]) == 2
