"""Sampling through the live server: a tiny FLUX (test fixture node) patched by Apply Omni-Attribute."""

import io

import numpy as np
import pytest
from PIL import Image

from omni_attribute.headless import ExecutionFailed, node_outputs

pytestmark = pytest.mark.host


def sampling_graph(attributes="object color", adapter="tiny-ip.safetensors", weight=1.0, apply=True,
                   family="flux", image_seed=0, encoder_adapter="tiny-ip.safetensors", cfg=2.0, mask=False):
    graph = {
        "1": {"class_type": "OmniTestImage", "inputs": {"width": 64, "height": 64, "channels": 3, "batch": 1,
                                                         "seed": image_seed, "poison_nan": False}},
        "2": {"class_type": "OmniAttributeEncoderLoader",
              "inputs": {"backbone": "tiny-qwen25vl", "adapter": encoder_adapter, "dtype": "auto", "device": "default"}},
        "3": {"class_type": "OmniAttributeEncode", "inputs": {"encoder": ["2", 0], "image": ["1", 0],
                                                              "attributes": attributes}},
        "10": {"class_type": "OmniTestTinyModel", "inputs": {"family": family, "seed": 0}},
        "11": {"class_type": "OmniAttributeApply", "inputs": {
            "model": ["10", 0], "embeds": ["3", 0], "adapter": adapter, "weight": weight, "start_percent": 0.0,
            "end_percent": 1.0, "apply_to": "positive only", "combine": "all rows together"}},
        "12": {"class_type": "OmniTestConditioning", "inputs": {"seed": 1, "length": 5, "guidance": 3.5}},
        "13": {"class_type": "OmniTestConditioning", "inputs": {"seed": 2, "length": 5, "guidance": 3.5}},
        "14": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "15": {"class_type": "KSampler", "inputs": {
            "model": ["11", 0] if apply else ["10", 0], "seed": 7, "steps": 3, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["12", 0], "negative": ["13", 0], "latent_image": ["14", 0],
            "denoise": 1.0}},
        "16": {"class_type": "OmniTestLatentToImage", "inputs": {"samples": ["15", 0]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "ip_test"}},
    }
    if mask:
        graph["18"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
        graph["11"]["inputs"]["mask"] = ["18", 0]
    if not apply:
        del graph["11"]
    return graph


def sample(client, **settings) -> np.ndarray:
    history = client.run(sampling_graph(**settings))
    (item,) = node_outputs(history, "images")
    return np.asarray(Image.open(io.BytesIO(client.view(item["filename"], item["subfolder"], item["type"]))),
                      dtype=np.int16)


def test_patched_sampling_returns_an_image_that_follows_the_embedding(client):
    plain = sample(client, apply=False)
    color = sample(client, attributes="object color")
    assert color.shape == (64, 64, 3)
    assert np.abs(color - plain).max() > 0, "the attribute tokens had no effect"
    assert np.abs(sample(client, attributes="object shape") - color).max() > 0, "other embedding, same image"
    assert np.abs(sample(client, attributes="object color", image_seed=9) - color).max() > 0
    assert np.array_equal(sample(client, attributes="object color", mask=True), color)  # all-white mask = no mask
    assert np.array_equal(sample(client, weight=0.0), plain)


@pytest.mark.parametrize("settings, fragment", [
    ({"adapter": "tiny.safetensors"}, "has no IP-Adapter weights"),
    ({"adapter": "tiny-ip-32-wide.safetensors"}, "embeds are 64 wide"),
    ({"adapter": "tiny-ip-4-double-blocks.safetensors"}, "another block layout"),
    ({"family": "sd3"}, "supports FLUX.1 models"),
], ids=["no-ip-weights", "embeds-width", "block-layout", "not-flux"])
def test_apply_refuses_what_does_not_fit(client, settings, fragment):
    with pytest.raises(ExecutionFailed) as caught:
        client.run(sampling_graph(**settings))
    assert fragment in str(caught.value) and "OmniAttributeApply" in str(caught.value)
    assert sample(client, attributes="lighting").shape == (64, 64, 3)  # the server keeps serving
