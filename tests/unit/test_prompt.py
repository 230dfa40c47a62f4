import pytest

from omni_attribute.errors import AttributeTextError
from omni_attribute.prompt import format_instruction, join_attributes, parse_attribute_text


def test_paper_phrasing():
    assert format_instruction(["man identity", "man hairstyle"]) == "Exclusively describe man identity, and man hairstyle:"
    assert format_instruction(["image lighting"]) == "Exclusively describe image lighting:"
    assert join_attributes(["a", "b", "c"]) == "a, b, and c"


def test_lines_are_instructions_and_commas_combine():
    text = "object color\n\n  man identity ,and man hairstyle ;  background \n"
    assert parse_attribute_text(text) == [["object color"], ["man identity", "man hairstyle", "background"]]


def test_control_characters_and_spaces_are_folded():
    assert parse_attribute_text("object\tcolor\x00  ") == [["object color"]]


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("   \n \t ", "empty"),
    (",,, ;", "no attribute"),
    ("???", "no letters"),
    ("x" * 300, "characters long"),
    (", ".join(f"a{i}" for i in range(20)), "attributes in one line"),
    ("\n".join(f"a{i}" for i in range(80)), "attribute lines"),
])
def test_bad_text_says_what_to_fix(text, fragment):
    with pytest.raises(AttributeTextError, match=fragment):
        parse_attribute_text(text)


def test_template_without_placeholder_is_a_holistic_encoder():
    assert format_instruction(["x"], "Describe the image:") == format_instruction(["y"], "Describe the image:")
