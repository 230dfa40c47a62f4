"""The MLLM judge of the personalization benchmark: DreamBench++-style instructions (the criterion, a scoring
rubric, a short reasoning, then a final ``Score: N`` on 0–10), one request per criterion, scores mapped to [0, 1].

Criteria (the paper's): attribute fidelity (does the generated image carry the reference's named attribute,
and only judged on that attribute), text fidelity (does it show what the prompt asks, the attribute aside),
naturalness (is it a coherent, artefact-free image, no copy-and-paste look).
"""

from __future__ import annotations

import re

from ..openai_client import BadResponseError, ChatClient, user_message

CRITERIA = ("attribute_fidelity", "text_fidelity", "naturalness")

ATTRIBUTE_FIDELITY = """You are an expert judge of personalized image generation.
Criterion: attribute fidelity.
The FIRST image is a reference. The SECOND image was generated to carry the reference's "{attribute}" while
following a text prompt. Judge ONLY how faithfully the second image reproduces the reference's {attribute}.
Ignore every other property of the reference (identity, pose, background, style, ...) unless it is part of
"{attribute}"; do not reward copying the reference as a whole.
Rubric: 0 = the {attribute} is absent or completely different; 2-3 = a vague resemblance; 5 = clearly similar
with notable differences; 7-8 = very close with small deviations; 10 = the same {attribute}.
Think briefly (at most three sentences), then end with a line "Score: N" where N is an integer from 0 to 10."""

TEXT_FIDELITY = """You are an expert judge of text-to-image generation.
Criterion: text fidelity.
The image was generated from the prompt: "{prompt}".
(It was also asked to take its "{attribute}" from a reference image; ignore that attribute here.)
Judge how completely and correctly the image shows what the prompt asks: subjects, actions, setting, style.
Rubric: 0 = unrelated to the prompt; 2-3 = a few elements; 5 = the main subject but much missing or wrong;
7-8 = nearly everything with small errors; 10 = everything the prompt asks.
Think briefly (at most three sentences), then end with a line "Score: N" where N is an integer from 0 to 10."""

NATURALNESS = """You are an expert judge of image quality.
Criterion: naturalness.
Judge how natural and coherent the image looks: plausible anatomy and geometry, consistent lighting and
perspective, no visible artefacts, and no "copy-and-paste" look (an object pasted in without blending).
Rubric: 0 = broken or unrecognisable; 2-3 = severe artefacts; 5 = clearly flawed but coherent; 7-8 = minor
flaws; 10 = indistinguishable from a real, well-made image.
Think briefly (at most three sentences), then end with a line "Score: N" where N is an integer from 0 to 10."""

_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?\s*$")


def parse_score(text: str) -> float:
    """The reply's final 'Score: N' (or a reply that is only a number) → N/10 in [0, 1]."""
    found = _SCORE.findall(text or "")
    value = float(found[-1]) if found else None
    if value is None:
        match = _NUMBER.match(text or "")
        value = float(match.group(1)) if match else None
    if value is None or not 0 <= value <= 10:
        raise BadResponseError(f"the judge's reply has no 'Score: N' with N in 0..10: {str(text)[:160]!r}")
    return value / 10.0


def requests_for(attribute: str, prompt: str, reference_png: bytes, generated_png: bytes) -> dict[str, list[dict]]:
    """The chat messages of the three criteria."""
    return {
        "attribute_fidelity": [user_message(ATTRIBUTE_FIDELITY.format(attribute=attribute),
                                            images=[reference_png, generated_png])],
        "text_fidelity": [user_message(TEXT_FIDELITY.format(prompt=prompt, attribute=attribute),
                                       images=[generated_png])],
        "naturalness": [user_message(NATURALNESS, images=[generated_png])],
    }


async def judge_one(client: ChatClient, criterion: str, messages: list[dict], reasks: int = 1) -> tuple[float, str]:
    """Ask one criterion; an answer without a readable score is asked again ``reasks`` times."""
    last_error = None
    for _ in range(reasks + 1):
        reply = await client.chat(messages)
        try:
            return parse_score(reply), reply
        except BadResponseError as exc:
            last_error = exc
    raise BadResponseError(f"{criterion}: {last_error}")
