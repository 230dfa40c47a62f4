"""Build Attribute Index, Retrieve by Attribute and Embedding Map through the live server: the node's hits equal
the library's, the index follows its folder, and every refusal reaches the user as a message."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from PIL import Image

from omni_attribute.encoder import load_encoder
from omni_attribute.headless import ExecutionFailed, PromptRejected
from omni_attribute.retrieval import AttributeIndex, embed_pooled, load_image

pytestmark = pytest.mark.host

ATTRIBUTES = "object color\nbackground color"


def gallery(comfy_base, count: int, seed: int = 0, sub: bool = True):
    name = f"gallery-{uuid.uuid4().hex[:8]}"
    folder = comfy_base / "input" / name
    (folder / "more").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        target = folder / "more" if sub and i == count - 1 else folder
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(target / f"img{i}.png")
    return name, folder


def retrieve_graph(graphs, query: str, folder: str, index_name: str, attribute: str = "background color", k: int = 4,
                   adapter: str = "tiny.safetensors", query_adapter: str | None = None):
    graph = graphs.builder()
    encoder = graph.node("OmniAttributeEncoderLoader", backbone="tiny-qwen25vl", adapter=adapter, dtype="auto",
                         device="default")
    index = graph.node("OmniAttributeBuildIndex", encoder=encoder.out(0), attributes=ATTRIBUTES, folder=folder,
                       index_name=index_name, rebuild=False)
    query_encoder = encoder
    if query_adapter:
        query_encoder = graph.node("OmniAttributeEncoderLoader", backbone="tiny-qwen25vl", adapter=query_adapter,
                                   dtype="auto", device="default")
    image = graph.node("LoadImage", image=query)
    hits = graph.node("OmniAttributeRetrieve", index=index.out(0), encoder=query_encoder.out(0), image=image.out(0),
                      attribute=attribute, k=k)
    graph.node("PreviewImage", images=hits.out(0))
    return graph.finalize(), index.id, hits.id


def test_retrieval_through_the_node_equals_the_library(client, graphs, comfy_base, tiny_backbone, tiny_adapter,
                                                       tmp_path):
    folder_name, folder = gallery(comfy_base, 6)
    query = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(99).integers(0, 255, (44, 52, 3), dtype=np.uint8)).save(query)
    prompt, build_id, retrieve_id = retrieve_graph(graphs, client.upload_image(query), folder_name, folder_name)
    history = client.run(prompt)
    node_hits = history["outputs"][retrieve_id]["omni_attribute_hits"][0]
    assert "6 image(s) embedded" in history["outputs"][build_id]["text"][0]

    index = AttributeIndex.open(comfy_base / "output" / "omni_attribute_indexes" / folder_name)
    assert sorted(r[0] for r in index.images) == ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png",
                                                  "more/img5.png"]
    encoder = load_encoder(tiny_backbone, tiny_adapter)
    library = index.search(embed_pooled(encoder, load_image(query), "background color"), "background color", 4)[0]
    assert [h["image"] for h in node_hits] == [h.image for h in library]
    assert np.allclose([h["score"] for h in node_hits], [h.score for h in library], atol=1e-5)
    text = history["outputs"][retrieve_id]["text"][0]
    assert f"1. {library[0].score:+.4f}  {library[0].image}" in text
    # the hits come back as images, best first, letterboxed to the first one's size
    previews = history["outputs"][str(int(retrieve_id) + 1)]["images"]
    first = np.asarray(Image.open(__import__("io").BytesIO(client.view(previews[0]["filename"], previews[0]["subfolder"],
                                                                      previews[0]["type"]))).convert("RGB"))
    assert len(previews) == 4 and np.array_equal(first, np.asarray(Image.open(library[0].path).convert("RGB")))

    # a new image in the folder: the node runs again (the folder's fingerprint changed) and embeds only it
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(folder / "new.png")
    again = client.run(prompt)
    assert "1 image(s) embedded, 6 kept from before" in again["outputs"][build_id]["text"][0]


def test_an_encoder_with_another_adapter_is_refused(client, graphs, comfy_base, tmp_path):
    folder_name, _ = gallery(comfy_base, 3, seed=1, sub=False)
    query = tmp_path / "q.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(query)
    prompt, _, _ = retrieve_graph(graphs, client.upload_image(query), folder_name, folder_name,
                                  query_adapter="tiny-world-ip.safetensors")
    with pytest.raises(ExecutionFailed) as caught:
        client.run(prompt)
    message = str(caught.value)
    assert "AttributeIndexError: this index was built with adapter tiny.safetensors (sha256" in message
    assert "the encoder uses tiny-world-ip.safetensors" in message and "build the index again" in message
    prompt, _, _ = retrieve_graph(graphs, client.upload_image(query), folder_name, folder_name, attribute="lighting")
    with pytest.raises(ExecutionFailed, match=r"holds the attribute\(s\) \['object color', 'background color'\] and "
                                              r"not 'lighting'"):
        client.run(prompt)


def test_folders_outside_input_and_output_and_bad_folders_are_refused(client, graphs, comfy_base, tmp_path):
    query = client.upload_image(_png(tmp_path))
    rejected = {"../models": "climbs out with '..'", str(comfy_base / "models"): "is an absolute path",
                "no-such-folder": "is not there in", "no-such-folder [output]": "is not there in"}
    link = f"escape-link-{uuid.uuid4().hex[:6]}"
    (comfy_base / "input" / link).symlink_to(comfy_base / "models", target_is_directory=True)
    rejected[link] = "symlink (or passes through one) leading outside"
    for folder, expected in rejected.items():
        with pytest.raises(PromptRejected, match=expected.replace("(", r"\(").replace(")", r"\)")):
            client.run(retrieve_graph(graphs, query, folder, "refused")[0])
    name, folder = gallery(comfy_base, 2, seed=2, sub=False)
    (folder / "linked.png").symlink_to(comfy_base / "models" / "omni_attribute" / "tiny.safetensors")
    failing = {name: r"1 entry of .* \(linked.png\) link outside"}
    empty = comfy_base / "input" / f"empty-{uuid.uuid4().hex[:6]}"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    failing[empty.name] = "holds no images"
    broken = comfy_base / "input" / f"broken-{uuid.uuid4().hex[:6]}"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    failing[broken.name] = r"none of the 1 image file\(s\) could be read \(a.png: UnidentifiedImageError"
    for folder_name, expected in failing.items():
        with pytest.raises(ExecutionFailed, match="FolderAccessError: .*" + expected):
            client.run(retrieve_graph(graphs, query, folder_name, folder_name)[0])


def _png(tmp_path):
    path = tmp_path / "q.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(path)
    return path


def test_an_image_batch_index_and_the_embedding_map(client, graphs, comfy_base):
    graph = graphs.builder()
    encoder = graph.node("OmniAttributeEncoderLoader", backbone="tiny-qwen25vl", adapter="tiny.safetensors",
                         dtype="auto", device="default")
    batch = graph.node("OmniTestImage", width=40, height=32, channels=3, batch=4, seed=21, poison_nan=False)
    index = graph.node("OmniAttributeBuildIndex", encoder=encoder.out(0), attributes=ATTRIBUTES, folder="",
                       index_name="batch-index", rebuild=True, image=batch.out(0))
    first = graph.node("OmniTestImage", width=40, height=32, channels=3, batch=1, seed=21, poison_nan=False)
    hits = graph.node("OmniAttributeRetrieve", index=index.out(0), encoder=encoder.out(0), image=first.out(0),
                      attribute="object color", k=2)
    graph.node("PreviewImage", images=hits.out(0))
    mapped = graph.node("OmniAttributeEmbeddingMap", image=batch.out(0), attributes=ATTRIBUTES, style="points", seed=0,
                        encoder=encoder.out(0), labels="a\na\nb\nb")
    graph.node("PreviewImage", images=mapped.out(0))
    history = client.run(graph.finalize())
    top = history["outputs"][hits.id]["omni_attribute_hits"][0][0]
    assert top["row"] == 0 and top["score"] > 0.999  # the query is the batch's first image (saved as 8-bit PNG)
    saved = sorted(p.name for p in (comfy_base / "output" / "omni_attribute_indexes" / "batch-index" / "images").iterdir())
    assert len(saved) == 4 and saved[0].startswith("00000-")
    report = history["outputs"][mapped.id]["text"][0]
    assert report.count("silhouette by label") == 2 and report.startswith("object color:")
    preview = history["outputs"][str(int(mapped.id) + 1)]["images"][0]
    figure = Image.open(__import__("io").BytesIO(client.view(preview["filename"], preview["subfolder"], preview["type"])))
    assert figure.size[0] == 2 * 512 + 8

    def map_graph(**inputs):
        g = graphs.builder()
        e = g.node("OmniAttributeEncoderLoader", backbone="tiny-qwen25vl", adapter="tiny.safetensors", dtype="auto",
                   device="default")
        b = g.node("OmniTestImage", width=40, height=32, channels=3, batch=4, seed=21, poison_nan=False)
        embeds = g.node("OmniAttributeEncode", encoder=e.out(0), image=b.out(0), attributes="object color")
        links = {"encoder": e.out(0), "embeds": embeds.out(0)}
        extra = {k: links[k] for k in inputs.pop("connect")}
        m = g.node("OmniAttributeEmbeddingMap", image=b.out(0), style="points", seed=0, **extra, **inputs)
        g.node("PreviewImage", images=m.out(0))
        return g.finalize()
    with pytest.raises(ExecutionFailed, match="embeds hold the attribute\\(s\\) \\['object color'\\], not "
                                              "\\['background color'\\]"):
        client.run(map_graph(connect=["embeds"], attributes="background color", labels=""))
    with pytest.raises(ExecutionFailed, match="3 label\\(s\\) for 4 image\\(s\\)"):
        client.run(map_graph(connect=["embeds"], attributes="", labels="a\nb\nc"))
    with pytest.raises(ExecutionFailed, match="connect either an encoder .* not both"):
        client.run(map_graph(connect=["encoder", "embeds"], attributes="object color", labels=""))
    ok = client.run(map_graph(connect=["embeds"], attributes="", labels="x,x,y,y"))
    assert any("object color: silhouette" in t for out in ok["outputs"].values() for t in out.get("text", []))
