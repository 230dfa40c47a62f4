"""Errors a user can trigger. Every message says what is wrong and what to do about it."""


class OmniAttributeError(Exception):
    """Base class: an error caused by input, files or configuration, not by a bug."""


class AdapterFileError(OmniAttributeError):
    """The adapter file is missing, unreadable, corrupt or of an unknown format."""


class AdapterMismatchError(OmniAttributeError):
    """The adapter file does not fit the backbone or generator it is used with."""


class BackboneError(OmniAttributeError):
    """The MLLM backbone folder is missing, incomplete or of an unsupported family."""


class AttributeTextError(OmniAttributeError):
    """The attribute text cannot be turned into an instruction."""


class ImageInputError(OmniAttributeError):
    """An input image has a shape, mode or value range we cannot use."""


class EmbedsFileError(OmniAttributeError):
    """A saved attribute-embeds file is missing, corrupt or of an unknown format."""
