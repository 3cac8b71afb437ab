"""The generator of every curation stage: a local jaxtune model or an OpenAI-compatible endpoint (vLLM,
llama.cpp server, OpenAI), behind one `complete(prompts, ...) -> [Completion]`.

A prompt that cannot be answered becomes a `Completion` that says why ("skipped": too long for the local
model; "error": the endpoint kept failing), never an aborted run. Errors that would fail every request (a
bad key, URL or model name) raise at once instead. Both teachers are repeatable: a completion is a function
of (prompts, max_new_tokens, seed, sample), and the `sample` index asks for another draw of the same prompts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import hashlib
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

GenerateFn = Callable[[Sequence[str], int, int], list[str]]
Progress = Callable[[int], None]

KINDS = ("local", "endpoint")
FINISHES = ("stop", "length", "skipped", "error")
_RETRY_STATUSES = (408, 409, 429)  # plus every 5xx: the same statuses the openai client itself retries
_TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "chat_template.jinja")


@dataclass(frozen=True)
class Completion:
    """One prompt's answer. `text` is None when `finish` is "skipped" or "error"; `reason` then says why in
    one line. `tokens_out` counts the tokens generated, a final stop token included. `seconds` is the wall
    time spent on this request (a local batch's time is split evenly among its prompts; a cache hit is 0)."""

    text: str | None
    finish: str
    reason: str | None
    tokens_in: int
    tokens_out: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.finish in ("stop", "length")


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"teacher.{key}: {msg}")


@dataclass(frozen=True)
class TeacherConfig:
    """The `teacher:` recipe section. `kind: local` runs an HF model dir in-process (`model` null: the
    pipeline's base model); `kind: endpoint` sends chat-completions to `base_url` for the served `model`,
    with the key read from the environment variable `api_key_env` ("none" is sent when it is unset, which
    local servers accept). `chat` (local only): wrap prompts in the tokenizer's chat template; null = when it
    has one. `stop`: extra stop tokens for the local model (e.g. "<s>" for a model that ends a text with
    BOS), stop strings for an endpoint. Endpoint requests are retried `max_retries` times on 429, 5xx,
    timeouts and connection errors, waiting `backoff_s` doubling up to `max_backoff_s` (or the server's
    Retry-After, capped the same), and with `cache` answered from the on-disk request cache when identical."""

    kind: str = "local"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    chat: bool | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int = 16
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    timeout_s: float = 120.0
    cache: bool = True

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        _need(self.kind in KINDS, "kind", f"{self.kind!r} is not one of {KINDS}")
        if self.kind == "endpoint":
            _need(bool(self.base_url), "base_url", "is required for kind: endpoint (e.g. http://localhost:8000/v1)")
            _need(str(self.base_url).startswith(("http://", "https://")), "base_url",
                  f"{self.base_url!r} must start with http:// or https://")
            _need(bool(self.model), "model", "is required for kind: endpoint: the model name the server serves")
            _need(self.chat is not False, "chat", "an endpoint is always sent chat-completions; remove chat: false")
        else:
            _need(self.base_url is None, "base_url", "is only for kind: endpoint; set kind: endpoint or remove it")
        _need(bool(self.api_key_env), "api_key_env", "must name an environment variable")
        _need(self.temperature >= 0, "temperature", f"{self.temperature} must be >= 0 (0 means greedy)")
        _need(0.0 < self.top_p <= 1.0, "top_p", f"{self.top_p} must be in (0, 1]")
        _need(self.top_k >= 0, "top_k", f"{self.top_k} must be >= 0 (0 means no top-k filter)")
        _need(all(isinstance(s, str) and s for s in self.stop), "stop", "entries must be non-empty strings")
        for name in ("batch_size", "max_concurrency"):
            _need(getattr(self, name) >= 1, name, f"{getattr(self, name)} must be >= 1")
        _need(self.max_retries >= 0, "max_retries", f"{self.max_retries} must be >= 0")
        _need(self.backoff_s >= 0, "backoff_s", f"{self.backoff_s} must be >= 0")
        _need(self.max_backoff_s >= self.backoff_s, "max_backoff_s",
              f"{self.max_backoff_s} must be >= teacher.backoff_s ({self.backoff_s})")
        _need(self.timeout_s > 0, "timeout_s", f"{self.timeout_s} must be > 0")

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "stop": list(self.stop)}


class Teacher(Protocol):
    def complete(self, prompts: Sequence[str], *, max_new_tokens: int, seed: int, sample: int = 0,
                 progress: Progress | None = None) -> list[Completion]: ...

    def fingerprint(self) -> dict: ...


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (fits every server's and JAX's seed field); distinct tuples, distinct seeds."""
    digest = hashlib.sha256(json.dumps([int(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _check_max_new(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")


# ------------------------------------------------------------------------------------------------ local


def file_digests(model_dir: str | Path) -> dict[str, str]:
    """sha256 of a model dir's weight files and the config/tokenizer files beside them, by file name."""
    from jaxtune.hf.load import weight_files

    model_dir = Path(model_dir)
    files = weight_files(model_dir) + [model_dir / n for n in _TOKENIZER_FILES if (model_dir / n).is_file()]
    out = {}
    for path in sorted(files):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[path.name] = h.hexdigest()
    return out


class LocalTeacher:
    """A jaxtune model sampling in batches of `cfg.batch_size`, prompts sorted by length. A short batch is
    padded to a power of two (repeating a prompt) and prompt widths to `bucket` times a power of two, so a
    run compiles a few shapes only. Batch b of sample s draws with seed `derive_seed(seed, s, b)`.

    With chat on, prompts are wrapped in `template` (Jinja text), else the tokenizer's own chat template."""

    def __init__(self, model, tokenizer, cfg: TeacherConfig = TeacherConfig(), *, bucket: int = 64,
                 model_dir: str | Path | None = None, template: str | None = None):
        from jaxtune.data.chat import resolve_template
        from jaxtune.generate import SamplingParams, stop_token_ids

        if cfg.kind != "local":
            raise ValueError(f"teacher.kind: {cfg.kind!r}; LocalTeacher needs kind: local")
        if bucket < 1:
            raise ValueError(f"bucket={bucket}: must be >= 1")
        self.model, self.tokenizer, self.cfg, self.bucket = model, tokenizer, cfg, bucket
        self.model_dir = None if model_dir is None else str(model_dir)
        template = template or resolve_template(None, tokenizer)  # a task domain's own, else the tokenizer's
        if cfg.chat and template is None:
            where = f" of {model_dir}" if model_dir else ""
            raise ValueError(f"teacher.chat: true, but the tokenizer{where} has no chat template; use plain prompts "
                             "(chat: false)")
        self.template = template if cfg.chat is not False else None
        vocab = tokenizer.get_vocab()
        for s in cfg.stop:
            if s not in vocab:
                raise ValueError(f"teacher.stop: {s!r} is not a token of the tokenizer; give single tokens such as "
                                 "'<s>' or '</s>'")
        stops = stop_token_ids(model.config, tokenizer, self.template, extra=[vocab[s] for s in cfg.stop])
        try:
            self.params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                         stop_ids=tuple(stops))
        except ValueError as e:
            raise ValueError(f"teacher.stop: {e}") from None
        self.limit = model.config.max_position_embeddings
        self._digests: dict | None = None

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt as the model sees it (in the chat template when chat is on)."""
        from jaxtune.generate import prompt_ids

        return prompt_ids(self.tokenizer, prompt, self.template)

    def _skip_reason(self, n: int, max_new_tokens: int) -> str | None:
        if n == 0:
            return "the prompt is empty after tokenization"
        if n + max_new_tokens > self.limit:
            return (f"prompt has {n} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
                    f"{self.limit} positions")
        return None

    def _width(self, longest: int) -> int:
        """Prompt columns for a batch: `bucket` doubled until it holds the longest prompt, at most the context."""
        width = self.bucket
        while width < longest:
            width *= 2
        return min(width, -(-self.limit // self.bucket) * self.bucket)

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int, seed: int, sample: int = 0,
                 progress: Progress | None = None) -> list[Completion]:
        from jaxtune.generate import generate

        _check_max_new(max_new_tokens)
        encoded = [self.encode(p) for p in prompts]
        out: list[Completion | None] = [None] * len(encoded)
        for i, ids in enumerate(encoded):
            reason = self._skip_reason(len(ids), max_new_tokens)
            if reason:
                out[i] = Completion(None, "skipped", reason, len(ids), 0, 0.0)
        todo = sorted((i for i, c in enumerate(out) if c is None), key=lambda i: len(encoded[i]))
        done = len(encoded) - len(todo)
        if progress and done:
            progress(done)
        size = self.cfg.batch_size
        for b, start in enumerate(range(0, len(todo), size)):
            idx = todo[start:start + size]
            batch = [encoded[i] for i in idx]
            batch += batch[:1] * (min(size, 1 << (len(batch) - 1).bit_length()) - len(batch))
            params = dataclasses.replace(self.params, max_new_tokens=max_new_tokens,
                                         seed=derive_seed(seed, sample, b))
            began = time.perf_counter()
            gen = generate(self.model, batch, params, bucket=self._width(max(map(len, batch))))
            seconds = (time.perf_counter() - began) / len(idx)
            for j, i in enumerate(idx):
                stopped = gen.finish_reasons[j] == "stop"
                text = self.tokenizer.decode(gen.tokens[j], skip_special_tokens=True)
                out[i] = Completion(text, gen.finish_reasons[j], None, len(encoded[i]),
                                    len(gen.tokens[j]) + stopped, seconds)
            done += len(idx)
            if progress:
                progress(done)
        return out

    def fingerprint(self) -> dict:
        if self._digests is None and self.model_dir is not None:
            self._digests = file_digests(self.model_dir)
        template = None if self.template is None else hashlib.sha256(self.template.encode("utf-8")).hexdigest()
        return {"kind": "local", "model": self.model_dir, "files": self._digests, "chat": self.template is not None,
                "template_sha256": template, "sampling": self.cfg.sampling(), "batch_size": self.cfg.batch_size,
                "bucket": self.bucket}


# ------------------------------------------------------------------------------------------------ cache


class RequestCache:
    """Endpoint answers on disk, one JSON file per request (`root/ab/abcd….json`), written atomically. The
    key covers everything that decides the answer, so a hit is the answer that request got; only
    completions that finished ("stop"/"length") are stored."""

    def __init__(self, root: str | Path | None = None):
        from jaxtune.cache import cache_dir

        self.root = Path(root) if root is not None else cache_dir() / "requests"
        self._warned = False

    @staticmethod
    def key(request: dict, sample: int) -> str:
        blob = json.dumps({"request": request, "sample": sample}, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        """The stored completion (0 seconds: nothing was spent on it now); None if absent or unreadable."""
        try:
            c = json.loads(self.path(key).read_text(encoding="utf-8"))["completion"]
            hit = Completion(c["text"], c["finish"], None, int(c["tokens_in"]), int(c["tokens_out"]), 0.0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return hit if hit.ok and isinstance(hit.text, str) else None

    def put(self, key: str, request: dict, sample: int, completion: Completion) -> None:
        from jaxtune.files import write_text_atomic

        if not completion.ok:
            return
        doc = {"request": request, "sample": sample, "completion": dataclasses.asdict(completion)}
        try:
            self.path(key).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path(key), json.dumps(doc, ensure_ascii=False) + "\n")
        except OSError as e:
            if not self._warned:
                self._warned = True
                print(f"[jaxtune] could not write the request cache in {self.root} ({e}); answers are not cached",
                      file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- endpoint


class EndpointError(ValueError):
    """The endpoint refused a request in a way that would fail every request (key, URL, model, parameters)."""


def _retry_after(headers) -> float | None:
    """Seconds the server asked to wait (`Retry-After`: seconds or an HTTP date), None if absent or unreadable."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _status_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message") if isinstance(inner, dict) else inner
        return _one_line(msg if isinstance(msg, str) else json.dumps(body))
    return _one_line(body if isinstance(body, str) and body else e.message)


class EndpointTeacher:
    """Chat-completions from an OpenAI-compatible server through the `openai` client with its own retries
    off, so one policy (see `TeacherConfig`) applies: `max_concurrency` requests in flight, retry with
    capped exponential backoff, and after `max_retries` a Completion with finish "error" while the run goes
    on. Identical requests within one call are sent once. Each request carries `seed = derive_seed(seed,
    sample)`, so K samples are K distinct requests."""

    def __init__(self, cfg: TeacherConfig, *, cache: RequestCache | None = None, client=None):
        if cfg.kind != "endpoint":
            raise ValueError(f"teacher.kind: {cfg.kind!r}; EndpointTeacher needs kind: endpoint")
        self.cfg, self.cache = cfg, cache
        if client is None:
            import openai

            client = openai.OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "none",
                                   max_retries=0, timeout=cfg.timeout_s)
        self.client = client

    def request(self, prompt: str, max_new_tokens: int, seed: int, sample: int) -> dict:
        """The request as sent (less the key), which is also what the cache key covers."""
        cfg = self.cfg
        return {"base_url": cfg.base_url, "model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k, "stop": list(cfg.stop),
                "max_tokens": max_new_tokens, "seed": derive_seed(seed, sample)}

    def _fatal(self, status, e) -> EndpointError:
        hint = f" (is ${self.cfg.api_key_env} set?)" if status in (401, 403) else ""
        return EndpointError(f"endpoint {self.cfg.base_url} (model {self.cfg.model!r}) answered HTTP {status}: "
                             f"{_status_message(e)}{hint}; every request would fail, so the run stops. Check "
                             "teacher.base_url, teacher.model and the key")

    def _call(self, req: dict) -> Completion:
        extra = {"top_k": req["top_k"]} if req["top_k"] else None
        resp = self.client.chat.completions.create(
            model=req["model"], messages=req["messages"], temperature=req["temperature"], top_p=req["top_p"],
            max_tokens=req["max_tokens"], seed=req["seed"], stop=req["stop"] or None, extra_body=extra,
            timeout=self.cfg.timeout_s)
        try:
            choice = resp.choices[0]
            text, reason = choice.message.content, choice.finish_reason
        except (AttributeError, IndexError, TypeError):
            raise EndpointError(f"endpoint {self.cfg.base_url} (model {self.cfg.model!r}) answered with something "
                                f"that is not a chat completion ({_one_line(repr(resp), 120)}); check "
                                "teacher.base_url (it usually ends in /v1)") from None
        usage = getattr(resp, "usage", None)
        tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
        tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
        if text is None:
            return Completion(None, "error", f"the response has no text (finish_reason {reason!r})",
                              tokens_in, tokens_out, 0.0)
        return Completion(text, "length" if reason == "length" else "stop", None, tokens_in, tokens_out, 0.0)

    def _send(self, req: dict, halt: threading.Event) -> Completion:
        import openai

        cfg = self.cfg
        began = time.perf_counter()
        for attempt in range(cfg.max_retries + 1):
            wait = None
            try:
                c = self._call(req)
                return dataclasses.replace(c, seconds=time.perf_counter() - began)
            except openai.APIStatusError as e:
                if e.status_code not in _RETRY_STATUSES and e.status_code < 500:
                    raise self._fatal(e.status_code, e) from None
                failure, wait = f"HTTP {e.status_code}", _retry_after(e.response.headers)
                message = _status_message(e)
            except openai.APITimeoutError:
                failure, message = "timeout", f"no answer within teacher.timeout_s={cfg.timeout_s}s"
            except openai.APIConnectionError as e:
                failure, message = "connection error", _one_line(f"{e.message} {e.__cause__ or ''}")
            if attempt < cfg.max_retries:
                delay = cfg.backoff_s * 2 ** attempt if wait is None else wait
                delay = min(delay, cfg.max_backoff_s)
                # A little jitter so requests that failed together do not all return at the same instant.
                if halt.wait(delay * (1 + 0.1 * random.random())):
                    break
        return Completion(None, "error", f"{failure} after {attempt + 1} attempts: {message}", 0, 0,
                          time.perf_counter() - began)

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int, seed: int, sample: int = 0,
                 progress: Progress | None = None) -> list[Completion]:
        _check_max_new(max_new_tokens)
        requests = [self.request(p, max_new_tokens, seed, sample) for p in prompts]
        keys = [RequestCache.key(r, sample) for r in requests]
        counts: dict[str, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        results: dict[str, Completion] = {}
        if self.cache is not None and self.cfg.cache:
            for k in counts:
                hit = self.cache.get(k)
                if hit is not None:
                    results[k] = hit
        done = sum(counts[k] for k in results)
        if progress and done:
            progress(done)
        todo = {k: r for k, r in zip(keys, requests) if k not in results}
        if todo:
            self._run(todo, sample, results, counts, done, progress)
        return [results[k] for k in keys]

    def _run(self, todo: dict, sample: int, results: dict, counts: dict, done: int, progress) -> None:
        halt = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(self.cfg.max_concurrency, thread_name_prefix="jaxtune-teacher")
        futures = {pool.submit(self._send, req, halt): k for k, req in todo.items()}
        try:
            for fut in concurrent.futures.as_completed(futures):
                k = futures[fut]
                results[k] = fut.result()
                if self.cache is not None and self.cfg.cache:
                    self.cache.put(k, todo[k], sample, results[k])
                done += counts[k]
                if progress:
                    progress(done)
        except BaseException:
            halt.set()  # requests in flight end at their timeout at the latest; none is retried
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def fingerprint(self) -> dict:
        return {"kind": "endpoint", "base_url": self.cfg.base_url, "model": self.cfg.model, "chat": True,
                "sampling": self.cfg.sampling()}


# ---------------------------------------------------------------------------------------------- factory


def teacher_from_config(cfg: TeacherConfig, *, base_model_dir: str | Path, cache_dir: str | Path | None = None,
                        bucket: int = 64, template: str | None = None) -> Teacher:
    """The teacher a recipe section describes; a local one loads `cfg.model`, else the base model, and
    wraps prompts in `template` (None: the tokenizer's own) when chat is on."""
    if cfg.kind == "endpoint":
        return EndpointTeacher(cfg, cache=RequestCache(cache_dir) if cfg.cache else None)
    from jaxtune.hf.load import load_pretrained, load_tokenizer

    model_dir = str(cfg.model or base_model_dir)
    return LocalTeacher(load_pretrained(model_dir), load_tokenizer(model_dir), cfg, bucket=bucket,
                        model_dir=model_dir, template=template)


def as_generate_fn(teacher: Teacher) -> GenerateFn:
    """The `(prompts, max_new_tokens, seed) -> texts` callable Self-Instruct and SDFT take; a skipped or
    failed prompt gives "" (which their checks reject and count)."""

    def generate_fn(prompts: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
        done = teacher.complete(list(prompts), max_new_tokens=max_new_tokens, seed=seed)
        return [c.text if c.ok and c.text is not None else "" for c in done]

    return generate_fn
