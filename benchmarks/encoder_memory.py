"""Encoder weight memory (issue 17, item 3): bf16 vs 8-bit backbone weights.

Two parts:
- full size, on the meta device (no weights, nothing downloaded): Qwen2.5-VL-7B's weight bytes as loaded from
  ComfyUI's text-encoder file (lm_head tied away), in bf16 and with Float8Linear layers;
- the tiny ComfyUI-shaped model, for real: weight bytes, embeds cosine of the 8-bit path against the
  unquantised one, and the peak CPU RSS of loading + one encode in a fresh process per mode.

    OMP_NUM_THREADS=1 python -m benchmarks.encoder_memory
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GB = 1e9


def full_size() -> dict:
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from omni_attribute.comfy_text_encoder_file import QWEN25_VL_7B
    from omni_attribute.float8 import quantizable_linears

    config = json.loads(json.dumps(QWEN25_VL_7B))
    config.update({"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": True})
    config["vision_config"].update({"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                    "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2})
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    # the loaded model ties lm_head to the embedding: it holds no weights of its own
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("lm_head."))
    linears = quantizable_linears(model)
    linear_weights = sum(m.weight.numel() for _, m in linears)
    rows = sum(m.out_features for _, m in linears)
    return {"params_B": params / 1e9, "linear_weight_params_B": linear_weights / 1e9,
            "bf16_GB": 2 * params / GB,
            "fp8_GB": (2 * (params - linear_weights) + linear_weights + 4 * rows) / GB,
            "file_with_lm_head_bf16_GB": 2 * (params + 152064 * 3584) / GB}


def one_mode(mode: str, files: dict, tokenizer_dir: str) -> None:
    """In a fresh process: load one way, encode once, print weight bytes and peak RSS (JSON)."""
    from omni_attribute.encoder import load_encoder
    from omni_attribute.float8 import Float8Linear, quantizable_linears, weight_bytes

    source, weight_dtype = mode.split(":")
    encoder = load_encoder(files[source], files["adapter"], dtype=torch.bfloat16, weight_dtype=weight_dtype,
                           tokenizer_dir=None if source == "hf" else tokenizer_dir)
    torch.manual_seed(0)
    embeds = encoder.encode(torch.rand(2, 84, 112, 3), "object color\nbackground")
    torch.save(embeds.tokens, files["out"] + f".{mode.replace(':', '_')}.pt")
    # the backbone's own Linear layers (LoRA's and the tied lm_head left out), plain or float8
    linears = [m for _, m in quantizable_linears(encoder.mllm)] + [m for m in encoder.mllm.modules()
                                                                   if isinstance(m, Float8Linear)]
    linear_bytes = sum(weight_bytes(m) for m in linears)
    print(json.dumps({"mode": mode, "weight_bytes": weight_bytes(encoder.mllm), "linear_bytes": linear_bytes,
                      "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def tiny() -> list[dict]:
    from devtools.fixtures import make_tiny_comfy_text_encoder, make_untrained_adapter, qwen25_tokenizer_dir

    base = Path(tempfile.mkdtemp(prefix="encoder_memory_"))
    files = {k: str(v) for k, v in make_tiny_comfy_text_encoder(base).items()}
    files["adapter"] = str(make_untrained_adapter(files["hf"], base / "adapter.safetensors", seed=1))
    files["out"] = str(base / "tokens")
    rows = []
    for mode in ("hf:default", "hf:fp8_e4m3fn", "plain:default", "fp8:default", "fp8:fp8_e4m3fn"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.encoder_memory", "--one", mode, json.dumps(files),
                              str(qwen25_tokenizer_dir())], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    reference = torch.load(files["out"] + ".hf_default.pt")
    for row in rows:
        tokens = torch.load(files["out"] + f".{row['mode'].replace(':', '_')}.pt")
        row["cosine_vs_bf16"] = torch.nn.functional.cosine_similarity(tokens.flatten(1), reference.flatten(1)).min().item()
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one_mode(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
        return
    print(json.dumps({"full_size_7B": full_size(), "tiny": tiny()}, indent=1))


if __name__ == "__main__":
    main()
