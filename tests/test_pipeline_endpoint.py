"""Round 1's generate stage with an OpenAI-compatible teacher and Self-Instruct, against a real HTTP server on
localhost that answers by what it is asked: numbered lists of new instructions for Self-Instruct prompts, and
answers that follow some constraints (title, end phrase, postscript; lowercase from a task's second sample
on) and ignore others (bullet lists, JSON), with one HTTP 500 on the way. Round 0's steering results are
written by hand so the allocation has evidence. No GPU; of the base model, only its tokenizer is loaded
(and its weights by the last test)."""

import hashlib
import json
import random
import re
import threading
from collections import Counter

import pytest
from test_curate_teachers import FakeServer, error

from jaxtune.curate.constraints import GENERIC, failed_constraints
from jaxtune.pipeline import manifest
from jaxtune.pipeline.config import load_pipeline
from jaxtune.pipeline.context import Context, round_dir
from jaxtune.pipeline.run import open_run_dir, run_stage

KEY_ENV, KEY = "JAXTUNE_TEST_TEACHER_KEY", "sk-test-pipeline-1234"
LOWER, BULLETS = "change_case:english_lowercase", "detectable_format:number_bullet_lists"
TASKS, SAMPLES = 6, 3

VERBS = ("Explain", "Describe", "Summarize", "Compare", "Suggest", "Outline", "Recommend", "Plan")
TOPICS = ("coral reefs", "medieval castles", "solar panels", "sourdough bread", "chess openings", "volcanoes",
          "honey bees", "city parks", "jazz history", "rain gardens", "paper airplanes", "tide pools",
          "glass blowing", "desert plants", "moon phases", "bicycle repair")
FORMS = ("{verb} the basics of {topic} for {who}.", "{verb} three ways {topic} could matter to {who}.",
         "{verb} what {who} should know before learning about {topic}.")
WHO = ("a curious child", "a busy parent", "a new student", "a retired teacher", "a small shop owner")


class Teacher:
    """What the fake endpoint answers, by request."""

    def __init__(self, chat_style: bool = False):
        self.chat_style = chat_style
        self.instructions: set[str] = set()
        self.first_seed: dict[str, int] = {}  # per prompt: the seed of its first sample
        self.failed_once: dict | None = None
        self.lock = threading.Lock()

    def new_instructions(self, prompt: str, seed: int) -> str:
        """The open numbered list continued with five new instructions (the prompt ends at "N.")."""
        rng = random.Random(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest())
        n = int(prompt.rstrip().rsplit("\n", 1)[-1].rstrip("."))
        items = [rng.choice(FORMS).format(verb=rng.choice(VERBS), topic=topic, who=rng.choice(WHO))
                 for topic in rng.sample(TOPICS, 5)]
        with self.lock:
            self.instructions.update(items)
        if self.chat_style:  # as a chat model answers: a preamble, the whole list numbered, no trailing newline
            return "Here are some new tasks:\n\n" + "\n".join(f"{n + i}. {text}" for i, text in enumerate(items))
        return " " + "\n".join(f"{n + i}. {text}" if i else text for i, text in enumerate(items)) + "\n\n"

    @staticmethod
    def answer(prompt: str, lowercase: bool) -> str:
        text = "This answer covers the request in plain words."
        if "double angular brackets" in prompt:
            text = "<<A Short Answer>>\n" + text
        if "postscript starting with P.S." in prompt:
            text += "\nP.S. Thanks for asking."
        end = re.search(r'Finish your answer with the exact phrase "([^"]+)"', prompt)
        if end:
            text += " " + end.group(1)
        if lowercase and "entire answer in lowercase" in prompt:
            text = text.lower()
        return text  # bullet lists and JSON are never followed

    def __call__(self, n: int, body: dict):
        prompt = body["messages"][-1]["content"]
        if "Come up with a series of tasks" in prompt:
            text = self.new_instructions(prompt, body["seed"])
        else:
            with self.lock:
                first = self.failed_once is None
                if first:
                    self.failed_once = body
                resampled = self.first_seed.setdefault(prompt, body["seed"]) != body["seed"]
            if first:
                return error(500, "overloaded")
            text = self.answer(prompt, lowercase=resampled)
        payload = FakeServer.success(body)
        payload["choices"][0]["message"]["content"] = text
        return 200, {}, payload


def steering_rows() -> list[dict]:
    """Round 0's steering results: every catalogue kind seen once and followed, except lowercase (failed
    twice of two) and bullet lists (failed once of two). With weight = fail_rate: 4 and 2 of 6 tasks."""
    rows = [{"key": f"k{i}", "instruction_id_list": [iid], "followed": [True], "task_type": None}
            for i, iid in enumerate(GENERIC) if iid != LOWER]
    rows += [{"key": "l1", "instruction_id_list": [LOWER], "followed": [False], "task_type": None},
             {"key": "l2", "instruction_id_list": [LOWER, BULLETS], "followed": [False, False], "task_type": None}]
    return [{**r, "prompt": "p", "response": "r", "followed_loose": r["followed"]} for r in rows]


def recipe(tmp_path, url, stories_dir, assets_dir):
    data = assets_dir / "data"
    text = f"""\
model: {{path: {stories_dir}}}
domain: {{seeds: {data / "self_instruct_seed_tasks.jsonl"}, eval: {data / "ifeval_input_data.jsonl"}, template: null}}
teacher: {{kind: endpoint, base_url: "{url}", model: served-teacher, api_key_env: {KEY_ENV}, temperature: 0.7,
          backoff_s: 0.01, max_backoff_s: 0.05, max_concurrency: 4}}
generate: {{method: self-instruct, tasks: {TASKS}, max_constraints: 2, samples: {SAMPLES}, max_new_tokens: 64,
           self_instruct: {{prompts_per_round: 2, max_new_tokens: 128}}}}
allocation: {{weight: fail_rate, by: [instruction]}}
tune: {{train: {{steps: 2}}}}
output: {{run_dir: {tmp_path / "run"}, progress: false}}
"""
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return load_pipeline(path)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def start(tmp_path, monkeypatch, stories_dir, assets_dir, server):
    """The run dir with round 0's steering results faked, and round 1's generate stage run once."""
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("JAXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = recipe(tmp_path, server.url, stories_dir, assets_dir)
    run_dir = open_run_dir(cfg)
    steering = round_dir(run_dir, 0) / "evaluate" / "steering.jsonl"
    steering.parent.mkdir(parents=True)
    steering.write_text("".join(json.dumps(r) + "\n" for r in steering_rows()))
    lines = []
    first = run_stage(Context(cfg, run_dir, lines.append), 1, "generate", force=False)
    return cfg, run_dir, first, lines


@pytest.fixture()
def generated(tmp_path, monkeypatch, stories_dir, assets_dir):
    teacher = Teacher()
    with FakeServer(teacher) as server:
        cfg, run_dir, first, lines = start(tmp_path, monkeypatch, stories_dir, assets_dir, server)
        yield cfg, run_dir, server, teacher, first, lines


def test_tasks_come_from_the_teachers_instructions_with_allocated_constraints(generated):
    _, run_dir, server, teacher, first, _ = generated
    out = round_dir(run_dir, 1) / "generate"
    kept, rejected = _jsonl(out / "tasks.jsonl"), _jsonl(out / "rejects.jsonl")
    tasks = kept + rejected
    assert not first.skipped and first.counts["in"] == len(tasks) == TASKS
    assert first.counts["made"]["instructions"] == TASKS
    assert sum("Come up with a series of tasks" in r["messages"][-1]["content"] for r in server.requests) >= 1
    # The data cost counts every answered request, instruction writing included (the server bills 7 tokens
    # per completion; the one HTTP 500 was not answered).
    assert first.counts["teacher_usage"]["tokens_out"] == 7 * (len(server.requests) - 1)
    # Each task is one of the instructions the teacher wrote, with its constraints' phrases appended.
    for t in tasks:
        assert any(t["prompt"].startswith(i + " ") for i in teacher.instructions), t["prompt"]
        assert 1 <= len(t["instruction_id_list"]) <= 2 and set(t["instruction_id_list"]) <= set(GENERIC)
        assert len(set(t["instruction_id_list"])) == len(t["instruction_id_list"]) == len(t["kwargs"])
        assert t["task_type"] == t["prompt"].split()[0].lower()
    assert len({t["key"] for t in tasks}) == TASKS and len({t["prompt"] for t in tasks}) == TASKS
    # The allocation follows round 0's failures, and each task's first constraint is as allocated.
    alloc = json.loads((out / "allocation.json").read_text())["instruction"]
    assert alloc["evidence"][LOWER] == {"failed": 2, "n": 2} and alloc["evidence"][BULLETS] == {"failed": 1, "n": 2}
    assert {k: v for k, v in alloc["counts"].items() if v} == {LOWER: 4, BULLETS: 2}
    assert Counter(t["instruction_id_list"][0] for t in tasks) == Counter({LOWER: 4, BULLETS: 2})
    by = first.counts["by_instruction"]
    assert by[LOWER]["tasks"] >= 4 and by[BULLETS]["tasks"] >= 2 and by[BULLETS]["kept"] == 0


def test_kept_responses_pass_and_drops_are_counted_by_reason(generated):
    _, run_dir, _, _, first, lines = generated
    out = round_dir(run_dir, 1) / "generate"
    kept, rejected = _jsonl(out / "tasks.jsonl"), _jsonl(out / "rejects.jsonl")
    assert kept and rejected and first.counts["out"] == len(kept)
    for t in kept:
        assert failed_constraints(t, t["response"]) == []
        assert 0 <= t["sample"] < SAMPLES
    assert any(LOWER in t["instruction_id_list"] for t in kept)
    for t in kept:  # the teacher lowercases only when asked: the check is not passing by accident
        assert (t["response"] == t["response"].lower()) == (LOWER in t["instruction_id_list"])
    for r in rejected:
        failed = failed_constraints(r, r["last_response"])
        assert failed and r["reason"] == f"failed {failed[0]}"
    assert first.counts["dropped"] == dict(Counter(r["reason"] for r in rejected))
    assert first.counts["dropped"][f"failed {BULLETS}"] >= 2  # every bullet-list task, at least
    assert all(reason.startswith("failed ") for reason in first.counts["dropped"])
    assert first.counts["in"] == first.counts["out"] + sum(first.counts["dropped"].values())
    assert any(line.startswith(f"[pipeline] round 1 generate: {TASKS} in, {len(kept)} out") for line in lines)


def test_each_sample_is_another_request_and_a_500_was_retried(generated):
    _, run_dir, server, teacher, _, _ = generated
    out = round_dir(run_dir, 1) / "generate"
    kept, rejected = _jsonl(out / "tasks.jsonl"), _jsonl(out / "rejects.jsonl")
    retried = teacher.failed_once
    assert retried is not None

    def sent(task):
        return [q for q in server.requests if q["messages"] == [{"role": "user", "content": task["prompt"]}]]

    def extra(task):  # the request that got HTTP 500 went twice
        return int(task["prompt"] == retried["messages"][-1]["content"])

    for t in rejected:  # asked K times, each with another seed
        seeds = {q["seed"] for q in sent(t)}
        assert len(seeds) == SAMPLES and len(sent(t)) == SAMPLES + extra(t)
        assert {q["max_tokens"] for q in sent(t)} == {64} and {q["model"] for q in sent(t)} == {"served-teacher"}
    for t in kept:  # asked until a sample passed: lowercase only comes with the second sample
        assert t["sample"] == (1 if LOWER in t["instruction_id_list"] else 0)
        assert len({q["seed"] for q in sent(t)}) == t["sample"] + 1 and len(sent(t)) == t["sample"] + 1 + extra(t)
    assert any(t["sample"] == 1 for t in kept)
    # The request that got HTTP 500 was sent again, unchanged, and its task went on as any other.
    assert sum(q == retried for q in server.requests) == 2
    assert any(t["prompt"] == retried["messages"][-1]["content"] for t in kept + rejected)
    assert not any(r["reason"].startswith("error") for r in rejected)


def test_a_second_run_is_skipped_and_sends_nothing(generated):
    cfg, run_dir, server, _, first, _ = generated
    out = round_dir(run_dir, 1) / "generate"
    before, sent = manifest.tree_hashes(out, manifest.LOG_NAMES), len(server.requests)
    lines = []
    again = run_stage(Context(cfg, run_dir, lines.append), 1, "generate", force=False)
    assert again.skipped and again.counts == first.counts and len(server.requests) == sent
    assert lines == [f"[pipeline] round 1 generate: up to date, skipped ({first.counts['out']} kept)"]
    # Forced to run again: every request is answered from the request cache, to the same bytes.
    forced = run_stage(Context(cfg, run_dir, lambda _: None), 1, "generate", force=True)
    assert not forced.skipped and len(server.requests) == sent
    assert manifest.tree_hashes(out, manifest.LOG_NAMES) == before
    # A changed teacher setting is another stage: it runs, and asks the server again.
    changed = load_pipeline(run_dir.parent / "pipeline.yaml", ["teacher.temperature=0.5"])
    assert not run_stage(Context(changed, run_dir, lambda _: None), 1, "generate", force=False).skipped
    assert len(server.requests) > sent


def test_the_key_comes_from_the_environment_and_is_never_written(generated, tmp_path):
    _, run_dir, server, _, _, _ = generated
    assert server.auth and set(server.auth) == {f"Bearer {KEY}"}
    assert list((tmp_path / "cache").rglob("*.json"))  # answers were cached, under JAXTUNE_CACHE_DIR
    for path in [*run_dir.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    man = manifest.read_manifest(round_dir(run_dir, 1) / "generate")
    assert man["teacher"]["config"]["api_key_env"] == KEY_ENV and man["teacher"]["model"] is None


def test_a_chat_style_list_of_instructions_is_parsed(tmp_path, monkeypatch, stories_dir, assets_dir):
    teacher = Teacher(chat_style=True)
    with FakeServer(teacher) as server:
        _, run_dir, first, _ = start(tmp_path, monkeypatch, stories_dir, assets_dir, server)
    out = round_dir(run_dir, 1) / "generate"
    tasks = _jsonl(out / "tasks.jsonl") + _jsonl(out / "rejects.jsonl")
    assert first.counts["made"]["instructions"] == len(tasks) == TASKS
    assert all(any(t["prompt"].startswith(i + " ") for i in teacher.instructions) for t in tasks)


def test_the_endpoints_stop_strings_stay_with_the_endpoint(tmp_path, stories_dir, assets_dir):
    recipe(tmp_path, "http://127.0.0.1:9/v1", stories_dir, assets_dir)
    cfg = load_pipeline(tmp_path / "pipeline.yaml", ["teacher.stop=['###']"])  # a string, not a token of the base
    ctx = Context(cfg, tmp_path / "run", lambda _: None)
    sampler = ctx.model_teacher(ctx.base_model, temperature=0.0)  # what evaluate and distill sample the base with
    assert sampler.cfg.stop == () and sampler.params.stop_ids
