"""The one client for OpenAI-compatible chat endpoints (OpenAI, vLLM, SGLang, LM Studio, llama.cpp server, ...):
the evaluation judge (``omni-attribute-eval``) uses it as it is, the annotator (``omni-attribute-annotate``) through
``annotate/client.py``, which adds its endpoint check, structured output and its own messages.

    async with ChatClient(ChatSettings(base_url="http://127.0.0.1:8000/v1", model="Qwen2.5-VL-72B-Instruct",
                                       api_key_env="OPENAI_API_KEY", concurrency=8)) as client:
        text = await client.chat([user_message("Describe this.", images=[png_bytes])])

* **Bounded concurrency**: at most ``concurrency`` requests in flight (an ``asyncio.Semaphore``, and as many
  pooled connections).
* **Retries** on 408/409/425/429/5xx, timeouts, dropped connections and replies that are not a chat completion
  (a body cut off), with exponential backoff and jitter (``backoff_base`` · 2^attempt, at most ``backoff_max``,
  a random wait in its upper half); a ``Retry-After`` header (seconds or an HTTP date) is honoured up to
  ``max_retry_after`` (default ``backoff_max``), and a 429 pauses *every* request of the client until then, not
  only the one that got it. Every backoff goes through ``ClientStats.retry`` (its cause and seconds).
* **No retry storms**: 401/403, 404 (unknown model or wrong path) and an unreachable server are not retried; the
  first such error is remembered and every other request of the client fails at once with it. Another refusal
  (400, 413, 422, ...) is not retried either; this client also stops on it, a subclass may refuse only the one
  request (``_refused``) or change the request and send it again (``_adapt``).
* **Errors say what to do**: ``AuthenticationError`` (check the key and its environment variable),
  ``ModelNotFoundError`` (the model name or the base URL), ``EndpointUnreachableError`` (the server and the
  port), ``RetriesExhaustedError`` (the last cause), ``BadRequestError`` (the status and the server's message),
  ``BadResponseError`` (a reply without text). A subclass words them for its own settings by overriding the
  ``_key_refused``, ``_not_found``, ``_unreachable``, ``_refused`` and ``_exhausted`` methods.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

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
    connect_timeout: float | None = None  # seconds to connect (at most ``timeout``); None: ``timeout``
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float | None = None  # a Retry-After is honoured up to this many seconds; None: ``backoff_max``
    temperature: float | None = 0.0
    max_tokens: int | None = 512
    headers: dict | None = None

    def key(self) -> str | None:
        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float          # the successful request, sending to answer
    model: str = ""


@dataclass
class ClientStats:
    requests: int = 0
    retries: dict = field(default_factory=dict)        # cause -> count
    waits: list = field(default_factory=list)          # (cause, seconds) of every backoff
    statuses: dict = field(default_factory=dict)       # HTTP status -> count
    structured_output: bool | None = None              # the annotator: what the run ended up using

    def retry(self, cause: str, wait: float) -> None:
        self.retries[cause] = self.retries.get(cause, 0) + 1
        self.waits.append((cause, round(wait, 3)))

    def answered(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def retried(self) -> int:
        return sum(self.retries.values())

    @property
    def rate_limited(self) -> int:
        return self.statuses.get(429, 0)


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
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def error_message(response: httpx.Response) -> str:
    """The server's error text (OpenAI's {"error": {"message"}} or vLLM's {"message"}), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:300]


def read_json(response: httpx.Response, latency: float) -> Any:
    try:
        return response.json()
    except ValueError:
        raise BadResponseError(f"answered {response.status_code} with something that is not JSON: "
                               f"{response.text[:200]!r}") from None


def read_completion(response: httpx.Response, latency: float) -> Completion:
    """A chat completion's first choice; content parts (some servers answer with them) are joined."""
    try:
        data = response.json()
        choice = data["choices"][0]
        content = choice["message"].get("content")
        usage = data.get("usage") or {}
        prompt_tokens, completion_tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BadResponseError(f"the reply is not a chat completion with choices[0].message ({type(exc).__name__}: "
                               f"{str(exc)[:120]})") from None
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, (str, type(None))):
        raise BadResponseError(f"the reply's content is not text: {str(content)[:200]}")
    return Completion(content or "", choice.get("finish_reason"), prompt_tokens, completion_tokens, latency,
                      str(data.get("model", "")))


class ChatClient:
    """Async client; use ``async with`` (or call ``aclose()``). One instance shares its concurrency limit, its
    pause after a 429 and its fatal error."""

    retry_unreachable = False   # a refused connection: stop (False) or retry it like a dropped one (True)

    def __init__(self, settings: ChatSettings, transport: httpx.AsyncBaseTransport | None = None,
                 rng: random.Random | None = None):
        if settings.concurrency < 1:
            raise ChatAPIError(f"concurrency must be at least 1, got {settings.concurrency}")
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        headers = {"Content-Type": "application/json", **(settings.headers or {})}
        key = settings.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connect = min(settings.connect_timeout, settings.timeout) if settings.connect_timeout else settings.timeout
        self._client = httpx.AsyncClient(
            base_url=self.base_url + "/", headers=headers, transport=transport,
            timeout=httpx.Timeout(settings.timeout, connect=connect),
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency))
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._rng = rng or random.Random()
        self._paused_until = 0.0
        self._fatal: Exception | None = None
        self.stats = ClientStats()

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def fatal(self) -> Exception | None:
        """The error that stopped this client (401/403, 404, unreachable, a refusal), if one did."""
        return self._fatal

    def _fail(self, error: Exception) -> Exception:
        self._fatal = self._fatal or error
        return error

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: a random wait in [d/2, d], d = base * 2^attempt (capped)."""
        delay = min(self.settings.backoff_max, self.settings.backoff_base * 2 ** attempt)
        return delay / 2 + self._rng.random() * delay / 2

    # ---- the errors, as this client words them (a subclass words them for its settings) --------------------
    def _key_refused(self, url: str, response: httpx.Response) -> Exception:
        settings = self.settings
        return AuthenticationError(
            f"{url} refused the request ({response.status_code}: {error_message(response)[:300]}): check the API key"
            + (f" in the environment variable {settings.api_key_env}" if settings.api_key_env and not settings.api_key
               else ""))

    def _not_found(self, url: str, response: httpx.Response) -> Exception:
        return ModelNotFoundError(f"{url} answered 404 ({error_message(response)[:300]}): check the model name "
                                  f"{self.settings.model!r} (GET {self.base_url}/models lists them) and the base URL")

    def _unreachable(self, url: str, exc: Exception) -> Exception:
        return EndpointUnreachableError(f"cannot reach {url} ({exc}): is the server running, and are the host, port "
                                        "and base URL right (OpenAI-compatible servers usually end in /v1)?")

    def _refused(self, url: str, response: httpx.Response) -> Exception:
        """A status that another try would not change (400, 413, 422, ...): here it stops the client."""
        return self._fail(BadRequestError(f"{url} answered {response.status_code}: {error_message(response)[:300]}"))

    def _exhausted(self, url: str, cause: str, detail: str, attempts: int) -> Exception:
        return RetriesExhaustedError(f"{url}: no answer after {attempts} attempts (last: {cause}: {detail}); the "
                                     "server is overloaded or failing: try later, or lower the concurrency")

    def _adapt(self, response: httpx.Response) -> bool:
        """Whether the request, refused with ``response``, was changed and is to be sent again (not an attempt)."""
        return False

    # ---- requests ------------------------------------------------------------------------------------------
    async def post(self, path: str, payload: dict | Callable[[], dict],
                   read: Callable[[httpx.Response, float], Any] = read_json) -> Any:
        """POST JSON to ``path`` (relative to the base URL) with the retry rules above; returns ``read(response,
        seconds)`` of the first 2xx answer. ``payload`` may be a function: called again for every try."""
        url = self.base_url + "/" + path.lstrip("/")
        attempt = 0
        while True:
            if self._fatal:
                raise self._fatal
            response, cause, detail, wait = None, "", "", None
            body = payload() if callable(payload) else payload
            async with self._semaphore:
                # a 429 pauses every request of the client, also those already waiting for a slot
                while (pause := self._paused_until - time.monotonic()) > 0:
                    await asyncio.sleep(pause)
                if self._fatal:
                    raise self._fatal
                self.stats.requests += 1
                started = time.perf_counter()
                try:
                    response = await self._client.post(path.lstrip("/"), json=body)
                except httpx.TimeoutException as exc:
                    cause, detail = "timeout", f"no answer within {self.settings.timeout:g} s ({type(exc).__name__})"
                except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
                    if not self.retry_unreachable or isinstance(exc, httpx.UnsupportedProtocol):
                        raise self._fail(self._unreachable(url, exc)) from None
                    cause, detail = "connection refused", str(exc) or type(exc).__name__
                except httpx.TransportError as exc:   # dropped connection, truncated body, protocol error
                    cause, detail = "connection dropped", f"{type(exc).__name__}: {exc}"
                latency = time.perf_counter() - started
            if response is not None:
                status = response.status_code
                self.stats.answered(status)
                if status < 300:
                    try:
                        return read(response, latency)
                    except BadResponseError as exc:
                        cause, detail = "malformed response", str(exc)
                elif status in (401, 403):
                    raise self._fail(self._key_refused(url, response))
                elif status == 404:
                    raise self._fail(self._not_found(url, response))
                elif status in RETRY_STATUS:
                    cause, detail = f"HTTP {status}", error_message(response)[:200]
                    hinted = retry_after_seconds(response.headers.get("retry-after"))
                    if hinted is not None:
                        cap = self.settings.max_retry_after
                        wait = min(hinted, self.settings.backoff_max if cap is None else cap)
                elif self._adapt(response):
                    continue
                else:
                    raise self._refused(url, response)
            attempt += 1
            if attempt > self.settings.max_retries:
                raise self._exhausted(url, cause, detail, attempt)
            wait = self.backoff(attempt - 1) if wait is None else wait
            if response is not None and response.status_code == 429:
                self._paused_until = max(self._paused_until, time.monotonic() + wait)
            self.stats.retry(cause, wait)
            await asyncio.sleep(wait)

    def payload(self, messages: list[dict], **params: Any) -> dict:
        body: dict[str, Any] = {"model": self.settings.model, "messages": messages}
        if self.settings.temperature is not None:
            body["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            body["max_tokens"] = self.settings.max_tokens
        body.update(params)
        return body

    async def completion(self, messages: list[dict], **params: Any) -> Completion:
        """One chat completion: its text, finish reason, token usage and latency."""
        return await self.post("chat/completions", self.payload(messages, **params), read_completion)

    async def chat(self, messages: list[dict], **params: Any) -> str:
        """One chat completion; returns the reply's text."""
        return (await self.completion(messages, **params)).text
