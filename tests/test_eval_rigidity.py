"""Over-rigidity probe: the v1 probe file is well-formed and satisfiable, and responses land in the right category."""

import argparse
import json

import pytest

from jaxtune.cli.eval import register
from jaxtune.eval.ifeval import IFEvalDataError
from jaxtune.eval.rigidity import (
    CATEGORIES,
    DEFAULT_PROBES,
    load_probes,
    score_probe,
    score_rigidity,
)

# One hand-written response per v1 probe that meets both sides: proof that no probe is impossible.
BOTH_SIDES = {
    "pros_cons_bullets_short": "* Pro: no commute.\n* Pro: flexible hours.\n* Con: isolation.\n"
    "* Con: blurred boundaries.",
    "sections_few_sentences": "SECTION 1\nA vaccine shows the body a harmless piece of a germ.\n"
    "SECTION 2\nImmune cells learn its shape and make antibodies.\n"
    "SECTION 3\nMemory cells then react fast when the real germ arrives.",
    "titled_essay_short": "<<Green Roofs>>\nCities can grow food.\n***\nRooftops catch sun and rain.\n***\n"
    "Neighbours share the harvest.\n***\nGardens cool the streets.",
    "json_with_explanation": '```json\n{"city": "Lisbon", "reason": "Lisbon is worth a visit because its hills give '
    "sweeping views over the river at every turn, and because the food is excellent and affordable. Trams rattle "
    "through old neighbourhoods, the light is soft in the evenings, the museums are small but rich, and the "
    'beaches are a short train ride away, so a single trip combines culture, history and the sea."}\n```',
    "highlights_short_summary": "*Royal debt*, *bread prices*, *unfair taxes*, *Enlightenment ideas* and "
    "*a weak king* pushed France into revolution.",
    "recipe_bullets_forbidden_verbs": "* Whisk flour, sugar and baking powder.\n* Beat in milk and one egg.\n"
    "* Heat a buttered pan.\n* Pour a small ladle of batter.\n* Flip when bubbles appear.\n* Serve with syrup.",
    "single_paragraph_detail": '"A bill usually begins when a member of Congress introduces it in the House or the '
    "Senate. It is referred to a committee, which studies it, holds hearings, proposes amendments and decides "
    "whether to send it back to the full chamber. If the committee approves it, the chamber debates the bill and "
    "votes on it. A bill that passes one chamber goes to the other chamber, which follows a similar process of "
    "committee review, debate and voting. When the two chambers pass different versions, a conference committee "
    "negotiates a single text that both must approve again. The final bill is then sent to the President, who "
    "can sign it into law or veto it. Congress can override a veto with a two-thirds vote in both chambers, and "
    "if the President takes no action for ten days while Congress is in session, the bill becomes law without a "
    "signature. Each step gives citizens and their representatives a chance to shape or stop the proposal before it "
    'becomes binding."',
    "two_slogans_tiny": "Fresh bread, friendly faces.\n******\nBaked at dawn, gone by noon.",
    "fruit_sentence_no_commas": "Guava and kiwi and orange and lemon and strawberry and papaya and pineapple and "
    "mango are all rich in vitamin C.",
    "thank_you_postscript_short": "Thanks so much for covering my shift yesterday, Sam. I owe you one!\n"
    "P.S. Coffee is on me.",
    "french_sections": "Section 1\nL'eau des océans s'évapore sous l'effet de la chaleur du soleil et forme des "
    "nuages dans le ciel.\nSection 2\nLa pluie et la neige ramènent ensuite cette eau vers les rivières, les lacs "
    "et la mer.",
    "offer_template_short": "Dear [name],\nWe offer you the role of [position] at [company], starting [date], "
    "with a salary of [salary]. Please reply by [deadline].\nRegards,\n[manager]",
    "lab_warning_caps_short": "ALWAYS WEAR GOGGLES. NEVER TASTE ANYTHING. REPORT SPILLS IMMEDIATELY.",
    "beach_list_few_sentences": "<<Beach Day Essentials>>\n* Sunscreen\n* Towel\n* Water bottle\n* Hat\n* Snacks",
    "exercise_highlights_forbidden": "Regular exercise brings *stronger muscles and bones*, *better sleep* and "
    "*a brighter mood*. It also builds stamina for daily life.",
    "autumn_paragraphs_short": "Autumn arrives with cool mornings.\n\nLeaves turn red and gold, then drift "
    "down.\n\nEvenings grow short and cosy.",
    "sky_blue_two_sentences_endphrase": "Air molecules scatter blue sunlight far more than red light, so blue "
    "reaches our eyes from every direction. Any other questions?",
    "router_bullets_one_sentence": "* Unplug the router\n* wait thirty seconds\n* plug it back in\n"
    "* wait until the lights turn steady.",
    "book_quote_keywords": '"I would recommend Hatchet by Gary Paulsen. It is a gripping adventure about a boy '
    "who survives alone in the Canadian wilderness after a plane crash. With only a hatchet, he learns to build "
    "shelter, find food and keep going when everything goes wrong. The story celebrates courage and resilience, "
    "and although he is alone, the memories of friendship and family help him endure. It is short, fast and "
    'thoughtful, which makes it ideal for a fourteen-year-old reader."',
    "eiffel_lowercase_facts": "construction of the eiffel tower began in 1887 and finished in 1889 for the world's "
    "fair in paris. the company of gustave eiffel designed and built the iron lattice tower.",
    "headphones_sections_short": "SECTION 1 Silence the world.\nSECTION 2 Active noise cancelling.\n"
    "SECTION 3 Thirty-hour battery.\nSECTION 4 Soft memory-foam cushions.\nSECTION 5 Folds flat for travel.",
    "person_json_short": '{"name": "Ada", "age": 34, "city": "Oslo", "job": "pilot", "pet": "cat", '
    '"hobby": "chess", "food": "soup", "color": "teal"}',
    "inflation_three_bullets_long": "* Demand-pull inflation happens when households, firms and governments want to "
    "buy more goods and services than the economy can produce, for example after a stimulus programme or a credit "
    "boom, so sellers raise prices because customers keep buying.\n"
    "* Cost-push inflation comes from rising production costs such as energy, raw materials or wages; when oil "
    "prices jump or supply chains break down, firms pass those higher costs on to consumers through higher "
    "prices across many sectors.\n"
    "* Expectations and money growth matter as well: if people expect prices to keep rising they ask for higher "
    "wages and buy earlier, and if the central bank lets the money supply grow much faster than output, the "
    "extra money chases the same goods and pushes the general price level up over time, which is why central banks "
    "watch inflation expectations closely and raise interest rates when they start to drift upward, even if that "
    "slows hiring and growth for a while.",
    "mystery_openings_detail": "The fog rolled in at dusk. Somewhere a lantern swung on a hook. Nobody in the "
    "village admitted to lighting it.\n******\nMargaret found the lantern still warm on the doorstep. The fog hid "
    "the footprints. She locked the door and counted to ten.",
    "meeting_summary_caps_lowercase_keywords": "* the launch deadline is march first\n"
    "* the budget is capped at forty thousand\n* priya is the owner of the vendor contract",
}


@pytest.fixture(scope="module")
def probes():
    return load_probes()



def test_v1_probe_file_is_well_formed(probes):
    assert DEFAULT_PROBES.name == "over_rigidity_v1.jsonl"
    assert 20 <= len(probes) <= 30
    assert len({p.id for p in probes}) == len(probes)
    for p in probes:
        assert p.format and p.content and p.tension, p.id


def test_every_probe_has_a_both_sides_reference(probes):
    assert set(BOTH_SIDES) == {p.id for p in probes}
    for p in probes:
        result = score_probe(p, BOTH_SIDES[p.id])
        assert result.category == "both", (p.id, result.format_checks, result.content_checks)


def test_categories_for_rigid_and_loose_responses(probes):
    probe = next(p for p in probes if p.id == "pros_cons_bullets_short")
    long_list = "* Pro: " + "no commute saves time every day " * 8 + "\n* Pro: flexible\n* Con: lonely\n* Con: noisy"
    short_prose = "Working from home saves commuting time but can feel isolating."
    assert score_probe(probe, long_list).category == "format_only"
    assert score_probe(probe, short_prose).category == "content_only"
    assert score_probe(probe, long_list.replace("* ", "")).category == "neither"
    assert score_probe(probe, BOTH_SIDES[probe.id]).category == "both"


def test_loose_scoring_forgives_a_preamble(probes):
    probe = next(p for p in probes if p.id == "sky_blue_two_sentences_endphrase")
    answer = "Sure!\n" + BOTH_SIDES[probe.id] + "\nHope that helps."
    assert score_probe(probe, answer).category != "both"
    assert score_probe(probe, answer, loose=True).category == "both"


def test_score_rigidity_counts_and_matching(probes):
    responses = {p.prompt: BOTH_SIDES[p.id] for p in probes}
    responses[probes[0].prompt] = "no"
    result = score_rigidity(probes, responses)
    assert result.counts["both"] == len(probes) - 1
    assert sum(result.counts.values()) == len(probes)
    assert result.fractions["both"] == pytest.approx((len(probes) - 1) / len(probes))
    assert set(result.to_dict()) == {"probe_set", "loose", "counts", "fractions", "rows"}
    by_id = score_rigidity(probes, {p.id: BOTH_SIDES[p.id] for p in probes})
    assert by_id.counts["both"] == len(probes)
    with pytest.raises(IFEvalDataError, match=probes[1].id):
        score_rigidity(probes, {probes[0].id: "x"})
    with pytest.raises(IFEvalDataError, match="2 responses"):
        score_rigidity(probes, ["a", "b"])


def test_bad_probe_file_names_line_and_field(tmp_path):
    good = {"id": "a", "prompt": "p", "format": [{"instruction_id": "detectable_format:title"}],
            "content": [{"instruction_id": "punctuation:no_comma"}]}
    bad = dict(good, id="b", content=[{"instruction_id": "length_constraints:number_words", "kwargs": {}}])
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(IFEvalDataError, match=r"probes.jsonl:2: content\[0\].*num_words"):
        load_probes(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(IFEvalDataError, match="probes.jsonl:2: duplicate probe id"):
        load_probes(path)


def test_cli_writes_rows_and_summary(tmp_path, probes, capsys):
    responses = tmp_path / "resp.jsonl"
    responses.write_text("".join(json.dumps({"prompt": p.prompt, "response": BOTH_SIDES[p.id]}) + "\n" for p in probes))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["rigidity", "--responses", str(responses), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert f"both{len(probes):>14}" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "rigidity_summary.json").read_text())
    assert summary["counts"] == {c: (len(probes) if c == "both" else 0) for c in CATEGORIES}
    rows = (tmp_path / "out" / "rigidity_results.jsonl").read_text().splitlines()
    assert len(rows) == len(probes) and json.loads(rows[0])["category"] == "both"


def test_cli_refuses_unpaired_responses_and_pairs_headed_ones(tmp_path, probes, capsys):
    from jaxtune.cli.main import main
    from jaxtune.eval.ifeval import write_responses

    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"response": BOTH_SIDES[p.id]}) + "\n" for p in reversed(probes)))
    out = str(tmp_path / "out")
    assert main(["eval", "rigidity", "--responses", str(bare), "--out", out]) == 2
    assert "bare.jsonl:1: no 'prompt' field" in capsys.readouterr().err
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"prompt": "Tell me a joke.", "response": "no"}) + "\n")
    assert main(["eval", "rigidity", "--responses", str(unknown), "--out", out]) == 2
    assert "unknown.jsonl:1: prompt 'Tell me a joke.' is not in" in capsys.readouterr().err
    headed = write_responses(tmp_path / "headed.jsonl", [p.prompt for p in probes], [BOTH_SIDES[p.id] for p in probes],
                             with_prompts=False)
    assert main(["eval", "rigidity", "--responses", str(headed), "--out", out]) == 0
    assert f"both{len(probes):>14}" in capsys.readouterr().out
