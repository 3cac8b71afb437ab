"""Self-Instruct and SDFT end to end with the real stories260K model. It writes children's stories, not
tasks, so most of what it generates is rejected: the test is that every stage runs on real model output
and the counts account for every candidate."""

from __future__ import annotations

import pytest

from jaxtune.curate import records
from jaxtune.curate import self_instruct as si
from jaxtune.curate.generator import load_generate_fn, model_generate_fn
from jaxtune.curate.sdft import SdftConfig, check_rewrite, distill

# One prompt bucket (the whole 512-position context), batch size and length for every call below, so the
# decode program is compiled for very few shapes.
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "batch_size": 4, "bucket": 512}


@pytest.fixture(scope="module")
def stories_fn(stories_dir):
    return load_generate_fn(str(stories_dir), **SAMPLING)


def _accounted(report) -> bool:
    return report.records_in == report.records_out + sum(report.rejected.values()) and report.records_out >= 0


def test_self_instruct_runs_on_stories260k(stories_fn, assets_dir):
    seeds = [s for s in si.load_seed_tasks(assets_dir / "data" / "self_instruct_seed_tasks.jsonl")
             if len(s.instruction.split()) <= 10 and all(len((i + o).split()) <= 20 for i, o in s.instances)]
    cfg = si.SelfInstructConfig(num_instructions=4, prompt_tasks=4, prompt_machine=1, prompts_per_round=4,
                                patience=1, classify_shots=0, instance_shots=1, max_new_tokens=96,
                                instance_max_new_tokens=96)
    calls = []

    def recording(prompts, max_new_tokens, seed):
        calls.append(len(prompts))
        return stories_fn(prompts, max_new_tokens, seed)

    rows, (instr, inst) = si.self_instruct_dataset(recording, seeds, cfg)
    print(instr.summary(), inst.summary(), sep="\n")
    assert instr.records_in >= 4 and _accounted(instr) and _accounted(inst)
    # 96 tokens of story nearly always hold a full line, which passes as an "instruction"
    assert instr.records_out >= 1 and inst.records_in >= 1
    rounds = instr.notes["rounds"]
    assert calls[:rounds] == [4] * rounds
    assert calls[rounds:] == ([instr.records_out] if instr.records_out else [])  # one instance call per kept
    for row in rows:
        assert si.check_instruction(row["instruction"], True, cfg) is None and row["output"].strip()
    assert len(rows) == inst.records_out


def test_sdft_runs_on_stories260k(stories_fn, assets_dir):
    from jaxtune.data.formats import load_records

    convs, _ = load_records(assets_dir / "data" / "alpaca_data_1k.json")
    short = [c for c in convs if len(records.full_text(c).split()) <= 25][:4]
    out, report = distill(stories_fn, short, SdftConfig(max_new_tokens=96))
    assert len(out) == 4 and _accounted(report)
    assert report.notes["rewrites kept"] + report.notes["fell back to the reference"] == 4
    for before, after in zip(short, out):
        ref, new = records.responses(before)[-1], records.responses(after)[-1]
        assert new == ref or check_rewrite(new, ref, SdftConfig()) is None
    assert len(report.rejects) == report.notes["fell back to the reference"]


def test_prompt_longer_than_the_model_is_skipped(stories_fn):
    assert stories_fn(["word " * 600, "Once upon a time"], 16, 0)[0] == ""


def test_chat_template_wraps_prompts(stories_dir):
    from jaxtune.curate.teachers import LocalTeacher, TeacherConfig
    from jaxtune.hf.load import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(stories_dir)
    model = load_pretrained(stories_dir)
    with pytest.raises(ValueError, match="has no chat template"):
        model_generate_fn(model, tokenizer, chat=True)
    tokenizer.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    out = model_generate_fn(model, tokenizer, chat=True, **SAMPLING)(["Name a planet."] * 4, 96, 0)
    assert len(out) == 4 and all(isinstance(o, str) for o in out)
    wrapped = tokenizer("User: Name a planet.\nAssistant:", add_special_tokens=False)["input_ids"]
    assert LocalTeacher(model, tokenizer, TeacherConfig(chat=True)).encode("Name a planet.") == [
        tokenizer.bos_token_id, *wrapped]
    assert LocalTeacher(model, tokenizer, TeacherConfig(chat=False)).encode("Name a planet.") == tokenizer.encode(
        "Name a planet.")
