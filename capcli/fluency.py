"""What makes a caption a broken sentence: the one definition, for the caption search's rules
(``models/decoding.py``), for measuring captions (``scripts/fluency_report.py``) and for the confidence model.

A caption is a list of lower-case word tokens (``vocab.tokenize``). Its defects:

- ``repeated_trigram``: three words in a row said twice ("on a ramp on a ramp");
- ``repeated_word``: one word twice in a row ("a sheep sheep", "is is");
- ``repeated_phrase``: two words in a row, not both function words, said again within three words of the first
  ("riding a bike on a bike", "a table at a table", "a group of a group of");
- ``repeated_modifier``: a colour or adjective said twice in one noun phrase ("a yellow and yellow shirt", "a small
  black and white small brown toy");
- ``colour_list``: a noun phrase's colours joined by "and" twice ("two black and one brown and white ...", "a small
  black and brown and white hat"; people do so in 14 of Flickr8k's 35,455 captions, mostly in lists: "red and
  white and the crowd");
- ``bad_ending``: it ends on a word that needs another after it: an article, a preposition, a conjunction, an
  auxiliary, a possessive, or a colour or adjective without its noun ("a man in a black");
- ``orphan_modifier``: an article or a number, or its colour or adjective, followed by a word that cannot begin
  or continue a noun phrase ("a black is playing", "a in the", "two little are sitting");
- ``article_number``: "a" / "an" before a plural ("a lamps", "a small dogs");
- ``repeated_object``: a thing said again as the object of "in", "on", "through"... within a few words, the
  phrase ending on it: a thing in or on itself ("a bird is in a bird", "a bed in the bed"; not "a dirt bike in the
  dirt", where the first is no phrase's last word);
- ``number_singular``: a number whose noun phrase ends without its plural ("two microwave are", "three dog in",
  "three young three"): the phrase may hold singular nouns before it ("two football players"), and ending the
  caption there is a bad ending.

The word lists below are data, reviewed against Flickr8k's reference captions (train + val: the lists flag few
of the people's own sentences, see tests/test_fluency.py).
"""

from __future__ import annotations

from collections.abc import Sequence

DEFECTS = ("repeated_trigram", "repeated_word", "repeated_phrase", "repeated_modifier", "colour_list", "bad_ending",
           "orphan_modifier", "article_number", "repeated_object", "number_singular")

ARTICLES = frozenset(["a", "an", "the"])
SINGULAR_ARTICLES = frozenset(["a", "an"])
# Prepositions that need their object ("up", "down", "out", "off", "by", "outside", "inside", "behind", "around",
# "over", "away", "together": also adverbs, a caption may end on them: "a dog jumps over").
PREPOSITIONS = frozenset([
    "in", "on", "at", "of", "with", "to", "through", "into", "near", "from", "for", "under", "across", "along",
    "beside", "towards", "toward", "onto", "above", "against", "between", "during", "after", "before", "upon",
    "among", "amongst", "atop", "beneath", "below", "within", "without", "like", "via", "underneath", "past",
    "than", "about", "while", "whilst",
])
CONJUNCTIONS = frozenset(["and", "or", "but", "as", "that", "who", "which", "where", "because", "if", "so", "nor",
                          "while", "whilst", "whose", "when"])
AUXILIARIES = frozenset(["is", "are", "am", "was", "were", "be", "been", "being", "has", "have", "had", "does",
                         "do", "can", "will"])
# Possessives and determiners that need their noun ("her" also stands alone: "looking at her").
# ("other", "another", "both" end sentences: "each other", "one another", "they both".)
DETERMINERS = frozenset(["its", "his", "their", "my", "your", "our", "'s", "some", "each", "every", "several",
                         "many", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "these",
                         "those", "no", "few"])
COLOURS = frozenset([
    "white", "black", "brown", "red", "blue", "yellow", "green", "orange", "pink", "purple", "grey", "gray", "tan",
    "golden", "colorful", "colourful", "striped", "blond", "blonde", "silver", "beige", "maroon",
    "multicolored", "multi-colored", "spotted", "plaid", "camouflage", "teal", "turquoise",
])
# Adjectives that begin a noun phrase and, in a caption, are not its last word ("a man holds a small").
ADJECTIVES = frozenset([
    "little", "small", "large", "big", "young", "old", "older", "tall", "long", "wooden", "grassy", "snowy",
    "sandy", "rocky", "muddy", "wet", "shallow", "busy", "crowded", "empty", "giant", "huge", "tiny", "smiling",
    "bright", "asian", "elderly", "professional", "shirtless", "curly", "wide", "open", "various", "different",
])
# Plain words that end in "s" but are no plural ("a bus", "a sports car"), and plurals without an "s".
SINGULAR_S = frozenset([
    "bus", "gas", "canvas", "christmas", "news", "series", "species", "lens", "sports", "its", "his", "this",
    "is", "was", "has", "does", "as", "us", "yes", "plus", "across", "always", "perhaps", "towards", "whereas",
    "overseas", "afterwards", "backwards", "upwards", "downwards", "sideways", "outdoors", "indoors", "upstairs",
    "downstairs", "nervous", "famous", "various", "dangerous", "jealous", "curious", "serious", "previous",
    "gorgeous", "enormous", "tennis", "dress", "chess", "glass", "grass", "mattress", "walrus", "cactus", "circus",
    "octopus", "bonus", "lotus", "iris", "chaos", "atlas", "bias", "alias", "texas", "kansas", "paris", "vegas",
    "los", "arkansas", "athletics", "gymnastics", "physics", "mathematics", "aerobics", "acrobatics", "politics",
    "economics", "electronics", "graphics", "overalls", "pants", "shorts", "jeans", "glasses", "sunglasses",
    "goggles", "scissors", "trousers", "pajamas", "tights", "leggings", "binoculars", "headphones",
    "mens", "womens", "kids", "childrens",  # "a kids pool"
])
PLURALS_WITHOUT_S = frozenset(["men", "women", "children", "people", "feet", "teeth", "geese", "mice", "oxen"])
# Words a number's noun phrase may end on besides plurals: nouns whose plural is the same word, and plurals that
# SINGULAR_S keeps from "a" ("a kids pool", "a pair of shorts"): "two sheep are", "two kids are".
SAME_IN_PLURAL = frozenset([
    "sheep", "deer", "fish", "moose", "bison", "buffalo", "cattle", "police", "salmon", "trout", "aircraft",
    "swine", "elk", "kids", "mens", "womens", "childrens", "pants", "shorts", "jeans", "glasses", "sunglasses",
    "goggles", "scissors", "trousers", "pajamas", "tights", "leggings", "binoculars", "headphones", "overalls",
    "species", "series",
])

NUMBERS = frozenset(["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
# Words that open a noun phrase: after them, and after their colours and adjectives, comes its noun ("two black
# are" has none). A number may itself follow an opener ("the two dogs", "a two year old").
OPENERS = ARTICLES | NUMBERS | frozenset(["its", "his", "their", "my", "your", "our", "'s"])
MODIFIERS = COLOURS | ADJECTIVES
# Words a caption never ends on, wherever they stand (a modifier may end it outside a noun phrase: "is black").
# (Prepositions that are also adverbs end sentences: "from above", "walks past".)
BAD_ENDINGS = ARTICLES | CONJUNCTIONS | AUXILIARIES | DETERMINERS | (
    PREPOSITIONS - {"above", "below", "past", "underneath", "along", "beneath", "about"})
# Words that cannot follow an opener or its modifiers: the phrase's noun is missing ("a black is", "the in").
# ("and" goes on after a colour: "a black and white dog".)
# Words that carry no thing of their own: "on a" may come back at once ("on a rock on a hill"), "a bike" may not.
FUNCTION_WORDS = ARTICLES | PREPOSITIONS | CONJUNCTIONS | AUXILIARIES | DETERMINERS
# How near a two-word phrase may not come back: within three words flags 0.07% of Flickr8k's reference captions
# ("a boxer punches a boxer"), within four 0.4% ("rock climbing on a rock climbing wall").
PHRASE_WINDOW = 3
NOT_IN_NOUN_PHRASE = (OPENERS - NUMBERS) | PREPOSITIONS | CONJUNCTIONS | AUXILIARIES | frozenset(
    ["some", "another", "each", "every", "several", "many", "both", "these", "those", "this", "no"])
# Prepositions that put a thing in or on another, and how many words before one the thing may not have been said:
# within five, 9 of Flickr8k's 35,455 reference captions ("another plays badminton in the pool").
CONTAINING = frozenset(["in", "on", "into", "onto", "through", "inside"])
OBJECT_WINDOW = 5


def is_plural(word: str) -> bool:
    """Whether a word reads as a plural (or a verb's -s form: "a runs" is broken just the same)."""
    if word in PLURALS_WITHOUT_S or word in ("skis", "taxis", "kiwis"):
        return True
    if word.endswith("men") and word not in ("specimen", "abdomen", "stamen"):
        return True  # "policemen", "gentlemen"
    if word in SINGULAR_S or len(word) < 4 or not word.endswith("s") or "'" in word:
        return False
    return not word.endswith(("ss", "us", "is", "ous", "ics"))


def repeats_trigram(words: Sequence[str], n: int = 3) -> bool:
    """Whether some n words in a row occur twice in ``words``."""
    seen = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i: i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def repeats_phrase(words: Sequence[str], within: int = PHRASE_WINDOW) -> bool:
    """Whether two words in a row, not both :data:`FUNCTION_WORDS`, occur again starting at most ``within`` words
    after they did."""
    for j in range(2, len(words) - 1):
        for i in range(max(0, j - within), j - 1):
            if words[i: i + 2] == words[j: j + 2] and not {words[j], words[j + 1]} <= FUNCTION_WORDS:
                return True
    return False


def _noun_phrase_defects(words: Sequence[str]) -> set[str]:
    """The defects of the noun phrases that openers begin: the opener's modifiers run on (and "and" after a colour),
    then must come a word that can be its noun; after "a" / "an" not a plural. A phrase the caption ends in is
    one bad ending."""
    found: set[str] = set()
    for i, w in enumerate(words):
        if w not in OPENERS:
            continue
        j, said, ands = i + 1, set(), 0
        while j < len(words) and (words[j] in MODIFIERS or _colour_and(words, j)):
            if words[j] in MODIFIERS:
                if words[j] in said:
                    found.add("repeated_modifier")
                said.add(words[j])
            else:
                ands += 1
                if ands == 2:
                    break
            j += 1
        if ands == 2:
            found.add("colour_list")
            continue
        if j == len(words):
            if j > i + 1:
                found.add("bad_ending")  # "a man in a black"
            continue
        if words[j] in NOT_IN_NOUN_PHRASE:
            found.add("orphan_modifier")
        elif w in SINGULAR_ARTICLES and is_plural(words[j]):
            found.add("article_number")
        elif w in NUMBERS and not _in_a_phrase(words, i):
            found |= _number_defects(words, j, ands)
    return found


def _colour_and(words: Sequence[str], k: int) -> bool:
    """Whether word ``k`` is an "and" between colours, which goes on with a noun phrase ("a black and white dog")."""
    return words[k] == "and" and k > 0 and words[k - 1] in COLOURS


def _in_a_phrase(words: Sequence[str], i: int) -> bool:
    """Whether word ``i`` is inside a noun phrase that "a" / "an" opened (after it and its modifiers): a number
    there counts nothing ("a two year old boy", "a small two story house")."""
    k = i - 1
    while k >= 0 and (words[k] in MODIFIERS or _colour_and(words, k)):
        k -= 1
    return k >= 0 and words[k] in SINGULAR_ARTICLES


def _number_defects(words: Sequence[str], j: int, ands: int) -> set[str]:
    """A counting number's phrase from its first word after the number's modifiers (``j``): singular nouns and
    modifiers may run on ("two football players") until a plural; a word that cannot be in a noun phrase before
    then, or another number, is "number_singular", the caption's end a bad ending. ``ands``: the colours' "and"s
    said so far in the phrase."""
    singular = False
    for k in range(j, len(words)):
        x = words[k]
        if _colour_and(words, k):
            ands += 1
            if ands == 2:
                return {"colour_list"}
            continue
        if x in MODIFIERS:
            continue
        if x in NOT_IN_NOUN_PHRASE:
            return {"number_singular"} if singular else set()
        if x in NUMBERS:  # "three young three", "two dog two cats"
            return {"number_singular"}
        if is_plural(x) or x in SAME_IN_PLURAL:
            return set()
        singular = True
    return {"bad_ending"} if singular else set()


def _repeats_object(words: Sequence[str]) -> set[str]:
    """"in a X" ending its phrase on X where X ended a phrase (a word that cannot be in one follows it) at most
    :data:`OBJECT_WINDOW` words before the preposition; the caption's end there is a bad ending."""
    for k in range(3, len(words)):
        x = words[k]
        if words[k - 1] not in ARTICLES or words[k - 2] not in CONTAINING or x in FUNCTION_WORDS | MODIFIERS:
            continue
        if any(words[p] == x and words[p + 1] in NOT_IN_NOUN_PHRASE for p in range(max(0, k - 2 - OBJECT_WINDOW),
                                                                                  k - 2)):
            if k + 1 == len(words):
                return {"bad_ending"}
            if words[k + 1] in NOT_IN_NOUN_PHRASE:
                return {"repeated_object"}
    return set()


def defects(words: Sequence[str]) -> frozenset[str]:
    """The names (of ``DEFECTS``) of what is broken in a caption's words; empty for a sound sentence."""
    words = [w.lower() for w in words]
    found = _noun_phrase_defects(words) | _repeats_object(words)
    if repeats_trigram(words):
        found.add("repeated_trigram")
    if any(a == b for a, b in zip(words, words[1:], strict=False)):
        found.add("repeated_word")
    if repeats_phrase(words):
        found.add("repeated_phrase")
    if words and words[-1] in BAD_ENDINGS:
        found.add("bad_ending")
    return frozenset(found)
