"""Omni-Attribute: open-vocabulary attribute encoder for visual concept personalization.

The library is importable without ComfyUI; ComfyUI glue lives in the plugin's ``nodes/``.
"""

__version__ = "0.2.0"
