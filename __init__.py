"""ComfyUI entry point of the Omni-Attribute plugin (the one registration path: comfy_entrypoint).

The library is always the module named ``omni_attribute``, never a second copy under the plugin's
folder name: the installed package when ``pip install`` put it on the path, else this folder's copy
registered under that name (a plain ``git clone`` into ``custom_nodes``). The ``nodes`` package then
imports it absolutely, like every other user of the library.

Outside ComfyUI (pytest collecting this folder, training machines) there is no ``comfy_api`` and
nothing is imported.
"""

import importlib.util
import sys
from pathlib import Path

WEB_DIRECTORY = "./web"


def _use_library_copy_if_not_installed() -> None:
    if "omni_attribute" in sys.modules or importlib.util.find_spec("omni_attribute") is not None:
        return
    folder = Path(__file__).resolve().parent / "omni_attribute"
    spec = importlib.util.spec_from_file_location("omni_attribute", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["omni_attribute"] = module
    spec.loader.exec_module(module)


if importlib.util.find_spec("comfy_api") is not None:
    _use_library_copy_if_not_installed()
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
