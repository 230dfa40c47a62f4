"""Boundary checks for the plugin's node inputs, one place per kind of input.

ComfyUI 0.3.75 checks little of a V3 prompt at ``POST /prompt``: its min/max test on FLOAT inputs is a
comparison (JSON ``NaN`` passes it), COMBO values are not checked at all, and a custom socket
(``io.Custom``) accepts any literal typed into the prompt. Each node's ``validate_inputs`` therefore calls
the checks below, so a bad value is a 400 with ``node_errors`` before anything runs; ``execute`` calls the
same checks again for values that arrive over links (which are unknown at validation).

Note: an input named in ``validate_inputs``' signature skips ComfyUI's own min/max and COMBO checks, so
:class:`Number` carries the range and checks it itself (``Number.input()`` builds the widget from it).
A check returns ``None`` (fine) or a message naming the input, the value and the fix.
"""

from __future__ import annotations

import math
import os
import unicodedata
from dataclasses import dataclass
from typing import Iterable

import folder_paths
import torch
from comfy_api.latest import io

from omni_attribute.errors import InputError
from omni_attribute.validation import short


# ---- numbers ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Number:
    """A FLOAT widget and its check, from one definition."""
    name: str
    default: float
    min: float
    max: float
    step: float = 0.01
    tooltip: str | None = None

    def input(self, **extra) -> io.Float.Input:
        return io.Float.Input(self.name, default=self.default, min=self.min, max=self.max, step=self.step,
                              tooltip=self.tooltip, **extra)

    def problem(self, value) -> str | None:
        if value is None:  # linked from another node: checked when it runs
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{self.name} is {short(value)}, not a number: give a number from {self.min:g} to {self.max:g}"
        if not math.isfinite(value):
            return (f"{self.name} is {value} (not a finite number): give a number from {self.min:g} to {self.max:g}"
                    f" (default {self.default:g})")
        if not self.min <= value <= self.max:
            return f"{self.name} is {value:g}, outside {self.min:g} … {self.max:g}: give a number in that range"
        return None


def schedule_problem(start, end) -> str | None:
    """start_percent must not come after end_percent (checked only when both are plain numbers)."""
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and start > end:
        return f"start_percent {start:g} is after end_percent {end:g}: swap them"
    return None


# ---- fixed choices and file names ------------------------------------------------------------------

def _listing(options: list[str], limit: int = 8) -> str:
    if not options:
        return "none"
    shown = ", ".join(repr(o) for o in options[:limit])
    return shown + (f" and {len(options) - limit} more" if len(options) > limit else "")


def choice_problem(name: str, value, options: Iterable[str]) -> str | None:
    options = list(options)
    if value is None or value in options:
        return None
    return f"{name} is {short(value)}, which is not one of its options: pick one of {_listing(options)}"


def file_problem(name: str, value, key: str, what: str) -> str | None:
    """A COMBO of ComfyUI model/file names: the value must be listed and readable (not a dangling link)."""
    if value is None:
        return None
    folders = ", ".join(folder_paths.get_folder_paths(key)) if key in folder_paths.folder_names_and_paths else key
    options = folder_paths.get_filename_list(key)
    if not isinstance(value, str) or value not in options:
        return (f"{name} {short(value)} is not a file in {folders}: put the {what} there (then refresh), or "
                f"pick one of {_listing(options)}")
    if folder_paths.get_full_path(key, value) is None:
        return f"{name} {value!r} is listed in {folders} but cannot be read (a broken link?): fix or remove it"
    return None


def resolve_file(name: str, value: str, key: str, what: str, error: type[Exception] = InputError) -> str:
    """Full path of a listed file, or ``error`` with the same message as :func:`file_problem`."""
    problem = file_problem(name, value, key, what)
    if problem:
        raise error(problem)
    return folder_paths.get_full_path(key, value)


# ---- sockets ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Socket:
    """A socket type: what it carries and which nodes give it (for messages)."""
    type_name: str
    kinds: tuple[type, ...]
    made_by: str

    def literal_problem(self, name: str, value) -> str | None:
        """At validation a linked input is None; anything else was typed into the prompt."""
        if value is None:
            return None
        return (f"{name} got the value {short(value)} typed into the prompt, but it takes {self.type_name} over a "
                f"link: connect the output of {self.made_by}")

    def require(self, name: str, value):
        """At run time: the value must be of the socket's type."""
        if not isinstance(value, self.kinds):
            got = short(value) if isinstance(value, (str, int, float)) else type(value).__name__
            raise InputError(f"{name} received {got}, not {self.type_name}: connect the output of {self.made_by}")
        return value


def tensor_socket(type_name: str, made_by: str, ndims: tuple[int, ...]) -> "TensorSocket":
    return TensorSocket(type_name, (torch.Tensor,), made_by, ndims)


@dataclass(frozen=True)
class TensorSocket(Socket):
    ndims: tuple[int, ...] = ()

    def require(self, name: str, value):
        super().require(name, value)
        if value.ndim not in self.ndims or value.numel() == 0:
            raise InputError(f"{name} has shape {list(value.shape)}: {self.type_name} must be a non-empty tensor of "
                             f"{' or '.join(str(n) for n in self.ndims)} dimensions ({self.made_by})")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputError(f"{name} contains NaN or infinite values: check the node that produced it "
                             f"({self.made_by})")
        return value


MASK = tensor_socket("a MASK", "a mask node (e.g. SolidMask, LoadImageMask)", (2, 3))
IMAGE = Socket("an IMAGE", (torch.Tensor,), "an image node (e.g. LoadImage)")


def model_socket() -> Socket:
    import comfy.model_patcher

    return Socket("a MODEL", (comfy.model_patcher.ModelPatcher,), "a model loader (e.g. UNETLoader)")


def conditioning(name: str, value):
    """CONDITIONING: a list of [tensor, dict] pairs."""
    ok = isinstance(value, list) and value and all(
        isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[0], torch.Tensor) and isinstance(c[1], dict)
        for c in value)
    if not ok:
        raise InputError(f"{name} received {type(value).__name__}, not CONDITIONING: connect the output of a text "
                         "encode node (e.g. CLIPTextEncode)")
    return value


# ---- outcome ---------------------------------------------------------------------------------------

def verdict(*problems: str | None) -> bool | str:
    """What ``validate_inputs`` returns: True, or the problems joined (ComfyUI shows the text)."""
    found = [p for p in problems if p]
    return "; ".join(dict.fromkeys(found)) if found else True


def ensure(*problems: str | None) -> None:
    """The same checks at run time: raise :class:`InputError` with every problem."""
    found = [p for p in problems if p]
    if found:
        raise InputError("; ".join(dict.fromkeys(found)))


# ---- file name prefixes ----------------------------------------------------------------------------

MAX_NAME_BYTES = 200  # per path component: leaves room for "_00001_.safetensors" under the usual 255-byte limit


def prefix_problem(name: str, value) -> str | None:
    """A ``filename_prefix``: a relative path inside the output folder, printable, of sane length."""
    if value is None:
        return None
    if not isinstance(value, str):
        return f"{name} is {short(value)}, not text: give a file name such as 'omni_attribute' or 'faces/smile'"
    bad = [ch for ch in value if unicodedata.category(ch) in ("Cc", "Cs")]
    if bad:
        return (f"{name} contains the control character {short(bad[0])}: use printable characters only, e.g. "
                "'omni_attribute' or 'faces/smile'")
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or (len(value) > 1 and value[1] == ":") or ".." in parts:
        return (f"{name} {short(value)} leaves the output folder: give a relative name without '..', e.g. "
                "'faces/smile'")
    long = [p for p in parts if len(p.encode("utf-8")) > MAX_NAME_BYTES]
    if long or len(value) > 1000:
        return f"{name} is too long (a path part of at most {MAX_NAME_BYTES} bytes, 1000 characters in all): shorten it"
    return None


def clean_prefix(value: str, default: str) -> str:
    """The prefix with empty and '.' parts dropped; an empty file name part (an empty prefix, or one ending
    in '/') becomes ``default`` — so a save never ends up with an empty name."""
    raw = value.split("/")
    parts = [p for p in raw if p not in ("", ".")]
    if not parts or raw[-1] in ("", "."):
        parts.append(default)
    return "/".join(parts)


def inside(folder: str, root: str) -> bool:
    """``folder`` (resolved through links) lies in ``root`` (resolved)."""
    folder, root = os.path.realpath(folder), os.path.realpath(root)
    return os.path.commonpath([folder, root]) == root


# ---- the plugin's own sockets ------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbedsSocket(Socket):
    def require(self, name: str, value):
        super().require(name, value)
        value.__post_init__()  # rows, shapes, finite values (a foreign node may have changed the tensors)
        return value


@dataclass(frozen=True)
class StackSocket(Socket):
    def require(self, name: str, value):
        from omni_attribute.injection import AttributeCondition

        super().require(name, value)
        if not all(isinstance(c, AttributeCondition) for c in value):
            raise InputError(f"{name} holds something other than attribute conditions: connect the output of "
                             f"{self.made_by}")
        return value


def _embeds_socket() -> EmbedsSocket:
    from omni_attribute.embeds import AttributeEmbeds

    return EmbedsSocket("OMNI_ATTRIBUTE_EMBEDS", (AttributeEmbeds,),
                        "Omni-Attribute Encode or Load Omni-Attribute Embeds")


def _encoder_socket() -> Socket:
    from .model_management import EncoderHandle

    return Socket("OMNI_ATTRIBUTE_ENCODER", (EncoderHandle,), "Load Omni-Attribute Encoder")


EMBEDS = _embeds_socket()
ENCODER = _encoder_socket()
STACK = StackSocket("OMNI_ATTRIBUTE_STACK", (list, tuple), "Omni-Attribute Stack")
