"""Offline word and sentence tokenisation with the semantics IFEval's checkers were scored with.

The official IFEval code counts words with the regex tokenizer `\\w+`, counts capitalised words over
nltk's `word_tokenize` (Treebank rules) and counts sentences with nltk's Punkt model for English. nltk and
its trained Punkt tables are not dependencies here, so this module re-implements the Punkt decision
procedure (Kiss & Strunk, 2006, as nltk applies it: candidate breaks at `.?!` followed by whitespace or
closing punctuation, abbreviation / initial / ordinal reclassification, orthographic evidence from the next
word) with small hand-written English lexicons in place of the learned tables. docs/ifeval.md records how
close this gets and where it differs.
"""

from __future__ import annotations

import dataclasses
import re
import string

# --------------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Words as IFEval counts them for `length_constraints:number_words`: maximal runs of `\\w`."""
    return len(_WORD_RE.findall(text))


# Treebank-style splitting rules, applied in order to one sentence. Only the splits that change which
# letter runs end up in one token matter for IFEval (capital-word counts), but the token texts follow
# nltk's conventions (`` and '' for double quotes) so the output is recognisable.
_OPEN_QUOTE_RE = re.compile(r'^"|(?<=[ (\[{<])"')
_BACKTICKS_RE = re.compile(r"`+")
_ALWAYS_SPLIT_RE = re.compile(r"\.{2,}|--|[;@#$%&?!*\[\](){}<>«»“”‘’„\u2012-\u2015]")
_COLON_COMMA_RE = re.compile(r"[,:](?!\d)")
_FINAL_PERIOD_RE = re.compile(r"(?<![.\s])\s*\.([\])}>\"'»”’ ]*)\s*$")
_LEADING_APOSTROPHE_RE = re.compile(r"(?i)(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
_CLITIC_RE = re.compile(r"(?<=[^' ])('[sSmMdD]|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T|')(?= )")
_SPLIT_WORDS_RE = [
    re.compile(r"(?i)\b(can)(not)\b"),
    re.compile(r"(?i)\b(d)('ye)\b"),
    re.compile(r"(?i)\b(gim)(me)\b"),
    re.compile(r"(?i)\b(gon)(na)\b"),
    re.compile(r"(?i)\b(got)(ta)\b"),
    re.compile(r"(?i)\b(lem)(me)\b"),
    re.compile(r"(?i)\b(more)('n)\b"),
    re.compile(r"(?i)\b(wan)(na)(?=\s)"),
    re.compile(r"(?i) ('t)(is)\b"),
    re.compile(r"(?i) ('t)(was)\b"),
]


def _treebank_sentence(sentence: str) -> list[str]:
    text = _OPEN_QUOTE_RE.sub(" `` ", sentence)
    text = _LEADING_APOSTROPHE_RE.sub("' ", text)
    text = _ALWAYS_SPLIT_RE.sub(r" \g<0> ", text)
    text = _BACKTICKS_RE.sub(lambda m: " " + "`` " * (len(m.group()) // 2) + "` " * (len(m.group()) % 2), text)
    text = _COLON_COMMA_RE.sub(r" \g<0> ", text)
    text = _FINAL_PERIOD_RE.sub(r" . \1 ", text)
    text = " " + text.replace('"', " '' ") + " "
    text = re.sub(r"\s+", " ", text)
    text = _CLITIC_RE.sub(r" \1", text)
    for pattern in _SPLIT_WORDS_RE:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Treebank-style tokens per sentence, like nltk's `word_tokenize` (used for capital-word counts).

    Contractions split off (`DON'T` -> `DO`, `N'T`), punctuation and brackets become their own tokens,
    hyphens, slashes and inner periods stay inside words.
    """
    return [tok for sentence in split_sentences(text) for tok in _treebank_sentence(sentence)]


# --------------------------------------------------------------------------------------------------
# Sentences: the Punkt decision procedure with hand-written English lexicons
# --------------------------------------------------------------------------------------------------

# Orthographic-context flags: how a word type was seen capitalised (UC) or lower-case (LC), at the start of
# a sentence (BEG), inside one (MID) or in an undecidable position (UNK).
BEG_UC, MID_UC, UNK_UC, BEG_LC, MID_LC, UNK_LC = (1 << n for n in range(1, 7))
ANY_UC = BEG_UC | MID_UC | UNK_UC
ANY_LC = BEG_LC | MID_LC | UNK_LC

# Lower-case types (without their final period) that Punkt should read as abbreviations. Ordinary words
# that double as abbreviations ("sat", "mass", "no", "fig") are left out: a false abbreviation hides a real
# sentence end, which costs more than the rare missed abbreviation.
ENGLISH_ABBREVIATIONS = frozenset(
    """
    mr mrs ms messrs mme dr prof rev hon gen sen rep gov lt col capt cpt sgt maj adm cmdr pres supt insp
    st jr sr esq ph.d m.d b.a m.a b.sc m.sc d.d.s r.n
    jan feb apr jun jul aug sep sept oct nov dec
    inc corp co ltd llc bros dept assn ave blvd rd mt ft
    e.g i.e etc vs viz cf al approx ca vol pp eds ed chap
    u.s u.k u.n u.s.a d.c n.y l.a a.m p.m a.d b.c
    """.split()
)

# Word types with a known orthographic context: common English words that are seen lower-case inside
# sentences and capitalised at sentence starts, never capitalised mid-sentence. A capitalised one after an
# abbreviation, ellipsis, initial or number is therefore taken to open a new sentence.
_COMMON_WORDS = """
    a about after again all also although an and another any are as at because before being both but by
    can could did do does during each either even every few finally first for from further furthermore
    had has have having he her here hers him his how however if in instead into is it its just last later
    let many may meanwhile might more moreover most much must my next no nor not now of often on once one
    only or other others our overall perhaps please rather second she should similarly since so some
    still such than that the their them then there therefore these they third this those though thus to
    today too under unlike unless until we were what when where whether which while who why will with
    within without would yes yet you your
"""
ENGLISH_ORTHO_CONTEXT = {word: MID_LC | BEG_UC for word in _COMMON_WORDS.split()}

# Types that start sentences after an abbreviation even though they are also capitalised mid-sentence.
ENGLISH_SENT_STARTERS = frozenset({"i"})


@dataclasses.dataclass(frozen=True)
class PunktLexicon:
    """The four tables a trained Punkt model supplies; here they are hand-written."""

    abbreviations: frozenset[str] = ENGLISH_ABBREVIATIONS
    collocations: frozenset[tuple[str, str]] = frozenset()
    sent_starters: frozenset[str] = ENGLISH_SENT_STARTERS
    ortho_context: dict[str, int] = dataclasses.field(default_factory=lambda: dict(ENGLISH_ORTHO_CONTEXT))


ENGLISH = PunktLexicon()

_QUOTES = "\u2018\u2019\u201c\u201d\xab\xbb"
_NON_WORD = rf"[)\";}}\]*:@'({{\[{_QUOTES}!?]"
_MULTI_CHAR = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_WORD_RE = re.compile(
    rf"""{_MULTI_CHAR}
    |(?=[^(\"`{{\[:;&\#*@)}}\]\-,])\S+?(?=\s|$|{_NON_WORD}|{_MULTI_CHAR}|,(?=$|\s|{_NON_WORD}|{_MULTI_CHAR}))
    |\S""",
    re.VERBOSE,
)
_CANDIDATE_RE = re.compile(rf"[.?!](?=(?P<after>{_NON_WORD}|\s+(?P<next>\S+)))")
_REALIGN_RE = re.compile(rf"[\"')\]}}{_QUOTES}]+?(?:\s+|(?=--)|$)", re.MULTILINE)
_NUMBER_RE = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL_RE = re.compile(r"[^\W\d]\.$")
_ELLIPSIS_RE = re.compile(r"\.\.+$")
_SENT_END = frozenset(".?!")
_PUNCTUATION = frozenset(";:,.!?")


@dataclasses.dataclass
class _Tok:
    text: str
    sentbreak: bool = False
    abbr: bool = False
    ellipsis: bool = False

    @property
    def kind(self) -> str:
        return _NUMBER_RE.sub("##number##", self.text.lower())

    @property
    def kind_no_period(self) -> str:
        k = self.kind
        return k[:-1] if len(k) > 1 and k.endswith(".") else k

    @property
    def kind_no_sentperiod(self) -> str:
        return self.kind_no_period if self.sentbreak else self.kind


def _ortho_says_starter(tok: _Tok, lex: PunktLexicon) -> bool | None:
    """Orthographic evidence that `tok` opens a sentence: True, False, or None when undecided."""
    if tok.text in _PUNCTUATION:
        return False
    flags = lex.ortho_context.get(tok.kind_no_sentperiod, 0)
    if tok.text[0].isupper() and flags & ANY_LC and not flags & MID_UC:
        return True
    if tok.text[0].islower() and (flags & ANY_UC or not flags & BEG_LC):
        return False
    return None


def _annotate(words: list[str], lex: PunktLexicon) -> list[_Tok]:
    toks = [_Tok(w) for w in words]
    for tok in toks:  # type-based pass: every period-final word is a break unless it is an abbreviation
        t = tok.text
        if t in _SENT_END:
            tok.sentbreak = True
        elif _ELLIPSIS_RE.match(t):
            tok.ellipsis = True
        elif t.endswith(".") and not t.endswith(".."):
            stem = t[:-1].lower()
            tok.abbr = stem in lex.abbreviations or stem.split("-")[-1] in lex.abbreviations
            tok.sentbreak = not tok.abbr
    for tok, nxt in zip(toks, toks[1:]):  # token-based pass: look at the following word
        if not tok.text.endswith("."):
            continue
        kind, next_kind = tok.kind_no_period, nxt.kind_no_sentperiod
        initial = bool(_INITIAL_RE.match(tok.text))
        if (kind, next_kind) in lex.collocations:
            tok.sentbreak, tok.abbr = False, True
            continue
        if (tok.abbr or tok.ellipsis) and not initial:
            starter = _ortho_says_starter(nxt, lex)
            if starter or (nxt.text[0].isupper() and next_kind in lex.sent_starters):
                tok.sentbreak = True
                continue
        if initial or kind == "##number##":
            starter = _ortho_says_starter(nxt, lex)
            proper_noun_after_initial = (
                starter is None
                and initial
                and nxt.text[0].isupper()
                and not lex.ortho_context.get(next_kind, 0) & ANY_LC
            )
            if starter is False or proper_noun_after_initial:
                tok.sentbreak, tok.abbr = False, True
    return toks


def _breaks_inside(context: str, lex: PunktLexicon) -> bool:
    """Whether any word but the last of a candidate's context is annotated as a sentence break."""
    toks = _annotate(_PUNKT_WORD_RE.findall(context), lex)
    return any(tok.sentbreak for tok in toks[:-1])


def _last_whitespace(text: str) -> int:
    """Index of the last whitespace character, or 0 when there is none (Punkt cannot tell 0 from none)."""
    for i in range(len(text) - 1, -1, -1):
        if text[i] in string.whitespace:
            return i
    return 0


def _candidates(text: str):
    """Yield (match, context) for each candidate break: the word before it, the mark and what follows.

    A candidate whose preceding word runs into the next candidate's (as in `!!` or `?!`) is dropped, so a
    run of marks is judged once, at its last mark.
    """
    prev_start, prev_stop, prev_match = 0, 0, None
    for m in _CANDIDATE_RE.finditer(text):
        ws = _last_whitespace(text[prev_stop : m.start()])
        start = prev_stop + ws + 1 if ws else prev_start
        if prev_match is not None and prev_stop <= start:
            yield prev_match, text[prev_start:prev_stop] + prev_match.group() + prev_match.group("after")
        prev_start, prev_stop, prev_match = start, m.start(), m
    if prev_match is not None:
        yield prev_match, text[prev_start:prev_stop] + prev_match.group() + prev_match.group("after")


def sentence_spans(text: str, lex: PunktLexicon = ENGLISH) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (closing quotes and brackets stay with their sentence)."""
    spans, last = [], 0
    for m, context in _candidates(text):
        if _breaks_inside(context, lex):
            spans.append((last, m.end()))
            last = m.start("next") if m.group("next") else m.end()
    spans.append((last, len(text.rstrip())))
    out, shift = [], 0
    for (start, stop), following in zip(spans, spans[1:] + [None]):
        start += shift
        shift = 0
        if following is not None and (m := _REALIGN_RE.match(text, following[0], following[1])):
            out.append((start, following[0] + len(m.group().rstrip())))
            shift = m.end() - following[0]
        elif text[start:stop]:
            out.append((start, stop))
    return out


def split_sentences(text: str, lex: PunktLexicon = ENGLISH) -> list[str]:
    """Sentences of `text`, Punkt-style (see the module docstring)."""
    return [text[a:b] for a, b in sentence_spans(text, lex)]


def count_sentences(text: str, lex: PunktLexicon = ENGLISH) -> int:
    """Sentence count for `length_constraints:number_sentences`."""
    return len(sentence_spans(text, lex))
