"""Generated BLiMP-style minimal pairs from the project's templates and lexicon (lexicon.py).

Each paradigm is a template that draws words from the lexicon with a seeded RNG and returns a
grammatical sentence and its twin that differs in exactly the targeted way (one word, except
where a phrase is the licensor). Words are kept when all the forms a template uses occur at least
`min_word_count` times in the training corpus, so the model has seen them; a paradigm whose pool
would fall below two words uses the whole lexicon instead, and says so in the stage record.

Every paradigm is balanced against a context-free frequency scorer (unigram.py: the sum of the
tokens' unigram log-probabilities, with the study's tokenizer and training counts): the templates
vary which form is grammatical, the licensor and the lexical items, so that in some pairs the
grammatical sentence holds the rarer words and in others the commoner; `generate` then keeps as
many pairs the scorer gets right as pairs it gets wrong. The pairs stay minimal pairs of the
named phenomenon; only which of the template's pairs are kept depends on the counts.

UIDs start with `gen_` so they are never confused with (or joined to the published results of)
the real BLiMP paradigms; `field` and `linguistics_term` use BLiMP's values.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

from .lexicon import (ADJECTIVES, ADVERBIALS, INTRANSITIVE, LOCATIONS, NAMES, NOUNS,
                      PERSON_ONLY_INTRANSITIVE, PREPOSITIONS, REFLEXIVE_VERBS, VERBS, Noun, Verb)

REFLEXIVE = {"m": "himself", "f": "herself"}
SG_DETS, PL_DETS = ("this", "that"), ("these", "those")
WEAK_SG, STRONG_SG = ("a", "one", "no"), ("every", "each")
WEAK_PL, STRONG_PL = ("some", "many", "several", "few", "two", "three", "no"), ("all", "most")


class GenerationError(ValueError):
    pass


def word_counts(texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(re.findall(r"[a-z]+", text.lower()))
    return counts


def sentence(*parts: str) -> str:
    text = " ".join(p for p in parts if p).replace(" ,", ",")
    return text[0].upper() + text[1:] + "."


@dataclass
class Pools:
    """Lexicon entries whose forms are frequent enough in the training corpus."""
    counts: Counter | None
    min_count: int
    relaxed: set

    def frequent(self, *words: str) -> bool:
        if self.counts is None or self.min_count == 0:
            return True
        return all(self.counts[w.lower()] >= self.min_count for w in words)

    def pick(self, name: str, items: list, forms: Callable) -> list:
        kept = [x for x in items if self.frequent(*forms(x))]
        if len(kept) < 2:
            self.relaxed.add(name)
            return items
        return kept

    def nouns(self, kind: str, gendered: bool = False, irregular: bool | None = None) -> list[Noun]:
        items = [n for n in NOUNS if kind in n.kinds and (not gendered or n.gender)
                 and (irregular is None or n.irregular == irregular)]
        return self.pick(f"nouns:{kind}:{gendered}:{irregular}", items, lambda n: (n.sg, n.pl))

    def names(self) -> list[str]:
        return self.pick("names", list(NAMES), lambda n: (n,))

    def verbs(self, name: str, keep: Callable[[Verb], bool], forms: Callable[[Verb], tuple]) -> list[Verb]:
        return self.pick(f"verbs:{name}", [v for v in VERBS if keep(v)], forms)


def _object(rng, pools: Pools, verb: Verb) -> Noun:
    kinds = [k for k in verb.objects if k in ("person", "animal", "thing", "food", "text")]
    return rng.choice(pools.nouns(rng.choice(kinds)))


def _form(noun: Noun, plural: bool) -> str:
    return noun.pl if plural else noun.sg


def _subject(rng, pools: Pools, animate_only=True) -> tuple[Noun, str]:
    kind = rng.choice(("person", "animal")) if animate_only else rng.choice(("person", "animal", "thing"))
    return rng.choice(pools.nouns(kind)), kind


# --- paradigms: each returns (good, bad) ----------------------------------------------------

def determiner_noun_agreement(rng, pools):
    verb = rng.choice(pools.verbs("transitive-past", lambda v: bool(v.objects), lambda v: (v.past,)))
    kinds = [k for k in verb.objects if k in ("animal", "thing", "food", "text")] or ["thing"]
    noun = rng.choice(pools.nouns(rng.choice(kinds)))
    plural = rng.random() < 0.5
    det = rng.choice(PL_DETS if plural else SG_DETS)
    name = rng.choice(pools.names())
    return (sentence(name, verb.past, det, _form(noun, plural)),
            sentence(name, verb.past, det, _form(noun, not plural)))


def determiner_noun_agreement_irregular(rng, pools):
    verb = rng.choice(pools.verbs("transitive-past", lambda v: bool(v.objects), lambda v: (v.past,)))
    candidates = [n for n in NOUNS if n.irregular and set(n.kinds) & set(verb.objects)]
    candidates = [n for n in candidates if pools.frequent(n.sg, n.pl)] or candidates
    if not candidates:
        return None
    noun, plural = rng.choice(candidates), rng.random() < 0.5
    det, name = rng.choice(PL_DETS if plural else SG_DETS), rng.choice(pools.names())
    return (sentence(name, verb.past, det, _form(noun, plural)),
            sentence(name, verb.past, det, _form(noun, not plural)))


def _present(verb: Verb, plural: bool) -> str:
    return verb.base if plural else verb.s


def subject_verb_agreement(rng, pools):
    noun, kind = _subject(rng, pools)
    names = INTRANSITIVE + (PERSON_ONLY_INTRANSITIVE if kind == "person" else ())
    verb = rng.choice(pools.verbs(f"intransitive:{kind}", lambda v: v.base in names, lambda v: (v.base, v.s)))
    plural, adverbial = rng.random() < 0.5, rng.choice(ADVERBIALS)
    subject = f"the {_form(noun, plural)}"
    return (sentence(subject, _present(verb, plural) + adverbial),
            sentence(subject, _present(verb, not plural) + adverbial))


def _be(plural: bool, past: bool) -> str:
    return ("were" if plural else "was") if past else ("are" if plural else "is")


def distractor_agreement_prepositional_phrase(rng, pools):
    noun, kind = _subject(rng, pools)
    distractor = rng.choice(pools.nouns(rng.choice(("person", "animal", "thing"))))
    plural, past = rng.random() < 0.5, rng.random() < 0.5
    adjective = rng.choice(ADJECTIVES[kind])
    prep = rng.choice(PREPOSITIONS)
    head = f"the {_form(noun, plural)} {prep} the {_form(distractor, not plural)}"
    return (sentence(head, _be(plural, past), adjective), sentence(head, _be(not plural, past), adjective))


def distractor_agreement_relative_clause(rng, pools):
    noun, kind = _subject(rng, pools)
    verb = rng.choice(pools.verbs("relative", lambda v: kind in v.objects, lambda v: (v.past,)))
    agent = rng.choice(pools.nouns("person"))
    plural, past = rng.random() < 0.5, rng.random() < 0.5
    adjective = rng.choice(ADJECTIVES[kind])
    head = f"the {_form(noun, plural)} that the {_form(agent, not plural)} {verb.past}"
    return (sentence(head, _be(plural, past), adjective), sentence(head, _be(not plural, past), adjective))


def _reflexive_verb(rng, pools):
    return rng.choice(pools.verbs("reflexive", lambda v: v.base in REFLEXIVE_VERBS, lambda v: (v.past,)))


def anaphor_number_agreement(rng, pools):
    noun = rng.choice(pools.nouns("person", gendered=True))
    verb, plural = _reflexive_verb(rng, pools), rng.random() < 0.5
    singular_reflexive = REFLEXIVE[noun.gender]
    good = "themselves" if plural else singular_reflexive
    bad = singular_reflexive if plural else "themselves"
    subject = f"the {_form(noun, plural)}"
    return sentence(subject, verb.past, good), sentence(subject, verb.past, bad)


def anaphor_gender_agreement(rng, pools):
    if rng.random() < 0.5:
        name = rng.choice(pools.names())
        subject, gender = name, NAMES[name]
    else:
        noun = rng.choice(pools.nouns("person", gendered=True))
        subject, gender = f"the {noun.sg}", noun.gender
    verb = _reflexive_verb(rng, pools)
    other = "f" if gender == "m" else "m"
    return sentence(subject, verb.past, REFLEXIVE[gender]), sentence(subject, verb.past, REFLEXIVE[other])


def _irregular_transitive(rng, pools):
    return rng.choice(pools.verbs("irregular", lambda v: v.irregular_past and bool(v.objects),
                                  lambda v: (v.past, v.pp)))


def irregular_past_tense(rng, pools):
    verb, name = _irregular_transitive(rng, pools), rng.choice(pools.names())
    obj = f"the {_form(_object(rng, pools, verb), rng.random() < 0.5)}"
    return sentence(name, verb.past, obj), sentence(name, verb.pp, obj)


def irregular_past_participle(rng, pools):
    verb, name = _irregular_transitive(rng, pools), rng.choice(pools.names())
    obj = f"the {_form(_object(rng, pools, verb), rng.random() < 0.5)}"
    aux = rng.choice(("has", "had"))
    return sentence(name, aux, verb.pp, obj), sentence(name, aux, verb.past, obj)


def _perfect_clause(rng, pools):
    verb = rng.choice(pools.verbs("perfect", lambda v: bool(v.objects), lambda v: (v.pp,)))
    return verb, f"the {_form(_object(rng, pools, verb), rng.random() < 0.5)}"


# NPI licensing: `ever` needs a downward-entailing licensor. Each paradigm draws its licensor
# and its non-licensor from lists that hold both frequent and rare words (`not` is among the
# commonest words, `hardly` or `seldom` among the rarer; `also` is common, `certainly` rare), so
# that in some pairs the grammatical sentence has the rarer word and in others the commoner:
# frequency alone cannot tell the twins apart (see the balancing in `generate`).
NPI_ADVERB_LICENSORS = ("not", "hardly", "rarely", "barely", "seldom", "scarcely")
NPI_ADVERB_NON_LICENSORS = ("probably", "certainly", "clearly", "surely", "definitely", "obviously",
                            "also", "often", "always", "already", "sometimes")
NPI_DET_LICENSORS_SG, NPI_DET_LICENSORS_PL = ("no",), ("no", "few")
NPI_DET_NON_LICENSORS_SG = ("the", "a", "this", "that", "one", "each", "every")
NPI_DET_NON_LICENSORS_PL = ("the", "these", "those", "many", "several", "all", "most", "two", "three")


def _seen(pools: Pools, words: tuple[str, ...]) -> tuple[str, ...]:
    """The words frequent enough in the corpus, or all of them when too few are."""
    kept = tuple(w for w in words if pools.frequent(w))
    return kept if len(kept) >= 2 or (kept and len(words) == 1) else words


def npi_negation_ever(rng, pools):
    """`ever` after a negative adverb (`not`, `hardly`, ...) vs after one that does not license
    it (`probably`, `also`, ...): BLiMP's sentential_negation_npi_licensor_present
    construction, one word differing."""
    verb, obj = _perfect_clause(rng, pools)
    name, aux = rng.choice(pools.names()), rng.choice(("has", "had"))
    licensor = rng.choice(_seen(pools, NPI_ADVERB_LICENSORS))
    other = rng.choice(_seen(pools, NPI_ADVERB_NON_LICENSORS))
    return (sentence(name, aux, licensor, "ever", verb.pp, obj),
            sentence(name, aux, other, "ever", verb.pp, obj))


def _article(det: str, word: str) -> str:
    return "an" if det == "a" and word[0] in "aeiou" else det


def npi_no_ever(rng, pools):
    """`no N has ever V-ed` (or `few Ns have ever V-ed`) vs the same subject with a determiner
    that does not license `ever` (`the`, `each`, `many`, ...): only the determiner differs."""
    verb, obj = _perfect_clause(rng, pools)
    noun, plural = rng.choice(pools.nouns("person")), rng.random() < 0.5
    licensors = NPI_DET_LICENSORS_PL if plural else NPI_DET_LICENSORS_SG
    others = NPI_DET_NON_LICENSORS_PL if plural else NPI_DET_NON_LICENSORS_SG
    form, aux = _form(noun, plural), rng.choice(("have" if plural else "has", "had"))
    licensor, other = rng.choice(_seen(pools, licensors)), _article(rng.choice(_seen(pools, others)), form)
    return (sentence(licensor, form, aux, "ever", verb.pp, obj),
            sentence(other, form, aux, "ever", verb.pp, obj))


def existential_there_quantifiers(rng, pools):
    noun = rng.choice(pools.nouns(rng.choice(("person", "animal", "thing"))))
    plural, past = rng.random() < 0.5, rng.random() < 0.5
    weak, strong = (WEAK_PL, STRONG_PL) if plural else (WEAK_SG, STRONG_SG)
    if not plural and noun.sg[0] in "aeiou":
        weak = tuple("an" if w == "a" else w for w in weak)
    be, location, form = _be(plural, past), rng.choice(LOCATIONS), _form(noun, plural)
    return (sentence("there", be, rng.choice(weak), form, location),
            sentence("there", be, rng.choice(strong), form, location))


# UID -> (field, linguistics_term, template)
PARADIGMS: dict[str, tuple[str, str, Callable]] = {
    "gen_determiner_noun_agreement": ("morphology", "determiner_noun_agreement", determiner_noun_agreement),
    "gen_determiner_noun_agreement_irregular": ("morphology", "determiner_noun_agreement",
                                                determiner_noun_agreement_irregular),
    "gen_subject_verb_agreement": ("morphology", "subject_verb_agreement", subject_verb_agreement),
    "gen_distractor_agreement_prepositional_phrase": ("syntax", "subject_verb_agreement",
                                                      distractor_agreement_prepositional_phrase),
    "gen_distractor_agreement_relative_clause": ("syntax", "subject_verb_agreement",
                                                 distractor_agreement_relative_clause),
    "gen_anaphor_number_agreement": ("morphology", "anaphor_agreement", anaphor_number_agreement),
    "gen_anaphor_gender_agreement": ("morphology", "anaphor_agreement", anaphor_gender_agreement),
    "gen_irregular_past_tense": ("morphology", "irregular_forms", irregular_past_tense),
    "gen_irregular_past_participle": ("morphology", "irregular_forms", irregular_past_participle),
    "gen_npi_negation_ever": ("semantics", "npi_licensing", npi_negation_ever),
    "gen_npi_no_ever": ("semantics", "npi_licensing", npi_no_ever),
    "gen_existential_there_quantifiers": ("semantics", "quantifiers", existential_there_quantifiers),
}


def generate(pairs_per_paradigm: int = 200, seed: int = 0, counts: Counter | None = None,
             min_count: int = 2, paradigms: list[str] | None = None,
             balance: Callable[[str, str], bool] | None = None) -> tuple[dict, dict]:
    """{UID: [pair dicts in BLiMP's format]} and {"relaxed": [...], "unbalanced": [...]}.

    `balance(good, bad)` is a frequency scorer's verdict on a pair (relora/data/unigram.py:
    UnigramScorer.correct, with the study's tokenizer and training counts). When given, each
    paradigm keeps as many pairs the scorer gets right as pairs it gets wrong (half of
    `pairs_per_paradigm` each, the odd one wrong), drawing more candidates until both halves are
    full, so the scorer's accuracy on every generated paradigm is 0.5: what a model scores above
    that is not word frequency. A template whose candidates the scorer nearly always decides one
    way would exhaust the draws; its paradigm is then filled without balancing and listed under
    `unbalanced` (the data stage records this, and the unigram table shows its accuracy).
    """
    unknown = [p for p in paradigms or [] if p not in PARADIGMS]
    if unknown:
        raise GenerationError(f"evaluation.blimp.paradigms: unknown generated paradigms {unknown} "
                              f"(known: {', '.join(PARADIGMS)})")
    pools = Pools(counts, min_count, set())
    out, unbalanced = {}, []
    max_draws = 200 * pairs_per_paradigm
    for index, (uid, (field, term, template)) in enumerate(PARADIGMS.items()):
        if paradigms and uid not in paradigms:
            continue
        rng = random.Random(seed * 1_000_003 + index)
        # quota[verdict]: pairs still wanted that the frequency scorer gets right (True) / wrong
        quota = {True: pairs_per_paradigm // 2, False: pairs_per_paradigm - pairs_per_paradigm // 2}
        pairs, seen, attempts, balancing = [], set(), 0, balance is not None
        while len(pairs) < pairs_per_paradigm:
            attempts += 1
            if balancing and attempts > max_draws:
                balancing = False
                unbalanced.append(uid)
            if attempts > 2 * max_draws:
                raise GenerationError(f"{uid}: only {len(pairs)} distinct pairs after {attempts} draws "
                                      f"(asked for {pairs_per_paradigm}); lower pairs_per_paradigm")
            pair = template(rng, pools)
            if pair is None or pair in seen or pair[0] == pair[1]:
                continue
            if balancing:
                verdict = bool(balance(*pair))
                if quota[verdict] == 0:
                    continue
                quota[verdict] -= 1
            seen.add(pair)
            pairs.append({"sentence_good": pair[0], "sentence_bad": pair[1], "field": field,
                          "linguistics_term": term, "UID": uid, "pairID": str(len(pairs)),
                          "source": "generated"})
        out[uid] = pairs
    return out, {"relaxed": sorted(pools.relaxed), "unbalanced": unbalanced}
