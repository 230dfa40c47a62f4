"""The tiny attribute world: procedural images with known, independent factors — the project's laboratory.

Six factors (shape, object colour, surface pattern, background colour, lighting direction, object
size) with 3–4 values each; captions; several phrasings per attribute name (open vocabulary, one
phrasing of each held out for evaluation); pairs with ground-truth positive and negative
attributes (the stand-in for the MLLM annotator). Everything is deterministic from a seed.
"""
