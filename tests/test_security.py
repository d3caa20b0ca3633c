"""Issue #13, security: what a shared workflow or config can make the pack send, and where; what the LLM
endpoint client follows and reads; what is written about an endpoint URL; that no model load unpickles.

Every server here listens on loopback (two servers on two ports are two origins)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from safetydpo_core.cli.main import main
from safetydpo_core.errors import ConfigError, ModelError
from safetydpo_core.prompts.llm_endpoint import ChatEndpoint, EndpointError
from safetydpo_core.prompts.llm_writer import make_backend
from test_prompts_endpoint import ChatServer

SECRET = "sk-test-4d3c2b1a-SECRET"
QUERY_SECRET = "QSECRET4242"


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code)


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    """No allowances from the machine's own config file: SAFETYDPO_CONFIG points at a file that is not there."""
    monkeypatch.setenv("SAFETYDPO_CONFIG", str(tmp_path / "no-config.json"))


def _config(tmp_path, monkeypatch, **settings):
    path = tmp_path / "safetydpo.json"
    path.write_text(json.dumps(settings))
    monkeypatch.setenv("SAFETYDPO_CONFIG", str(path))
    return path


# -- 12. which key variables and which endpoints ----------------------------------------------------------
@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "HOME", "DATABASE_URL", "API_KEY_FILE"])
def test_api_key_env_must_look_like_an_llm_key(tmp_path, monkeypatch, name):
    with pytest.raises(ConfigError, match="_API_KEY"):
        ChatEndpoint("http://127.0.0.1:1/v1", "m", api_key_env=name)
    _config(tmp_path, monkeypatch, allowed_api_key_envs=[name])
    assert ChatEndpoint("http://127.0.0.1:1/v1", "m", api_key_env=name).api_key_env == name


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "MY_LLM_API_KEY", None, ""])
def test_llm_key_names_are_accepted(name):
    ChatEndpoint("http://127.0.0.1:1/v1", "m", api_key_env=name)


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000/v1", "http://169.254.169.254/latest", "https://example.com/v1",
                                 "http://0.0.0.0:8080/v1", "http://127.0.0.1.nip.io/v1", "http://[fe80::1]/v1"])
def test_remote_endpoint_is_refused_unless_allowed_outside_the_graph(tmp_path, monkeypatch, url):
    with pytest.raises(ConfigError, match="SAFETYDPO_CONFIG|allowed_endpoints"):
        ChatEndpoint(url, "m")
    with pytest.raises(ConfigError):
        make_backend(url, "m")
    assert ChatEndpoint(url, "m", allow_remote=True).model == "m"  # the CLI's explicit flag


def test_allowed_endpoints_in_the_user_config_match_the_origin(tmp_path, monkeypatch):
    _config(tmp_path, monkeypatch, allowed_endpoints=["https://llm.example.com", "10.0.0.5:8000"])
    ChatEndpoint("https://llm.example.com/v1", "m")
    ChatEndpoint("https://llm.example.com:443/v1", "m")
    ChatEndpoint("http://10.0.0.5:8000/v1", "m")
    for url in ("http://llm.example.com/v1", "https://llm.example.com:8443/v1", "https://evil.example.com/v1",
                "http://10.0.0.5:8001/v1", "https://llm.example.com.evil.net/v1"):
        with pytest.raises(ConfigError):
            ChatEndpoint(url, "m")


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/v1", "http://localhost:1/v1", "http://[::1]:1/v1",
                                 "http://127.0.0.2:1/v1"])
def test_loopback_endpoints_need_no_allowance(url):
    ChatEndpoint(url, "m")


def test_cli_allows_a_remote_endpoint_only_with_its_own_flag(tmp_path, monkeypatch, capsys):
    args = ["pairs", "--writer", "llm", "--llm", "https://llm.example.com/v1", "--llm-model", "m", "--categories",
            "violence", "--per-category", "1", "--out", tmp_path / "p.jsonl", "--no-progress", "--llm-retries", "0"]
    assert cli(*args) == 2
    assert "--allow-remote-endpoint" in capsys.readouterr().err
    # a shared config file cannot switch it on
    (tmp_path / "shared.toml").write_text("allow_remote_endpoint = true\n")
    assert cli(*args, "--config", tmp_path / "shared.toml") == 2
    assert "command line" in capsys.readouterr().err
    # the user's own flag: the policy lets it through (the request itself is stubbed: no network in tests)
    sent = []

    def fake_request(self, payload):
        sent.append(self.url)
        raise EndpointError("stubbed: no network in tests")

    monkeypatch.setattr(ChatEndpoint, "_request", fake_request)
    assert cli(*args, "--allow-remote-endpoint") == 2
    assert "stubbed" in capsys.readouterr().err and sent == ["https://llm.example.com/v1/chat/completions"]


def test_a_config_file_cannot_name_a_secret_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    (tmp_path / "shared.toml").write_text('api_key_env = "AWS_SECRET_ACCESS_KEY"\n')
    with ChatServer() as srv:
        rc = cli("pairs", "--writer", "llm", "--llm", srv.url, "--llm-model", "m", "--categories", "violence",
                 "--per-category", "1", "--out", tmp_path / "p.jsonl", "--no-progress", "--config",
                 tmp_path / "shared.toml")
    assert rc == 2 and "_API_KEY" in capsys.readouterr().err
    assert srv.requests == []


# -- 13. redirects and response size ---------------------------------------------------------------------
class _Server:
    """A loopback server that records every request (any method) and answers with ``respond(handler)``."""

    def __init__(self, respond):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                       "body": body})
                respond(self)

            do_GET = do_POST = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(handler, code, data=b"", headers=()):
    handler.send_response(code)
    for k, v in headers:
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_cross_origin_redirect_is_not_followed_with_the_key(monkeypatch, code):
    monkeypatch.setenv("SAFETYDPO_TEST_API_KEY", SECRET)
    with _Server(lambda h: _send(h, 404)) as other:  # another port: another origin
        target = other.url + "/v1/chat/completions"
        with _Server(lambda h: _send(h, code, headers=[("Location", target)])) as first:
            ep = ChatEndpoint(first.url + "/v1", "m", api_key_env="SAFETYDPO_TEST_API_KEY", retries=0)
            with pytest.raises(EndpointError, match="redirect") as e:
                ep.complete([{"role": "user", "content": "hi"}])
    assert len(first.requests) == 1
    assert other.requests == []  # the other origin never saw the request, let alone the key
    assert SECRET not in str(e.value)


def test_endpoint_response_size_is_capped(monkeypatch):
    from safetydpo_core.prompts import llm_endpoint

    monkeypatch.setattr(llm_endpoint, "MAX_RESPONSE_BYTES", 64 * 1024, raising=False)

    huge = json.dumps({"choices": [{"message": {"content": "x" * (1 << 20)}}]}).encode()
    with _Server(lambda h: _send(h, 200, huge)) as srv:
        ep = ChatEndpoint(srv.url + "/v1", "m", retries=0)
        with pytest.raises(EndpointError, match="larger than"):
            ep.complete([{"role": "user", "content": "hi"}])


# -- 14. URL joining, and no query string or credential written anywhere -----------------------------------
def test_endpoint_url_query_string_is_kept_and_never_written(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "p.jsonl"
    with ChatServer() as srv:
        url = f"{srv.url}?api-version=2024-06-01&sig={QUERY_SECRET}"
        rc = cli("-v", "pairs", "--writer", "llm", "--llm", url, "--llm-model", "tiny", "--categories", "violence",
                 "--per-category", "2", "--out", out, "--no-progress", "--batch-size", "1", "--rejects",
                 tmp_path / "rejects.jsonl")
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert srv.requests and all(r["path"] == f"/v1/chat/completions?api-version=2024-06-01&sig={QUERY_SECRET}"
                                for r in srv.requests)
    config = (tmp_path / "p.config.json").read_text()
    assert json.loads(config)["llm"].startswith(srv.url)
    for text in (config, out.read_text(), (tmp_path / "rejects.jsonl").read_text(), cap.out, cap.err, caplog.text):
        assert QUERY_SECRET not in text
    ep = ChatEndpoint(url, "m")
    assert QUERY_SECRET not in repr(ep) and QUERY_SECRET not in ep.display_url


def test_url_joining_keeps_the_path_and_query():
    assert ChatEndpoint("http://127.0.0.1:1/v1/", "m").url == "http://127.0.0.1:1/v1/chat/completions"
    assert ChatEndpoint("http://127.0.0.1:1/v1/chat/completions?x=1", "m").url == \
        "http://127.0.0.1:1/v1/chat/completions?x=1"
    assert ChatEndpoint("http://127.0.0.1:1/openai/v1?api-version=2", "m").url == \
        "http://127.0.0.1:1/openai/v1/chat/completions?api-version=2"


def test_credentials_in_the_url_are_refused_and_not_repeated():
    with pytest.raises(ConfigError) as e:
        ChatEndpoint("http://user:PWSECRET@127.0.0.1:1/v1", "m")
    assert "PWSECRET" not in str(e.value) and "environment variable" in str(e.value)


def test_failed_endpoint_errors_do_not_show_the_query(monkeypatch):
    with ChatServer(default="http_404") as srv:
        ep = ChatEndpoint(f"{srv.url}?sig={QUERY_SECRET}", "m", retries=0)
        with pytest.raises(EndpointError) as e:
            ep.complete([{"role": "user", "content": "Unsafe concept: x"}])
    assert "404" in str(e.value) and QUERY_SECRET not in str(e.value)


# -- 15. no pickled model weights ------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_diffusers_folder_with_pickled_weights_is_refused(tiny_sd15, tmp_path, part):
    from safetensors.torch import load_file

    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser

    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)
    st = next((model / part).glob("*.safetensors"))
    pickled = {"model.safetensors": "pytorch_model.bin"}.get(st.name, st.with_suffix(".bin").name)
    torch.save(load_file(str(st)), st.parent / pickled)
    st.unlink()
    with pytest.raises(ModelError, match="safetensors"):
        DiffusersDenoiser.from_pretrained(model)
