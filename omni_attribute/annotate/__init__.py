"""Annotating image pairs with a vision-language model (``omni-attribute-annotate``).

The paper's data pipeline: semantically linked image pairs are shown to a large MLLM (Qwen2.5-VL-72B,
the *teacher*, with a reasoning prompt), which names the attributes the two images share (positive) and
those that differ (negative) and captions each image; a smaller MLLM (the *expert*) is then fine-tuned on
the teacher's answers with a short prompt and annotates at scale.

Modules: ``pairs`` (which pairs to annotate: explicit lists, groups, nearest neighbours; deduplication),
``prompts`` (teacher/expert prompts, the JSON schema, parsing, repair, validation), ``images`` (images as
data URLs at a configured size, Qwen2.5-VL image-token counts), ``client`` (an OpenAI-compatible
chat-completions client: async, bounded concurrency, retries), ``local`` (the same through transformers),
``output`` (the durable, resumable JSONL the trainer reads), ``run`` (the annotation loop and its summary),
``sft`` (teacher answers → supervised conversations), ``finetune`` (LoRA fine-tuning of the expert),
``config`` and ``cli``.
"""
