"""ComfyUI entry point of the Omni-Attribute plugin (the one registration path: comfy_entrypoint).

Outside ComfyUI (pytest collecting this folder, training machines) there is no ``comfy_api`` and
the folder is just the home of the ``omni_attribute`` library: nothing is imported then.
"""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
