"""Attribute retrieval: index images by their pooled attribute embeddings and search them by cosine similarity.

``store`` (the index folder: safetensors shards + index.json), ``build`` (embedding folders, resumable),
``search`` (exact and FAISS), ``paths`` (folders read safely), ``cli`` (console script ``omni-attribute-index``).
"""

from .build import BuildReport, build_index, embed_pooled, load_image, save_batch_images
from .paths import FolderAccessError, ImageFile, list_images, read_image_list, resolve_inside
from .search import AnnSettings, ArraySource, ExactSearcher, FaissSearcher, SearchError, recall_at_k
from .store import AdapterIdentity, AttributeIndex, AttributeIndexError, Hit, attribute_lines, encoder_settings

__all__ = [
    "AdapterIdentity", "AnnSettings", "ArraySource", "AttributeIndex", "AttributeIndexError", "BuildReport",
    "ExactSearcher", "FaissSearcher", "FolderAccessError", "Hit", "ImageFile", "SearchError", "attribute_lines",
    "build_index", "embed_pooled", "encoder_settings", "list_images", "load_image", "read_image_list", "recall_at_k",
    "resolve_inside", "save_batch_images",
]
