"""An OpenAI-compatible chat-completions client (vLLM, SGLang, hosted APIs) for annotation: async (httpx),
at most ``concurrency`` requests in flight, a timeout per request, and retries with exponential backoff and
jitter on timeouts, dropped connections, 429 (waiting what Retry-After says) and 5xx.

What retrying cannot fix stops the run with one message and no further requests: a key the server refuses
(401/403), a model it does not serve (404), no server at the URL. ``check()`` asks ``GET /models`` once
before any work, so these show up at once; the same answers in the middle of a run stop it as well.
A server that refuses the structured-output ``response_format`` (HTTP 400 naming it) is asked without it
from then on (``structured_output: auto``); answers are parsed and validated either way."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from dataclasses import dataclass, field

import httpx

from .config import EndpointConfig
from .errors import AnnotateError, EndpointError
from .prompts import response_format

log = logging.getLogger(__name__)
TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
STRUCTURED_WORDS = ("response_format", "json_schema", "guided", "structured", "grammar", "xgrammar")


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float          # the successful request, sending to answer
    model: str = ""


class RequestFailed(AnnotateError):
    """One request gave up: its retries ran out (``transport``: a server-side condition, which counts towards
    stopping the run) or the server refused this request alone (400, 413, 422: the pair is rejected)."""

    def __init__(self, cause: str, detail: str, transport: bool):
        self.cause, self.detail, self.transport = cause, detail, transport
        super().__init__(f"{cause}: {detail}")


@dataclass
class ClientStats:
    requests: int = 0
    retries: dict = field(default_factory=dict)        # cause -> count
    waits: list = field(default_factory=list)          # (cause, seconds) of every backoff
    statuses: dict = field(default_factory=dict)       # HTTP status -> count
    structured_output: bool | None = None              # what the run ended up using

    def retry(self, cause: str, wait: float) -> None:
        self.retries[cause] = self.retries.get(cause, 0) + 1
        self.waits.append((cause, round(wait, 3)))


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


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
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
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    def __init__(self, config: EndpointConfig, api_key: str | None = None, seed: int = 0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, transport=transport,
            timeout=httpx.Timeout(config.timeout_s, connect=min(config.connect_timeout_s, config.timeout_s)),
            limits=httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency))
        self.semaphore = asyncio.Semaphore(config.concurrency + 1)
        self.structured = config.structured_output != "off"
        self.rng = random.Random(seed)
        self.stats = ClientStats(structured_output=self.structured)
        self.api_key_env = config.api_key_env

    async def aclose(self) -> None:
        await self.client.aclose()

    # ---- errors that stop the run ----------------------------------------------------------------------
    def _key_refused(self, response: httpx.Response) -> EndpointError:
        where = f"the environment variable {self.api_key_env}" if self.api_key_env else "endpoint.api_key_env"
        return EndpointError(f"{self.base_url} refused the API key (HTTP {response.status_code}: {error_message(response)}): "
                             f"put the right key in {where} (vLLM: the --api-key it was started with)")

    def _not_found(self, response: httpx.Response) -> EndpointError:
        message = error_message(response)
        if "model" in message.lower():
            return EndpointError(f"{self.base_url} does not serve the model {self.config.model!r} (HTTP 404: {message}): "
                                 "set endpoint.model to a served model name (GET /v1/models lists them; vLLM: the "
                                 "--served-model-name, or the model path it was started with)")
        return EndpointError(f"{self.base_url}/chat/completions does not exist (HTTP 404: {message}): endpoint.base_url "
                             "must be the API root, e.g. http://HOST:8000/v1 for vLLM and SGLang")

    def _unreachable(self, exc: Exception) -> EndpointError:
        return EndpointError(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc or 'no answer'}): start the "
                             "server, or fix endpoint.base_url (host, port, http/https)")

    async def check(self) -> list[str]:
        """One GET /models: stops with EndpointError when the server is unreachable, refuses the key or does not
        list the model. Returns the served model names (empty when the server has no /models route)."""
        try:
            response = await self.client.get("/models", timeout=min(30.0, self.config.timeout_s))
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
            raise self._unreachable(exc) from exc
        except httpx.TransportError as exc:
            raise EndpointError(f"{self.base_url} did not answer GET /models ({type(exc).__name__}: {exc}): check that it "
                                "is an OpenAI-compatible server and that it is healthy") from exc
        finally:
            self.stats.requests += 1
        self.stats.statuses[response.status_code] = self.stats.statuses.get(response.status_code, 0) + 1
        if response.status_code in (401, 403):
            raise self._key_refused(response)
        if response.status_code == 404 or response.status_code == 405:
            log.info("%s has no /models route; the model name is checked by the first request", self.base_url)
            return []
        if response.status_code != 200:
            raise EndpointError(f"{self.base_url}/models answered HTTP {response.status_code} ({error_message(response)}): "
                                "the server is not ready; try again when it is")
        try:
            served = [str(m.get("id")) for m in response.json().get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            served = []
        if served and self.config.model not in served:
            raise EndpointError(f"{self.base_url} does not serve the model {self.config.model!r}; it serves: "
                                f"{', '.join(served)}. Set endpoint.model to one of them")
        return served

    # ---- one completion --------------------------------------------------------------------------------
    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: a random wait in [d/2, d], d = base * 2^attempt (capped)."""
        delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** attempt)
        return delay / 2 + self.rng.random() * delay / 2

    def payload(self, messages: list[dict], style: str) -> dict:
        body = {"model": self.config.model, "messages": messages, "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens}
        if self.structured:
            body["response_format"] = response_format(style)
        return body

    async def complete(self, messages: list[dict], style: str) -> Completion:
        attempt = 0
        while True:
            cause, detail, wait = None, "", None
            body = self.payload(messages, style)
            async with self.semaphore:
                start = time.perf_counter()
                self.stats.requests += 1
                try:
                    response = await self.client.post("/chat/completions", json=body)
                except httpx.TimeoutException as exc:
                    cause, detail = "timeout", f"no answer within {self.config.timeout_s:g} s ({type(exc).__name__})"
                except httpx.ConnectError as exc:
                    cause, detail = "connection refused", str(exc) or type(exc).__name__
                except httpx.TransportError as exc:   # dropped connection, truncated body, protocol error
                    cause, detail = "connection dropped", f"{type(exc).__name__}: {exc}"
                else:
                    latency = time.perf_counter() - start
            if cause is None:
                status = response.status_code
                self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
                if status == 200:
                    try:
                        data = response.json()
                        choice = data["choices"][0]
                        text = choice["message"].get("content") or ""
                        usage = data.get("usage") or {}
                        return Completion(text, choice.get("finish_reason"), int(usage.get("prompt_tokens") or 0),
                                          int(usage.get("completion_tokens") or 0), latency, str(data.get("model", "")))
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                        cause, detail = "malformed response", f"{type(exc).__name__}: {str(exc)[:120]}"
                elif status in (401, 403):
                    raise self._key_refused(response)
                elif status == 404:
                    raise self._not_found(response)
                elif status == 400 and self.structured and self.config.structured_output == "on" and \
                        any(word in error_message(response).lower() for word in STRUCTURED_WORDS):
                    raise EndpointError(f"{self.base_url} refuses structured output ({error_message(response)[:200]}): "
                                        "set endpoint.structured_output to auto (answers are then parsed from text) "
                                        "or start the server with guided decoding enabled")
                elif status == 400 and self.structured and self.config.structured_output == "auto" and \
                        any(word in error_message(response).lower() for word in STRUCTURED_WORDS):
                    log.warning("%s refuses structured output (%s): answers are parsed from text from now on",
                                self.base_url, error_message(response)[:160])
                    self.structured = False
                    self.stats.structured_output = False
                    continue                                   # not a failed attempt
                elif status in TRANSIENT_STATUS:
                    cause, detail = f"HTTP {status}", error_message(response)[:200]
                    if status == 429:
                        after = retry_after_seconds(response.headers.get("retry-after"))
                        if after is not None:
                            wait = min(after, self.config.max_retry_after_s)
                else:   # 400, 413, 422 ...: this request is refused (too long, bad image); another try would be too
                    raise RequestFailed(f"HTTP {status}", error_message(response)[:300], transport=False)
            attempt += 1
            if attempt >= self.config.max_attempts:
                raise RequestFailed(cause, f"{detail} (gave up after {attempt} attempts)", transport=True)
            wait = self.backoff(attempt - 1) if wait is None else wait
            self.stats.retry(cause, wait)
            log.debug("retrying after %s (%s) in %.2f s", cause, detail, wait)
            await asyncio.sleep(wait)
