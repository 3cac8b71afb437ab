"""Teachers: the OpenAI-compatible endpoint against a real HTTP server on localhost (scripted failures,
retries, backoff, Retry-After, fatal statuses, seeds, the request cache, concurrency) and the local model
(determinism, samples, over-long prompts, token counts, bounded batch shapes)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time

import pytest

from jaxtune.curate import teachers as T
from jaxtune.curate.teachers import Completion, EndpointError, EndpointTeacher, LocalTeacher, TeacherConfig

# ------------------------------------------------------------------------------------------- the server


class FakeServer:
    """POST /v1/chat/completions in OpenAI's JSON shape. `script(server, body)` returns (status, headers,
    payload); None means a success whose text names the prompt and seed."""

    def __init__(self, script=None, delay: float = 0.0):
        self.script, self.delay = script, delay
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.auth: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.times.append(time.monotonic())
                    server.auth.append(self.headers.get("Authorization", ""))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    n = len(server.requests)
                try:
                    time.sleep(server.delay)
                    status, headers, payload = (server.script(n, body) if server.script else None) or (
                        200, {}, server.success(body))
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def success(body, finish="stop"):
        prompt = body["messages"][-1]["content"]
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"{prompt}|{body['seed']}"},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 7, "total_tokens": 0}}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def error(status, message="boom", headers=None):
    return status, headers or {}, {"error": {"message": message, "type": "server_error"}}


def endpoint(server, tmp_path=None, **kw):
    cfg = TeacherConfig(**{"kind": "endpoint", "base_url": server.url, "model": "m", "backoff_s": 0.01,
                           "max_backoff_s": 1.0, "max_retries": 5, "timeout_s": 10.0, **kw})
    return EndpointTeacher(cfg, cache=T.RequestCache(tmp_path) if tmp_path is not None else None)


# ------------------------------------------------------------------------------------------ endpoint


def test_429_then_500_then_success_backs_off_and_succeeds(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    statuses = {1: error(429, "slow down"), 2: error(500)}
    with FakeServer(lambda n, body: statuses.get(n)) as server:
        [c] = endpoint(server, backoff_s=0.05).complete(["hi there"], max_new_tokens=16, seed=0)
    assert len(server.requests) == 3
    assert c.finish == "stop" and c.text.startswith("hi there|") and c.reason is None
    assert (c.tokens_in, c.tokens_out) == (2, 7)
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # backoff_s, then doubled
    assert c.seconds >= 0.15
    assert server.auth == ["Bearer none"] * 3  # no key in the environment
    body = server.requests[0]
    assert body["max_tokens"] == 16 and body["model"] == "m" and body["temperature"] == 0.8
    assert body["messages"] == [{"role": "user", "content": "hi there"}]


def test_retry_after_is_honoured_and_capped():
    script = {1: error(429, headers={"Retry-After": "0.3"})}
    with FakeServer(lambda n, body: script.get(n)) as server:
        [c] = endpoint(server).complete(["a"], max_new_tokens=4, seed=0)
    assert c.finish == "stop" and server.times[1] - server.times[0] >= 0.3

    script = {1: error(503, headers={"Retry-After": "120"})}
    with FakeServer(lambda n, body: script.get(n)) as server:
        began = time.monotonic()
        [c] = endpoint(server, max_backoff_s=0.05).complete(["a"], max_new_tokens=4, seed=0)
    assert c.finish == "stop" and time.monotonic() - began < 5


def test_a_request_that_keeps_failing_becomes_an_error_and_the_run_goes_on(tmp_path):
    with FakeServer(lambda n, body: error(500, "kaput\nsecond line") if "bad" in str(body["messages"]) else None) \
            as server:
        teacher = endpoint(server, tmp_path, max_retries=2)
        out = teacher.complete(["good 1", "bad", "good 2"], max_new_tokens=8, seed=0)
        assert [c.finish for c in out] == ["stop", "error", "stop"]
        assert out[1].text is None and out[1].reason == "HTTP 500 after 3 attempts: kaput second line"
        assert sum("bad" in str(r["messages"]) for r in server.requests) == 3
        assert T.as_generate_fn(teacher)(["good 1", "bad"], 8, 0) == [out[0].text, ""]
        # the two good answers came from the cache; the error was not cached, so "bad" was sent again
        assert sum("good" in str(r["messages"]) for r in server.requests) == 2
        assert sum("bad" in str(r["messages"]) for r in server.requests) == 6


def test_connection_errors_are_retried_then_reported():
    with FakeServer() as server:
        url = server.url
    teacher = EndpointTeacher(TeacherConfig(kind="endpoint", base_url=url, model="m", max_retries=1,
                                            backoff_s=0.01, timeout_s=5.0))
    [c] = teacher.complete(["x"], max_new_tokens=4, seed=0)
    assert c.finish == "error" and c.reason.startswith("connection error after 2 attempts")


def test_timeouts_are_retried_then_reported():
    with FakeServer(delay=0.5) as server:
        [c] = endpoint(server, max_retries=1, timeout_s=0.1).complete(["x"], max_new_tokens=4, seed=0)
    assert c.finish == "error" and c.reason.startswith("timeout after 2 attempts")
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [401, 404, 400])
def test_a_status_that_would_fail_every_request_raises_at_once(status):
    with FakeServer(lambda n, body: error(status, "Incorrect API key\nprovided")) as server, \
            pytest.raises(EndpointError) as info:
        endpoint(server, max_retries=5).complete(["x"], max_new_tokens=4, seed=0)
    msg = str(info.value)
    assert "\n" not in msg and server.url in msg and "'m'" in msg and f"HTTP {status}" in msg
    assert "Incorrect API key provided" in msg
    assert len(server.requests) == 1  # not retried
    assert ("OPENAI_API_KEY" in msg) == (status == 401)


def test_k_samples_are_k_requests_with_different_seeds_and_a_repeat_is_served_from_the_cache(tmp_path):
    with FakeServer() as server:
        teacher = endpoint(server, tmp_path)
        texts = [teacher.complete(["tell me"], max_new_tokens=8, seed=3, sample=k)[0].text for k in range(4)]
        seeds = [r["seed"] for r in server.requests]
        assert len(server.requests) == 4 and len(set(seeds)) == 4 and len(set(texts)) == 4
        again = [teacher.complete(["tell me"], max_new_tokens=8, seed=3, sample=k)[0] for k in range(4)]
        assert len(server.requests) == 4  # all four from the cache
        assert [c.text for c in again] == texts and all(c.seconds == 0.0 and c.tokens_out == 7 for c in again)
        # anything in the request changes the key: another max_tokens, another seed, another model
        teacher.complete(["tell me"], max_new_tokens=9, seed=3)
        teacher.complete(["tell me"], max_new_tokens=8, seed=4)
        endpoint(server, tmp_path, model="other").complete(["tell me"], max_new_tokens=8, seed=3)
        assert len(server.requests) == 7
        # cache off: sent again
        endpoint(server, tmp_path, cache=False).complete(["tell me"], max_new_tokens=8, seed=3)
        assert len(server.requests) == 8
    assert len(list(tmp_path.rglob("*.json"))) == 7


def test_identical_prompts_in_one_call_share_one_request():
    with FakeServer() as server:
        out = endpoint(server).complete(["same", "other", "same"], max_new_tokens=8, seed=0)
    assert len(server.requests) == 2 and out[0] == out[2] and out[0].text != out[1].text


def test_concurrency_is_bounded():
    with FakeServer(delay=0.05) as server:
        done = []
        out = endpoint(server, max_concurrency=4).complete([f"p{i}" for i in range(16)], max_new_tokens=4, seed=0,
                                                           progress=done.append)
    assert [c.text.split("|")[0] for c in out] == [f"p{i}" for i in range(16)]  # input order
    assert 2 <= server.max_in_flight <= 4
    assert done == list(range(1, 17))


def test_length_finish_usage_and_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret")
    with FakeServer(lambda n, body: (200, {}, FakeServer.success(body, "length"))) as server:
        teacher = endpoint(server, api_key_env="MY_KEY", top_k=5, stop=["###"])
        [c] = teacher.complete(["one two three"], max_new_tokens=4, seed=0)
    assert c.finish == "length" and c.tokens_in == 3
    assert server.auth == ["Bearer sk-secret"]
    assert server.requests[0]["top_k"] == 5 and server.requests[0]["stop"] == ["###"]
    fp = teacher.fingerprint()
    assert "sk-secret" not in json.dumps(fp) and fp["base_url"] == server.url and fp["model"] == "m"
    assert fp["sampling"] == {"temperature": 0.8, "top_p": 0.95, "top_k": 5, "stop": ["###"]}


def test_a_response_that_is_not_a_chat_completion_raises():
    with FakeServer(lambda n, body: (200, {}, {"choices": []})) as server, \
            pytest.raises(EndpointError, match="not a chat completion"):
        endpoint(server).complete(["x"], max_new_tokens=4, seed=0)


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, field", [
    ({"kind": "remote"}, "teacher.kind"),
    ({"kind": "endpoint", "model": "m"}, "teacher.base_url"),
    ({"kind": "endpoint", "base_url": "localhost:8000"}, "teacher.base_url"),
    ({"kind": "endpoint", "base_url": "http://h/v1"}, "teacher.model"),
    ({"kind": "endpoint", "base_url": "http://h/v1", "model": "m", "chat": False}, "teacher.chat"),
    ({"base_url": "http://h/v1"}, "teacher.base_url"),
    ({"temperature": -1.0}, "teacher.temperature"),
    ({"top_p": 0.0}, "teacher.top_p"),
    ({"batch_size": 0}, "teacher.batch_size"),
    ({"max_concurrency": 0}, "teacher.max_concurrency"),
    ({"max_retries": -1}, "teacher.max_retries"),
    ({"backoff_s": 2.0, "max_backoff_s": 1.0}, "teacher.max_backoff_s"),
    ({"timeout_s": 0.0}, "teacher.timeout_s"),
    ({"stop": ("",)}, "teacher.stop"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        TeacherConfig(**kw)


def test_config_from_a_recipe_mapping():
    from jaxtune.structs import from_dict

    cfg = from_dict(TeacherConfig, {"kind": "endpoint", "base_url": "http://h/v1", "model": "m", "stop": ["a"]},
                    "teacher")
    assert cfg.stop == ("a",)
    with pytest.raises(ValueError, match="^teacher.max_retries: "):
        from_dict(TeacherConfig, {"max_retries": -2}, "teacher")


def test_derived_seeds_are_stable_and_distinct():
    assert T.derive_seed(0, 0) == T.derive_seed(0, 0)
    seeds = {T.derive_seed(s, k, b) for s in range(3) for k in range(3) for b in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2 ** 31 for s in seeds)


def test_cache_ignores_unreadable_entries_and_never_stores_failures(tmp_path):
    cache = T.RequestCache(tmp_path)
    key = cache.key({"a": 1}, 0)
    assert key != cache.key({"a": 1}, 1) and cache.get(key) is None
    cache.put(key, {"a": 1}, 0, Completion(None, "error", "HTTP 500 after 6 attempts: x", 0, 0, 1.0))
    assert cache.get(key) is None and not list(tmp_path.rglob("*.json"))
    cache.put(key, {"a": 1}, 0, Completion("ok", "stop", None, 1, 2, 1.0))
    assert cache.get(key) == Completion("ok", "stop", None, 1, 2, 0.0)
    cache.path(key).write_text("{not json")
    assert cache.get(key) is None


def test_default_cache_dir_is_under_the_jaxtune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXTUNE_CACHE_DIR", str(tmp_path))
    assert T.RequestCache().root == tmp_path / "requests"


# --------------------------------------------------------------------------------------------- local

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]  # every id of the 128-token vocab decodes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama (64 positions) with a word-level tokenizer saved beside it."""
    from hf_models import build
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    build("llama_gqa", path, max_position_embeddings=64)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    from jaxtune.hf.load import load_pretrained, load_tokenizer

    return path, load_pretrained(path), load_tokenizer(path)


PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11"]
# One prompt bucket and one max_new_tokens throughout, so the tests share compiled decode programs.
BUCKET, NEW = 16, 8


def test_local_is_deterministic_and_samples_differ(tiny):
    _, model, tok = tiny
    teacher = LocalTeacher(model, tok, TeacherConfig(temperature=1.0, top_p=1.0, batch_size=4), bucket=BUCKET)
    first = teacher.complete(PROMPTS, max_new_tokens=NEW, seed=0)
    again = teacher.complete(PROMPTS, max_new_tokens=NEW, seed=0)
    assert [c.text for c in first] == [c.text for c in again]
    other = teacher.complete(PROMPTS, max_new_tokens=NEW, seed=0, sample=1)
    assert sum(a.text != b.text for a, b in zip(first, other)) >= 3
    reseeded = teacher.complete(PROMPTS, max_new_tokens=NEW, seed=1)
    assert sum(a.text != b.text for a, b in zip(first, reseeded)) >= 3
    for p, c in zip(PROMPTS, first):
        assert c.tokens_in == len(tok.encode(p)) and c.finish in ("stop", "length") and c.reason is None
        assert c.tokens_out == NEW if c.finish == "length" else 1 <= c.tokens_out <= NEW
        assert c.seconds > 0


def test_local_skips_an_over_long_prompt_and_completes_the_rest(tiny):
    _, model, tok = tiny
    done = []
    too_long, just_fits = " ".join(["w3"] * 57), " ".join(["w3"] * 56)  # 56 + 8 new = the 64 positions
    teacher = LocalTeacher(model, tok, TeacherConfig(batch_size=4), bucket=BUCKET)
    out = teacher.complete([PROMPTS[0], too_long, just_fits], max_new_tokens=NEW, seed=0, progress=done.append)
    assert out[1] == Completion(None, "skipped", "prompt has 57 tokens; with max_new_tokens=8 that exceeds the "
                                "model's 64 positions", 57, 0, 0.0)
    assert out[0].text is not None and out[2].text is not None and out[2].tokens_in == 56
    assert done == [1, 3]
    assert T.as_generate_fn(teacher)([too_long], NEW, 0) == [""]


def test_local_stop_tokens_end_the_completion(tiny):
    _, model, tok = tiny
    [free] = LocalTeacher(model, tok, bucket=BUCKET).complete(["w1 w2"], max_new_tokens=NEW, seed=0)
    first = free.text.split()[0]
    [stopped] = LocalTeacher(model, tok, TeacherConfig(stop=(first,)), bucket=BUCKET).complete(
        ["w1 w2"], max_new_tokens=NEW, seed=0)
    assert (stopped.finish, stopped.text, stopped.tokens_out) == ("stop", "", 1)
    with pytest.raises(ValueError, match="^teacher.stop: 'nope' is not a token"):
        LocalTeacher(model, tok, TeacherConfig(stop=("nope",)))


def test_local_batches_have_bounded_shapes(tiny, monkeypatch):
    import jaxtune.generate as gen

    _, model, tok = tiny
    shapes, real = [], gen.generate

    def spy(model, prompts, params, *, bucket):
        shapes.append((len(prompts), bucket))
        return real(model, prompts, params, bucket=bucket)

    monkeypatch.setattr(gen, "generate", spy)
    prompts = [" ".join(["w9"] * n) for n in (1, 2, 3, 20, 5)]
    out = LocalTeacher(model, tok, TeacherConfig(batch_size=4), bucket=BUCKET).complete(
        prompts, max_new_tokens=NEW, seed=0)
    assert len(out) == 5 and all(c.text is not None for c in out)
    # sorted by length: [1, 2, 3, 5] then [20] alone (a batch of 1); prompt widths 16 and 32
    assert shapes == [(4, 16), (1, 32)]


def test_local_chat_needs_a_template(tiny):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="^teacher.chat: true, but the tokenizer has no chat template"):
        LocalTeacher(model, tok, TeacherConfig(chat=True))
    assert LocalTeacher(model, tok).template is None  # chat: null and no template = plain prompts
    given = "{% for m in messages %}w7 {{ m['content'] }} {% endfor %}w8"
    assert LocalTeacher(model, tok, template=given).encode("w1 w2") == tok.encode("w7 w1 w2 w8")
    assert LocalTeacher(model, tok, TeacherConfig(chat=False), template=given).encode("w1 w2") == tok.encode("w1 w2")


def test_teacher_from_config_and_fingerprint(tiny, tmp_path):
    path, _, _ = tiny
    teacher = T.teacher_from_config(TeacherConfig(batch_size=2), base_model_dir=str(path))
    assert isinstance(teacher, LocalTeacher) and teacher.model_dir == str(path)
    fp = teacher.fingerprint()
    assert fp["files"]["model.safetensors"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert {"tokenizer.json", "config.json", "tokenizer_config.json"} <= set(fp["files"])
    assert fp["sampling"]["temperature"] == 0.8 and json.loads(json.dumps(fp)) == fp
    ep = T.teacher_from_config(TeacherConfig(kind="endpoint", base_url="http://h/v1", model="m"),
                               base_model_dir=str(path), cache_dir=tmp_path)
    assert isinstance(ep, EndpointTeacher) and ep.cache.root == tmp_path
    assert T.teacher_from_config(TeacherConfig(kind="endpoint", base_url="http://h/v1", model="m", cache=False),
                                 base_model_dir=str(path)).cache is None
