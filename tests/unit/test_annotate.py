"""Annotation library without a server: answers parsed, repaired or rejected; images at Qwen2.5-VL sizes;
the durable output (torn lines, locks); pair sources (lists, groups, nearest neighbours) and deduplication."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_attribute.annotate import pairs as P
from omni_attribute.annotate.client import retry_after_seconds
from omni_attribute.annotate.config import (
    ConfigError,
    load_annotate_config,
    load_finetune_config,
)
from omni_attribute.annotate.errors import AnnotateError, AnswerRejected
from omni_attribute.annotate.images import (
    decode_data_url,
    encode_image,
    fit_size,
    image_tokens,
)
from omni_attribute.annotate.output import DurableJsonl, RunLock, scan_jsonl
from omni_attribute.annotate.prompts import (
    answer_schema,
    build_messages,
    parse_answer,
    render_chat,
    response_format,
    retry_messages,
)

REPO = Path(__file__).resolve().parents[2]
GOOD = {"positive_attributes": ["dog identity", "fur color"], "negative_attributes": ["background"],
        "caption_a": "a dog on a beach", "caption_b": "a dog on a sofa"}


# ---- answers ---------------------------------------------------------------------------------------------

def test_a_clean_answer_is_read_as_it_is():
    answer = parse_answer(json.dumps({"reasoning": "both show the same corgi", **GOOD}))
    assert answer.answer() == GOOD and answer.reasoning == "both show the same corgi" and answer.repairs == []


def test_safe_repairs_are_made_and_recorded():
    text = ('Let me compare them.\n```json\n{"reasoning": "same dog", "shared": ["dog identity", " Fur color. ",],\n'
            ' "negative_attributes": "background; dog pose", "caption_1": "a dog  on a beach", '
            '"caption_b": "a dog on a sofa", "positive_attributes_extra": 1,}\n```\nDone.')
    answer = parse_answer(text)
    assert answer.positive_attributes == ["dog identity", "Fur color"]
    assert answer.negative_attributes == ["background", "dog pose"]
    assert answer.caption_a == "a dog on a beach"
    kinds = " | ".join(answer.repairs)
    for fragment in ("surrounding text", "trailing commas", "'shared' read as", "'caption_1' read as",
                     "split from a comma-separated string"):
        assert fragment in kinds, answer.repairs
    duplicate = parse_answer(json.dumps({**GOOD, "positive_attributes": ["dog identity", "Dog identity"]}))
    assert duplicate.positive_attributes == ["dog identity"] and "duplicate" in duplicate.repairs[0]


@pytest.mark.parametrize("text, finish, reason", [
    ("", None, "empty answer"),
    ("I cannot tell.", None, "no JSON"),
    ('{"positive_attributes": ["a"], "negative_attributes": [', "length", "truncated answer"),
    ('{"positive_attributes": ["a"], "negative_attributes": [', "stop", "truncated JSON"),
    ("[1, 2]", None, "not a JSON object"),
    (json.dumps({**GOOD, "negative_attributes": None}), None, "schema violation"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "caption_b"}), None, "schema violation"),
    (json.dumps({**GOOD, "positive_attributes": [3]}), None, "schema violation"),
    (json.dumps({**GOOD, "positive_attributes": []}), None, "no positive attribute"),
    (json.dumps({**GOOD, "negative_attributes": ["Fur color"]}), None, "contradiction"),
    (json.dumps({**GOOD, "positive_attributes": ["fur color, length"]}), None, "bad attribute name"),
    (json.dumps({**GOOD, "positive_attributes": ["?!"]}), None, "bad attribute name"),
    (json.dumps({**GOOD, "positive_attributes": ["x" * 201]}), None, "bad attribute name"),
    (json.dumps({**GOOD, "positive_attributes": [f"attribute {i}" for i in range(17)]}), None, "schema violation"),
    (json.dumps({**GOOD, "caption_a": " "}), None, "empty caption"),
])
def test_unusable_answers_are_rejected_with_a_reason(text, finish, reason):
    with pytest.raises(AnswerRejected) as caught:
        parse_answer(text, finish)
    assert caught.value.reason == reason, caught.value


def test_messages_schema_and_chat_rendering():
    teacher = build_messages("teacher", "data:image/png;base64,AAAA", "data:image/png;base64,BBBB")
    expert = build_messages("expert", "data:image/png;base64,AAAA", "data:image/png;base64,BBBB")
    assert teacher[0]["role"] == "system" and [i["type"] for i in teacher[1]["content"]].count("image_url") == 2
    assert expert[0]["role"] == "user" and expert[0]["content"][0]["image_url"]["url"].endswith("AAAA")
    assert list(answer_schema("teacher")["properties"])[0] == "reasoning"     # reasoning is generated first
    assert "reasoning" not in answer_schema("expert")["properties"]
    assert response_format("expert")["json_schema"]["schema"]["required"] == list(GOOD)
    text = render_chat(expert, [4, 9])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.count("<|image_pad|>") == 13 and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>" in text
    again = retry_messages(expert, "nonsense", "no JSON")
    assert again[-2] == {"role": "assistant", "content": "nonsense"} and "no JSON" in again[-1]["content"]


# ---- images ---------------------------------------------------------------------------------------------

def test_images_are_sent_at_the_processor_size(tmp_path):
    for w, h, budget in ((1000, 700, 448 * 448), (32, 32, 448 * 448), (640, 480, 28 * 28 * 64)):
        fw, fh = fit_size(w, h, 56 * 56, budget)
        assert fw % 28 == 0 and fh % 28 == 0 and 56 * 56 <= fw * fh <= budget, (w, h, fw, fh)
    assert fit_size(32, 32, 56 * 56, 448 * 448) == (56, 56) and image_tokens(56, 56) == 4 + 2
    Image.new("RGBA", (300, 200), (255, 0, 0, 0)).save(tmp_path / "a.png")
    encoded = encode_image(tmp_path / "a.png", 56 * 56, 112 * 112)
    assert decode_data_url(encoded.url) == encoded.payload and encoded.url.startswith("data:image/png;base64,")
    with Image.open(tmp_path / "a.png") as source, Image.open(__import__("io").BytesIO(encoded.payload)) as sent:
        assert sent.size == (encoded.width, encoded.height) == fit_size(*source.size, 56 * 56, 112 * 112)
        assert sent.mode == "RGB" and sent.getpixel((0, 0)) == (255, 255, 255)   # transparent → white
    Image.new("RGB", (4000, 10)).save(tmp_path / "thin.png")
    with pytest.raises(AnnotateError, match="aspect ratio"):
        encode_image(tmp_path / "thin.png", 56 * 56, 448 * 448)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(AnnotateError, match="cannot be read"):
        encode_image(tmp_path / "broken.png", 56 * 56, 448 * 448)


# ---- output file ----------------------------------------------------------------------------------------

def test_torn_last_line_is_dropped_and_damage_is_named(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = DurableJsonl(path)
    writer.append({"id": "1", "x": "é"})
    writer.append({"id": "2"})
    writer.close()
    with path.open("ab") as handle:
        handle.write(b'{"id": "3", "positive_att')           # a write cut off by a kill
    records, torn = scan_jsonl(path, repair=False)
    assert [r["id"] for r in records] == ["1", "2"] and torn and path.read_bytes().endswith(b"att")
    records, torn = scan_jsonl(path, repair=True)
    assert torn and path.read_bytes().endswith(b'{"id": "2"}\n')
    assert scan_jsonl(path, repair=True) == ([{"id": "1", "x": "é"}, {"id": "2"}], False)
    path.write_text('{"id": "1"}\n{broken\n{"id": "2"}\n')
    with pytest.raises(AnnotateError, match="out.jsonl:2 is not a complete JSON record"):
        scan_jsonl(path, repair=True)


def test_one_run_at_a_time_writes_an_output(tmp_path):
    out = tmp_path / "out.jsonl"
    with RunLock(out):
        with pytest.raises(AnnotateError, match="another annotation run is writing out.jsonl"):
            with RunLock(out):
                pass
    with RunLock(out):   # released
        pass


# ---- configs --------------------------------------------------------------------------------------------

def test_configs_load_and_bad_values_are_named(tmp_path):
    teacher = load_annotate_config(REPO / "configs" / "annotate_teacher.yaml")
    expert = load_annotate_config(REPO / "configs" / "annotate_expert.yaml", ["endpoint.concurrency=4"])
    assert teacher.prompt.style == "teacher" and expert.prompt.style == "expert" and expert.endpoint.concurrency == 4
    assert load_finetune_config(REPO / "configs" / "annotate_expert_finetune.yaml").lora.r == 16
    for override, fragment in (("endpoint.concurency=3", "unknown key"), ("endpoint.concurrency=0", "concurrency"),
                               ("prompt.style=poet", "prompt.style"), ("image.max_pixels=100", "max_pixels"),
                               ("endpoint.base_url=localhost:8000", "base_url"), ("endpoint", "section.key=value")):
        with pytest.raises(ConfigError, match=fragment):
            load_annotate_config(None, [override])
    with pytest.raises(ConfigError, match="does not exist"):
        load_annotate_config(tmp_path / "nope.yaml")


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert 0 <= retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0 + 1e-9   # in the past: no wait


# ---- pair sources ---------------------------------------------------------------------------------------

def draw(path: Path, seed: int, noise: float = 0.0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.repeat(np.repeat(rng.integers(0, 255, (4, 4, 3)), 16, 0), 16, 1).astype(np.float64)
    if noise:
        pixels += np.random.default_rng(seed + 1000).normal(0, noise, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def test_explicit_lists_jsonl_and_csv(tmp_path):
    (tmp_path / "l.jsonl").write_text('{"image_a": "a.png", "image_b": "/x/b.png", "id": "p1"}\n\n'
                                      '{"image_a": "c.png", "image_b": "d.png"}\n')
    tasks = P.read_pair_list(tmp_path / "l.jsonl")
    assert [t.id for t in tasks] == ["p1", P.pair_id("c.png", "d.png")]
    assert tasks[0].image_a == tmp_path / "a.png" and tasks[0].image_b == Path("/x/b.png")
    (tmp_path / "h.csv").write_text("id,image_a,image_b\nq,a.png,b.png\n")
    (tmp_path / "n.csv").write_text("a.png,b.png\nc.png,d.png\n")
    assert P.read_pair_list(tmp_path / "h.csv")[0].id == "q" and len(P.read_pair_list(tmp_path / "n.csv")) == 2
    (tmp_path / "dup.jsonl").write_text('{"image_a": "a", "image_b": "b", "id": "x"}\n{"image_a": "c", "image_b": "d", "id": "x"}\n')
    with pytest.raises(AnnotateError, match=r"dup.jsonl:2: id 'x' repeats dup.jsonl:1"):
        P.read_pair_list(tmp_path / "dup.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"image_a": "a"}\n')
    with pytest.raises(AnnotateError, match="bad.jsonl:1: image_a and image_b must be non-empty"):
        P.read_pair_list(tmp_path / "bad.jsonl")


def test_pair_enumeration_is_complete():
    for n in (2, 3, 7):
        pairs = [P._pair_at(i, n) for i in range(n * (n - 1) // 2)]
        assert pairs == [(i, j) for i in range(n) for j in range(i + 1, n)]


def test_groups_are_sampled_within_each_group_with_a_cap_and_a_seed(tmp_path):
    for group, count in (("cat", 6), ("dog", 3), ("lonely", 1)):
        for i in range(count):
            draw(tmp_path / "g" / group / f"{i}.png", hash((group, i)) % 1000)
    groups = P.groups_from_folder(tmp_path / "g")
    assert sorted(groups) == ["cat", "dog", "lonely"]
    tasks = P.group_pairs(groups, 4, seed=1, root=tmp_path / "g")
    by_group = {}
    for t in tasks:
        assert t.image_a.parent == t.image_b.parent and t.image_a != t.image_b
        by_group.setdefault(t.extra["group"], []).append(t)
    assert {g: len(v) for g, v in by_group.items()} == {"cat": 4, "dog": 3}
    assert len({t.id for t in tasks}) == len(tasks)
    assert P.group_pairs(groups, 4, seed=1, root=tmp_path / "g") == tasks                       # same seed, same pairs
    assert P.group_pairs(groups, 4, seed=2, root=tmp_path / "g") != tasks
    extra = {**groups, "bird": groups["dog"]}
    assert [t for t in P.group_pairs(extra, 4, seed=1, root=tmp_path / "g") if t.extra["group"] == "cat"] == by_group["cat"]
    (tmp_path / "t.csv").write_text("path,subject\n" + "\n".join(f"g/cat/{i}.png,c" for i in range(6)) + "\n")
    assert len(P.group_pairs(P.groups_from_csv(tmp_path / "t.csv", "path", "subject"), 100, 0)) == 15
    with pytest.raises(AnnotateError, match="no column 'group'"):
        P.groups_from_csv(tmp_path / "t.csv", "path", "group")
    (tmp_path / "flat").mkdir()
    draw(tmp_path / "flat" / "x.png", 1)
    with pytest.raises(AnnotateError, match="one sub-folder per subject"):
        P.groups_from_folder(tmp_path / "flat")


def test_nearest_neighbour_search_exact_numpy_and_hnsw_agree(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    vectors = P.normalise(np.repeat(centres, 5, 0) + 0.05 * rng.normal(size=(50, 16)))
    flat_scores, flat = P.nearest(vectors, 4, "ip", "flat")
    hnsw_scores, hnsw = P.nearest(vectors, 4, "ip", "hnsw")
    assert (flat == hnsw).all() and np.allclose(flat_scores, hnsw_scores, atol=1e-5)
    assert all(set(flat[i]) == set(range(i // 5 * 5, i // 5 * 5 + 5)) - {i} for i in range(50))   # its own cluster
    monkeypatch.setattr(P, "_faiss", lambda: None)
    numpy_scores, numpy_idx = P.nearest(vectors, 4, "ip", "auto")
    assert (numpy_idx == flat).all() and np.allclose(numpy_scores, flat_scores, atol=1e-5)
    l2, l2_idx = P.nearest(vectors, 2, "l2", "flat")
    assert (l2 >= -1e-6).all() and (l2_idx[:, 0] == flat[:, 0]).all()
    with pytest.raises(AnnotateError, match="pip install faiss-cpu"):
        P.nearest(vectors, 2, "ip", "hnsw")


def test_neighbour_pairs_skip_near_identical_and_repeat_nothing(tmp_path):
    images = [tmp_path / f"{i}.png" for i in range(6)]
    vectors = np.array([[1, 0], [0.99, 0.14], [1, 0.0001], [0, 1], [0.1, 0.99], [-1, 0]], dtype=np.float32)
    tasks = P.neighbour_pairs(images, vectors, k=2, max_similarity=0.999, root=tmp_path)
    keys = [(t.image_a.name, t.image_b.name) for t in tasks]
    assert len(keys) == len(set(keys)) and all(a < b for a, b in keys)
    assert ("0.png", "2.png") not in keys           # cosine ≈ 1: near-identical, left out
    assert ("0.png", "1.png") in keys and ("3.png", "4.png") in keys
    assert all(t.extra["similarity"] < 0.999 for t in tasks)
    assert not [t for t in P.neighbour_pairs(images, vectors, k=2, min_similarity=0.0) if t.extra["similarity"] < 0]
    with pytest.raises(AnnotateError, match="3 embeddings for 6 images"):
        P.neighbour_pairs(images, vectors[:3], k=2)
    np.save(tmp_path / "e.npy", vectors[:5])
    with pytest.raises(AnnotateError, match=r"shape \[5, 2\]; expected \[6, dim\]"):
        P.load_embeddings(tmp_path / "e.npy", 6)


def test_deduplication_drops_near_identical_images_and_pairs(tmp_path):
    a, b, c = draw(tmp_path / "a.png", 1), draw(tmp_path / "b.png", 2), draw(tmp_path / "c.png", 3)
    a2 = draw(tmp_path / "a_resaved.png", 1, noise=1.0)          # the same picture, re-encoded with noise
    Image.open(a).save(tmp_path / "a.jpg", quality=90, subsampling=0)     # and as a JPEG
    tasks = [P.PairTask("1", a, b), P.PairTask("2", a, a2), P.PairTask("3", b, tmp_path / "a.jpg"),
             P.PairTask("4", a, c), P.PairTask("5", b, c)]
    kept, dropped = P.deduplicate(tasks, near_duplicate_rms=0.01)
    assert [t.id for t in kept] == ["1", "4", "5"]
    assert dropped == {"near-identical images": 1, "near-identical to an earlier pair": 1}
    assert P.deduplicate(tasks, near_duplicate_rms=0)[0] == tasks


def test_neighbours_from_this_projects_encoder(tmp_path, tiny_backbone, tiny_adapter):
    images = [draw(tmp_path / f"{i}.png", i % 3, noise=8.0 * (i // 3)) for i in range(6)]
    vectors = P.encoder_embeddings(images, tiny_backbone, tiny_adapter, progress=False)
    assert vectors.shape == (6, 64) and np.isfinite(vectors).all()
    tasks = P.neighbour_pairs(images, vectors, k=1, max_similarity=1.01, root=tmp_path)
    for t in tasks:   # each picture's nearest image is its noisy copy (same seed, i and i + 3)
        assert abs(int(t.image_a.stem) - int(t.image_b.stem)) == 3, [(t.image_a.stem, t.image_b.stem) for t in tasks]


def test_pairs_command_writes_a_list_run_reads(tmp_path):
    from omni_attribute.annotate.cli import main

    for group in ("x", "y"):
        for i in range(3):
            draw(tmp_path / "g" / group / f"{i}.png", random.Random(f"{group}{i}").randrange(10_000))
    out = tmp_path / "lists" / "todo.jsonl"
    assert main(["pairs", "--groups", str(tmp_path / "g"), "--per-group", "2", "--out", str(out)]) == 0
    tasks = P.read_pair_list(out)
    assert len(tasks) == 4 and all(t.image_a.is_file() and t.image_b.is_file() for t in tasks)
    assert json.loads(out.read_text().splitlines()[0])["image_a"].startswith("../g/")
    assert main(["pairs", "--neighbours", str(tmp_path / "g"), "--out", str(out)]) == 2
    assert main(["run", "--pairs", str(out), "--out", str(tmp_path / "o.jsonl"), "--set", "endpoint.concurrency=0"]) == 2
    assert not os.path.exists(tmp_path / "o.jsonl")
