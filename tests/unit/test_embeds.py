import pytest
import torch
from safetensors.torch import save_file

from omni_attribute.embeds import AttributeEmbeds, load_embeds, save_embeds
from omni_attribute.errors import EmbedsFileError


def test_round_trip(tmp_path):
    tokens = torch.randn(3, 4, 8)
    embeds = AttributeEmbeds(tokens, tokens.mean(1), ["a", "b", "c, and d"], [0, 0, 1], {"adapter": "x"})
    save_embeds(tmp_path / "e.safetensors", embeds)
    back = load_embeds(tmp_path / "e.safetensors")
    assert torch.equal(back.tokens, tokens) and back.attributes == embeds.attributes
    assert back.image_index == [0, 0, 1] and back.info == {"adapter": "x"}
    assert "c, and d" in back.summary()


def test_bad_files(tmp_path):
    foreign = tmp_path / "f.safetensors"
    save_file({"tokens": torch.zeros(1, 1, 1)}, str(foreign))
    with pytest.raises(EmbedsFileError, match="not Omni-Attribute embeds"):
        load_embeds(foreign)
    broken = tmp_path / "b.safetensors"
    broken.write_bytes(b"12345678")
    with pytest.raises(EmbedsFileError, match="not a readable"):
        load_embeds(broken)
    with pytest.raises(EmbedsFileError, match="do not fit"):
        AttributeEmbeds(torch.zeros(2, 3, 4), torch.zeros(2, 5), ["a", "b"], [0, 1])
