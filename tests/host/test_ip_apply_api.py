"""Sampling through the live server: a tiny FLUX (test fixture node) patched by Apply Omni-Attribute."""

import io

import numpy as np
import pytest
from PIL import Image

from omni_attribute.headless import ExecutionFailed, node_outputs

pytestmark = pytest.mark.host


def sampling_graph(graphs, attributes="object color", adapter="tiny-ip.safetensors", weight=1.0, apply=True,
                   family="flux", image_seed=0, encoder_adapter="tiny-ip.safetensors", cfg=2.0, mask=False):
    """Test image → Encode; tiny FLUX (patched by Apply unless ``apply`` is false) → KSampler → image → Save."""
    graph = graphs.builder()
    image = graph.node("OmniTestImage", width=64, height=64, channels=3, batch=1, seed=image_seed, poison_nan=False)
    encoder = graph.node("OmniAttributeEncoderLoader", backbone="tiny-qwen25vl", adapter=encoder_adapter,
                         dtype="auto", device="default")
    encode = graph.node("OmniAttributeEncode", encoder=encoder.out(0), image=image.out(0), attributes=attributes)
    model = graph.node("OmniTestTinyModel", family=family, seed=0)
    if apply:
        patched = graph.node("OmniAttributeApply", model=model.out(0), embeds=encode.out(0), adapter=adapter,
                             weight=weight, start_percent=0.0, end_percent=1.0, apply_to="positive only",
                             combine="all rows together")
        if mask:
            patched.set_input("mask", graph.node("SolidMask", value=1.0, width=64, height=64).out(0))
        model = patched
    positive = graph.node("OmniTestConditioning", seed=1, length=5, guidance=3.5)
    negative = graph.node("OmniTestConditioning", seed=2, length=5, guidance=3.5)
    latent = graph.node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    sampled = graph.node("KSampler", model=model.out(0), seed=7, steps=3, cfg=cfg, sampler_name="euler",
                         scheduler="simple", positive=positive.out(0), negative=negative.out(0),
                         latent_image=latent.out(0), denoise=1.0)
    decoded = graph.node("OmniTestLatentToImage", samples=sampled.out(0))
    graph.node("SaveImage", images=decoded.out(0), filename_prefix="ip_test")
    return graph.finalize()


def sample(client, graphs, **settings) -> np.ndarray:
    history = client.run(sampling_graph(graphs, **settings))
    (item,) = node_outputs(history, "images")
    return np.asarray(Image.open(io.BytesIO(client.view(item["filename"], item["subfolder"], item["type"]))),
                      dtype=np.int16)


def assert_differs(image: np.ndarray, other: np.ndarray, reference: np.ndarray, why: str) -> None:
    """More than rounding noise: the mean |difference| is above 1% of the reference image's own spread (about one
    8-bit grey level here; measured: 13.2 with vs without the tokens, 2.5 between two attribute texts, 8.2
    between two reference images)."""
    bound = 0.01 * reference.std()
    difference = np.abs(image - other).mean()
    assert difference > bound, f"{why}: mean |difference| {difference:.3f} <= {bound:.3f}"


def test_patched_sampling_returns_an_image_that_follows_the_embedding(client, graphs):
    plain = sample(client, graphs, apply=False)
    color = sample(client, graphs, attributes="object color")
    assert color.shape == plain.shape == (64, 64, 3)
    assert_differs(color, plain, plain, "the attribute tokens had no effect")
    assert_differs(sample(client, graphs, attributes="object shape"), color, plain, "other embedding, same image")
    assert_differs(sample(client, graphs, attributes="object color", image_seed=9), color, plain,
                   "other reference image, same image")
    assert np.array_equal(sample(client, graphs, attributes="object color", mask=True), color)  # all-white mask = no mask
    assert np.array_equal(sample(client, graphs, weight=0.0), plain)


@pytest.mark.parametrize("settings, fragment", [
    ({"adapter": "tiny.safetensors"}, "has no IP-Adapter weights"),
    ({"adapter": "tiny-ip-32-wide.safetensors"}, "embeds are 64 wide"),
    ({"adapter": "tiny-ip-4-double-blocks.safetensors"}, "another block layout"),
    ({"family": "sd3"}, "supports FLUX.1 models"),
], ids=["no-ip-weights", "embeds-width", "block-layout", "not-flux"])
def test_apply_refuses_what_does_not_fit(client, graphs, settings, fragment):
    with pytest.raises(ExecutionFailed) as caught:
        client.run(sampling_graph(graphs, **settings))
    assert fragment in str(caught.value) and "OmniAttributeApply" in str(caught.value)
    assert sample(client, graphs, attributes="lighting").shape == (64, 64, 3)  # the server keeps serving
