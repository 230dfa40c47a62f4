"""The in-process ComfyUI layer: ComfyUI 0.3.75 imported into the test process (CPU mode) and the plugin
loaded the way ComfyUI loads a custom node folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def comfy_in_process() -> None:
    from devtools.comfy_host import add_comfyui_to_path

    add_comfyui_to_path(cpu=True)


@pytest.fixture(scope="session")
def plugin_nodes(comfy_in_process):
    """The plugin's ``nodes`` package (``plugin_nodes.apply``, ``plugin_nodes.flow_blend``, …)."""
    from devtools.comfy_host import import_in_process

    return import_in_process("omni_attribute_plugin_under_test").nodes
