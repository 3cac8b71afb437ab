"""Training-set arms for the instruction-tuning experiment on the stories domain (`jaxtune.curate.stories`).

Three arms beside the base model's own verified stories: a foreign writer (`foreign_response`) standing in
for responses from another model, a noise model (`noisy_set`) for large unverified training sets, and an
even mix of self and foreign responses (`mix`). Everything is deterministic in its seed and never touches the
global RNG, so an arm rebuilt from the same inputs is the same arm.
"""

from __future__ import annotations

import math
import random
import re

from jaxtune.curate.constraints import failed_constraints
from jaxtune.curate.stories import KINDS, TEMPLATE, Premise
from jaxtune.eval.ifeval_text import count_words

FOREIGN_SOURCE = (
    "Foreign responses come from a deterministic rule-based writer (`experiments/arms.py: foreign_response`) "
    "that stands in for another model's stories: on-premise (the premise's subject, name and action are "
    "parsed from the prompt and opened with), fluent, but in a register the TinyStories model never writes, "
    "literary present-tense narration with adult vocabulary and long sentences (\"Subsequently, Max discovers "
    "a crimson sphere beneath the hawthorn hedge and contemplates its provenance with scrupulous attention.\"). "
    "Each story draws 4 to 7 sentences (fewer when the task caps them) from banks of openers, middles, "
    "closers and keyword sentences filled from word lists, seeded per task and seed. Every constraint is met "
    "by construction and checked by the IFEval checkers before the text is returned: the required word is "
    "used (a word containing it when the same word is also forbidden, as the existence check matches "
    "substrings and the forbidden check whole words), no bank holds a forbidden word and the premise's own "
    "forbidden words are replaced by synonyms, the name is said often enough, the sentence count stays under "
    "the limit, and the asked end phrase closes the story; without one, the story never ends with a trained "
    "end phrase."
)

NOISE_MODEL = (
    "A noisy set of n records is built from every sample the base model generated (verified or not) as "
    "follows, deterministically in the seed: round(n * (1 - duplicated)) distinct samples are drawn uniformly "
    "without replacement; round(n * mismatched) of them get the response of another sample, drawn uniformly "
    "from the samples whose task has a different premise; round(n * truncated) more (among those of two or "
    "more words) get their response cut after a uniformly drawn number of words between 20% and 80% of "
    "its words, at a word boundary; the rest stay raw, unverified, so they fail their constraints or stop "
    "at the token limit as often as the generator did; finally n - round(n * (1 - duplicated)) records are "
    "exact copies of records drawn uniformly with replacement from that set, and the whole is shuffled. The "
    "composition reports the count per noise label, how many records fail their own prompt's constraints, "
    "and how many responses are unfinished (truncated, or stopped by the token limit)."
)

NOISE_LABELS = ("raw", "mismatched", "truncated", "duplicated")

END_PHRASES = tuple(KINDS["startend:end_checker"].values)

# -- premise ----------------------------------------------------------------------------------------

_HEAD, _TAIL = TEMPLATE.split("{premise}")
_PROMPT = re.compile(rf"^{re.escape(_HEAD)}(?P<premise>.+?){re.escape(_TAIL)}(?=\s|$)")
_RELATIVE = re.compile(r"^(?P<subject>.+?)\s+(?P<rel>who|whose)\s+(?P<action>.+)$")
_NAMED = re.compile(r"\s+named\s+([A-Z][a-z]+)(?:\s+and\s+([A-Z][a-z]+))?")
_ARTICLE = re.compile(r"^(a|an|the|one)\s+", re.IGNORECASE)
_HUMAN = {"girl": "she", "boy": "he", "woman": "she", "man": "he", "lady": "she", "king": "he", "queen": "she",
          "princess": "she", "prince": "he", "mother": "she", "father": "he", "grandma": "she", "grandpa": "he"}
_FEMININE_NAMES = {"Sue", "Mia", "Daisy", "Kitty", "Shelly", "Bubbles", "Lily", "Anna", "Lucy", "Sara", "Emma",
                   "Zoe", "Amy", "Kim", "Molly", "Rose", "Jenny", "Ella", "Katie", "Nina", "Bella", "Lisa",
                   "Grace", "Fluffy"}
_PRONOUNS = {"he": ("he", "him", "his", "himself"), "she": ("she", "her", "her", "herself"),
             "they": ("they", "them", "their", "themselves")}
_STOP = {"in", "on", "with", "to", "at", "of", "until", "and", "for", "from", "after", "into", "who", "that"}
# In-register replacements for the forbidden words that premises may contain.
_SYNONYMS = {"big": "enormous", "happy": "contented", "saw": "beheld", "wanted": "desired", "very": "exceedingly",
             "said": "remarked"}
# A word containing the required one that the whole-word forbidden check does not match.
_CONTAINING = {"happy": "unhappy", "big": "bigger"}


def premise_of(task: dict) -> str:
    """The premise a stories prompt was composed from, or the whole prompt when it follows another layout."""
    m = _PROMPT.match(task["prompt"])
    return m.group("premise") if m else task["prompt"]


def _scrub(text: str, forbidden: set[str]) -> str:
    for word in sorted(forbidden):
        if word in _SYNONYMS:
            text = re.sub(rf"\b{re.escape(word)}\b", _SYNONYMS[word], text, flags=re.IGNORECASE)
    return text


class _Premise:
    """The parts of a premise the writer needs: names, an epithet, pronouns, the action and its object."""

    def __init__(self, text: str):
        self.name = Premise(text, "", "").name
        m = _RELATIVE.match(text)
        subject, self.rel, self.action = (m["subject"], m["rel"], m["action"]) if m else (text, None, None)
        names = [n for pair in _NAMED.findall(subject) for n in pair if n]
        bare = _NAMED.sub("", subject).strip()
        self.kind = bare  # "a little dog", "two friends", "a dog and a cat"
        self.epithet = " and ".join(_ARTICLE.sub("the ", part.strip()) if _ARTICLE.match(part.strip())
                                    else "the " + part.strip() for part in bare.split(" and "))
        self.plural = len(names) > 1 or bare.split()[0].lower() in {"two", "three", "some", "many"}
        self.names = " and ".join(names) if names else self.epithet
        head = bare.split(" and ")[0].split()[-1].lower()
        if self.plural:
            gender = "they"
        elif head in _HUMAN:
            gender = _HUMAN[head]
        elif self.action and re.search(r"\b(she|her|herself)\b", self.action):
            gender = "she"
        elif self.action and re.search(r"\b(he|him|his|himself)\b", self.action):
            gender = "he"
        else:
            gender = "she" if self.name in _FEMININE_NAMES else "he"
        self.pron, self.obj, self.poss, self.refl = _PRONOUNS[gender]
        self.object = self._object()

    def _object(self) -> str | None:
        """The noun phrase right after the action's verb (and a preposition), e.g. "the piece of cheese";
        a phrase further in is left alone, as it may belong to a clause ("until a friend helps him")."""
        if self.rel != "who":
            return None
        words = self.action.split()
        at = next((i for i, w in enumerate(words[:3]) if w.lower() in ("a", "an", "the")), None)
        if at is None:
            return None
        np = []
        for i, x in enumerate(words[at + 1:at + 5]):
            if x.lower() in _STOP and not (x.lower() == "of" and np and i + at + 2 < len(words)):
                break
            np.append(x)
        return "the " + " ".join(np) if np else None


# -- banks ------------------------------------------------------------------------------------------
# Slots: {S} the subject (name, pronoun or epithet; always in the nominative), {N} the name or epithet in any
# position, {O} {P} {R} object / possessive / reflexive pronouns, {pron} the subject pronoun, verb endings
# {s} {es} {is} {has} {does} {was} agree with the subject's number; the rest are word-list fillers. Openers
# name the subject through {CORE} (names and action); every other template names it once through {S} or {N}.

OPENERS = (
    "It is on an unremarkable {weekday} {tod} that {CORE}.",
    "In the {adj} hours of a {season} {tod}, {CORE}.",
    "Our chronicle begins on a {weather} {weekday}, when {CORE}.",
    "{CORE}, and thereby set{s} in motion a curious sequence of events.",
    "Nobody in the vicinity anticipates that {CORE}, yet that is precisely what transpires.",
    "Although the {tod} promises nothing out of the ordinary, {CORE}.",
    "Under a {weather} sky and against every reasonable expectation, {CORE}.",
    "As the {season} light slants across the {foliage}, {CORE}.",
    "There comes a {tod} when {CORE}, and the consequences are not inconsiderable.",
    "According to the scrupulous record of this modest history, {CORE} on a {weather} {weekday}.",
)

GENERIC_ACTIONS = (
    "embark{s} upon a modest expedition of discovery",
    "set{s} out to survey the surrounding countryside",
    "resolve{s} to investigate a small mystery in the neighbourhood",
)

MIDDLES = (
    "{conn}, {S} discover{s} {a_adj} {thing} beneath {place} and contemplate{s} its {abstract} with "
    "scrupulous attention.",
    "{S} {is} seized by a sudden {emotion}, the sort that arrives unbidden and departs without apology.",
    "For some minutes {S} stand{s} motionless beside {place}, listening to {sound}.",
    "{conn}, {S} proceed{s} {adv} along {place}, cataloguing every {thing} and every shadow.",
    "The air near {place} smells of wet earth and woodsmoke, and {S} inhale{s} it {adv}.",
    "{S} reflect{s}, not without a certain {emotion}, upon the {abstract} of ordinary things.",
    "{S} begin{s} to suspect that the world is considerably more {adj} than anyone had supposed.",
    "A {adj} light falls across {place}, and {S} pause{s} to admire the {abstract} of the scene.",
    "{S} {has} never been especially given to sentiment, yet {pron} find{s} {R} unexpectedly moved.",
    "{conn}, {S} encounter{s} an elderly heron who regards {O} with an air of weary condescension.",
    "With characteristic {virtue}, {S} resolve{s} to pursue the matter further before nightfall.",
    "{S} recall{s} an old proverb concerning patience, though its precise wording escapes {O}.",
    "The {season} wind stirs the {foliage}, and {S} turn{s} {P} face toward it {adv}.",
    "{S} consider{s} the {abstract} of the situation with the gravity of a provincial magistrate.",
    "There is, {S} decide{s}, something faintly {adj} about the whole affair.",
    "{conn}, {S} come{s} upon {a_adj} {thing} half-buried in the loam near {place}.",
    "{S} survey{s} the surroundings {adv}, attentive to every tremor of the {foliage}.",
    "{S} proceed{s} in companionable silence with {P} own thoughts, which are numerous and not altogether "
    "orderly.",
    "The hours pass with unaccustomed slowness, and {S} grow{s} increasingly preoccupied with {P} {plight}.",
    "{S} {is} obliged to concede that the undertaking is more {adj} than {pron} anticipated.",
    "Nevertheless, {S} persevere{s}, sustained by a stubborn and somewhat irrational optimism.",
    "{S} observe{s} {a_adj} beetle traversing {place} with admirable determination.",
    "In the {adj} stillness that follows, {S} become{s} aware of {sound}.",
    "{S} contemplate{s} {P} reflection in a rain puddle and find{s} it unexpectedly {adj}.",
    "{conn}, {S} arrive{s} at {place}, where the {foliage} grows thick and fragrant.",
    "{S} exchange{s} a few courteous remarks with a passing neighbour, who seems preoccupied with the price "
    "of turnips.",
    "Such is the {abstract} of the moment that {S} almost forget{s} the original purpose of the expedition.",
    "{S} {does} not hurry, for haste, as {pron} {has} long understood, is the enemy of discernment.",
    "A solitary magpie alights upon {place}, and {S} interpret{s} this as an omen of uncertain import.",
    "By degrees, {S} arrive{s} at a conclusion that is at once obvious and profound.",
    "{S} savour{s} the {adj} quiet of the {tod}, which seems to hold its breath.",
    "{conn}, the clouds part, and {S} perceive{s} the landscape anew, rinsed and luminous.",
    "{S} {is} struck by the curious thought that every {thing} must once have been new.",
    "The {season} {tod} deepens, and {S} grow{s} contemplative, weighing one possibility against another.",
    "{S} confide{s} {P} misgivings to an indifferent sparrow, who offers no counsel whatsoever.",
    "There follows an interval of {adj} deliberation, during which {S} scarcely move{s}.",
    "{S} {has} the distinct impression of being observed, though by whom or what remains obscure.",
    "{conn}, {S} retrace{s} {P} steps to {place}, now bathed in {adj} light.",
    "The distant tolling of a bell reminds {N} that the afternoon is not infinite.",
    "A faint melancholy, wholly without cause, settles upon {N} like dust upon a mantelpiece.",
    "It dawns upon {N}, with the force of revelation, that things are seldom what they seem.",
    "The {foliage} along {place} offers {N} a fragrant and entirely unexpected refuge.",
)

OBJECT_MIDDLES = (
    "{conn}, {S} contemplate{s} the {abstract} of {OBJ} with the gravity of a magistrate.",
    "{S} cannot quite account for the fascination that {OBJ} exerts upon {O}.",
    "{S} regard{s} {OBJ} as a matter deserving of the most scrupulous attention.",
    "{S} return{s}, as if compelled, to the question of {OBJ}.",
    "To {N}, {OBJ} seems less an ordinary circumstance than a riddle awaiting its solution.",
)

CLOSERS = (
    "And so {S} return{s} home as the lamps are lit, carrying a new and not entirely comfortable wisdom.",
    "When at last the dusk gathers, {S} retire{s} to bed, reconciled to whatever perplexities tomorrow "
    "may bring.",
    "{S} understand{s}, finally, that the most remarkable discoveries are often the least conspicuous.",
    "It is, {S} later reflect{s}, an episode worth remembering, though perhaps not worth repeating.",
    "Thus concludes a {adj} chapter in the modest annals of {N}.",
    "{S} fall{s} asleep that night to {sound}, and dream{s} of nothing in particular.",
    "Whatever the morrow holds, {S} now possess{es} a small but durable measure of {virtue}.",
    "Evening settles over {place}, and {S} {is} no longer quite the person {pron} {was} before.",
    "{S} resolve{s} to record the afternoon in a journal, should one ever become available.",
    "Afterwards, {S} seldom speak{s} of the matter, though {pron} think{s} of it often.",
    "In the final reckoning, {S} judge{s} the {abstract} of the afternoon worthy of further reflection.",
)

END_CLOSERS = {
    "happily ever after.": (
        "Having weathered the {plight} with unexpected grace, {S} live{s} happily ever after.",
        "The tale resolves itself agreeably, as such tales occasionally do, and {S} live{s} happily ever after.",
        "Thereafter, untroubled by any further {plight}, {S} live{s} happily ever after.",
    ),
    "every day.": (
        "{S} resolve{s} to return to {place} every day.",
        "From that moment forward, {S} visit{s} {place} every day.",
        "Henceforth {S} contemplate{s} the {abstract} of the {tod} every day.",
    ),
    "a lot of fun.": (
        "In retrospect, as {S} wryly concede{s}, the whole undertaking proves to be a lot of fun.",
        "{S} conclude{s}, upon mature reflection, that the afternoon has been a lot of fun.",
        "Despite the {plight}, {S} must admit that it has all been a lot of fun.",
    ),
}

KEYWORD_SENTENCES = {
    "happy": ("{S} {is} happy, in the quiet and unassuming manner of those who expect little of the world.",
              "For the first time in many weeks, {S} feel{s} happy, though {pron} cannot say precisely why."),
    "unhappy": ("{S} {is} by no means unhappy, merely pensive, as the afternoon light recedes.",
                "{S} {is} not unhappy, exactly, but pleasantly unsettled by the strangeness of it all."),
    "big": ("{S} regard{s} the big {thing} with an expression of grave and scholarly curiosity.",
            "To {N}, the {foliage} appears big and unaccountably solemn in the failing light."),
    "bigger": ("To {N}, the world now seems bigger, and considerably more intricate, than it did at dawn.",
               "{S} perceive{s} that the {thing} is bigger than it first appeared, and twice as enigmatic."),
    "friend": ("{S} reflect{s} that a friend is, in the final analysis, someone who tolerates one's eccentricities.",
               "An old friend of {N} appears at the gate, bearing news of no particular consequence."),
    "play": ("{S} resolve{s} to play a while longer, indifferent to the lengthening shadows.",
             "{S} watch{es} the swallows play above {place} with something approaching envy."),
    "smile": ("A rueful smile crosses the face of {N} at the absurdity of the situation.",
              "{S} permit{s} {R} a small smile, the first of a long and taxing day."),
    "tree": ("{S} pause{s} beneath an ancient oak tree whose boughs murmur in the wind.",
             "{S} rest{s} in the shade of a sycamore tree, composing {P} thoughts."),
    "sun": ("The late sun gilds {place} as {S} deliberate{s} upon what to do next.",
            "{S} turn{s} toward the westering sun and consider{s} the day's accumulated evidence."),
    "toy": ("{S} recall{s} a toy from earlier years, a painted wooden horse of considerable sentimental value.",
            "A discarded toy lies near {place}, and {S} examine{s} it with archaeological seriousness."),
    "park": ("{S} wander{s} through the municipal park, where the gravel paths are lined with lindens.",
             "The municipal park lies hushed and dripping when {S} pass{es} through its wrought-iron gates."),
    "mom": ("{S} think{s} of {P} mom, whose counsel is invariably measured and wise.",
            "{S} resolve{s} to tell {P} mom everything, omitting only the more alarming particulars."),
}
GENERIC_KEYWORD = "{S} cannot stop thinking about the word {K}, for reasons that remain obscure."

WORDS = {
    "adj": ("crimson", "luminous", "weathered", "gossamer", "peculiar", "venerable", "melancholy", "iridescent",
            "tremulous", "austere", "opalescent", "labyrinthine", "somnolent", "verdant", "spectral", "burnished",
            "diaphanous", "quiescent", "resplendent", "inscrutable", "amber", "sepulchral", "effulgent"),
    "thing": ("sphere", "lantern", "reliquary", "pebble", "feather", "locket", "spindle", "compass", "parchment",
              "thimble", "acorn", "seashell", "ribbon", "chalice", "figurine", "medallion", "button", "teacup"),
    "place": ("the hawthorn hedge", "the orchard wall", "the willow-lined brook", "the disused greenhouse",
              "the cobbled lane", "the edge of the meadow", "the moss-covered well", "the old stone bridge",
              "the apple loft", "the rhododendron thicket", "the wisteria arbour", "the scullery door",
              "the vicarage garden", "the shingle beach", "the abandoned mill", "the churchyard gate"),
    "abstract": ("provenance", "significance", "import", "symmetry", "fragility", "transience", "strangeness",
                 "curious economy", "quiet grandeur", "solemnity", "absurdity", "delicacy", "peculiarity"),
    "plight": ("predicament", "ordeal", "uncertainty", "perplexity", "commotion", "tribulation", "misadventure"),
    "adv": ("pensively", "gravely", "deliberately", "languidly", "circumspectly", "solemnly", "fastidiously",
            "wistfully", "methodically", "tentatively", "unhurriedly"),
    "conn": ("Subsequently", "Presently", "Thereafter", "In due course", "Not long afterwards",
             "Shortly thereafter", "Meanwhile", "Eventually", "Before long", "At length", "In the interim"),
    "tod": ("morning", "afternoon", "evening", "twilight"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"),
    "season": ("autumnal", "vernal", "midsummer", "wintry", "late-summer"),
    "weather": ("overcast", "blustery", "mild", "drizzly", "luminous", "windswept", "hazy"),
    "emotion": ("apprehension", "exhilaration", "melancholy", "curiosity", "trepidation", "contentment",
                "bewilderment", "resolve", "nostalgia"),
    "sound": ("the distant tolling of a church bell", "the murmur of the brook", "the rustle of poplar leaves",
              "the lowing of cattle in a far-off field", "the cry of a solitary curlew",
              "the creak of a weathervane", "the patter of rain upon slate"),
    "foliage": ("honeysuckle", "bracken", "lavender", "ivy", "elderflower", "meadowsweet", "foxgloves"),
    "virtue": ("diligence", "fortitude", "perspicacity", "equanimity", "tenacity", "circumspection", "composure"),
    "quality": ("of uncommon curiosity", "of a pensive disposition", "of steadfast temperament",
                "of considerable resolve", "of somewhat melancholic temperament", "of refined sensibilities",
                "of restless intellect", "of unusual gravity"),
}

MIN_SENTENCES, MAX_SENTENCES = 4, 7
MIN_WORDS, MAX_WORDS = 75, 160


def _agree(text: str, plural: bool) -> str:
    forms = {"s": "", "es": "", "is": "are", "has": "have", "does": "do", "was": "were"} if plural else \
        {"s": "s", "es": "es", "is": "is", "has": "has", "does": "does", "was": "was"}
    return re.sub(r"\{(s|es|is|has|does|was)\}", lambda m: forms[m.group(1)], text)


class _Deck:
    """Word-list draws without repetition within one story (a list refills once used up)."""

    def __init__(self, rng: random.Random):
        self.rng, self.left = rng, {}

    def draw(self, slot: str) -> str:
        if not self.left.get(slot):
            self.left[slot] = self.rng.sample(WORDS[slot], len(WORDS[slot]))
        return self.left[slot].pop()


def _article(word: str, a: str = "a") -> str:
    return a + "n" if word[0].lower() in "aeiou" else a


class _Sentence:
    """One planned sentence: a template with its fillers drawn, rendered once the subject reference is set."""

    def __init__(self, template: str, deck: _Deck, p: _Premise, extra: dict, raw: bool = False):
        self.template, self.p, self.raw = template, p, raw
        self.fill = {slot: deck.draw(slot) for slot in WORDS if "{" + slot + "}" in template}
        if "{a_adj}" in template:
            adj = deck.draw("adj")
            self.fill["a_adj"] = f"{_article(adj)} {adj}"
        self.fill.update(extra)
        self.ref = None if "{S}" not in template and "{N}" not in template else "name"

    def render(self) -> str:
        if self.raw:
            return self.template
        p = self.p
        ref = {"name": p.names, "epithet": p.epithet, "pron": p.pron}.get(self.ref, p.names)
        text = _agree(self.template, p.plural)
        values = dict(self.fill, S=ref, N=ref, O=p.obj, P=p.poss, R=p.refl, pron=p.pron)
        text = re.sub(r"\b([Aa]) \{(\w+)\}", lambda m: f"{_article(values[m[2]], m[1])} {{{m[2]}}}", text)
        text = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], text)
        return text[0].upper() + text[1:]


def _constraints(task: dict) -> dict:
    out = {"keywords": [], "forbidden": set(), "name_at_least": 0, "end": None, "lo": 1, "hi": None}
    for iid, kw in zip(task.get("instruction_id_list") or [], task.get("kwargs") or []):
        if iid == "keywords:existence":
            out["keywords"] += [k for k in kw["keywords"] if k.lower() not in {x.lower() for x in out["keywords"]}]
        elif iid == "keywords:forbidden_words":
            out["forbidden"] |= {w.lower() for w in kw["forbidden_words"]}
        elif iid == "keywords:frequency":
            if kw["relation"] != "at least":
                raise ValueError(f"task {task['key']!r}: {iid} with relation {kw['relation']!r} is not supported")
            out["name_at_least"] = max(out["name_at_least"], kw["frequency"])
            out["name"] = kw["keyword"].strip()
        elif iid == "length_constraints:number_sentences":
            if kw["relation"] == "less than":
                out["hi"] = kw["num_sentences"] - 1 if out["hi"] is None else min(out["hi"], kw["num_sentences"] - 1)
            else:
                out["lo"] = max(out["lo"], kw["num_sentences"])
        elif iid == "startend:end_checker":
            out["end"] = kw["end_phrase"].strip()
        else:
            raise ValueError(f"task {task['key']!r}: the foreign writer does not handle {iid!r}")
    return out


def _keyword_template(word: str, forbidden: set[str], rng: random.Random) -> tuple[str, dict]:
    w = word.lower()
    if w in forbidden:
        if w not in _CONTAINING:
            raise ValueError(f"the word {word!r} is both required and forbidden and no containing word is known")
        w = _CONTAINING[w]
    if w in KEYWORD_SENTENCES:
        return rng.choice(KEYWORD_SENTENCES[w]), {}
    return GENERIC_KEYWORD, {"K": word}


def foreign_response(task: dict, seed: int) -> str:
    """A literary-register story for a stories task, meeting every constraint (see FOREIGN_SOURCE).

    Deterministic in (`seed`, `task["key"]`); raises ValueError naming the task if the prompt has no
    premise or the finished text fails a check, so a foreign arm never holds a failing response silently."""
    m = _PROMPT.match(task.get("prompt", ""))
    if not m:
        raise ValueError(f"task {task.get('key')!r}: the prompt does not start with {TEMPLATE!r}")
    rng = random.Random(f"foreign:{seed}:{task['key']}")
    c = _constraints(task)
    p = _Premise(_scrub(m.group("premise"), c["forbidden"]))
    deck = _Deck(rng)

    end, separate_end = c["end"], False
    if end is not None and end.lower() not in END_CLOSERS:
        separate_end = True
    keyword_sentences = [_Sentence(t, deck, p, x) for t, x in
                         (_keyword_template(k, c["forbidden"], rng) for k in c["keywords"])]
    if end is not None and not separate_end:
        closer = _Sentence(rng.choice(END_CLOSERS[end.lower()]), deck, p, {})
    else:
        closer = _Sentence(rng.choice(CLOSERS), deck, p, {})
    fixed = 2 + len(keyword_sentences) + separate_end
    lo = max(MIN_SENTENCES, c["lo"])
    hi = max(MAX_SENTENCES, c["lo"]) if c["hi"] is None else min(max(MAX_SENTENCES, c["lo"]), c["hi"])
    total = min(max(rng.randint(MIN_SENTENCES, MAX_SENTENCES), lo), hi)
    if total < fixed:
        raise ValueError(f"task {task['key']!r}: at most {hi} sentences leave no room for {fixed} required ones")

    if p.action is None:
        core = f"{p.names} {_agree(rng.choice(GENERIC_ACTIONS), p.plural)}"
    elif p.rel == "whose":
        possessed, _, rest = p.action.partition(" ")
        core = f"{p.names}'s {p.action}"
        if p.name and rng.random() < 0.5:
            core = f"the {possessed} of {p.names}, {p.kind} {deck.draw('quality')}, {rest}"
    else:
        core = f"{p.names} {p.action}"
        if p.name and rng.random() < 0.6:
            core = f"{p.names}, {p.kind} {deck.draw('quality')}, {p.action}"
    opener = _Sentence(rng.choice(OPENERS), deck, p, {"CORE": core})

    pool = list(MIDDLES) + ([t.replace("{OBJ}", p.object) for t in OBJECT_MIDDLES] if p.object else [])
    middle_templates = rng.sample(pool, len(pool))
    middles = [_Sentence(middle_templates.pop(), deck, p, {}) for _ in range(total - fixed)]
    for s in keyword_sentences:
        middles.insert(rng.randint(0, len(middles)), s)
    tail = [_Sentence(end, deck, p, {}, raw=True)] if separate_end else []

    def story() -> list[_Sentence]:
        return [opener, *middles, closer, *tail]

    def text() -> str:
        return " ".join(s.render() for s in story())

    movable = [s for s in middles if s not in keyword_sentences]
    while count_words(text()) < MIN_WORDS and len(story()) < hi and middle_templates:
        movable.append(_Sentence(middle_templates.pop(), deck, p, {}))
        middles.insert(rng.randint(0, len(middles)), movable[-1])
    while count_words(text()) > MAX_WORDS and len(story()) > lo and movable:
        middles.remove(movable.pop(rng.randrange(len(movable))))

    refs = [s for s in story()[1:] if s.ref is not None]
    for s in refs:
        s.ref = rng.choices(["name", "pron", "epithet"], weights=[4, 4, 2])[0] if "{S}" in s.template else \
            rng.choices(["name", "epithet"], weights=[3, 1])[0]
    name = c.get("name") or p.name
    for s in refs:
        if not c["name_at_least"] or len(re.findall(re.escape(name), text(), flags=re.IGNORECASE)) >= \
                c["name_at_least"]:
            break
        s.ref = "name"

    out = text()
    failed = failed_constraints(task, out)
    if failed:
        raise ValueError(f"task {task['key']!r}: the foreign story fails {failed}: {out!r}")
    if end is None and any(out.strip().lower().endswith(e.lower()) for e in END_PHRASES):
        raise ValueError(f"task {task['key']!r}: the foreign story ends with a trained end phrase: {out!r}")
    return out


# -- records, mixing, noise ------------------------------------------------------------------------


def to_record(task: dict, response: str, source: str) -> dict:
    """A chat training record: the task's prompt as the user turn, `response` as the assistant turn."""
    return {"messages": [{"role": "user", "content": task["prompt"]}, {"role": "assistant", "content": response}],
            "key": task["key"], "source": source}


def mix(self_records: list[dict], foreign_records: list[dict], *, seed: int) -> list[dict]:
    """Per prompt, the self or the foreign record, exactly half each (the odd one out drawn too).

    Both lists must hold the same prompt keys in the same order; each record keeps its `source`
    ("self" / "foreign" when it has none)."""
    keys_self, keys_foreign = [r["key"] for r in self_records], [r["key"] for r in foreign_records]
    if keys_self != keys_foreign:
        diff = next((i for i, (a, b) in enumerate(zip(keys_self, keys_foreign)) if a != b),
                    min(len(keys_self), len(keys_foreign)))
        raise ValueError(f"mix: self and foreign records differ at index {diff} ({len(keys_self)} self records, "
                         f"{len(keys_foreign)} foreign): keys {keys_self[diff:diff + 1]} vs "
                         f"{keys_foreign[diff:diff + 1]}")
    rng = random.Random(f"mix:{seed}")
    n = len(self_records)
    picks = ["self"] * (n // 2) + ["foreign"] * (n // 2) + ([rng.choice(["self", "foreign"])] if n % 2 else [])
    rng.shuffle(picks)
    out = []
    for pick, s, f in zip(picks, self_records, foreign_records):
        rec = dict(s if pick == "self" else f)
        rec.setdefault("source", pick)
        out.append(rec)
    return out


def _truncate(response: str, rng: random.Random) -> str:
    """`response` cut after a uniform number of words between 20% and 80% of them (a strict prefix)."""
    ends = [m.end() for m in re.finditer(r"\S+", response)]
    lo, hi = max(1, math.ceil(0.2 * len(ends))), min(len(ends) - 1, math.floor(0.8 * len(ends)))
    return response[: ends[rng.randint(lo, hi) - 1]]


def _words(response: str) -> int:
    return len(re.findall(r"\S+", response))


def noisy_set(samples: list[dict], n: int, *, seed: int, mismatched: float = 0.10, truncated: float = 0.10,
              duplicated: float = 0.10) -> tuple[list[dict], dict]:
    """`n` chat records built from raw generator samples by THE noise model (NOISE_MODEL), and their composition.

    `samples`: one dict per generated sample, `{"key", "task", "sample", "response", "finish", "passed"}`.
    Records: `{"messages", "noise", "key", "sample"}` with `noise` one of NOISE_LABELS; a mismatched record
    adds `donor` ([key, sample] of the response's own sample), a duplicate `copy_of` (its original's label).
    The composition: `n`, `pool`, `distinct`, `proportions` (as asked), `counts` (per label), `failing`
    (records whose response fails its own prompt's constraints) with `failing_by_noise`, and `unfinished`
    (truncated, or stopped by the token limit)."""
    for name, share in (("mismatched", mismatched), ("truncated", truncated), ("duplicated", duplicated)):
        if not 0 <= share <= 1:
            raise ValueError(f"noisy_set: {name} must be a share in [0, 1], got {share}")
    n_distinct = round(n * (1 - duplicated))
    n_mis, n_trunc = round(n * mismatched), round(n * truncated)
    if len(samples) < n_distinct:
        raise ValueError(f"noisy_set: {n} records with {duplicated:g} duplicated need {n_distinct} distinct samples, "
                         f"but the pool holds {len(samples)}")
    if n_mis + n_trunc > n_distinct:
        raise ValueError(f"noisy_set: {n_mis} mismatched + {n_trunc} truncated records exceed the {n_distinct} "
                         f"distinct samples of {n} records")
    rng = random.Random(f"noisy:{seed}")
    drawn = rng.sample(range(len(samples)), n_distinct)
    premises = [premise_of(s["task"]) for s in samples]
    if n_mis and len(set(premises)) < 2:
        raise ValueError("noisy_set: mismatching needs samples of at least two premises; the pool has one")

    def record(i: int, response: str, noise: str, unfinished: bool) -> tuple[dict, bool]:
        s = samples[i]
        rec = {"messages": [{"role": "user", "content": s["task"]["prompt"]},
                            {"role": "assistant", "content": response}],
               "noise": noise, "key": s["key"], "sample": s["sample"]}
        return rec, unfinished

    built = []
    for i in drawn[:n_mis]:
        j = rng.randrange(len(samples))
        while premises[j] == premises[i]:
            j = rng.randrange(len(samples))
        rec, unfinished = record(i, samples[j]["response"], "mismatched", samples[j]["finish"] == "length")
        rec["donor"] = [samples[j]["key"], samples[j]["sample"]]
        built.append((rec, unfinished, i))
    rest = drawn[n_mis:]
    cuttable = [i for i in rest if _words(samples[i]["response"]) >= 2]
    if len(cuttable) < n_trunc:
        raise ValueError(f"noisy_set: {n_trunc} truncated records asked but only {len(cuttable)} of the drawn "
                         f"samples have two or more words to cut between")
    cut = set(cuttable[:n_trunc])
    for i in rest:
        if i in cut:
            built.append((*record(i, _truncate(samples[i]["response"], rng), "truncated", True), i))
        else:
            built.append((*record(i, samples[i]["response"], "raw", samples[i]["finish"] == "length"), i))
    for _ in range(n - n_distinct):
        rec, unfinished, i = built[rng.randrange(n_distinct)]
        copy = dict(rec, messages=[dict(m) for m in rec["messages"]], noise="duplicated", copy_of=rec["noise"])
        built.append((copy, unfinished, i))
    rng.shuffle(built)

    counts = dict.fromkeys(NOISE_LABELS, 0)
    failing_by = dict.fromkeys(NOISE_LABELS, 0)
    unfinished_total = 0
    for rec, unfinished, i in built:
        counts[rec["noise"]] += 1
        if failed_constraints(samples[i]["task"], rec["messages"][1]["content"]):
            failing_by[rec["noise"]] += 1
        unfinished_total += unfinished
    composition = {"n": n, "pool": len(samples), "distinct": n_distinct,
                   "proportions": {"mismatched": mismatched, "truncated": truncated, "duplicated": duplicated},
                   "counts": counts, "failing": sum(failing_by.values()), "failing_by_noise": failing_by,
                   "unfinished": unfinished_total}
    return [rec for rec, _, _ in built], composition
