"""What the annotator asks and how its answers are read.

Two prompts: the **teacher**'s (a large MLLM, e.g. Qwen2.5-VL-72B) explains the task, asks it to compare the
two images step by step in a ``reasoning`` field and then give the answer; the **expert**'s is one short
request for the answer alone (the fine-tuned smaller model has learnt the task, so it needs neither the
explanation nor the reasoning: far fewer input and output tokens).

The answer is one JSON object::

    {"reasoning": "...",                           (teacher only, written first)
     "positive_attributes": ["dog identity", ...], attributes both images share
     "negative_attributes": ["background", ...],   attributes that differ
     "caption_a": "...", "caption_b": "..."}       one sentence per image

Its JSON schema is sent as structured output when the server supports it. Otherwise (and always, as a
check) the text is parsed: the JSON object is taken out of code fences or surrounding prose, trailing
commas are dropped, known alternative key names are mapped, a list given as one comma-separated string is
split and names are trimmed and de-duplicated — repairs that cannot change the meaning. Everything else
(truncated or missing JSON, missing fields, wrong types, no shared attribute, an attribute in both lists,
names that are not names) rejects the answer with a reason, and the pair is asked again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..prompt import MAX_ATTRIBUTE_CHARS, MAX_ATTRIBUTES_PER_INSTRUCTION
from .errors import AnswerRejected

PROMPT_VERSION = 1
DEFAULT_SYSTEM = "You are a helpful assistant."   # what Qwen2.5-VL's chat template inserts without a system turn
FIELDS = ("positive_attributes", "negative_attributes", "caption_a", "caption_b")

TEACHER_SYSTEM = ("You are a meticulous visual annotator. You compare two images and name their visual "
                  "attributes precisely, for training an image encoder that extracts one attribute at a time.")

TEACHER_PROMPT = """The first image and the second image above are semantically linked: for example the same \
subject photographed twice, the same object in another setting, or two pictures in one style.

Name the visual attributes the two images SHARE (positive attributes) and the visual attributes in which they \
DIFFER (negative attributes), and caption each image.

How to name an attribute:
- 1 to 5 lowercase words: the subject, then the aspect, e.g. "dog identity", "man hairstyle", "object color", \
"foreground material", "background", "image lighting", "camera angle", "artistic style", "facial expression".
- Name the aspect, never its value: "fur color", not "brown fur"; "image lighting", not "warm light".
- No commas or semicolons inside a name; never the same attribute in both lists.

What to list:
- positive_attributes: every aspect that is the same in both images and that one would copy from the first \
image to reproduce it in the second. At least 1, at most 8.
- negative_attributes: aspects that clearly differ between the two images. 0 to 8.
- caption_a, caption_b: one sentence each describing the first and the second image. Describe the shared \
attributes only generically ("a dog", not "a brown corgi with a white chest"): their details come from the \
other image. State the differing attributes plainly.

Work step by step in "reasoning": describe each image briefly, compare them aspect by aspect (subject, \
identity, shape, color, material, pattern, pose, expression, clothing, background, lighting, viewpoint, \
style), decide what is shared and what differs. Then fill in the other fields.

Answer with one JSON object and nothing else:
{"reasoning": "...", "positive_attributes": ["..."], "negative_attributes": ["..."], "caption_a": "...", \
"caption_b": "..."}"""

EXPERT_PROMPT = ("Shared and differing attributes of the two images, and a caption of each, as JSON "
                 "(positive_attributes, negative_attributes, caption_a, caption_b).")

RETRY_PROMPT = ("Your answer could not be used: {reason}. Answer again with only the JSON object, following "
                "the instructions above.")


def answer_schema(style: str) -> dict:
    """The JSON schema of an answer (kept to what guided-decoding backends all support; limits are checked here)."""
    attributes = {"type": "array", "items": {"type": "string"}}
    properties = {"positive_attributes": attributes, "negative_attributes": attributes,
                  "caption_a": {"type": "string"}, "caption_b": {"type": "string"}}
    if style == "teacher":
        properties = {"reasoning": {"type": "string"}, **properties}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def response_format(style: str) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": f"pair_annotation_{style}", "schema": answer_schema(style), "strict": True}}


def build_messages(style: str, image_a_url: str, image_b_url: str) -> list[dict]:
    """OpenAI chat messages for one pair (images as data URLs, first image = image_a)."""
    def image(url: str) -> dict:
        return {"type": "image_url", "image_url": {"url": url}}

    if style == "teacher":
        return [{"role": "system", "content": TEACHER_SYSTEM},
                {"role": "user", "content": [{"type": "text", "text": "First image:"}, image(image_a_url),
                                             {"type": "text", "text": "Second image:"}, image(image_b_url),
                                             {"type": "text", "text": TEACHER_PROMPT}]}]
    if style == "expert":
        return [{"role": "user", "content": [image(image_a_url), image(image_b_url),
                                             {"type": "text", "text": EXPERT_PROMPT}]}]
    raise ValueError(f"unknown prompt style {style!r}: use teacher or expert")


def retry_messages(messages: list[dict], answer_text: str, reason: str) -> list[dict]:
    """The conversation again, with the rejected answer and the reason it was rejected."""
    return [*messages, {"role": "assistant", "content": answer_text},
            {"role": "user", "content": RETRY_PROMPT.format(reason=reason)}]


# ---- Qwen2.5-VL's chat format ------------------------------------------------------------------------------

def render_chat(messages: list[dict], image_tokens: list[int] | None = None, add_generation_prompt: bool = True) -> str:
    """The text Qwen2.5-VL's chat template makes of ``messages`` (a default system turn when there is none).
    Each image becomes ``<|vision_start|><|image_pad|>…<|vision_end|>`` with ``image_tokens[i]`` pads (one pad,
    as the template writes it, when None)."""
    parts, image_index = [], 0
    if not messages or messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for message in messages:
        parts.append(f"<|im_start|>{message['role']}\n")
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            for item in content:
                if item.get("type") in ("image_url", "image") or "image_url" in item or "image" in item:
                    pads = 1 if image_tokens is None else image_tokens[image_index]
                    parts.append("<|vision_start|>" + "<|image_pad|>" * pads + "<|vision_end|>")
                    image_index += 1
                elif "text" in item:
                    parts.append(item["text"])
        parts.append("<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# ---- reading answers -------------------------------------------------------------------------------------

@dataclass
class Annotation:
    positive_attributes: list[str]
    negative_attributes: list[str]
    caption_a: str
    caption_b: str
    reasoning: str = ""
    repairs: list[str] = field(default_factory=list)

    def answer(self) -> dict:
        """The answer as the expert is taught to give it (no reasoning)."""
        return {"positive_attributes": self.positive_attributes, "negative_attributes": self.negative_attributes,
                "caption_a": self.caption_a, "caption_b": self.caption_b}


ALIASES = {
    "positive_attributes": ("positive_attributes", "positive", "positives", "shared_attributes", "shared",
                            "positive_attribute", "common_attributes"),
    "negative_attributes": ("negative_attributes", "negative", "negatives", "differing_attributes", "different_attributes",
                            "negative_attribute", "differences"),
    "caption_a": ("caption_a", "caption_1", "caption1", "first_caption", "caption_first", "image_a_caption"),
    "caption_b": ("caption_b", "caption_2", "caption2", "second_caption", "caption_second", "image_b_caption"),
    "reasoning": ("reasoning", "reason", "analysis", "thoughts", "thinking"),
}
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def _object_spans(text: str) -> tuple[list[tuple[int, int]], bool]:
    """Spans of the top-level {...} objects in ``text`` (strings respected), and whether one is left open."""
    spans, depth, start, in_string, escaped = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"' and depth > 0:
            in_string = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans, depth > 0


def _without_trailing_commas(text: str) -> str:
    """Drop commas right before a closing bracket, outside strings."""
    out, in_string, escaped, i = [], False, False, 0
    while i < len(text):
        ch = text[i]
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch == ",":
            match = _TRAILING_COMMA.match(text, i)
            if not match:
                out.append(ch)
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def extract_json(text: str) -> tuple[dict, list[str]]:
    """The answer's JSON object and the repairs it needed. Raises AnswerRejected."""
    repairs: list[str] = []
    stripped = text.strip()
    if not stripped:
        raise AnswerRejected("empty answer")
    try:
        value = json.loads(stripped)
        if isinstance(value, dict):
            return value, repairs
        raise AnswerRejected("not a JSON object", f"the answer is a JSON {type(value).__name__}")
    except json.JSONDecodeError:
        pass
    spans, left_open = _object_spans(stripped)
    for start, end in reversed(spans):   # the answer comes last (after reasoning in prose)
        candidate = stripped[start:end]
        for attempt, note in ((candidate, None), (_without_trailing_commas(candidate), "trailing commas removed")):
            try:
                value = json.loads(attempt)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and any(k in value for names in ALIASES.values() for k in names):
                if start > 0 or end < len(stripped):
                    repairs.append("JSON taken out of surrounding text")
                if note:
                    repairs.append(note)
                return value, repairs
    if left_open:
        raise AnswerRejected("truncated JSON", "the object is not closed")
    if spans:
        raise AnswerRejected("invalid JSON", "no parsable object with the answer's fields")
    raise AnswerRejected("no JSON", f"the answer has no JSON object: {stripped[:80]!r}")


def _clean_name(name: str) -> str:
    return " ".join(name.split()).strip().rstrip(".").strip()


def _attribute_list(value, key: str, repairs: list[str]) -> list[str]:
    if isinstance(value, str):
        repairs.append(f"{key} split from a comma-separated string")
        value = [part for part in re.split(r"[,;]", value)]
    if not isinstance(value, list):
        raise AnswerRejected("schema violation", f"{key} must be a list of strings, got {type(value).__name__}")
    names, seen = [], set()
    for item in value:
        if not isinstance(item, str):
            raise AnswerRejected("schema violation", f"{key} must hold strings, got {type(item).__name__}")
        name = _clean_name(item)
        if not name:
            continue
        if "," in name or ";" in name:
            raise AnswerRejected("bad attribute name", f"{name!r} in {key} holds a comma or semicolon: one attribute per entry")
        if not any(ch.isalnum() for ch in name):
            raise AnswerRejected("bad attribute name", f"{name!r} in {key} has no letters or digits")
        if len(name) > MAX_ATTRIBUTE_CHARS:
            raise AnswerRejected("bad attribute name", f"an attribute in {key} is {len(name)} characters long "
                                                     f"(at most {MAX_ATTRIBUTE_CHARS})")
        if name.lower() in seen:
            repairs.append(f"duplicate {name!r} removed from {key}")
            continue
        seen.add(name.lower())
        names.append(name)
    if len(names) > MAX_ATTRIBUTES_PER_INSTRUCTION:
        raise AnswerRejected("schema violation", f"{key} has {len(names)} attributes (at most {MAX_ATTRIBUTES_PER_INSTRUCTION})")
    return names


def validate_answer(data: dict, repairs: list[str] | None = None) -> Annotation:
    """Check (and safely repair) a parsed answer. Raises AnswerRejected with the reason."""
    repairs = list(repairs or [])
    values = {}
    for canonical, names in ALIASES.items():
        found = [name for name in names if name in data]
        if found:
            if found[0] != canonical:
                repairs.append(f"key {found[0]!r} read as {canonical!r}")
            values[canonical] = data[found[0]]
    missing = [k for k in FIELDS if k not in values]
    if missing:
        raise AnswerRejected("schema violation", f"missing field(s) {', '.join(missing)}")
    positives = _attribute_list(values["positive_attributes"], "positive_attributes", repairs)
    negatives = _attribute_list(values["negative_attributes"], "negative_attributes", repairs)
    if not positives:
        raise AnswerRejected("no positive attribute", "positive_attributes is empty: a pair needs at least one shared attribute")
    both = sorted({p.lower() for p in positives} & {n.lower() for n in negatives})
    if both:
        raise AnswerRejected("contradiction", f"{', '.join(both)} listed as both shared and differing")
    captions = {}
    for key in ("caption_a", "caption_b"):
        value = values[key]
        if not isinstance(value, str):
            raise AnswerRejected("schema violation", f"{key} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise AnswerRejected("empty caption", f"{key} is empty")
        captions[key] = " ".join(value.split())
    reasoning = values.get("reasoning", "")
    if not isinstance(reasoning, str):
        reasoning = json.dumps(reasoning)
    return Annotation(positives, negatives, captions["caption_a"], captions["caption_b"], reasoning, repairs)


def parse_answer(text: str, finish_reason: str | None = None) -> Annotation:
    """Text of a chat completion → a validated Annotation. Raises AnswerRejected."""
    try:
        data, repairs = extract_json(text)
    except AnswerRejected as exc:
        if finish_reason == "length":
            raise AnswerRejected("truncated answer", "the answer reached max_tokens: raise endpoint.max_tokens") from exc
        raise
    return validate_answer(data, repairs)


def expert_target(annotation: Annotation) -> str:
    """The assistant's text the expert is fine-tuned to produce."""
    return json.dumps(annotation.answer(), ensure_ascii=False)


def prompt_tokens(style: str, tokenizer, width: int, height: int) -> int:
    """Input tokens of one pair's first request: the chat-formatted prompt with two images of width x height
    (already at a processor size) as Qwen2.5-VL counts them, (H/28)·(W/28) pads per image."""
    pads = (width // 28) * (height // 28)
    text = render_chat(build_messages(style, "", ""), [pads, pads])
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
