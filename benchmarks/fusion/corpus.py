"""A synthetic corpus of several "domains" with distinct regularities, generated from a seed (no downloads).

Each document is one line of plain ASCII text from one domain:

- ``arith``: small additions, ``"7 + 12 = 19."``: the answer is determined by the question;
- ``count``: counting runs, ``"count 17 18 19 20."`` / ``"down 9 8 7."``: the next number is determined;
- ``grammar``: sentences of a small grammar with number agreement (``"the red cat sees a dog ."`` /
  ``"the cats see ..."``);
- ``lore``: facts about invented creatures from one fixed table (``"a blick is green and lives in the sea."``)
  and questions about them (``"Q: where does a blick live? A: in the sea."``): knowledge a model only has if it
  saw enough of the table.

Teachers see many documents of their domains (fusion: each source knows what the pivot does not); the student
sees a few documents of every domain; everyone is evaluated on held-out documents of every domain.
"""
import random
from typing import Dict, List, Sequence

DOMAINS = ("arith", "count", "grammar", "lore")

_COLORS = ("red", "green", "blue", "grey", "white", "black", "yellow", "brown")
_PLACES = ("the sea", "the hills", "a cave", "the forest", "a lake", "the desert", "a tree", "the snow")
_FOODS = ("fish", "moss", "berries", "seeds", "bugs", "leaves", "roots", "grass")
_NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("child", "children"), ("farmer", "farmers"),
          ("horse", "horses"), ("teacher", "teachers"), ("fox", "foxes"))
_VERBS = (("sees", "see"), ("likes", "like"), ("follows", "follow"), ("helps", "help"), ("finds", "find"),
          ("watches", "watch"))
_ADJECTIVES = ("small", "big", "old", "young", "quiet", "happy", "red", "lazy")
_SYLLABLES = ("bl", "gr", "zo", "qu", "tr", "sn", "fl", "kr", "mo", "pi", "ve", "dra")
_ENDINGS = ("ick", "orp", "an", "ee", "ux", "ol", "ith", "amp")


def creature_table(seed: int = 1234, size: int = 48) -> List[Dict[str, str]]:
    """The fixed facts of the ``lore`` domain: ``size`` invented creatures with a colour, a home and a food."""
    rng = random.Random(seed)
    names = sorted({rng.choice(_SYLLABLES) + rng.choice(_ENDINGS) for _ in range(size * 4)})
    rng.shuffle(names)
    return [{"name": name, "color": rng.choice(_COLORS), "place": rng.choice(_PLACES), "food": rng.choice(_FOODS)}
            for name in names[:size]]


def _arith(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        parts.append(f"{a} + {b} = {a + b}.")
    return " ".join(parts)


def _count(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(2, 3)):
        start, length = rng.randint(0, 60), rng.randint(4, 8)
        if rng.random() < 0.5:
            parts.append("count " + " ".join(str(start + i) for i in range(length)) + ".")
        else:
            start += length
            parts.append("down " + " ".join(str(start - i) for i in range(length)) + ".")
    return " ".join(parts)


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    noun = rng.choice(_NOUNS)[1 if plural else 0]
    det = rng.choice(("the", "some")) if plural else rng.choice(("the", "a"))
    return f"{det} {rng.choice(_ADJECTIVES)} {noun}" if rng.random() < 0.5 else f"{det} {noun}"


def _grammar(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 4)):
        plural = rng.random() < 0.5
        verb = rng.choice(_VERBS)[1 if plural else 0]
        sentences.append(f"{_noun_phrase(rng, plural)} {verb} {_noun_phrase(rng, rng.random() < 0.5)} .")
    return " ".join(sentences)


def _lore(rng: random.Random, table: Sequence[Dict[str, str]]) -> str:
    parts = []
    for _ in range(rng.randint(2, 3)):
        c = rng.choice(table)
        form = rng.randrange(4)
        if form == 0:
            parts.append(f"a {c['name']} is {c['color']} and lives in {c['place']}.")
        elif form == 1:
            parts.append(f"a {c['name']} eats {c['food']}.")
        elif form == 2:
            parts.append(f"Q: where does a {c['name']} live? A: in {c['place']}.")
        else:
            parts.append(f"Q: what colour is a {c['name']}? A: {c['color']}.")
    return " ".join(parts)


def generate(domain: str, count: int, seed: int, table_seed: int = 1234) -> List[str]:
    """``count`` documents of ``domain``, reproducible from ``seed`` (the ``lore`` facts from ``table_seed``)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    rng = random.Random(f"{domain}:{seed}")
    table = creature_table(table_seed)
    make = {"arith": _arith, "count": _count, "grammar": _grammar, "lore": lambda r: _lore(r, table)}[domain]
    return [make(rng) for _ in range(count)]


def mixture(counts: Dict[str, int], seed: int) -> List[str]:
    """Documents of several domains (``{domain: count}``), shuffled reproducibly."""
    docs = [doc for domain, count in counts.items() for doc in generate(domain, count, seed)]
    random.Random(seed).shuffle(docs)
    return docs
