import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from omni_attribute.embeds import AttributeEmbeds, load_embeds, save_embeds
from omni_attribute.errors import EmbedsError, EmbedsFileError


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
    with pytest.raises(EmbedsError, match="do not fit"):
        AttributeEmbeds(torch.zeros(2, 3, 4), torch.zeros(2, 5), ["a", "b"], [0, 1])


RAW_MARKERS = ("object has no attribute", "invalid literal", "not supported between", "KeyError", "Traceback",
               "NoneType", "list indices")


def good_meta(rows=2):
    return {"format": "omni-attribute-embeds", "format_version": 1, "attributes": ["a"] * rows,
            "image_index": list(range(rows)), "info": {"adapter": "x.safetensors"}}


def write(path, meta, tokens=None, pooled=None):
    tokens = torch.randn(2, 4, 8) if tokens is None else tokens
    pooled = tokens.mean(1) if pooled is None and tokens.ndim == 3 else pooled
    save_file({"tokens": tokens, "pooled": pooled}, str(path),
              metadata={"omni_attribute_embeds": meta if isinstance(meta, str) else json.dumps(meta)})


@pytest.mark.parametrize("meta, tokens, pooled, fragment", [
    ("[1]", None, None, "metadata must be a JSON object, found a list"),
    ("not json", None, None, "damaged metadata, not valid JSON"),
    ({**good_meta(), "format_version": "1"}, None, None, "'format_version' is '1' (a string)"),
    ({**good_meta(), "format_version": 7}, None, None, "newer than this plugin reads"),
    ({**good_meta(), "attributes": "ab"}, None, None, "'attributes' is 'ab' (a string); expected a list of 2 strings"),
    ({**good_meta(), "attributes": ["a"]}, None, None, "expected a list of 2 strings"),
    ({**good_meta(), "image_index": ["0", "1"]}, None, None, "'image_index' is ['0', '1']"),
    ({**good_meta(), "image_index": [0, -1]}, None, None, "'image_index' is [0, -1]"),
    ({**good_meta(), "info": []}, None, None, "'info' must be a JSON object, found a list"),
    ({**good_meta(), "info": {"adapter": 3}}, None, None, "'info.adapter' is 3"),
    (good_meta(0), torch.zeros(0, 4, 8), torch.zeros(0, 8), "holds no embedding (tokens [0, 4, 8]"),
    (good_meta(), torch.zeros(2, 0, 8), torch.zeros(2, 8), "holds no embedding (tokens [2, 0, 8]"),
    (good_meta(), torch.zeros(2, 4), torch.zeros(2, 4), "do not fit together"),
    (good_meta(), torch.full((2, 4, 8), float("nan")), torch.zeros(2, 8), "tokens holds 64 NaN"),
    (good_meta(), torch.zeros(2, 4, 8), torch.full((2, 8), float("inf")), "pooled holds 16 NaN or infinite"),
    (good_meta(), torch.zeros(2, 4, 8, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32), "dtype int32"),
], ids=["list", "not-json", "version-string", "version-newer", "labels-string", "labels-short", "index-strings",
        "index-negative", "info-list", "info-adapter-number", "zero-rows", "zero-tokens", "two-dims", "nan", "inf",
        "integers"])
def test_bad_embeds_files_are_named_and_explained(tmp_path, meta, tokens, pooled, fragment):
    path = tmp_path / "bad.safetensors"
    write(path, meta, tokens, pooled)
    with pytest.raises(EmbedsFileError) as caught:
        load_embeds(path)
    message = str(caught.value)
    assert fragment in message and "bad.safetensors" in message, message
    assert not any(marker in message for marker in RAW_MARKERS), message


def test_embeds_refuse_non_finite_and_empty_values():
    with pytest.raises(EmbedsError, match="NaN or infinite"):
        AttributeEmbeds(torch.full((1, 2, 3), float("nan")), torch.zeros(1, 3), ["a"], [0])
    with pytest.raises(EmbedsError, match="hold no embedding"):
        AttributeEmbeds(torch.zeros(0, 2, 3), torch.zeros(0, 3), [], [])
    with pytest.raises(EmbedsError, match="3-D floating-point"):
        AttributeEmbeds(torch.zeros(2, 3), torch.zeros(2, 3), ["a", "b"], [0, 1])


def test_saving_never_replaces_and_refuses_nan(tmp_path):
    embeds = AttributeEmbeds(torch.randn(1, 2, 3), torch.randn(1, 3), ["a"], [0])
    path = tmp_path / "e.safetensors"
    save_embeds(path, embeds, replace=False)
    before = path.read_bytes()
    other = AttributeEmbeds(torch.randn(1, 2, 3), torch.randn(1, 3), ["b"], [0])
    with pytest.raises(FileExistsError):
        save_embeds(path, other, replace=False)
    assert path.read_bytes() == before
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        save_embeds(tmp_path / "dangling.safetensors", other, replace=False)
    assert not (tmp_path / "nowhere").exists()
    embeds.tokens[0, 0, 0] = float("nan")  # changed after construction: checked again when saved
    with pytest.raises(EmbedsError, match="NaN"):
        save_embeds(tmp_path / "nan.safetensors", embeds, replace=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.safetensors", "e.safetensors"]  # no temporary left


def test_saved_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_embeds(tmp_path / "e.safetensors", AttributeEmbeds(torch.randn(1, 2, 3), torch.randn(1, 3), ["a"], [0]),
                    replace=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "e.safetensors").st_mode) == 0o644


def test_each_row_its_own_condition():
    tokens = torch.randn(3, 2, 4)
    embeds = AttributeEmbeds(tokens, tokens.mean(1), ["color", "shape", "color"], [0, 0, 1])
    rows = embeds.row_conditions(0.5, 0.1, 0.9)
    assert [c.label for c in rows] == ["image 0: color", "image 0: shape", "image 1: color"]
    assert all(torch.equal(c.tokens[0], tokens[i]) and c.weight == 0.5 for i, c in enumerate(rows))
