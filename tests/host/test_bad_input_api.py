"""Bad input through the API: a clear error naming what to fix, and the server keeps serving."""

import pytest

from omni_attribute.headless import ExecutionFailed, PromptRejected

pytestmark = pytest.mark.host


def expect_failure(client, prompt, error_type, fragment):
    with pytest.raises(error_type) as caught:
        client.run(prompt)
    assert fragment in str(caught.value), str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("overrides, error_type, fragment", [
    ({"backbone": "../../etc"}, PromptRejected, "not in any registered omni_attribute_backbones folder"),
    ({"backbone": "no-weights"}, ExecutionFailed, "has no *.safetensors weights"),
    ({"adapter": "truncated.safetensors"}, ExecutionFailed, "truncated or corrupted"),
    ({"adapter": "hidden32.safetensors"}, ExecutionFailed, "hidden size 32, backbone has 64"),
    ({"adapter": "other_pack_ip_adapter.safetensors"}, ExecutionFailed, "not an Omni-Attribute adapter"),
    ({"attributes": "   \n  "}, PromptRejected, "attribute text is empty"),
    ({"attributes": "?!"}, PromptRejected, "no letters or digits"),
], ids=["path-outside-folders", "folder-without-weights", "corrupt-adapter", "mismatched-adapter",
        "foreign-adapter", "empty-attribute", "absurd-attribute"])
def test_bad_models_and_text(client, graphs, overrides, error_type, fragment):
    expect_failure(client, graphs.encode(graphs.image(), **overrides), error_type, fragment)
    assert client.run(graphs.encode(graphs.image(seed=1)))["status"]["status_str"] == "success"


@pytest.mark.parametrize("image, fragment", [
    ({"poison_nan": True}, "NaN"),
    ({"width": 600, "height": 1}, "aspect ratio"),
    ({"channels": 5}, "5 channels"),
], ids=["nan", "extreme-aspect", "five-channels"])
def test_unusable_images(client, graphs, image, fragment):
    message = expect_failure(client, graphs.encode(graphs.image(**image)), ExecutionFailed, fragment)
    assert "OmniAttributeEncode" in message
    assert client.run(graphs.encode(graphs.image(seed=2)))["status"]["status_str"] == "success"


@pytest.mark.parametrize("image", [
    {"channels": 4}, {"channels": 1}, {"channels": 2}, {"width": 3000, "height": 2500}, {"width": 1, "height": 1},
], ids=["rgba", "gray", "gray-alpha", "very-large", "one-pixel"])
def test_odd_but_usable_images_encode(client, graphs, image, tmp_path):
    embeds, _ = graphs.fetch(client, client.run(graphs.encode(graphs.image(**image))), tmp_path)
    assert embeds.tokens.shape == (1, 4, 64)
