"""The laboratory, outside the shipped plugin: the tiny attribute world (``lab.world``), the main job
(``python -m lab.demo``) and its ComfyUI node pack (``lab/comfy_nodes``)."""
