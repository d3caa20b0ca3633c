"""What an LLM endpoint may be sent, and where: the rules a shared workflow or config file cannot change.

A workflow (or a ``--config`` file) someone else wrote names the endpoint URL and the environment variable
that holds the API key. Without rules it could send any secret of the machine (a cloud key, a token) to
its own server, or make the ComfyUI server request internal addresses. So:

* the key variable must look like an LLM key: a name ending in ``_API_KEY`` (``OPENAI_API_KEY``,
  ``GROQ_API_KEY``, ...), or one the user allowed in the user config file (``allowed_api_key_envs``);
* the endpoint must be on this machine (a loopback address: ``localhost``, ``127.x.x.x``, ``::1``), or its
  origin must be allowed in the user config file (``allowed_endpoints``), or the command-line user passed
  ``--allow-remote-endpoint`` (the CLI's own flag, never read from a config file; the nodes have none).

The user config file lives outside any graph: ``$SAFETYDPO_CONFIG`` if set, else
``$XDG_CONFIG_HOME/safetydpo/config.json`` (``~/.config/safetydpo/config.json``); inside ComfyUI also
``<ComfyUI>/user/__safetydpo/config.json`` (a system-user folder that ComfyUI's HTTP API cannot write). It
is JSON::

    {"allowed_api_key_envs": ["MY_LLM_TOKEN"],
     "allowed_endpoints": ["https://api.openai.com", "llm.lan:8000"]}

An ``allowed_endpoints`` entry with a scheme (``https://host[:port]``) allows exactly that origin (the
default port of the scheme when none is given); an entry without one (``host[:port]``) allows that host
(and port, if given) over http and https.

Public API: :class:`EndpointPolicy` (``load``, ``check_key_env``, ``check_url``), :func:`user_config_paths`,
:func:`is_loopback`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

from ..errors import ConfigError

CONFIG_ENV = "SAFETYDPO_CONFIG"
KEY_SUFFIX = "_API_KEY"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "safetydpo" / "config.json"


def user_config_paths(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The user config files that are read: ``$SAFETYDPO_CONFIG`` or the default one, then ``extra``."""
    env = os.environ.get(CONFIG_ENV)
    return [Path(env).expanduser() if env else default_config_path(), *map(Path, extra)]


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (``127.0.0.0/8``, ``::1``); no name is looked up."""
    host = (host or "").strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(scheme: str, host: str, port: int | None) -> tuple[str, str, int]:
    scheme = scheme.lower()
    return scheme, host.strip("[]").lower().rstrip("."), port or _DEFAULT_PORTS.get(scheme, 0)


@dataclasses.dataclass(frozen=True)
class EndpointPolicy:
    allowed_key_envs: frozenset[str] = frozenset()
    allowed_endpoints: tuple[str, ...] = ()
    allow_remote: bool = False
    sources: tuple[Path, ...] = ()

    @classmethod
    def load(cls, extra_configs: Iterable[str | os.PathLike] = (), allow_remote: bool = False) -> "EndpointPolicy":
        keys: set[str] = set()
        endpoints: list[str] = []
        sources = tuple(user_config_paths(extra_configs))
        for path in sources:
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise ConfigError(f"The SafetyDPO user config file {path} cannot be read as JSON: {e}.") from e
            if not isinstance(data, dict):
                raise ConfigError(f"The SafetyDPO user config file {path} must hold a JSON object.")
            for key, into in (("allowed_api_key_envs", keys), ("allowed_endpoints", None)):
                value = data.get(key, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{path}: {key} must be a list of strings.")
                if into is not None:
                    into.update(v.strip() for v in value if v.strip())
                else:
                    endpoints.extend(v.strip() for v in value if v.strip())
        return cls(frozenset(keys), tuple(endpoints), bool(allow_remote), sources)

    def _where(self) -> str:
        return " or ".join(str(p) for p in self.sources) or str(default_config_path())

    def check_key_env(self, name: str | None) -> str | None:
        """The variable name, if it may be read and sent as the endpoint's API key."""
        name = (name or "").strip()
        if not name:
            return None
        if not _ENV_NAME.match(name):
            raise ConfigError("api_key_env must be the NAME of an environment variable that holds the key "
                              "(e.g. OPENAI_API_KEY), never the key itself.")
        if name.endswith(KEY_SUFFIX) or name in self.allowed_key_envs:
            return name
        raise ConfigError(f"The API-key variable {name} does not end in {KEY_SUFFIX}, so it is not sent to an LLM "
                          f"endpoint: a shared workflow or config could otherwise send any secret of this machine. Put "
                          f"the key in a variable such as MY_LLM{KEY_SUFFIX}, or allow {name} yourself in the user config "
                          f"file ({self._where()}; set {CONFIG_ENV} to use another): "
                          f'{{"allowed_api_key_envs": ["{name}"]}}.')

    def endpoint_allowed(self, scheme: str, host: str, port: int | None) -> bool:
        if is_loopback(host) or self.allow_remote:
            return True
        want = _origin(scheme, host, port)
        for entry in self.allowed_endpoints:
            if "://" in entry:
                u = urlsplit(entry)
                try:
                    if u.hostname and _origin(u.scheme, u.hostname, u.port) == want:
                        return True
                except ValueError:
                    continue
            else:
                h, _, p = entry.rpartition(":") if re.search(r":\d+$", entry) else (entry, "", "")
                if h.strip("[]").lower().rstrip(".") == want[1] and (not p or int(p) == want[2]):
                    return True
        return False

    def check_url(self, scheme: str, host: str, port: int | None, shown: str) -> None:
        """Refuse an endpoint that is not on this machine unless the user allowed it outside the graph."""
        if self.endpoint_allowed(scheme, host, port):
            return
        raise ConfigError(f"The LLM endpoint {shown} is not on this machine (not a loopback address), so nothing is "
                          f"sent to it unless you allow it yourself: add its origin to allowed_endpoints in the user "
                          f"config file ({self._where()}; set {CONFIG_ENV} to use another), e.g. "
                          f'{{"allowed_endpoints": ["{scheme}://{host}{":" + str(port) if port else ""}"]}}, or on the '
                          f"command line pass --allow-remote-endpoint. A workflow or --config file cannot allow it.")
