"""Training on tiny real models: losses go down, a killed run resumes exactly, bad input fails early."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni_attribute.adapter_file import read_adapter_metadata
from omni_attribute.train.config import ConfigError, load_config
from omni_attribute.train.data import DatasetError, iter_records, parse_record, shard_files
from omni_attribute.train.trainer import OmniAttributeModel, build_model, preflight, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pairs(tiny_pairs) -> Path:
    return tiny_pairs


def tiny_config(tmp: Path, pairs: Path, backbone: Path, *extra: str):
    return load_config(REPO / "configs" / "train_tiny.yaml", [
        f"output_dir={tmp / 'run'}", f"data.pairs={pairs}", f"data.validation_pairs={pairs}",
        f"backbone.path={backbone}", *extra])


def fixed_loss(model: OmniAttributeModel, config, pairs: Path) -> dict[str, float]:
    """Mean losses over all pairs with fixed randomness (same timesteps, noise and choices before and after)."""
    from omni_attribute.train.data import PairDataset

    records = list(iter_records(shard_files(str(pairs))))
    dataset = PairDataset(records, config.data.image_size)
    totals = {"loss": 0.0, "lgen": 0.0, "lcon": 0.0}
    with torch.no_grad():
        for i in range(0, len(dataset) - 1, 2):
            out = model([dataset[i], dataset[i + 1]], step_seed=1234 + i)
            for key in totals:
                totals[key] += float(out[key]) / (len(dataset) // 2)
    return totals


def test_smoke_training_lowers_the_loss_and_writes_a_loadable_adapter(tmp_path, pairs, tiny_backbone):
    config = tiny_config(tmp_path, pairs, tiny_backbone, "optim.max_steps=60")
    records, info = preflight(config)
    before = fixed_loss(build_model(config, info), config, pairs)
    adapter = train(config, progress=False)
    after_model = build_model(config, info)
    tensors = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000060" / "trainable.safetensors"))
    after_model.load_state_dict(tensors, strict=False)
    after = fixed_loss(after_model, config, pairs)
    print("fixed-batch losses before", before, "after", after)
    assert after["loss"] < 0.9 * before["loss"], (before, after)
    assert after["lcon"] < 0.5 * before["lcon"] and after["lgen"] < before["lgen"], (before, after)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 60 and {"loss", "lgen", "lcon", "lr"} <= set(metrics[-1])
    assert any("val_delta_pos_neg" in m for m in metrics)
    metadata = read_adapter_metadata(adapter)
    assert metadata.generator["ip"]["context_dim"] == 64 and metadata.training["steps"] == 60
    assert "val_delta_pos_neg" in metadata.training

    from omni_attribute.encoder import load_encoder

    encoder = load_encoder(tiny_backbone, adapter)
    assert encoder.encode(torch.rand(1, 32, 32, 3), "object color").tokens.shape == (1, 4, 64)


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "omni_attribute.train.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_killed_run_resumes_exactly(tmp_path, pairs, tiny_backbone):
    common = [f"data.pairs={pairs}", f"data.validation_pairs={pairs}", f"backbone.path={tiny_backbone}",
              "optim.max_steps=6", "runtime.checkpoint_every=2", "runtime.validate_every=0"]
    sets = lambda out, *more: [a for s in (f"output_dir={out}", *common, *more) for a in ("--set", s)]  # noqa: E731
    config = str(REPO / "configs" / "train_tiny.yaml")
    whole = run_cli("--config", config, "--quiet", *sets(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = run_cli("--config", config, "--quiet", *sets(tmp_path / "killed", "runtime.crash_after_step=3"))
    assert killed.returncode == -9, killed.stderr  # SIGKILL after step 3; the newest checkpoint is step 2
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step-0000002"
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()
    (tmp_path / "killed" / "checkpoints" / ".tmp-step-0000004-999").mkdir()  # a write that died half-way
    resumed = run_cli("--config", config, "--quiet", *sets(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(tmp_path / "whole" / "checkpoints" / "step-0000006" / "trainable.safetensors"))
    assert any(not torch.equal(first[k], torch.zeros_like(first[k])) for k in first)


def test_help_documents_every_option():
    result = run_cli("--help", timeout=120)
    assert result.returncode == 0
    for option in ("--config", "--set", "--no-resume", "--dry-run", "--print-config", "--quiet", "--log-level"):
        assert option in result.stdout
    for key in ("loss.lambda_con = 0.01", "loss.tau = 0.1", "optim.grad_accum = 1", "runtime.gradient_checkpointing"):
        assert key in result.stdout


def test_bad_records_name_the_line_and_field(tmp_path):
    base = tmp_path
    good = {"image_a": "a.png", "image_b": "b.png", "positive_attributes": ["x"], "negative_attributes": [],
            "caption_a": "", "caption_b": ""}
    assert parse_record(good, "f:1", base).image_a == base / "a.png"
    for change, fragment in [({"positive_attributes": []}, "'positive_attributes' is empty"),
                             ({"negative_attributes": "x"}, "list of non-empty strings"),
                             ({"image_a": ""}, "'image_a' is empty"), ({"caption_a": 3}, "'caption_a' must be a string")]:
        with pytest.raises(DatasetError, match=fragment):
            parse_record({**good, **change}, "pairs.jsonl:7", base)
    with pytest.raises(DatasetError, match="pairs.jsonl:7: missing field"):
        parse_record({"image_a": "a"}, "pairs.jsonl:7", base)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DatasetError, match="bad.jsonl:2: not valid JSON"):
        list(iter_records([bad]))


def test_sharding_is_deterministic_and_complete(tmp_path):
    path = tmp_path / "p.jsonl"
    line = {"image_a": "a", "image_b": "b", "positive_attributes": ["x"], "negative_attributes": [],
            "caption_a": "", "caption_b": ""}
    path.write_text("\n".join(json.dumps({**line, "id": str(i)}) for i in range(10)))
    shards = [[r.id for r in iter_records([path], rank, 3)] for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(str(i) for i in range(10)) and shards[0] == ["0", "3", "6", "9"]


def test_preflight_fails_before_loading_models(tmp_path, pairs, tiny_backbone, narrow_adapter):
    broken = tmp_path / "missing.jsonl"
    broken.write_text(json.dumps({"image_a": "nope.png", "image_b": "nope2.png", "positive_attributes": ["x"],
                                  "negative_attributes": [], "caption_a": "", "caption_b": ""}) + "\n")
    with pytest.raises(DatasetError, match="missing image files"):
        preflight(tiny_config(tmp_path, broken, tiny_backbone))
    with pytest.raises(Exception, match="hidden size 32, backbone has 64"):
        preflight(tiny_config(tmp_path, pairs, tiny_backbone, f"adapter.init_from={narrow_adapter}"))
    with pytest.raises(ConfigError, match="unknown key"):
        tiny_config(tmp_path, pairs, tiny_backbone, "optim.learning_rate=1")
    with pytest.raises(ConfigError, match="drop_text"):
        tiny_config(tmp_path, pairs, tiny_backbone, "loss.drop_text=1.5")
    result = run_cli("--config", str(REPO / "configs" / "train_tiny.yaml"), "--set", f"data.pairs={broken}",
                     "--set", f"backbone.path={tiny_backbone}", "--dry-run", timeout=120)
    assert result.returncode == 2 and "missing image files" in result.stderr and "nope.png" in result.stderr


def test_undecodable_images_are_skipped_and_counted(tmp_path, pairs, tiny_backbone):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    lines = pairs.read_text().splitlines()
    record = json.loads(lines[0])
    record.update(image_a=str(corrupt), image_b=str(pairs.parent / record["image_b"]))
    mixed = tmp_path / "mixed.jsonl"
    rebased = [json.dumps({**json.loads(l), "image_a": str(pairs.parent / json.loads(l)["image_a"]),
                           "image_b": str(pairs.parent / json.loads(l)["image_b"])}) for l in lines[1:]]
    mixed.write_text("\n".join([json.dumps(record), *rebased]) + "\n")
    config = tiny_config(tmp_path, mixed, tiny_backbone, "optim.max_steps=4", "runtime.validate_every=0",
                         "data.validation_pairs=null", "runtime.log_every=1")
    train(config, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_samples"] >= 1


def test_streaming_pairs_resume_where_they_stopped(tmp_path):
    from omni_attribute.train.data import StreamingPairs

    line = {"image_a": "a", "image_b": "b", "positive_attributes": ["x"], "negative_attributes": [],
            "caption_a": "", "caption_b": ""}
    files = []
    for shard in range(3):
        path = tmp_path / f"shard{shard}.jsonl"
        path.write_text("\n".join(json.dumps({**line, "id": f"{shard}-{i}"}) for i in range(7)))
        files.append(path)
    stream = StreamingPairs(files, seed=4, buffer=5)
    first = [r.id for _, r in zip(range(50), stream.records())]
    assert sorted(first[:21]) == sorted(f"{s}-{i}" for s in range(3) for i in range(7))  # one pass = every record once
    assert first[:21] != first[21:42]  # each pass is reshuffled
    assert [r.id for _, r in zip(range(20), stream.records(consumed=30))] == first[30:50]
    assert first == [r.id for _, r in zip(range(50), StreamingPairs(files, seed=4, buffer=5).records())]


def test_streaming_training_runs_and_resumes_exactly(tmp_path, pairs, tiny_backbone):
    base = ["data.streaming=true", "data.shuffle_buffer=4", "runtime.validate_every=0", "data.validation_pairs=null",
            "runtime.checkpoint_every=2", "optim.max_steps=4"]
    whole = tiny_config(tmp_path / "a", pairs, tiny_backbone, *base)
    train(whole, progress=False)
    half = tiny_config(tmp_path / "b", pairs, tiny_backbone, *base[:-1], "optim.max_steps=2")
    train(half, progress=False)
    rest = tiny_config(tmp_path / "b", pairs, tiny_backbone, *base)
    train(rest, progress=False)
    a = load_file(str(tmp_path / "a" / "run" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_attribute_tuples_per_pair_average_the_papers_lcon(tmp_path, pairs, tiny_backbone):
    from omni_attribute.prompt import format_instruction
    from omni_attribute.train.data import PairDataset, choose_attribute_sets, choose_attributes
    from omni_attribute.train.losses import contrastive_loss

    config = tiny_config(tmp_path, pairs, tiny_backbone, "loss.lambda_gen=0", "loss.attributes_per_pair=99")
    records, info = preflight(config)
    sample = PairDataset(records, config.data.image_size)[0]  # two a+, one a−: two tuples
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert choose_attribute_sets(sample.record, rng_a, 1) == tuple([x] for x in choose_attributes(sample.record, rng_b))
    model = build_model(config, info)
    with torch.no_grad():
        every = [float(model([sample], step_seed=seed)["lcon"]) for seed in (1, 2)]
        template = model.encoder.metadata.prompt_template
        embed = lambda image, text: model.encoder.encode_image(  # noqa: E731
            image[None], [format_instruction([text], template)])[1][0]
        tuples = [contrastive_loss(*(embed(img, a)[None] for img, a in ((sample.image_a, p), (sample.image_b, p),
                                                                      (sample.image_a, n), (sample.image_b, n))),
                                   tau=config.loss.tau)
                  for p in sample.record.positive_attributes for n in sample.record.negative_attributes]
    # all tuples are used whatever the draw, and their mean is the loss
    assert every[0] == pytest.approx(every[1], abs=1e-5)
    assert every[0] == pytest.approx(float(torch.stack(tuples).mean()), abs=1e-4)
    with pytest.raises(ConfigError, match="attributes_per_pair"):
        tiny_config(tmp_path, pairs, tiny_backbone, "loss.attributes_per_pair=0")


def test_in_batch_negatives_count_each_pairs_positive_once(tmp_path, pairs, tiny_backbone):
    """With several (a+, a−) tuples per pair, the in-batch term runs over each (pair, a+) once: the paper's Lcon
    over every tuple, plus symmetric InfoNCE over the unique positives of the batch."""
    from omni_attribute.prompt import format_instruction
    from omni_attribute.train.data import PairDataset
    from omni_attribute.train.losses import contrastive_loss, in_batch_contrastive_loss

    two_negatives = tmp_path / "pairs.jsonl"  # 2 a+ × 2 a−: each a+ is in two tuples
    lines = [json.loads(line) for line in pairs.read_text().splitlines()[:2]]
    two_negatives.write_text("".join(json.dumps({
        **r, "image_a": str(pairs.parent / r["image_a"]), "image_b": str(pairs.parent / r["image_b"]),
        "negative_attributes": [*r["negative_attributes"], "image lighting"]}) + "\n" for r in lines))
    config = tiny_config(tmp_path, two_negatives, tiny_backbone, "loss.lambda_gen=0", "loss.attributes_per_pair=99",
                         "loss.in_batch_negatives=true")
    records, info = preflight(config)
    dataset = PairDataset(records, config.data.image_size)
    batch = [dataset[0], dataset[1]]
    model = build_model(config, info)
    with torch.no_grad():
        lcon = float(model(batch, step_seed=3)["lcon"])
        template = model.encoder.metadata.prompt_template
        embed = lambda image, text: model.encoder.encode_image(  # noqa: E731
            image[None], [format_instruction([text], template)])[1][0]
        tuples, x_pos, y_pos = [], [], []
        for sample in batch:
            record = sample.record
            for p in record.positive_attributes:
                x_pos.append(embed(sample.image_a, p))
                y_pos.append(embed(sample.image_b, p))
                tuples += [contrastive_loss(x_pos[-1][None], y_pos[-1][None], embed(sample.image_a, n)[None],
                                            embed(sample.image_b, n)[None], tau=config.loss.tau)
                           for n in record.negative_attributes]
        expected = torch.stack(tuples).mean() + in_batch_contrastive_loss(torch.stack(x_pos), torch.stack(y_pos),
                                                                          config.loss.tau)
    assert len(tuples) == 2 * len(x_pos) == 8
    assert lcon == pytest.approx(float(expected), abs=1e-4)


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, pairs, tiny_backbone, monkeypatch, caplog):
    """The disk fills up while the second checkpoint is written: a clear error, no half-written folder,
    the first checkpoint intact, and the same command run again resumes from it and finishes."""
    import errno
    import logging

    from omni_attribute.errors import CheckpointError

    config = tiny_config(tmp_path, pairs, tiny_backbone, "optim.max_steps=4", "runtime.checkpoint_every=2",
                         "runtime.validate_every=0")
    real_save = torch.save

    def disk_full_at_step_4(obj, path, *args, **kwargs):
        if "step-0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(CheckpointError, match=r"No space left on device.*step-0000002\) is intact"):
        train(config, progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000002"]  # no .tmp-* left behind
    assert not (tmp_path / "run" / "adapter.safetensors").exists()

    monkeypatch.setattr(torch, "save", real_save)
    with caplog.at_level(logging.INFO, logger="omni_attribute.train"):
        adapter = train(config, progress=False)
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert adapter.is_file() and (checkpoints / "latest").read_text().strip() == "step-0000004"
