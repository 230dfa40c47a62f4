"""The annotation run's chat-completions client (vLLM, SGLang, hosted APIs): the shared OpenAI-compatible client
(``omni_attribute.openai_client``: at most ``concurrency`` requests in flight, a timeout per request, retries with
exponential backoff and jitter on timeouts, dropped connections, 429 (waiting what Retry-After says) and 5xx),
worded for ``endpoint.*`` and with what annotation adds.

What retrying cannot fix stops the run with one message and no further requests: a key the server refuses
(401/403), a model it does not serve (404), no server at the URL. ``check()`` asks ``GET /models`` once
before any work, so these show up at once; a refused key or an unknown model in the middle of a run stops it
as well (a refused connection there is retried: a server that restarts). A request the server refuses alone
(400, 413, 422) rejects its pair. A server that refuses the structured-output ``response_format`` (HTTP 400
naming it) is asked without it from then on (``structured_output: auto``); answers are parsed and validated
either way."""

from __future__ import annotations

import logging
import random

import httpx

from ..openai_client import ChatClient as _ChatClient
from ..openai_client import ChatSettings, ClientStats, Completion, error_message, read_completion, retry_after_seconds
from .config import EndpointConfig
from .errors import AnnotateError, EndpointError
from .prompts import response_format

__all__ = ["ChatClient", "ClientStats", "Completion", "RequestFailed", "endpoint_settings", "retry_after_seconds"]

log = logging.getLogger(__name__)
STRUCTURED_WORDS = ("response_format", "json_schema", "guided", "structured", "grammar", "xgrammar")


class RequestFailed(AnnotateError):
    """One request gave up: its retries ran out (``transport``: a server-side condition, which counts towards
    stopping the run) or the server refused this request alone (400, 413, 422: the pair is rejected)."""

    def __init__(self, cause: str, detail: str, transport: bool):
        self.cause, self.detail, self.transport = cause, detail, transport
        super().__init__(f"{cause}: {detail}")


def endpoint_settings(config: EndpointConfig, api_key: str | None = None) -> ChatSettings:
    """The shared client's settings for an annotation endpoint (the key is given, not read here)."""
    return ChatSettings(base_url=config.base_url, model=config.model, api_key=api_key, api_key_env=None,
                        concurrency=config.concurrency, max_retries=config.max_attempts - 1, timeout=config.timeout_s,
                        connect_timeout=config.connect_timeout_s, backoff_base=config.backoff_base_s,
                        backoff_max=config.backoff_max_s, max_retry_after=config.max_retry_after_s,
                        temperature=config.temperature, max_tokens=config.max_tokens)


class ChatClient(_ChatClient):
    """The shared client (``omni_attribute.openai_client``) for an annotation run: a refused connection is
    retried (a server that restarts), a refused request rejects its pair only, and every message names the
    ``endpoint.*`` key to fix."""

    retry_unreachable = True

    def __init__(self, config: EndpointConfig, api_key: str | None = None, seed: int = 0,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(endpoint_settings(config, api_key), transport=transport, rng=random.Random(seed))
        self.config = config
        self.structured = config.structured_output != "off"
        self.stats.structured_output = self.structured
        self.api_key_env = config.api_key_env

    # ---- errors that stop the run ----------------------------------------------------------------------
    def _key_refused(self, url: str, response: httpx.Response) -> EndpointError:
        where = f"the environment variable {self.api_key_env}" if self.api_key_env else "endpoint.api_key_env"
        return EndpointError(f"{self.base_url} refused the API key (HTTP {response.status_code}: {error_message(response)}): "
                             f"put the right key in {where} (vLLM: the --api-key it was started with)")

    def _not_found(self, url: str, response: httpx.Response) -> EndpointError:
        message = error_message(response)
        if "model" in message.lower():
            return EndpointError(f"{self.base_url} does not serve the model {self.config.model!r} (HTTP 404: {message}): "
                                 "set endpoint.model to a served model name (GET /v1/models lists them; vLLM: the "
                                 "--served-model-name, or the model path it was started with)")
        return EndpointError(f"{self.base_url}/chat/completions does not exist (HTTP 404: {message}): endpoint.base_url "
                             "must be the API root, e.g. http://HOST:8000/v1 for vLLM and SGLang")

    def _unreachable(self, url: str, exc: Exception) -> EndpointError:
        return EndpointError(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc or 'no answer'}): start the "
                             "server, or fix endpoint.base_url (host, port, http/https)")

    # ---- errors of one request ---------------------------------------------------------------------------
    def _refused(self, url: str, response: httpx.Response) -> RequestFailed:
        # 400, 413, 422 ...: this request is refused (too long, bad image); another try would be too
        return RequestFailed(f"HTTP {response.status_code}", error_message(response)[:300], transport=False)

    def _exhausted(self, url: str, cause: str, detail: str, attempts: int) -> RequestFailed:
        return RequestFailed(cause, f"{detail} (gave up after {attempts} attempts)", transport=True)

    def _adapt(self, response: httpx.Response) -> bool:
        """A server that refuses the structured-output response_format: asked without it (auto), or the run stops."""
        if response.status_code != 400 or not self.structured or \
                not any(word in error_message(response).lower() for word in STRUCTURED_WORDS):
            return False
        if self.config.structured_output == "on":
            raise EndpointError(f"{self.base_url} refuses structured output ({error_message(response)[:200]}): "
                                "set endpoint.structured_output to auto (answers are then parsed from text) "
                                "or start the server with guided decoding enabled")
        log.warning("%s refuses structured output (%s): answers are parsed from text from now on",
                    self.base_url, error_message(response)[:160])
        self.structured = False
        self.stats.structured_output = False
        return True

    async def check(self) -> list[str]:
        """One GET /models: stops with EndpointError when the server is unreachable, refuses the key or does not
        list the model. Returns the served model names (empty when the server has no /models route)."""
        try:
            response = await self._client.get("models", timeout=min(30.0, self.config.timeout_s))
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
            raise self._unreachable(self.base_url, exc) from exc
        except httpx.TransportError as exc:
            raise EndpointError(f"{self.base_url} did not answer GET /models ({type(exc).__name__}: {exc}): check that it "
                                "is an OpenAI-compatible server and that it is healthy") from exc
        finally:
            self.stats.requests += 1
        self.stats.answered(response.status_code)
        if response.status_code in (401, 403):
            raise self._key_refused(self.base_url, response)
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
    def annotation_payload(self, messages: list[dict], style: str) -> dict:
        body = self.payload(messages)
        if self.structured:
            body["response_format"] = response_format(style)
        return body

    async def complete(self, messages: list[dict], style: str) -> Completion:
        """One answer (asked again without the schema if the server refuses structured output)."""
        return await self.post("chat/completions", lambda: self.annotation_payload(messages, style), read_completion)
