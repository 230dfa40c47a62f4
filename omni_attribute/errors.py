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


class EmbedsError(OmniAttributeError):
    """Attribute embeds are empty, malformed or hold NaN/infinite values."""


class EmbedsFileError(EmbedsError):
    """A saved attribute-embeds file is missing, corrupt or of an unknown format."""


class InputError(OmniAttributeError, ValueError):
    """A node input (a number, a name, a value typed into a socket, a MODEL of another kind) cannot be used."""


class GeneratorFolderError(OmniAttributeError, ValueError):
    """A generator folder (e.g. the tiny world's) is missing files or holds malformed ones."""


class CheckpointError(OmniAttributeError):
    """A training checkpoint could not be written or read."""
