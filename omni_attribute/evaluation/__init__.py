"""Evaluation: attribute retrieval against labels (``retrieval``) and the MLLM-judged personalization benchmark
(``personalization``, ``judge``); console script ``omni-attribute-eval`` (``cli``)."""
