"""A small story grammar: characters, places, actions and feelings, deterministic from a seed.

Stories are lower-case words and punctuation separated by single spaces, e.g.

    once upon a time , a little fox lived in a quiet forest . the fox felt calm .
    one morning , the fox walked to the old bridge with a friend . ...

Why lower case with spaced punctuation: the word-level tokenizer (`tokenizer.py`) then needs no
casing or splitting rules, and `decode(encode(text)) == text` holds exactly.

Sentence lengths vary from 3 to about 21 words (a word is a run of letters; punctuation is not a
word). Emotion words appear in "feeling" sentences and as modifiers; "happy" is one of
`len(EMOTIONS)` emotions, drawn with probability `HAPPY_WEIGHT` (8%) where an emotion is drawn, so it is
present but not dominant: 2.2% of sentences and 15% of stories contain it (measured by
`corpus_stats` on 5000 stories and checked in the tests). It is still the single most likely
emotion word, so greedy decoding of a pretrained model favours it ("she felt so happy .").

    rng = random.Random(0)
    story = make_story(rng)        # one story (str)
    opening = story_opening(rng)   # an RL prompt: the first words of a fresh story
"""

from __future__ import annotations

import random
import re

# ----------------------------------------------------------------------------------------------
# Word lists
# ----------------------------------------------------------------------------------------------

ANIMALS = ("fox", "rabbit", "bear", "owl", "cat", "dog", "mouse", "bird", "frog", "turtle", "deer", "duck",
           "lion", "tiger", "wolf", "horse", "pig", "goat", "sheep", "squirrel", "dragon", "unicorn", "fish", "bee")
PEOPLE = ("girl", "boy", "king", "queen", "farmer", "baker", "painter", "teacher", "sailor", "child", "robot",
          "wizard", "knight", "princess", "prince", "doctor")
NAMES = ("mia", "leo", "lily", "max", "anna", "sam", "ella", "tom", "nora", "ben", "zoe", "finn", "ruby", "jack",
         "luna", "omar", "ivy", "theo", "maya", "eli")
SIZE_ADJ = ("little", "big", "small", "tiny", "young", "old", "tall", "clever", "kind", "gentle", "quiet", "curious",
            "brave", "shy", "silly", "wise", "fluffy", "friendly", "lonely", "busy")
PLACE_ADJ = ("quiet", "green", "dark", "sunny", "old", "small", "big", "busy", "magic", "secret", "cold", "warm",
             "far", "bright", "deep", "tall")
PLACES = ("forest", "village", "park", "garden", "river", "mountain", "castle", "meadow", "house", "school",
          "beach", "lake", "farm", "cave", "city", "field", "hill", "island", "market", "library", "bridge", "pond",
          "valley", "town")
THINGS = ("ball", "book", "kite", "hat", "box", "key", "map", "flower", "apple", "stone", "shell", "star", "drum",
          "cake", "lamp", "boat", "letter", "song", "blanket", "basket", "feather", "ring", "bell", "picture")
THING_ADJ = ("red", "blue", "shiny", "round", "soft", "heavy", "golden", "broken", "strange", "pretty", "tiny",
             "wooden", "new", "lost", "little", "old")
EMOTIONS = ("happy", "sad", "glad", "scared", "calm", "angry", "excited", "proud", "lonely", "tired", "surprised",
            "nervous", "cheerful", "worried", "hopeful", "curious", "grateful", "shy", "bored", "sleepy", "jolly",
            "upset", "thankful", "eager", "peaceful", "confused", "amazed", "gloomy", "content", "silly")
MOTION = ("walked", "ran", "went", "hurried", "wandered", "jumped", "danced", "flew", "swam", "climbed", "raced",
          "hopped", "strolled", "marched")
FIND = ("found", "saw", "picked up", "held", "carried", "painted", "lost", "shared", "hid", "dropped", "opened",
        "fixed", "made", "gave away", "showed")
INTRANSITIVE = ("smiled", "laughed", "cried", "slept", "waited", "listened", "sang", "sighed", "nodded", "played",
                "rested", "whispered", "giggled", "wondered", "yawned")
ADVERBS = ("slowly", "quickly", "softly", "quietly", "happily", "carefully", "loudly", "gently", "suddenly",
           "bravely", "sadly", "calmly")
TIMES = ("one morning", "one day", "that night", "the next day", "after lunch", "in the evening", "at sunrise",
         "later", "soon", "one afternoon", "after a while", "that summer", "in the winter")
COMPANIONS = ("with a friend", "with its mother", "with a new friend", "all alone", "with the other animals",
              "with a big smile", "without a sound")
WEATHER = ("the sun was warm", "the wind was cold", "the rain fell softly", "the sky was blue", "the stars were bright",
           "the snow was deep", "the moon was full", "the air smelled sweet")
AFTER_ACTION = ("again", "all day", "for a while")
OPENERS = ("once upon a time ,", "long ago ,", "one day ,", "in a faraway land ,", "not long ago ,")
ENDINGS = ("and that was the end .", "and they lived happily ever after .", "it was a good day .",
           "from that day on , {s} was never {e} again .", "{s} went home and slept .",
           "{s} would always remember that day .")

#: P("happy") each time an emotion word is drawn (the other 29 emotions share the rest uniformly,
#: ~3.2% each); about a quarter of sentences draw one, so ~2.2% of sentences contain "happy".
HAPPY_WEIGHT = 0.08
assert EMOTIONS[0] == "happy"

WORD_RE = re.compile(r"[a-z]+")


# ----------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------

def _a(phrase: str) -> str:
    """`phrase` with its indefinite article ("a fox", "an owl")."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _emotion(rng: random.Random) -> str:
    """An emotion word: "happy" with probability `HAPPY_WEIGHT`, else one of the others uniformly."""
    return "happy" if rng.random() < HAPPY_WEIGHT else rng.choice(EMOTIONS[1:])


def _place(rng: random.Random) -> str:
    if rng.random() < 0.6:
        adj_place = f"{rng.choice(PLACE_ADJ)} {rng.choice(PLACES)}"
        return f"the {adj_place}" if rng.random() < 0.5 else _a(adj_place)
    return f"the {rng.choice(PLACES)}"


def _thing(rng: random.Random) -> str:
    return _a(f"{rng.choice(THING_ADJ)} {rng.choice(THINGS)}" if rng.random() < 0.6 else rng.choice(THINGS))


def _hero(rng: random.Random) -> tuple[str, str, str]:
    """(introduction, short reference, pronoun) of the story's main character."""
    if rng.random() < 0.4:
        name = rng.choice(NAMES)
        kind = rng.choice(PEOPLE + ANIMALS)
        return f"{_a(rng.choice(SIZE_ADJ))} {kind} named {name}", name, rng.choice(("she", "he"))
    kind = rng.choice(ANIMALS + PEOPLE)
    return _a(f"{rng.choice(SIZE_ADJ)} {kind}"), f"the {kind}", rng.choice(("she", "he", "it")) if kind in ANIMALS \
        else rng.choice(("she", "he"))


def _subject(rng: random.Random, ref: str, pron: str) -> str:
    return ref if rng.random() < 0.5 else pron


def _sentence(rng: random.Random, ref: str, pron: str) -> str:
    """One body sentence (without the full stop); lengths range from 2-3 words to about 20."""
    s = _subject(rng, ref, pron)
    kind = rng.random()
    if kind < 0.14:  # feeling: 3-6 words
        adv = f" {rng.choice(('very', 'so', 'a little'))}" if rng.random() < 0.4 else ""
        return f"{s} felt{adv} {_emotion(rng)}"
    if kind < 0.24:  # short action: 3-4 words
        adv = rng.choice(ADVERBS) if rng.random() < 0.7 else rng.choice(AFTER_ACTION)
        return f"{s} {rng.choice(INTRANSITIVE)} {adv}"
    if kind < 0.44:  # motion: 5-14 words
        time = f"{rng.choice(TIMES)} , " if rng.random() < 0.4 else ""
        comp = f" {rng.choice(COMPANIONS)}" if rng.random() < 0.4 else ""
        return f"{time}{s} {rng.choice(MOTION)} to {_place(rng)}{comp}"
    if kind < 0.62:  # object: 4-12 words
        where = f" near {_place(rng)}" if rng.random() < 0.4 else ""
        return f"{s} {rng.choice(FIND)} {_thing(rng)}{where}"
    if kind < 0.70:  # weather: 4-5 words
        return rng.choice(WEATHER)
    if kind < 0.80:  # because: 7-14 words
        return f"{s} {rng.choice(INTRANSITIVE)} because {rng.choice(('she', 'he', 'it', 'they'))} felt " \
               f"{_emotion(rng)} about {_thing(rng)}"
    if kind < 0.90:  # compound: 9-22 words
        time = f"{rng.choice(TIMES)} , " if rng.random() < 0.5 else ""
        comp = f" {rng.choice(COMPANIONS)}" if rng.random() < 0.5 else ""
        return f"{time}{s} {rng.choice(MOTION)} to {_place(rng)}{comp} , and {rng.choice(('she', 'he', 'it', 'they'))} " \
               f"{rng.choice(FIND)} {_thing(rng)}"
    # meeting someone: 8-16 words
    other = rng.choice(ANIMALS + PEOPLE)
    return f"at {_place(rng)} , {s} met {_a(rng.choice(SIZE_ADJ))} {other} who looked {_emotion(rng)}"


def _opening(rng: random.Random) -> tuple[str, str, str]:
    intro, ref, pron = _hero(rng)
    return f"{rng.choice(OPENERS)} {intro}", ref, pron


def _continuation(rng: random.Random, ref: str, pron: str, min_sentences: int, max_sentences: int) -> str:
    """What follows a story's opening: where the hero lived, `min..max` body sentences, sometimes an ending."""
    parts = [f"lived in {_place(rng)} ."]
    for _ in range(rng.randint(min_sentences, max_sentences)):
        parts.append(_sentence(rng, ref, pron) + " .")
    if rng.random() < 0.5:
        parts.append(rng.choice(ENDINGS).format(s=ref, e=_emotion(rng)))
    return " ".join(parts)


def make_story(rng: random.Random, min_sentences: int = 3, max_sentences: int = 9) -> str:
    """One story: an opening sentence, `min..max` body sentences, sometimes an ending line."""
    opening, ref, pron = _opening(rng)
    return f"{opening} {_continuation(rng, ref, pron, min_sentences, max_sentences)}"


def story_continuations(rng: random.Random, n: int, min_sentences: int = 3,
                        max_sentences: int = 9) -> tuple[str, list[str]]:
    """One opening (an RL prompt, as `story_opening` draws it) and `n` independent continuations of it,
    each with its leading space, so that `opening + continuation` is a story of the grammar."""
    if n < 1:
        raise ValueError(f"story_continuations: n must be >= 1, got {n}")
    opening, ref, pron = _opening(rng)
    return opening, [" " + _continuation(rng, ref, pron, min_sentences, max_sentences) for _ in range(n)]


def story_opening(rng: random.Random) -> str:
    """An RL prompt: a story's opening words up to the hero, e.g. "once upon a time , a little fox"."""
    return _opening(rng)[0]


def vocabulary() -> list[str]:
    """Every token a story can contain (words and punctuation), sorted."""
    words: set[str] = set()
    for group in (ANIMALS, PEOPLE, NAMES, SIZE_ADJ, PLACE_ADJ, PLACES, THINGS, THING_ADJ, EMOTIONS, MOTION, FIND,
                  INTRANSITIVE, ADVERBS, AFTER_ACTION, TIMES, COMPANIONS, WEATHER, OPENERS, ENDINGS):
        for phrase in group:
            words.update(phrase.replace("{s}", "").replace("{e}", "").split())
    words.update("the a to near felt very so little because about and at met who looked lived in named she he it "
                 "they an , .".split())
    return sorted(words)


def sentences(text: str) -> list[str]:
    """The sentences of `text` (split after . ! ?; a trailing unfinished sentence counts too)."""
    return [s for s in re.split(r"(?<=[.!?])\s*", text) if WORD_RE.search(s)]


def corpus_stats(stories: list[str]) -> dict[str, float]:
    """Sentence counts and lengths, and how often "happy" occurs (for docs and tests)."""
    sents = [s for st in stories for s in sentences(st)]
    lengths = [len(WORD_RE.findall(s)) for s in sents]
    with_happy = sum(1 for s in sents if "happy" in WORD_RE.findall(s))
    return {"n_stories": len(stories), "n_sentences": len(sents), "min_len": min(lengths), "max_len": max(lengths),
            "mean_len": sum(lengths) / len(lengths), "happy_sentence_frac": with_happy / len(sents),
            "happy_story_frac": sum(1 for st in stories if "happy" in WORD_RE.findall(st)) / len(stories)}
