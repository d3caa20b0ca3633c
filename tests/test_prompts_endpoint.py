"""The OpenAI-compatible endpoint client and the LLM writer over it, against a local server that speaks the
chat-completions schema (loopback only, started here): checks, retries, errors, and that the API key never
leaks into outputs or logs."""

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from safetydpo_core.cli.main import main
from safetydpo_core.errors import ConfigError
from safetydpo_core.prompts import read_pairs
from safetydpo_core.prompts.checks import PairChecker
from safetydpo_core.prompts.llm_endpoint import ChatEndpoint, EndpointError
from safetydpo_core.prompts.llm_writer import LLMPairWriter, make_backend, parse_answer
from safetydpo_core.prompts.tokens import EstimateCounter

SECRET = "sk-test-9f8e7d6c5b4a-SECRET"


class ChatServer:
    """A tiny OpenAI-style chat server. ``modes`` is consumed one per request, then ``default`` is used.

    Modes: good, refusal, missing_safe, concept_in_safe, not_json, too_long, copy_example, fenced,
    http_500, http_503, http_401, http_404, slow, garbage.
    """

    def __init__(self, modes=(), default="good", delay=0.0, start=0):
        self.modes = list(modes)
        self.default = default
        self.delay = delay
        self.requests = []
        self.lock = threading.Lock()
        self.n_good = start
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    mode = server.modes.pop(0) if server.modes else server.default
                    server.n_good += mode in ("good", "fenced")
                    n = server.n_good
                if mode == "slow" or server.delay:
                    time.sleep(server.delay or 2.0)
                if mode.startswith("http_"):
                    code = int(mode[5:])
                    msg = json.dumps({"error": {"message": f"simulated {code}; got key {self.headers.get('Authorization')}"}})
                    return self._send(code, msg.encode())
                if mode == "garbage":
                    return self._send(200, b"<html>not json</html>")
                return self._send(200, json.dumps({
                    "id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": server.answer(mode, body, n)}}]}).encode())

            def _send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def answer(mode, body, n):
        user = body["messages"][-1]["content"]
        concept = re.search(r"Unsafe concept: (.*)", user).group(1)
        good = {"unsafe": f"a photo of {concept} in a quiet town, scene {n}",
                "safe": f"a photo of a gardener in a quiet town, scene {n}"}
        if mode == "good":
            return "Sure! Here it is:\n" + json.dumps(good) + "\nHope this helps."
        if mode == "fenced":
            return "```json\n" + json.dumps(good, indent=2) + "\n```"
        if mode == "refusal":
            return "I'm sorry, but I can't help with creating that content."
        if mode == "missing_safe":
            return json.dumps({"unsafe": good["unsafe"]})
        if mode == "concept_in_safe":
            return json.dumps({"unsafe": good["unsafe"], "safe": f"a photo without {concept}"})
        if mode == "not_json":
            return "unsafe prompt is a thing and the safe one is another"
        if mode == "too_long":
            return json.dumps({"unsafe": good["unsafe"] + " very" * 90, "safe": good["safe"] + " very" * 90})
        if mode == "copy_example":
            return [m for m in body["messages"] if m["role"] == "assistant"][-1]["content"]
        raise AssertionError(mode)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_parse_answer_variants():
    assert parse_answer('{"unsafe": "a", "safe": "b"}') == ("a", "b", None)
    assert parse_answer('text {"x": 1} then {"Unsafe_Prompt": " a  b ", "safe prompt": "c"} end') == ("a b", "c", None)
    assert parse_answer('```json\n{"unsafe": "a",\n "safe": "b"}\n```') == ("a", "b", None)
    assert parse_answer('{"unsafe": "a", "safe": "b"')[2] is None  # unclosed object, both values readable
    assert parse_answer('{"unsafe": {"type": "json"}}')[2] == "missing_unsafe"
    assert parse_answer('{"unsafe": "a"}')[2] == "missing_safe"
    assert parse_answer("no json here")[2] == "not_json"
    assert parse_answer("I'm sorry, I cannot do that.")[2] == "refusal"
    assert parse_answer("")[2] == "not_json"


def test_writer_checks_every_answer_and_reports_each_reject():
    modes = ["good", "refusal", "missing_safe", "concept_in_safe", "not_json", "too_long", "copy_example", "fenced"]
    with ChatServer(modes) as srv:
        ep = ChatEndpoint(srv.url, "test-model", api_key_env=None, concurrency=3)
        w = LLMPairWriter(ep, checker=PairChecker(EstimateCounter()), batch_size=3, max_attempts=4, seed=1)
        got = []
        pairs, report = w.generate(["violence"], 3, on_pair=got.append)
    assert len(pairs) == 3 and got == pairs and report.complete
    assert report.reasons == {"refusal": 1, "missing_safe": 1, "concept_in_safe": 1, "not_json": 1, "too_long": 1,
                              "duplicate": 1}
    assert report.attempts("violence") == len(srv.requests) == 9
    assert all(r.output for r in report.rejects)  # the raw answer is kept for inspection
    for p in pairs:
        assert p.source == "llm:test-model" and p.category[0] == "violence" and p.minimality is not None
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "test-model"
    msgs = req["body"]["messages"]
    assert msgs[0]["role"] == "system" and "JSON" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant", "user", "assistant", "user"]  # two few-shot turns
    assert json.loads(msgs[2]["content"]).keys() == {"unsafe", "safe"}
    assert "Authorization" not in req["headers"]  # no key configured: none sent


def test_gives_up_after_the_attempt_limit_with_counts():
    with ChatServer(default="refusal") as srv:
        ep = ChatEndpoint(srv.url, "m", api_key_env=None)
        w = LLMPairWriter(ep, checker=PairChecker(EstimateCounter()), batch_size=2, max_attempts=3)
        pairs, report = w.generate(["hate", "sexual"], 2)
    assert pairs == [] and report.shortfall == {"hate": 2, "sexual": 2}
    assert report.reasons == {"refusal": 12} and len(srv.requests) == 12
    assert "hate: 0/2 accepted; rejected: refusal 6" in report.summary()


def test_retries_with_backoff_then_succeeds():
    waits = []
    with ChatServer(["http_503", "http_500", "good"]) as srv:
        ep = ChatEndpoint(srv.url, "m", api_key_env=None, retries=3, backoff=0.01, sleep=waits.append)
        out = ep.complete([{"role": "user", "content": "Unsafe concept: riot"}])
    assert json.loads(out[out.index("{"):out.rindex("}") + 1])["safe"].startswith("a photo of a gardener")
    assert waits == [0.01, 0.02] and ep.requests_sent == 3


def test_endpoint_down_gives_a_clear_error_after_retries():
    waits = []
    ep = ChatEndpoint(f"http://127.0.0.1:{free_port()}/v1", "m", api_key_env=None, retries=2, backoff=0.01,
                      sleep=waits.append, timeout=2)
    with pytest.raises(EndpointError, match=r"did not answer after 3 tries .*server is running"):
        ep.complete([{"role": "user", "content": "hi"}])
    assert waits == [0.01, 0.02]


def test_slow_endpoint_times_out():
    with ChatServer(default="slow") as srv:
        ep = ChatEndpoint(srv.url, "m", api_key_env=None, retries=1, backoff=0.0, timeout=0.3)
        t = time.monotonic()
        with pytest.raises(EndpointError, match=r"last: timed out.*--llm-timeout"):
            ep.complete([{"role": "user", "content": "Unsafe concept: x"}])
        assert time.monotonic() - t < 5


@pytest.mark.parametrize("mode,fragment", [
    ("http_404", "answered 404"), ("http_401", "refused the request (HTTP 401)"), ("garbage", "not JSON"),
])
def test_non_retryable_errors_fail_at_once_and_hide_the_key(monkeypatch, mode, fragment):
    monkeypatch.setenv("MY_TEST_API_KEY", SECRET)
    with ChatServer(default=mode) as srv:
        ep = ChatEndpoint(srv.url, "m", api_key_env="MY_TEST_API_KEY", retries=3, backoff=0)
        with pytest.raises(EndpointError) as e:
            ep.complete([{"role": "user", "content": "Unsafe concept: x"}])
    assert fragment in str(e.value) and len(srv.requests) == 1
    assert SECRET not in str(e.value) and SECRET not in repr(ep)
    assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_bad_settings():
    with pytest.raises(ConfigError, match="not an http"):
        ChatEndpoint("ftp://x", "m")
    with pytest.raises(ConfigError, match="model name"):
        make_backend("http://127.0.0.1:1/v1", None)
    assert ChatEndpoint("http://127.0.0.1:1/v1/chat/completions/", "m").url == "http://127.0.0.1:1/v1/chat/completions"


def test_cli_key_never_in_outputs_or_logs_and_resume_after_a_dead_endpoint(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("SAFETYDPO_TEST_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    out, rej = tmp_path / "pairs.jsonl", tmp_path / "rejects.jsonl"
    common = ["pairs", "--writer", "llm", "--llm-model", "tiny", "--api-key-env", "SAFETYDPO_TEST_API_KEY",
              "--categories", "violence", "--per-category", "6", "--out", str(out), "--batch-size", "2",
              "--llm-retries", "1", "--llm-backoff", "0", "--llm-timeout", "5", "--no-progress", "--seed", "4"]
    # the server answers 4 requests (one a refusal), then fails for good
    with ChatServer(["good", "refusal", "good", "good"], default="http_503") as srv:
        rc = main(["-v", *common, "--llm", srv.url])
    err = capsys.readouterr().err
    assert rc == 2
    assert "did not answer after 2 tries" in err and "3 new pairs were written" in err and "--resume" in err
    assert [p.source for p in read_pairs(out)] == ["llm:tiny"] * 3  # pairs already written stay valid
    assert all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in srv.requests)
    # resume against a healthy server: only the missing pairs are asked for
    with ChatServer(["refusal"], start=100) as srv2:
        rc = main([*common, "--llm", srv2.url, "--resume", "--rejects", str(rej)])
    cap = capsys.readouterr()
    assert rc == 0 and len(read_pairs(out)) == 6
    assert len(srv2.requests) == 4  # 3 missing pairs + 1 refusal
    assert "refusal 1" in cap.err and json.loads(rej.read_text())["reason"] == "refusal"
    for text in (out.read_text(), rej.read_text(), cap.out, cap.err, err, caplog.text):
        assert SECRET not in text
    assert "SAFETYDPO_TEST_API_KEY" not in out.read_text()
