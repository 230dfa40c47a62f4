"""The embedding map (omni_attribute.embedding_map): t-SNE panels per attribute, silhouette scores, the drawing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from omni_attribute.embedding_map import (PALETTE, EmbeddingMapError, embedding_map, parse_labels,
                                          silhouette_by_label, tsne_2d)


def grouped(labels: list[int], width: int = 32, spread: float = 0.1, seed: int = 0) -> np.ndarray:
    """Vectors that cluster by ``labels`` (one random centre per label)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(labels) + 1, width))
    return centres[labels] + spread * rng.standard_normal((len(labels), width))


def test_each_attribute_gets_its_own_panel_and_score():
    colour = [i % 3 for i in range(24)]          # what the "object color" embedding follows
    background = [i // 8 for i in range(24)]     # what the "background" embedding follows
    names = [f"c{c}" for c in colour]
    vectors = {"object color": grouped(colour), "background color": grouped(background, seed=1)}
    figure, panels = embedding_map(vectors, labels=names, style="points", panel_size=300, seed=0)
    by_title = {p.title: p for p in panels}
    assert by_title["object color"].silhouette > 0.5 and by_title["object color"].silhouette_embedding > 0.5
    assert by_title["background color"].silhouette < 0.2 and by_title["background color"].silhouette_embedding < 0.2
    assert figure.size[0] == 2 * 300 + 8 and figure.size[1] > 300
    pixels = {tuple(p) for p in np.asarray(figure).reshape(-1, 3)}
    assert {PALETTE[0], PALETTE[1], PALETTE[2]} <= pixels  # the three labels' colours are drawn
    again, _ = embedding_map(vectors, labels=names, style="points", panel_size=300, seed=0)
    assert np.array_equal(np.asarray(figure), np.asarray(again))  # deterministic for a seed


def test_thumbnails_are_drawn():
    thumbs = [Image.new("RGB", (40, 40), (255, 0, 255) if i == 0 else (0, 200, 200)) for i in range(6)]
    figure, panels = embedding_map({"a": grouped([0, 0, 0, 1, 1, 1])}, thumbnails=thumbs, style="thumbnails",
                                   panel_size=256)
    pixels = np.asarray(figure).reshape(-1, 3)
    assert ((pixels == (255, 0, 255)).all(axis=1)).sum() > 100
    assert panels[0].silhouette is None  # no labels, no score


def test_silhouette_is_undefined_without_two_labels_and_refusals():
    points = np.random.default_rng(0).standard_normal((5, 2))
    assert silhouette_by_label(points, ["a"] * 5) is None and silhouette_by_label(points, None) is None
    assert silhouette_by_label(points, ["a", "b", "c", "d", "e"]) is None
    with pytest.raises(EmbeddingMapError, match="at least 3 images, got 2"):
        tsne_2d(np.ones((2, 4)))
    with pytest.raises(EmbeddingMapError, match="perplexity 10 must be below the number of images"):
        tsne_2d(np.random.default_rng(0).standard_normal((6, 4)), perplexity=10)
    with pytest.raises(EmbeddingMapError, match="every embedding is zero"):
        tsne_2d(np.zeros((5, 4)))
    assert parse_labels("red\nblue\nred", 3) == ["red", "blue", "red"]
    assert parse_labels("red, blue, red", 3) == ["red", "blue", "red"]
    assert parse_labels("  ", 3) is None
    with pytest.raises(EmbeddingMapError, match="2 label\\(s\\) for 3 image\\(s\\): give one label per image"):
        parse_labels("red\nblue", 3)
    with pytest.raises(EmbeddingMapError, match="same images"):
        embedding_map({"a": np.ones((4, 3)), "b": np.ones((5, 3))})
    with pytest.raises(EmbeddingMapError, match="style 'pie'"):
        embedding_map({"a": np.ones((4, 3))}, style="pie")
