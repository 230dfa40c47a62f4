"""Client for ComfyUI's HTTP API and websocket: queue API-format prompts, follow them, fetch outputs.

Used for headless runs (console script ``omni-attribute-run``), by the tests and the laboratory. Errors
from the server are turned into exceptions whose message names the node and what ComfyUI said.

    omni-attribute-run run WORKFLOW.api.json --server http://127.0.0.1:8188 \
        --set 4.image=photos/dog.png --set "Prompt.text=a dog in the snow" --out results/

``--set NODE.INPUT=VALUE`` names a node by id or by its title; VALUE is parsed as JSON when it
can be (numbers, true/false), else taken as text. A LoadImage input that names a local file is
uploaded first. Progress is printed as it streams in; outputs (images, saved embeds) are
downloaded into --out. Exit status: 0 done, 1 the server failed or rejected the prompt, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

import websocket  # websocket-client


class ComfyError(RuntimeError):
    """The server rejected or failed a prompt."""


class PromptRejected(ComfyError):
    def __init__(self, reply: dict):
        self.reply = reply
        super().__init__(format_rejection(reply))


class ExecutionFailed(ComfyError):
    def __init__(self, data: dict):
        self.data = data
        # a custom node's module name is its folder path: keep only the class name
        kind = str(data.get("exception_type", "error")).rsplit(".", 1)[-1]
        super().__init__(
            f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
            f"{kind}: {data.get('exception_message', '').strip()}"
        )


def format_rejection(reply: dict) -> str:
    """One line per distinct problem. A node's own input check (``validate_inputs``) is reported by ComfyUI once
    per input it looks at ("weight - <text>", "start_percent - <text>", ...): its text is shown once."""
    error = reply.get("error") or {}
    lines = [f"prompt rejected: {error.get('message', '')} {error.get('details', '')}".rstrip()]
    for node_id, entry in (reply.get("node_errors") or {}).items():
        seen = []
        for item in entry.get("errors", []):
            details = str(item.get("details", ""))
            name = (item.get("extra_info") or {}).get("input_name")
            if item.get("type") == "custom_validation_failed" and name and details.startswith(f"{name} - "):
                text = details[len(name) + 3:]
            else:
                text = f"{item.get('message')}: {details}"
            if text not in seen:
                seen.append(text)
        lines += [f"  node {node_id} ({entry.get('class_type')}): {text}" for text in seen]
    return "\n".join(lines)


class ComfyClient:
    def __init__(self, server: str = "http://127.0.0.1:8188", timeout: float = 600.0):
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # ---- plain HTTP ---------------------------------------------------------------------
    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.server + path, data=data, headers=headers or {})
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.read()

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def post_json(self, path: str, payload: dict):
        return json.loads(self._request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"}))

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._request(f"/view?{query}")

    def upload_image(self, path: str | Path, subfolder: str = "", overwrite: bool = True) -> str:
        """Upload to the server's input folder; returns the name to put in a LoadImage node."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        fields = {"overwrite": "true" if overwrite else "false", "subfolder": subfolder, "type": "input"}
        body = b""
        for key, value in fields.items():
            body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n".encode()
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                 f"Content-Type: {content_type}\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        reply = json.loads(self._request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]

    # ---- prompts ------------------------------------------------------------------------
    def queue(self, prompt: dict) -> str:
        try:
            reply = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                raise PromptRejected(json.loads(body)) from None
            except json.JSONDecodeError:
                raise ComfyError(f"POST /prompt answered {exc.code}: {body[:500]!r}") from None
        return reply["prompt_id"]

    def run(self, prompt: dict, on_event: Callable[[str, dict], None] | None = None) -> dict:
        """Queue a prompt, follow it on the websocket until it ends, return its history entry."""
        ws = websocket.create_connection(
            self.server.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}", timeout=self.timeout)
        try:
            prompt_id = self.queue(prompt)
            self._follow(ws, prompt_id, on_event)
        finally:
            ws.close()
        return self._wait_for_history(prompt_id)

    def _wait_for_history(self, prompt_id: str, seconds: float = 30.0) -> dict:
        """The server announces success just before it files the prompt's history: poll briefly."""
        deadline = time.monotonic() + seconds
        while True:
            entry = self.history(prompt_id)
            if entry.get("status", {}).get("completed") or time.monotonic() > deadline:
                return entry
            time.sleep(0.05)

    def _follow(self, ws, prompt_id: str, on_event) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            frame = ws.recv()
            if not isinstance(frame, str):
                continue  # binary preview images
            message = json.loads(frame)
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if on_event:
                on_event(kind, data)
            if kind == "execution_error":
                raise ExecutionFailed(data)
            if kind == "execution_interrupted":
                raise ComfyError(f"prompt {prompt_id} was interrupted at node {data.get('node_id')}")
            if kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                               and data.get("prompt_id") == prompt_id):
                return
        raise TimeoutError(f"prompt {prompt_id} did not finish within {self.timeout:.0f}s")


def node_outputs(history_entry: dict, key: str) -> list[dict]:
    """All items under ``key`` (e.g. 'images') in the outputs of a finished prompt."""
    return [item for out in history_entry.get("outputs", {}).values() for item in out.get(key, [])]


def load_workflow(path: str | Path) -> dict:
    """Read an API-format workflow; refuse UI-format files with a hint."""
    data = json.loads(Path(path).read_text())
    if "nodes" in data and "links" in data:
        raise ValueError(f"{path} is a UI-format workflow (drag-and-drop); headless runs need the API format "
                         "(*.api.json, or 'Export (API)' in ComfyUI)")
    return data


def set_inputs(prompt: dict, assignments: dict[str, object]) -> dict:
    """Apply ``{"NODE.INPUT": value}`` overrides (NODE is the node id or its _meta title)."""
    for target, value in assignments.items():
        node_ref, _, name = target.partition(".")
        matches = [nid for nid, node in prompt.items()
                   if nid == node_ref or node.get("_meta", {}).get("title") == node_ref]
        if len(matches) != 1 or not name:
            raise KeyError(f"--set {target}: expected NODE.INPUT where NODE is one node id or title "
                           f"(ids: {', '.join(prompt)})")
        inputs = prompt[matches[0]].setdefault("inputs", {})
        if name not in inputs:
            raise KeyError(f"--set {target}: node {matches[0]} ({prompt[matches[0]].get('class_type')}) has no input "
                           f"{name!r}; it has {', '.join(inputs)}")
        inputs[name] = value
    return prompt


OUTPUT_KINDS = ("images", "gifs", "omni_attribute_embeds")


def parse_assignment(text: str) -> tuple[str, object]:
    target, sep, raw = text.partition("=")
    if not sep or "." not in target:
        raise ValueError(f"--set {text!r}: write NODE.INPUT=VALUE, e.g. 4.image=photo.png or Prompt.text='a cat'")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return target, value


def upload_local_images(client: ComfyClient, prompt: dict) -> None:
    """LoadImage inputs that name an existing local file are uploaded and replaced by the server's name."""
    for node in prompt.values():
        if node.get("class_type") == "LoadImage":
            value = node.get("inputs", {}).get("image")
            if isinstance(value, str) and Path(value).is_file():
                node["inputs"]["image"] = client.upload_image(value)


def download_outputs(client: ComfyClient, history: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for kind in OUTPUT_KINDS:
        for item in node_outputs(history, kind):
            target = out_dir / Path(item["filename"]).name
            target.write_bytes(client.view(item["filename"], item.get("subfolder", ""), item.get("type", "output")))
            saved.append(target)
    return saved


def progress_printer(prompt: dict, stream=sys.stdout) -> Callable[[str, dict], None]:
    def report(kind: str, data: dict) -> None:
        if kind == "executing" and data.get("node"):
            node = prompt.get(data["node"], {})
            title = node.get("_meta", {}).get("title") or node.get("class_type", "")
            print(f"[run] node {data['node']} ({title})", file=stream, flush=True)
        elif kind == "progress":
            print(f"[run]   {data.get('value')}/{data.get('max')}", file=stream, flush=True)
        elif kind == "execution_cached" and data.get("nodes"):
            print(f"[run] cached: {', '.join(map(str, data['nodes']))}", file=stream, flush=True)
    return report


def run_workflow(client: ComfyClient, prompt: dict, out_dir: Path,
                 on_event: Callable[[str, dict], None] | None = None) -> list[Path]:
    """Upload local images, run the prompt to the end, download its outputs; returns the saved files."""
    upload_local_images(client, prompt)
    history = client.run(prompt, on_event=on_event)
    return download_outputs(client, history, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni-attribute-run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an API-format workflow on a ComfyUI server")
    run.add_argument("workflow", type=Path, help="API-format workflow (*.api.json)")
    run.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    run.add_argument("--set", dest="assignments", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input; repeatable")
    run.add_argument("--out", type=Path, default=Path("outputs"), help="where outputs are saved (default %(default)s)")
    run.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the prompt (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        prompt = set_inputs(load_workflow(args.workflow), dict(parse_assignment(a) for a in args.assignments))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = ComfyClient(args.server, timeout=args.timeout)
    try:
        saved = run_workflow(client, prompt, args.out, on_event=progress_printer(prompt))
    except ComfyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError, OSError) as exc:
        print(f"error: cannot reach ComfyUI at {args.server}: {exc}. Is the server running?", file=sys.stderr)
        return 1
    for path in saved:
        print(f"[run] saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
