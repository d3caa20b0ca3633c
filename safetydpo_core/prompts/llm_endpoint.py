"""A client for any OpenAI-compatible chat endpoint (``POST <base>/chat/completions``): Ollama, llama.cpp
server, vLLM, LM Studio, hosted APIs. Standard library only (urllib).

* The API key is read from an environment variable whose *name* the user gives (default ``OPENAI_API_KEY``);
  the key is sent as a bearer token and never logged, printed, put in an error message or written anywhere
  (server answers quoted in errors are scrubbed of it). No key: no Authorization header (local servers).
* What may be sent where is :mod:`.endpoint_policy`'s decision: only variables named like LLM keys
  (``*_API_KEY``, or allowed in the user config file), and only to loopback endpoints unless the user
  allowed the origin outside the graph (user config file, or the CLI's ``--allow-remote-endpoint``).
* ``/chat/completions`` is joined to the URL's path; a query string (``?api-version=...``) is kept in the
  request but never shown: logs, errors and written configs use :func:`display_url` (no query, no
  credentials). Credentials in the URL itself (``user:pass@``) are refused: use the key variable.
* Redirects to another origin (scheme, host or port) are not followed (the request carries the key); a
  response larger than :data:`MAX_RESPONSE_BYTES` is refused.
* Connection errors, time-outs, HTTP 408/409/429 and 5xx are retried with exponential back-off; then an
  :class:`EndpointError` says what happened and what to check. 401/403/404 and other 4xx fail at once.
* No network is used unless an endpoint is configured: this module opens connections only to the URL given.

Public API: :class:`ChatEndpoint` (``chat(conversations, max_new_tokens=, temperature=, seed=)``),
:class:`EndpointError`, :func:`chat_url`, :func:`display_url`, :func:`is_url`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any, Callable, Iterable
from urllib.parse import urljoin, urlsplit, urlunsplit

from ..errors import ConfigError, ModelError
from .endpoint_policy import EndpointPolicy, is_loopback

log = logging.getLogger(__name__)

Message = dict[str, str]
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # a chat answer is a few KiB; anything near this is not one
ROUTE = "/chat/completions"


def is_url(value: str) -> bool:
    return bool(re.match(r"^https?://", value or "", re.IGNORECASE))


def display_url(url: str) -> str:
    """``url`` as it may be logged or written: no credentials, and the query string replaced by ``?...``."""
    try:
        u = urlsplit(url)
        host = u.hostname or ""
        port = u.port
    except ValueError:
        return "(an unreadable URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((u.scheme, netloc, u.path, "..." if u.query else "", ""))


def chat_url(base_url: str) -> str:
    """The chat-completions URL for a base URL: the route joined to the path, the query string kept."""
    u = urlsplit(base_url)
    path = u.path.rstrip("/")
    if not path.endswith(ROUTE):
        path += ROUTE
    return urlunsplit((u.scheme, u.netloc, path, u.query, ""))


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urlsplit(url)
    port = u.port or {"http": 80, "https": 443}.get(u.scheme.lower())
    return u.scheme.lower(), (u.hostname or "").lower(), port


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
                 concurrency: int = 4, sleep: Callable[[float], None] = time.sleep, allow_remote: bool = False,
                 policy: EndpointPolicy | None = None, extra_configs: Iterable[str | os.PathLike] = ()):
        try:
            u = urlsplit(base_url)
            host, port = u.hostname, u.port
        except ValueError:
            raise ConfigError("The LLM endpoint URL cannot be read; give e.g. http://127.0.0.1:11434/v1.") from None
        if u.scheme not in ("http", "https") or not host:
            raise ConfigError(f"The LLM endpoint {display_url(base_url)!r} is not an http(s) URL, e.g. "
                              f"http://127.0.0.1:11434/v1.")
        if u.username is not None or u.password is not None:
            raise ConfigError(f"The LLM endpoint URL {display_url(base_url)} carries credentials (user:password@); "
                              f"they would be written into logs and configs. Put the key in an environment variable "
                              f"named like MY_LLM_API_KEY and pass its name as the API-key variable instead.")
        if not model:
            raise ConfigError("An LLM endpoint needs a model name (--llm-model), e.g. the name the server lists.")
        from ..utils.numbers import check_number

        timeout = check_number(timeout, "The LLM endpoint time-out", 0, lo_open=True)
        retries = check_number(retries, "The LLM endpoint retries", 0, integer=True)
        backoff = check_number(backoff, "The LLM endpoint back-off", 0)
        concurrency = check_number(concurrency, "The LLM endpoint concurrency", 1, integer=True)
        policy = policy or EndpointPolicy.load(extra_configs, allow_remote=allow_remote)
        self.url = chat_url(base_url)
        self.display_url = display_url(self.url)
        policy.check_url(u.scheme, host, port, self.display_url)
        self.api_key_env = policy.check_key_env(api_key_env)
        self.model = model
        self.name = model
        self.__key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if self.api_key_env and not self.__key:
            log.debug("No API key in $%s; sending requests without one.", self.api_key_env)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = int(concurrency)
        self._sleep = sleep
        self.requests_sent = 0
        # a loopback server is reached directly, never through an http(s)_proxy set in the environment
        proxies = urllib.request.ProxyHandler({}) if is_loopback(host) else urllib.request.ProxyHandler()
        self._opener = urllib.request.build_opener(proxies, _SameOriginRedirects(self.url))

    def __repr__(self) -> str:  # never shows the key or the query string
        return f"ChatEndpoint(url={self.display_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

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
                log.warning("LLM endpoint %s: %s; retry %d/%d in %.1f s", self.display_url, last, attempt, self.retries, wait)
                self._sleep(wait)
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            self.requests_sent += 1
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    body = resp.read(MAX_RESPONSE_BYTES + 1)
                if len(body) > MAX_RESPONSE_BYTES:
                    raise EndpointError(f"The LLM endpoint {self.display_url} answered with more than "
                                        f"{MAX_RESPONSE_BYTES} bytes, larger than any chat completion; the answer is "
                                        f"refused. Check the URL.")
            except urllib.error.HTTPError as e:
                try:
                    detail = self._scrub(e.read(4096).decode("utf-8", "replace"))[:300]
                except Exception:  # noqa: BLE001 - the body is only for the message
                    detail = ""
                if e.code in RETRY_STATUS:
                    last = f"HTTP {e.code}"
                    continue
                if e.code in (401, 403):
                    raise EndpointError(f"The LLM endpoint {self.display_url} refused the request (HTTP {e.code}). Check the "
                                        f"API key in the environment variable {self.api_key_env or '(none set)'}. "
                                        f"Server said: {detail}") from None
                if e.code == 404:
                    raise EndpointError(f"The LLM endpoint {self.display_url} answered 404: no chat-completions route there, "
                                        f"or no model {self.model!r}. Check --llm (the base URL, usually ending in /v1) "
                                        f"and --llm-model. Server said: {detail}") from None
                raise EndpointError(f"The LLM endpoint {self.display_url} rejected the request (HTTP {e.code}): {detail}") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                last = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else self._scrub(str(reason))
                continue
            try:
                return json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise EndpointError(f"The LLM endpoint {self.display_url} answered something that is not JSON: "
                                    f"{self._scrub(body[:200].decode('utf-8', 'replace'))!r}") from None
        raise EndpointError(f"The LLM endpoint {self.display_url} did not answer after {self.retries + 1} tries (last: {last}). "
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
            raise EndpointError(f"The LLM endpoint {self.display_url} answered JSON that is not a chat completion "
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


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the endpoint's origin: the request carries the API key, and another
    origin (another host, port or scheme) must never receive it, nor be reached on the graph's behalf."""

    def __init__(self, url: str):
        self.origin = _origin(url)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urljoin(req.full_url, newurl)
        if _origin(target) != self.origin:
            raise EndpointError(f"The LLM endpoint {display_url(req.full_url)} answered with a redirect (HTTP {code}) "
                                f"to another origin, {display_url(target)}; it is not followed, because the request "
                                f"carries the API key. If that is the real endpoint, give its URL directly (and allow "
                                f"it if it is not on this machine).")
        return super().redirect_request(req, fp, code, msg, headers, newurl)
