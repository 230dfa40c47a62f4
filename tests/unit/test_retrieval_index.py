"""The attribute index on tiny real models: build (batched, resumable, kept in sync with its folder), query by
image and by entry, the ANN path inside an index, the console script, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.retrieval import clustered_vectors
from omni_attribute.encoder import load_encoder
from omni_attribute.retrieval import (AdapterIdentity, AttributeIndex, AttributeIndexError, FolderAccessError,
                                      build_index, embed_pooled, list_images, load_image, read_image_list,
                                      resolve_inside, save_batch_images)
from omni_attribute.retrieval.cli import main as index_main
from omni_attribute.retrieval.search import AnnSettings, recall_at_k, unit
from omni_attribute.retrieval.store import _write_shard, encoder_settings

ATTRIBUTES = "object color\nbackground color"


@pytest.fixture(scope="module")
def encoder(tiny_backbone, tiny_adapter):
    return load_encoder(tiny_backbone, tiny_adapter)


def write_images(folder: Path, count: int, seed: int = 0, size=(40, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"im{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def build(encoder, adapter, folder, out, **kw):
    return build_index(encoder, list_images(folder), ATTRIBUTES, out, AdapterIdentity.of_file(adapter), folder, **kw)


def test_build_stores_the_encoders_pooled_vectors_and_identity(tmp_path, encoder, tiny_adapter):
    paths = write_images(tmp_path / "gallery", 5)
    index, report = build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "idx", batch_size=2)
    assert report.added == 5 and len(index.shards) == 3  # batches of 2, 2, 1: one shard each
    expected = encoder.encode(torch.stack([load_image(p)[0] for p in paths]).permute(0, 2, 3, 1), ATTRIBUTES)
    reopened = AttributeIndex.open(tmp_path / "idx")
    for k, attribute in enumerate(["object color", "background color"]):
        stored = reopened.vectors(attribute)
        assert np.allclose(stored, expected.pooled[k::2].numpy(), atol=2e-3)  # fp16 storage
    data = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert data["adapter"] == {"name": "tiny.safetensors", "sha256": AdapterIdentity.of_file(tiny_adapter).sha256}
    assert data["encoder"] == encoder_settings(encoder) and data["encoder"]["width"] == 64
    assert data["attributes"] == ["object color", "background color"]
    assert [r[0] for r in reopened.images] == [p.name for p in paths]
    assert {e["kind"] for e in data["ann"].values()} == {"exact"}


def test_query_by_image_and_by_entry(tmp_path, encoder, tiny_adapter):
    paths = write_images(tmp_path / "gallery", 6, seed=1)
    index, _ = build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "idx")
    query = embed_pooled(encoder, load_image(paths[3]), "background color")
    hits = index.search(query, "background color", k=4)[0]
    assert hits[0].image == "im03.png" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    stored = unit(index.vectors("background color"))
    order = np.argsort(-(stored @ unit(query)[0]))[:4]
    assert [h.row for h in hits] == order.tolist()
    assert [h.rank for h in hits] == [1, 2, 3, 4] and hits[0].path == tmp_path / "gallery" / "im03.png"
    by_entry = index.search_entry("im03.png", "background color", k=3)
    assert "im03.png" not in [h.image for h in by_entry] and len(by_entry) == 3
    assert [h.image for h in by_entry] == [h.image for h in hits[1:4]]
    with pytest.raises(AttributeIndexError, match=r"holds the attribute\(s\) \['object color', 'background color'\] "
                                                  r"and not 'lighting'"):
        index.search(query, "lighting")
    with pytest.raises(AttributeIndexError, match="not an entry of this index"):
        index.search_entry("nope.png", "object color")


def test_an_interrupted_build_resumes_without_embedding_twice(tmp_path, encoder, tiny_adapter, monkeypatch):
    write_images(tmp_path / "gallery", 7, seed=2)
    whole, _ = build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "whole", batch_size=3)

    class Stop(Exception):
        pass

    def stop_after_four(done, total):
        if done == 4:
            raise Stop
    with pytest.raises(Stop):
        build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "idx", batch_size=3, on_progress=stop_after_four)
    partial = AttributeIndex.open(tmp_path / "idx")
    assert len(partial) == 3  # the finished shard survives; the 4th image was in the unfinished batch
    import omni_attribute.retrieval.build as build_module

    calls = []
    real = build_module.embed_pooled
    monkeypatch.setattr(build_module, "embed_pooled", lambda *a, **k: calls.append(1) or real(*a, **k))
    index, report = build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "idx", batch_size=3)
    assert (report.kept, report.added, len(calls)) == (3, 4, 4)
    assert [r[0] for r in index.images] == [r[0] for r in whole.images]
    for attribute in ("object color", "background color"):
        assert np.array_equal(index.vectors(attribute), whole.vectors(attribute))


def test_a_second_build_follows_the_folder(tmp_path, encoder, tiny_adapter):
    paths = write_images(tmp_path / "gallery", 5, seed=3)
    build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "idx", batch_size=2)
    paths[0].unlink()                                                  # gone
    Image.new("RGB", (40, 48), (250, 0, 0)).save(paths[1])             # changed
    os.utime(paths[1], ns=(1, 1))
    Image.new("RGB", (30, 30), (0, 0, 250)).save(tmp_path / "gallery" / "new.png")  # new
    (tmp_path / "gallery" / "broken.png").write_bytes(b"not an image")
    index, report = build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "idx", batch_size=2)
    assert (report.kept, report.added, report.dropped, len(report.skipped)) == (3, 2, 2, 1)
    assert sorted(r[0] for r in index.images) == ["im01.png", "im02.png", "im03.png", "im04.png", "new.png"]
    assert index.skipped[0]["image"] == "broken.png" and "cannot identify image" in index.skipped[0]["reason"]
    row = index.row_of("im01.png")
    fresh = embed_pooled(encoder, load_image(paths[1]), "object color")[0]
    assert np.allclose(index.vectors("object color")[row], fresh, atol=2e-3)
    assert sorted(p.name for p in (tmp_path / "idx").glob("vectors-*")) == sorted(s["file"] for s in index.shards)
    _, again = build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "idx")
    assert (again.added, again.dropped, len(again.skipped)) == (0, 0, 0)  # the broken file is not retried


def test_an_index_of_another_adapter_is_refused(tmp_path, encoder, tiny_adapter, tiny_backbone):
    from devtools.fixtures import make_untrained_adapter

    write_images(tmp_path / "gallery", 3, seed=4)
    index, _ = build(encoder, tiny_adapter, tmp_path / "gallery", tmp_path / "idx")
    other_file = make_untrained_adapter(tiny_backbone, tmp_path / "other" / "tiny.safetensors", seed=9)
    other = AdapterIdentity.of_file(other_file)
    with pytest.raises(AttributeIndexError, match=r"built with adapter tiny.safetensors \(sha256 [0-9a-f]{12}\) but the "
                                                  r"encoder uses tiny.safetensors .*same file name, other contents.*"
                                                  r"build the index again"):
        index.check_encoder(other)
    with pytest.raises(AttributeIndexError, match=r"already holds an index built with another adapter .*choose another"):
        build_index(encoder, list_images(tmp_path / "gallery"), ATTRIBUTES, tmp_path / "idx", other,
                    tmp_path / "gallery")
    with pytest.raises(AttributeIndexError, match=r"another attribute lines \['object color', 'background color'\]"):
        build_index(encoder, list_images(tmp_path / "gallery"), "lighting", tmp_path / "idx",
                    AdapterIdentity.of_file(tiny_adapter), tmp_path / "gallery")
    settings = {**encoder_settings(encoder), "width": 32}
    with pytest.raises(AttributeIndexError, match="built with width 64 but the encoder has 32"):
        index.check_encoder(AdapterIdentity.of_file(tiny_adapter), settings)
    rebuilt, report = build_index(encoder, list_images(tmp_path / "gallery"), "lighting", tmp_path / "idx",
                                  AdapterIdentity.of_file(tiny_adapter), tmp_path / "gallery", overwrite=True)
    assert rebuilt.attributes == ["lighting"] and report.added == 3


def test_folders_are_read_only_inside_their_root(tmp_path):
    root = tmp_path / "input"
    write_images(root / "gallery", 2)
    outside = write_images(tmp_path / "elsewhere", 1)[0]
    assert resolve_inside(root, "gallery") == (root / "gallery").resolve()
    with pytest.raises(FolderAccessError, match="climbs out with '..'"):
        resolve_inside(root, "gallery/../../elsewhere")
    with pytest.raises(FolderAccessError, match="is an absolute path"):
        resolve_inside(root, str(tmp_path / "elsewhere"))
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FolderAccessError, match="symlink .* leading outside"):
        resolve_inside(root, "link")
    (root / "gallery" / "sneaky.png").symlink_to(outside)
    with pytest.raises(FolderAccessError, match=r"1 entry of .* \(sneaky.png\) link outside"):
        list_images(root / "gallery", root=root)
    (root / "gallery" / "sneaky.png").unlink()
    (root / "gallery" / "inner.png").symlink_to(root / "gallery" / "im00.png")  # a link that stays inside: fine
    assert [f.name for f in list_images(root / "gallery", root=root)] == ["im00.png", "im01.png", "inner.png"]


def test_folder_errors_say_what_to_do(tmp_path, monkeypatch, encoder, tiny_adapter):
    with pytest.raises(FolderAccessError, match="does not exist: create it"):
        list_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(FolderAccessError, match="is a file, not a folder"):
        list_images(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FolderAccessError, match=r"holds no images \(.png .jpg"):
        list_images(tmp_path / "empty")
    (tmp_path / "locked").mkdir()

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))
    with monkeypatch.context() as m:
        m.setattr(os, "scandir", denied)
        with pytest.raises(FolderAccessError, match="cannot read folder .*permission denied.*read access"):
            list_images(tmp_path / "locked")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"garbage")
    (tmp_path / "broken" / "b.jpg").write_bytes(b"")
    with pytest.raises(FolderAccessError, match=r"none of the 2 image file\(s\) could be read \(a.png: "):
        build(encoder, tiny_adapter, tmp_path / "broken", tmp_path / "idx")
    (tmp_path / "list.txt").write_text("gone.png\n")
    with pytest.raises(FolderAccessError, match="line 1: gone.png"):
        read_image_list(tmp_path / "list.txt")
    with pytest.raises(AttributeIndexError, match="no index.json in it"):
        AttributeIndex.open(tmp_path / "empty")


def test_batch_images_are_saved_once_and_indexed(tmp_path, encoder, tiny_adapter):
    batch = torch.rand(3, 32, 36, 3, generator=torch.Generator().manual_seed(0))
    files = save_batch_images(batch, tmp_path / "idx" / "images")
    assert [f.name.split("/")[0] for f in files] == ["images"] * 3
    assert save_batch_images(batch, tmp_path / "idx" / "images") == files  # same pixels, same files
    index, report = build_index(encoder, files, "object color", tmp_path / "idx", AdapterIdentity.of_file(tiny_adapter),
                                tmp_path / "idx")
    expected = encoder.encode(batch, "object color").pooled
    # PNG keeps 8 bits: compare with the encoder on the quantised pixels
    quantised = encoder.encode((batch * 255).round() / 255, "object color").pooled
    assert np.allclose(index.vectors("object color"), quantised.numpy(), atol=2e-3)
    assert expected.shape == (3, 64)


def test_an_index_searches_through_faiss_when_asked(tmp_path, encoder):
    """A large index (vectors written directly as shards) gets an IVF-PQ structure per attribute line."""
    folder = tmp_path / "big"
    folder.mkdir()
    vectors = np.concatenate(list(clustered_vectors(6000, 64, seed=5, latent=16, clusters=40)))
    for s in range(3):
        rows = vectors[s * 2000:(s + 1) * 2000]
        _write_shard(folder / f"vectors-{s:06d}.safetensors", rows[:, None, :],
                     [[f"img{s * 2000 + i}.png", 1, 1] for i in range(2000)])
    index = AttributeIndex(folder, AdapterIdentity("a.safetensors", "0" * 64), {**encoder_settings(encoder)},
                           ["object color"], str(folder), shards=[{"file": f"vectors-{s:06d}.safetensors",
                                                                   "images": 2000} for s in range(3)])
    index.write()
    exact = index.search(vectors[:40].astype(np.float32), "object color", 10)
    ann = index.build_ann("ivfpq", AnnSettings(pca=32, nlist=32, pq_bytes=8, nprobe=8, rerank=100, train_rows=4000))
    assert ann["0"]["kind"] == "ivfpq" and (folder / "ann-0.faiss").is_file()
    reopened = AttributeIndex.open(folder)
    approx = reopened.search(vectors[:40].astype(np.float32), "object color", 10)
    assert type(reopened.searcher("object color")).__name__ == "FaissSearcher"
    recall = recall_at_k(np.array([[h.row for h in q] for q in approx]), np.array([[h.row for h in q] for q in exact]),
                         10)
    assert recall >= 0.95, recall
    assert [h.row for h in approx[0]][0] == 0  # the query itself first


def test_console_script_build_query_info(tmp_path, tiny_backbone, tiny_adapter, capsys):
    paths = write_images(tmp_path / "gallery", 4, seed=6)
    common = ["--backbone", str(tiny_backbone), "--adapter", str(tiny_adapter)]
    assert index_main(["build", "--images", str(tmp_path / "gallery"), "--attributes", "object color",
                       "--attributes", "background color", "--out", str(tmp_path / "idx"), "--batch", "2", "--quiet",
                       *common]) == 0
    assert "4 image(s) embedded" in capsys.readouterr().out
    assert index_main(["query", str(tmp_path / "idx"), "--image", str(paths[2]), "--attribute", "object color",
                       "--k", "2", "--json", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"][0]["image"] == "im02.png" and result["hits"][0]["score"] == pytest.approx(1, abs=1e-3)
    assert index_main(["query", str(tmp_path / "idx"), "--entry", "im02.png", "--attribute", "object color",
                       "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "top 2 under 'object color' for entry im02.png" in out and "im02.png\n" not in out
    assert index_main(["info", str(tmp_path / "idx")]) == 0
    assert "4 images × 2 attribute line(s)" in capsys.readouterr().out
    (tmp_path / "list.txt").write_text(f"{paths[0]}\ngallery/{paths[1].name}\n")
    assert index_main(["build", "--images", str(tmp_path / "list.txt"), "--attributes", "object color", "--out",
                       str(tmp_path / "from-list"), "--quiet", *common]) == 0
    assert len(AttributeIndex.open(tmp_path / "from-list")) == 2
    # errors: exit 1 and a message, no traceback
    shutil.copy(tiny_adapter, tmp_path / "renamed.safetensors")
    with open(tmp_path / "renamed.safetensors", "ab") as handle:
        handle.write(b" ")  # other bytes: another adapter as far as the index can tell
    assert index_main(["query", str(tmp_path / "idx"), "--image", str(paths[0]), "--attribute", "object color",
                       "--backbone", str(tiny_backbone), "--adapter", str(tmp_path / "renamed.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "built with adapter tiny.safetensors" in err and "renamed.safetensors" in err
    assert index_main(["query", str(tmp_path / "gallery"), "--entry", "x", "--attribute", "object color"]) == 1
    assert "no index.json" in capsys.readouterr().err
    assert index_main(["query", str(tmp_path / "idx"), "--image", str(paths[0]), "--attribute", "object color"]) == 1
    assert "needs the encoder the index was built with" in capsys.readouterr().err
