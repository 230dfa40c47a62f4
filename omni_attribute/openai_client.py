"""A small client for OpenAI-compatible chat endpoints (OpenAI, vLLM, LM Studio, llama.cpp server, ...), for the
judges and annotators that call vision-language models over HTTP.

    async with ChatClient(ChatSettings(base_url="http://127.0.0.1:8000/v1", model="Qwen2.5-VL-72B-Instruct",
                                       api_key_env="OPENAI_API_KEY", concurrency=8)) as client:
        text = await client.chat([user_message("Describe this.", images=[png_bytes])])

* **Bounded concurrency**: at most ``concurrency`` requests in flight (an ``asyncio.Semaphore``).
* **Retries** on 408/409/429/5xx, timeouts and dropped connections, with exponential backoff and jitter
  (``backoff_base`` · 2^attempt, at most ``backoff_max``); a ``Retry-After`` header (seconds or an HTTP date)
  is honoured, and a 429 pauses *every* request of the client until then, not only the one that got it.
* **No retry storms**: 400, 401/403, 404 (unknown model or wrong path) and an unreachable server are not
  retried; the first such error is remembered and every other request of the client fails at once with it.
* **Errors say what to do**: ``AuthenticationError`` (check the key and its environment variable),
  ``ModelNotFoundError`` (the model name or the base URL), ``EndpointUnreachableError`` (the server and the
  port), ``RetriesExhaustedError`` (the last status and body), ``BadResponseError`` (a reply without text).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

from .errors import OmniAttributeError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}


class ChatAPIError(OmniAttributeError):
    """An OpenAI-compatible endpoint did not give an answer."""


class AuthenticationError(ChatAPIError):
    pass


class ModelNotFoundError(ChatAPIError):
    pass


class EndpointUnreachableError(ChatAPIError):
    pass


class RetriesExhaustedError(ChatAPIError):
    pass


class BadRequestError(ChatAPIError):
    pass


class BadResponseError(ChatAPIError):
    pass


@dataclass
class ChatSettings:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o"
    api_key: str | None = None          # given directly, or
    api_key_env: str | None = "OPENAI_API_KEY"   # read from this environment variable (may be unset for local servers)
    concurrency: int = 4
    max_retries: int = 6
    timeout: float = 120.0              # seconds per request
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    temperature: float | None = 0.0
    max_tokens: int | None = 512
    headers: dict | None = None

    def key(self) -> str | None:
        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def sniff_mime(data: bytes) -> str:
    """The image type of encoded bytes (PNG, JPEG, WebP, GIF); PNG when unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/png"


def image_part(data: bytes, mime: str | None = None) -> dict:
    """An image (encoded bytes) as a chat content part: a base64 data URL of its type."""
    mime = mime or sniff_mime(data)
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def user_message(text: str, images: list[bytes] | None = None) -> dict:
    parts: list[dict] = [image_part(i) for i in images or []]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def _body(response: httpx.Response, limit: int = 300) -> str:
    try:
        data = response.json()
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        if message:
            return str(message)[:limit]
    except ValueError:
        pass
    return response.text[:limit]


class ChatClient:
    """Async client; use ``async with``. One instance shares its concurrency limit, pause and fatal error."""

    def __init__(self, settings: ChatSettings, transport: httpx.AsyncBaseTransport | None = None):
        if settings.concurrency < 1:
            raise ChatAPIError(f"concurrency must be at least 1, got {settings.concurrency}")
        self.settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._paused_until = 0.0
        self._fatal: ChatAPIError | None = None
        self.stats = {"requests": 0, "retries": 0, "rate_limited": 0}

    async def __aenter__(self) -> "ChatClient":
        headers = {"Content-Type": "application/json", **(self.settings.headers or {})}
        key = self.settings.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(base_url=self.settings.base_url.rstrip("/") + "/", headers=headers,
                                         timeout=httpx.Timeout(self.settings.timeout), transport=self._transport)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        hinted = retry_after_seconds(response.headers.get("retry-after")) if response is not None else None
        if hinted is not None:
            return min(hinted, self.settings.backoff_max)
        base = min(self.settings.backoff_max, self.settings.backoff_base * (2 ** attempt))
        return base * (0.5 + random.random() / 2)

    @property
    def fatal(self) -> ChatAPIError | None:
        """The error that stopped this client (401/403, 404, unreachable), if one did."""
        return self._fatal

    def _fail(self, error: ChatAPIError) -> ChatAPIError:
        self._fatal = self._fatal or error
        return error

    async def post(self, path: str, payload: dict) -> dict:
        """POST JSON to ``path`` (relative to the base URL) with the retry rules above; returns the JSON reply."""
        if self._client is None:
            raise ChatAPIError("use the client inside 'async with ChatClient(...)'")
        url = self.settings.base_url.rstrip("/") + "/" + path.lstrip("/")
        last = ""
        for attempt in range(self.settings.max_retries + 1):
            if self._fatal:
                raise self._fatal
            response = None
            async with self._semaphore:
                # a 429 pauses every request of the client, also those already waiting for a slot
                while (wait := self._paused_until - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if self._fatal:
                    raise self._fatal
                self.stats["requests"] += 1
                try:
                    response = await self._client.post(path.lstrip("/"), json=payload)
                except httpx.ConnectError as exc:
                    raise self._fail(EndpointUnreachableError(
                        f"cannot reach {url} ({exc}): is the server running, and are the host, port and base URL "
                        "right (OpenAI-compatible servers usually end in /v1)?")) from None
                except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError,
                        httpx.WriteError) as exc:
                    last = f"{type(exc).__name__} after {self.settings.timeout:.0f} s" \
                        if isinstance(exc, httpx.TimeoutException) else f"{type(exc).__name__}: {exc}"
            if response is not None:
                status = response.status_code
                if status < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise BadResponseError(f"{url} answered {status} with something that is not JSON: "
                                               f"{response.text[:200]!r}") from None
                if status in (401, 403):
                    raise self._fail(AuthenticationError(
                        f"{url} refused the request ({status}: {_body(response)}): check the API key"
                        + (f" in the environment variable {self.settings.api_key_env}" if self.settings.api_key_env
                           and not self.settings.api_key else "")))
                if status == 404:
                    raise self._fail(ModelNotFoundError(
                        f"{url} answered 404 ({_body(response)}): check the model name {self.settings.model!r} "
                        f"(GET {self.settings.base_url.rstrip('/')}/models lists them) and the base URL"))
                if status not in RETRY_STATUS:
                    raise self._fail(BadRequestError(f"{url} answered {status}: {_body(response)}"))
                last = f"HTTP {status}: {_body(response)}"
                if status == 429:
                    self.stats["rate_limited"] += 1
            if attempt == self.settings.max_retries:
                break
            delay = self._delay(attempt, response)
            if response is not None and response.status_code == 429:
                self._paused_until = max(self._paused_until, time.monotonic() + delay)
            self.stats["retries"] += 1
            await asyncio.sleep(delay)
        raise RetriesExhaustedError(f"{url}: no answer after {self.settings.max_retries + 1} attempts (last: {last}); "
                                    "the server is overloaded or failing: try later, or lower the concurrency")

    async def chat(self, messages: list[dict], **params: Any) -> str:
        """One chat completion; returns the reply's text."""
        payload: dict[str, Any] = {"model": self.settings.model, "messages": messages}
        if self.settings.temperature is not None:
            payload["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            payload["max_tokens"] = self.settings.max_tokens
        payload.update(params)
        data = await self.post("chat/completions", payload)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BadResponseError(f"the reply has no choices[0].message.content: {str(data)[:300]}") from None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise BadResponseError(f"the reply's content is not text: {str(content)[:200]}")
        return content
