"""The project's own English lexicon for generated minimal pairs (written for this project).

Nouns carry their singular and plural (irregular plurals marked), a semantic kind that decides
which verbs may take them, and a gender where English marks it; names carry a gender; verbs
carry base, third-person singular, past and past participle forms and the kinds of object they
take. Only what the templates in generate_blimp.py need is here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Noun:
    sg: str
    pl: str
    kinds: tuple[str, ...]          # person | animal | thing | food | text
    gender: str | None = None       # m | f for nouns whose reflexive is fixed
    irregular: bool = False


@dataclass(frozen=True)
class Verb:
    base: str
    s: str                          # third person singular present
    past: str
    pp: str                         # past participle
    objects: tuple[str, ...] = ()   # noun kinds it takes as object; () = intransitive

    @property
    def irregular_past(self) -> bool:
        """Past and participle differ (ate/eaten), so one can stand in for the other."""
        return self.past != self.pp


def _n(sg, pl, *kinds, gender=None, irregular=False):
    return Noun(sg, pl, tuple(kinds), gender, irregular)


NOUNS: list[Noun] = [
    # people
    _n("man", "men", "person", gender="m", irregular=True),
    _n("woman", "women", "person", gender="f", irregular=True),
    _n("child", "children", "person", irregular=True),
    _n("person", "people", "person", irregular=True),
    _n("boy", "boys", "person", gender="m"), _n("girl", "girls", "person", gender="f"),
    _n("king", "kings", "person", gender="m"), _n("queen", "queens", "person", gender="f"),
    _n("father", "fathers", "person", gender="m"), _n("mother", "mothers", "person", gender="f"),
    _n("brother", "brothers", "person", gender="m"), _n("sister", "sisters", "person", gender="f"),
    _n("son", "sons", "person", gender="m"), _n("daughter", "daughters", "person", gender="f"),
    _n("husband", "husbands", "person", gender="m"),
    _n("wife", "wives", "person", gender="f", irregular=True),
    _n("uncle", "uncles", "person", gender="m"), _n("aunt", "aunts", "person", gender="f"),
    _n("teacher", "teachers", "person"), _n("doctor", "doctors", "person"),
    _n("student", "students", "person"), _n("farmer", "farmers", "person"),
    _n("friend", "friends", "person"), _n("neighbor", "neighbors", "person"),
    _n("nurse", "nurses", "person"), _n("player", "players", "person"),
    _n("driver", "drivers", "person"), _n("writer", "writers", "person"),
    _n("scientist", "scientists", "person"), _n("patient", "patients", "person"),
    # animals
    _n("dog", "dogs", "animal"), _n("cat", "cats", "animal"), _n("horse", "horses", "animal"),
    _n("bird", "birds", "animal"), _n("cow", "cows", "animal"), _n("rabbit", "rabbits", "animal"),
    _n("mouse", "mice", "animal", irregular=True), _n("goose", "geese", "animal", irregular=True),
    _n("wolf", "wolves", "animal", irregular=True), _n("fox", "foxes", "animal"),
    # things
    _n("book", "books", "thing", "text"), _n("letter", "letters", "thing", "text"),
    _n("story", "stories", "text"), _n("song", "songs", "text"), _n("poem", "poems", "text"),
    _n("car", "cars", "thing"), _n("table", "tables", "thing"), _n("chair", "chairs", "thing"),
    _n("box", "boxes", "thing"), _n("picture", "pictures", "thing"), _n("key", "keys", "thing"),
    _n("cup", "cups", "thing"), _n("window", "windows", "thing"), _n("door", "doors", "thing"),
    _n("bottle", "bottles", "thing"), _n("knife", "knives", "thing", irregular=True),
    _n("leaf", "leaves", "thing", irregular=True), _n("glass", "glasses", "thing"),
    _n("dish", "dishes", "thing"), _n("shoe", "shoes", "thing"), _n("hat", "hats", "thing"),
    _n("computer", "computers", "thing"), _n("bag", "bags", "thing"), _n("ball", "balls", "thing"),
    _n("map", "maps", "thing"), _n("photo", "photos", "thing"), _n("dress", "dresses", "thing"),
    _n("phone", "phones", "thing"), _n("coin", "coins", "thing"), _n("stone", "stones", "thing"),
    # food
    _n("apple", "apples", "food", "thing"), _n("cake", "cakes", "food", "thing"),
    _n("egg", "eggs", "food", "thing"), _n("sandwich", "sandwiches", "food", "thing"),
    _n("potato", "potatoes", "food", "thing", irregular=True), _n("cookie", "cookies", "food", "thing"),
    _n("orange", "oranges", "food", "thing"), _n("banana", "bananas", "food", "thing"),
]

NAMES: dict[str, str] = {
    "John": "m", "David": "m", "Michael": "m", "James": "m", "Robert": "m", "Thomas": "m",
    "Peter": "m", "Paul": "m", "George": "m", "Daniel": "m", "William": "m", "Charles": "m",
    "Mary": "f", "Sarah": "f", "Anna": "f", "Emma": "f", "Laura": "f", "Susan": "f",
    "Alice": "f", "Helen": "f", "Rachel": "f", "Linda": "f", "Elizabeth": "f", "Jane": "f",
}

_ANY = ("person", "animal", "thing")

VERBS: list[Verb] = [
    # irregular, past != participle
    Verb("see", "sees", "saw", "seen", _ANY),
    Verb("take", "takes", "took", "taken", ("thing", "animal")),
    Verb("break", "breaks", "broke", "broken", ("thing",)),
    Verb("hide", "hides", "hid", "hidden", _ANY),
    Verb("forget", "forgets", "forgot", "forgotten", ("thing", "person", "text")),
    Verb("steal", "steals", "stole", "stolen", ("thing", "food")),
    Verb("draw", "draws", "drew", "drawn", _ANY),
    Verb("choose", "chooses", "chose", "chosen", _ANY),
    Verb("eat", "eats", "ate", "eaten", ("food",)),
    Verb("write", "writes", "wrote", "written", ("text",)),
    Verb("throw", "throws", "threw", "thrown", ("thing", "food")),
    Verb("know", "knows", "knew", "known", ("person", "text")),
    Verb("give", "gives", "gave", "given", ("thing", "food")),
    Verb("drive", "drives", "drove", "driven", ()),
    Verb("sing", "sings", "sang", "sung", ("text",)),
    Verb("swim", "swims", "swam", "swum", ()),
    Verb("run", "runs", "ran", "run", ()),
    Verb("begin", "begins", "began", "begun", ("text",)),
    Verb("speak", "speaks", "spoke", "spoken", ()),
    Verb("wake", "wakes", "woke", "woken", ("person", "animal")),
    # irregular, past == participle
    Verb("find", "finds", "found", "found", _ANY + ("text", "food")),
    Verb("buy", "buys", "bought", "bought", ("thing", "food", "animal")),
    Verb("sell", "sells", "sold", "sold", ("thing", "food", "animal")),
    Verb("lose", "loses", "lost", "lost", ("thing", "animal")),
    Verb("hold", "holds", "held", "held", ("thing", "animal", "food")),
    Verb("keep", "keeps", "kept", "kept", ("thing", "animal")),
    Verb("sleep", "sleeps", "slept", "slept", ()),
    Verb("leave", "leaves", "left", "left", ()),
    Verb("sit", "sits", "sat", "sat", ()),
    # regular
    Verb("like", "likes", "liked", "liked", _ANY + ("food", "text")),
    Verb("watch", "watches", "watched", "watched", ("person", "animal")),
    Verb("clean", "cleans", "cleaned", "cleaned", ("thing",)),
    Verb("carry", "carries", "carried", "carried", ("thing", "animal", "food")),
    Verb("help", "helps", "helped", "helped", ("person",)),
    Verb("admire", "admires", "admired", "admired", ("person", "text")),
    Verb("praise", "praises", "praised", "praised", ("person",)),
    Verb("blame", "blames", "blamed", "blamed", ("person",)),
    Verb("describe", "describes", "described", "described", _ANY),
    Verb("remember", "remembers", "remembered", "remembered", _ANY + ("text",)),
    Verb("notice", "notices", "noticed", "noticed", _ANY),
    Verb("love", "loves", "loved", "loved", _ANY),
    Verb("hate", "hates", "hated", "hated", ("person", "food")),
    Verb("criticize", "criticizes", "criticized", "criticized", ("person", "text")),
    Verb("defend", "defends", "defended", "defended", ("person",)),
    Verb("wait", "waits", "waited", "waited", ()),
    Verb("work", "works", "worked", "worked", ()),
    Verb("arrive", "arrives", "arrived", "arrived", ()),
    Verb("smile", "smiles", "smiled", "smiled", ()),
    Verb("laugh", "laughs", "laughed", "laughed", ()),
    Verb("walk", "walks", "walked", "walked", ()),
    Verb("jump", "jumps", "jumped", "jumped", ()),
]

# verbs whose object may be a reflexive pronoun (person subjects)
REFLEXIVE_VERBS = ("see", "hide", "draw", "like", "help", "admire", "praise", "blame", "describe",
                   "remember", "love", "hate", "criticize", "defend", "know")
# intransitive verbs for animate subjects (person and animal) in the present tense
INTRANSITIVE = ("sleep", "run", "wait", "walk", "jump", "swim", "leave", "arrive", "sit")
PERSON_ONLY_INTRANSITIVE = ("work", "smile", "laugh", "speak")

ADJECTIVES = {
    "person": ("tired", "happy", "hungry", "angry", "busy", "young", "old", "sick", "late", "ready"),
    "animal": ("tired", "hungry", "young", "old", "sick", "small", "big", "quiet"),
    "thing": ("old", "new", "small", "big", "broken", "clean", "heavy", "red", "ready"),
}

PREPOSITIONS = ("near", "behind", "beside", "next to", "with")
LOCATIONS = ("in the room", "in the garden", "near the house", "outside", "in the kitchen",
             "on the street")
ADVERBIALS = ("", " every day", " in the morning", " at night", " again", " today")
