"""Workflow files: UI format (drag-and-drop) → API format, and checks against a server's /object_info."""

from __future__ import annotations

from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def _input_type(spec: list) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def _ordered_inputs(node_info: dict) -> list[tuple[str, list]]:
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {k: list(v) for k, v in inputs.items() if k != "hidden"}
    return [(name, inputs[group][name]) for group in ("required", "optional") for name in order.get(group, [])]


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to API format, as ComfyUI's frontend does for 'Export (API)'."""
    links = {link[0]: link for link in ui.get("links", [])}  # id → [id, from_node, from_slot, to_node, to_slot, type]
    prompt: dict[str, Any] = {}
    for node in ui["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node['id']}: type {kind!r} is not installed on this server")
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name, spec in _ordered_inputs(object_info[kind]):
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = _input_type(spec) in WIDGET_TYPES and not options.get("forceInput")
            value = values.pop(0) if is_widget and values else None
            if is_widget and (options.get("control_after_generate") or options.get("image_upload")) and values:
                values.pop(0)  # the frontend keeps one more value: 'fixed'/'randomize' or the upload button
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            elif is_widget and value is not None:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def check_against_object_info(prompt: dict, object_info: dict) -> list[str]:
    """Problems a server would reject: unknown nodes, unknown or missing inputs, links of the wrong type."""
    problems = []
    for node_id, node in prompt.items():
        kind = node.get("class_type")
        if kind not in object_info:
            problems.append(f"node {node_id}: unknown type {kind!r}")
            continue
        known = dict(_ordered_inputs(object_info[kind]))
        required = object_info[kind]["input"].get("required", {})
        for name in required:
            if name not in node["inputs"]:
                problems.append(f"node {node_id} ({kind}): missing input {name!r}")
        for name, value in node["inputs"].items():
            if name not in known:
                problems.append(f"node {node_id} ({kind}): no input named {name!r}")
            elif isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"node {node_id} ({kind}).{name}: links to missing node {value[0]}")
                    continue
                outputs = object_info.get(source["class_type"], {}).get("output", [])
                produced = outputs[value[1]] if value[1] < len(outputs) else None
                wanted = _input_type(known[name])
                if produced is None or (produced != wanted and wanted != "*" and not (wanted == "COMBO" and isinstance(produced, list))):
                    problems.append(f"node {node_id} ({kind}).{name}: wants {wanted}, gets {produced} from node {value[0]}")
    return problems


def api_to_ui(prompt: dict, object_info: dict, notes: list[tuple[str, list[int]]] = ()) -> dict:
    """Lay an API-format workflow out as a UI-format (drag-and-drop) file; ``notes`` adds Note nodes
    (text, [x, y]). Node ids stay the same; nodes are placed in columns by their depth in the graph."""
    ids = sorted(prompt, key=int)
    depth: dict[str, int] = {}

    def depth_of(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[node_id] = 1 + max((depth_of(s) for s in sources), default=-1)
        return depth[node_id]

    rows: dict[int, int] = {}
    nodes, links = [], []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for order, node_id in enumerate(ids):
        node = prompt[node_id]
        info = object_info[node["class_type"]]
        column = depth_of(node_id)
        row = rows.get(column, 0)
        rows[column] = row + 1
        inputs, widgets = [], []
        for name, spec in _ordered_inputs(info):
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = _input_type(spec) in WIDGET_TYPES and not options.get("forceInput")
            value = node["inputs"].get(name)
            is_link = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if is_link:
                link_id = len(links) + 1
                src_type = object_info[prompt[value[0]]["class_type"]]["output"][value[1]]
                links.append([link_id, int(value[0]), value[1], int(node_id), len(inputs), src_type])
                outputs_links.setdefault((value[0], value[1]), []).append(link_id)
                entry = {"name": name, "type": _input_type(spec), "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            if is_widget:
                widgets.append(options.get("default") if is_link or value is None else value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [40 + 380 * column, 40 + 220 * row],
                      "size": [340, 140], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets, "title": node.get("_meta", {}).get("title", node["class_type"])})
    for entry in nodes:
        info = object_info[entry["type"]]
        names = info.get("output_name") or info["output"]
        entry["outputs"] = [{"name": names[i], "type": kind, "links": outputs_links.get((str(entry["id"]), i)) or None,
                             "slot_index": i} for i, kind in enumerate(info["output"])]
    next_id = max(int(i) for i in ids) + 1
    for offset, (text, pos) in enumerate(notes):
        nodes.append({"id": next_id + offset, "type": "Note", "pos": list(pos), "size": [420, 220], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [text]})
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}
