"""A client for any OpenAI-compatible chat endpoint (``POST <base>/chat/completions``): Ollama, llama.cpp
server, vLLM, LM Studio, hosted APIs. Standard library only (urllib).

* The API key is read from an environment variable whose *name* the user gives (default ``OPENAI_API_KEY``);
  the key is sent as a bearer token and never logged, printed, put in an error message or written anywhere
  (server answers quoted in errors are scrubbed of it). No key: no Authorization header (local servers).
* Connection errors, time-outs, HTTP 408/409/429 and 5xx are retried with exponential back-off; then an
  :class:`EndpointError` says what happened and what to check. 401/403/404 and other 4xx fail at once.
* No network is used unless an endpoint is configured: this module opens connections only to the URL given.

Public API: :class:`ChatEndpoint` (``chat(conversations, max_new_tokens=, temperature=, seed=)``),
:class:`EndpointError`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any, Callable
from urllib.parse import urlparse

from ..errors import ConfigError, ModelError

log = logging.getLogger(__name__)

Message = dict[str, str]
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(ModelError):
    """The chat endpoint is down, too slow, refused the request or answered something unreadable."""


class ChatEndpoint:
    """An OpenAI-compatible chat completions endpoint.

    ``base_url``: e.g. ``http://127.0.0.1:11434/v1`` (``/chat/completions`` is appended unless the URL ends
    with it). ``retries``: extra tries after the first; the wait doubles from ``backoff`` seconds up to
    ``max_backoff``. ``concurrency``: parallel requests within one batch.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 concurrency: int = 4, sleep: Callable[[float], None] = time.sleep):
        u = urlparse(base_url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ConfigError(f"The LLM endpoint {base_url!r} is not an http(s) URL, e.g. http://127.0.0.1:11434/v1.")
        if not model:
            raise ConfigError("An LLM endpoint needs a model name (--llm-model), e.g. the name the server lists.")
        if timeout <= 0 or retries < 0 or backoff < 0 or concurrency < 1:
            raise ConfigError("LLM endpoint settings out of range: timeout > 0, retries >= 0, backoff >= 0, "
                              "concurrency >= 1.")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.name = model
        self.api_key_env = api_key_env
        self.__key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.__key:
            log.debug("No API key in $%s; sending requests without one.", api_key_env)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = int(concurrency)
        self._sleep = sleep
        self.requests_sent = 0
        host = (u.hostname or "").lower()
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        # a loopback server is reached directly, never through an http(s)_proxy set in the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}) if loopback else
                                                   urllib.request.ProxyHandler())

    def __repr__(self) -> str:  # never shows the key
        return f"ChatEndpoint(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _scrub(self, text: str) -> str:
        if self.__key and self.__key in text:
            text = text.replace(self.__key, "***")
        return text

    def _request(self, payload: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = "Bearer " + self.__key
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                log.warning("LLM endpoint %s: %s; retry %d/%d in %.1f s", self.url, last, attempt, self.retries, wait)
                self._sleep(wait)
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            self.requests_sent += 1
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:
                try:
                    detail = self._scrub(e.read().decode("utf-8", "replace"))[:300]
                except Exception:  # noqa: BLE001 - the body is only for the message
                    detail = ""
                if e.code in RETRY_STATUS:
                    last = f"HTTP {e.code}"
                    continue
                if e.code in (401, 403):
                    raise EndpointError(f"The LLM endpoint {self.url} refused the request (HTTP {e.code}). Check the "
                                        f"API key in the environment variable {self.api_key_env or '(none set)'}. "
                                        f"Server said: {detail}") from None
                if e.code == 404:
                    raise EndpointError(f"The LLM endpoint {self.url} answered 404: no chat-completions route there, "
                                        f"or no model {self.model!r}. Check --llm (the base URL, usually ending in /v1) "
                                        f"and --llm-model. Server said: {detail}") from None
                raise EndpointError(f"The LLM endpoint {self.url} rejected the request (HTTP {e.code}): {detail}") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                last = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else self._scrub(str(reason))
                continue
            try:
                return json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise EndpointError(f"The LLM endpoint {self.url} answered something that is not JSON: "
                                    f"{self._scrub(body[:200].decode('utf-8', 'replace'))!r}") from None
        raise EndpointError(f"The LLM endpoint {self.url} did not answer after {self.retries + 1} tries (last: {last}). "
                            f"Check that the server is running and reachable, or raise --llm-timeout "
                            f"({self.timeout:g} s) or --llm-retries ({self.retries}).")

    def complete(self, messages: list[Message], *, max_new_tokens: int = 128, temperature: float = 0.8,
                 seed: int | None = None) -> str:
        """One chat completion: the assistant's text."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": int(max_new_tokens),
                                   "temperature": float(temperature), "stream": False}
        if seed is not None:
            payload["seed"] = int(seed)
        answer = self._request(payload)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"The LLM endpoint {self.url} answered JSON that is not a chat completion "
                                f"(no choices[0].message.content): {self._scrub(json.dumps(answer)[:200])}") from None
        return content if isinstance(content, str) else ""

    def chat(self, conversations: list[list[Message]], *, max_new_tokens: int = 128, temperature: float = 0.8,
             seed: int = 0) -> list[str]:
        """Answer each conversation; requests run ``concurrency`` at a time, answers keep the input order."""
        if len(conversations) <= 1 or self.concurrency == 1:
            return [self.complete(c, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
                    for i, c in enumerate(conversations)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as ex:
            futs = [ex.submit(self.complete, c, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
                    for i, c in enumerate(conversations)]
            return [f.result() for f in futs]
