"""The shipped workflows in ComfyUI's template browser: ``GET /workflow_templates`` lists this plugin's UI
workflows (example_workflows/) and none of the API-format files (api_workflows/, a folder ComfyUI does not
scan), and each template and its thumbnail are served where the frontend fetches them.

Frontend 1.32.9 (ComfyUI 0.3.75) titles a custom node's template by its file name and shows
``/api/workflow_templates/<module>/<name>.jpg`` as its picture; <module> is the plugin's folder in
custom_nodes. That the API files still run headlessly is checked by test_workflows.py."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from devtools.comfy_host import PLUGIN_LINK_NAME
from tests.host.test_workflows import API_WORKFLOWS, EXAMPLES, SHIPPED

pytestmark = pytest.mark.host
THUMBNAIL_SIZE = (640, 480)  # devtools/workflow_thumbnails.py


def fetch(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=60) as reply:
            return reply.status, reply.headers.get_content_type(), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read()


def template_url(server_url: str, file_name: str) -> str:
    return f"{server_url}/api/workflow_templates/{PLUGIN_LINK_NAME}/{urllib.parse.quote(file_name)}"


def test_the_template_browser_lists_exactly_the_ui_workflows(client):
    templates = client.get_json("/workflow_templates")
    assert sorted(templates[PLUGIN_LINK_NAME]) == sorted(SHIPPED.values())
    assert not [name for names in templates.values() for name in names if name.endswith(".api")]


@pytest.mark.parametrize("title", sorted(SHIPPED.values()))
def test_each_template_and_its_thumbnail_are_served(comfy_server, title):
    status, kind, body = fetch(template_url(comfy_server.url, f"{title}.json"))
    assert status == 200 and kind == "application/json", (status, kind)
    assert body == (EXAMPLES / f"{title}.json").read_bytes()
    assert {"nodes", "links"} <= set(json.loads(body)), "a template is a UI-format workflow"
    status, kind, body = fetch(template_url(comfy_server.url, f"{title}.jpg"))
    assert status == 200 and kind == "image/jpeg", (status, kind)
    assert body == (EXAMPLES / f"{title}.jpg").read_bytes()
    picture = Image.open(io.BytesIO(body))
    assert picture.format == "JPEG" and picture.size == THUMBNAIL_SIZE
    assert 5_000 < len(body) < 100_000, len(body)


def test_api_files_are_not_templates(comfy_server):
    for api in sorted(API_WORKFLOWS.glob("*.api.json")):
        status, _, _ = fetch(template_url(comfy_server.url, api.name))
        assert status == 404, api.name
