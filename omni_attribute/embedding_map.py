"""The embedding map: a t-SNE of the same images' pooled embeddings under several attributes, one panel per
attribute (the paper's interpretability figure: 60 animals under "animal color", "animal species",
"background environment" cluster differently). Drawn with PIL: thumbnails or coloured points, a legend for the
labels, and per panel the silhouette score of the labels (how well the map separates them; -1 … 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import OmniAttributeError

MIN_IMAGES = 3
STYLES = ("thumbnails", "points")
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 128, 0)]


class EmbeddingMapError(OmniAttributeError):
    """The embedding map cannot be drawn from these inputs."""


def tsne_2d(vectors: np.ndarray, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """[N, D] → [N, 2] by t-SNE on cosine distances (scikit-learn), deterministic for a seed."""
    from sklearn.manifold import TSNE

    vectors = np.asarray(vectors, dtype=np.float64)
    n = len(vectors)
    if n < MIN_IMAGES:
        raise EmbeddingMapError(f"a map needs at least {MIN_IMAGES} images, got {n}: connect a larger IMAGE batch")
    if perplexity is None or perplexity <= 0:
        perplexity = min(30.0, max(1.0, (n - 1) / 3))
    if perplexity >= n:
        raise EmbeddingMapError(f"perplexity {perplexity} must be below the number of images ({n}): lower it "
                                "(0 picks one from the number of images)")
    norms = np.linalg.norm(vectors, axis=1)
    if np.all(norms < 1e-12):
        raise EmbeddingMapError("every embedding is zero: the encoder gave no signal")
    model = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed,
                 max_iter=1000)
    return model.fit_transform(vectors).astype(np.float32)


def silhouette_by_label(points: np.ndarray, labels: list[str] | None, metric: str = "euclidean") -> float | None:
    """Silhouette score of ``labels`` on ``points`` (None when it is undefined: fewer than 2 labels, or as many
    labels as points)."""
    if not labels:
        return None
    from sklearn.metrics import silhouette_score

    distinct = len(set(labels))
    if distinct < 2 or distinct >= len(labels):
        return None
    return float(silhouette_score(points, labels, metric=metric))


def parse_labels(text: str | None, count: int) -> list[str] | None:
    """One label per image, one per line (or comma-separated on one line); empty → no labels."""
    if text is None or not text.strip():
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) == 1 and "," in lines[0]:
        lines = [part.strip() for part in lines[0].split(",")]
    if len(lines) != count:
        raise EmbeddingMapError(f"{len(lines)} label(s) for {count} image(s): give one label per image, one per line "
                                "(or comma-separated), in the order of the IMAGE batch")
    return lines


@dataclass
class Panel:
    title: str
    points: np.ndarray            # [N, 2]
    silhouette: float | None
    silhouette_embedding: float | None


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(points: np.ndarray, lo: float, hi: float) -> np.ndarray:
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high - low > 1e-9, high - low, 1.0)
    return lo + (points - low) / span * (hi - lo)


def draw_panel(panel: Panel, labels: list[str] | None, thumbnails: list[Image.Image] | None, size: int,
               style: str) -> Image.Image:
    canvas = Image.new("RGB", (size, size + 56), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title_font, small = _font(max(12, size // 28)), _font(max(10, size // 40))
    draw.text((10, 8), panel.title, fill=(0, 0, 0), font=title_font)
    if panel.silhouette is not None:
        draw.text((10, 30), f"silhouette by label: map {panel.silhouette:+.2f}, embedding "
                            f"{panel.silhouette_embedding:+.2f}", fill=(80, 80, 80), font=small)
    n = len(panel.points)
    thumb = int(np.clip(size / np.sqrt(n) / 1.6, 16, size / 5))
    margin = thumb // 2 + 6 if style == "thumbnails" else 14
    xy = _fit(panel.points, margin, size - margin)
    xy[:, 1] += 56
    names = sorted(set(labels)) if labels else []
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    draw.rectangle((2, 54, size - 3, size + 53), outline=(200, 200, 200))
    for i in range(n):
        x, y = (int(v) for v in xy[i])
        fill = colour[labels[i]] if labels else PALETTE[0]
        if style == "thumbnails" and thumbnails is not None:
            image = thumbnails[i].copy()
            image.thumbnail((thumb, thumb))
            box = (x - image.width // 2, y - image.height // 2)
            if labels:
                draw.rectangle((box[0] - 3, box[1] - 3, box[0] + image.width + 2, box[1] + image.height + 2), fill=fill)
            canvas.paste(image, box)
        else:
            r = max(4, size // 70)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(0, 0, 0))
    return canvas


def legend(labels: list[str], width: int) -> Image.Image:
    names = sorted(set(labels))
    font = _font(14)
    per_row = max(1, width // 160)
    rows = (len(names) + per_row - 1) // per_row
    image = Image.new("RGB", (width, 10 + 22 * rows), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(names):
        x, y = 10 + (i % per_row) * 160, 6 + (i // per_row) * 22
        draw.rectangle((x, y + 2, x + 14, y + 16), fill=PALETTE[i % len(PALETTE)], outline=(0, 0, 0))
        draw.text((x + 20, y + 1), name[:22], fill=(0, 0, 0), font=font)
    return image


def embedding_map(vectors: dict[str, np.ndarray], thumbnails: list[Image.Image] | None = None,
                  labels: list[str] | None = None, style: str = "thumbnails", panel_size: int = 512, seed: int = 0,
                  perplexity: float | None = None) -> tuple[Image.Image, list[Panel]]:
    """``vectors``: attribute → [N, D] pooled embeddings of the same N images. Returns the figure and its panels
    (t-SNE points and silhouette scores of the labels, on the map and on the cosine embedding)."""
    if style not in STYLES:
        raise EmbeddingMapError(f"style {style!r}: choose one of {', '.join(STYLES)}")
    if not vectors:
        raise EmbeddingMapError("no attribute to map: give at least one attribute line")
    counts = {len(v) for v in vectors.values()}
    if len(counts) != 1:
        raise EmbeddingMapError(f"every attribute needs the same images; got row counts {sorted(counts)}")
    if style == "thumbnails" and thumbnails is None:
        style = "points"
    panels = []
    for title, rows in vectors.items():
        points = tsne_2d(rows, seed=seed, perplexity=perplexity)
        panels.append(Panel(title, points, silhouette_by_label(points, labels),
                            silhouette_by_label(np.asarray(rows, np.float64), labels, metric="cosine")))
    drawn = [draw_panel(p, labels, thumbnails, panel_size, style) for p in panels]
    width = sum(d.width for d in drawn) + 8 * (len(drawn) - 1)
    key = legend(labels, width) if labels else None
    figure = Image.new("RGB", (width, drawn[0].height + (key.height if key else 0)), (255, 255, 255))
    x = 0
    for d in drawn:
        figure.paste(d, (x, 0))
        x += d.width + 8
    if key:
        figure.paste(key, (0, drawn[0].height))
    return figure, panels


def report(panels: list[Panel]) -> str:
    lines = []
    for p in panels:
        if p.silhouette is None:
            lines.append(f"{p.title}: {len(p.points)} images (no labels: no silhouette score)")
        else:
            lines.append(f"{p.title}: silhouette by label {p.silhouette:+.3f} on the map, "
                         f"{p.silhouette_embedding:+.3f} on the embedding (cosine)")
    return "\n".join(lines)
