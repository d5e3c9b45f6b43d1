"""Makes data/corpus/{train,validation}.txt: a small synthetic English corpus for causal
language modelling (one short story paragraph per line).

The paragraphs come from a small story grammar (a character, a place, a routine, an
event, a bit of dialogue, an ending) with a varied vocabulary, so a tiny GPT-2 has
regularities to learn (agreement of names and pronouns, recurring phrases, punctuation)
without the corpus being a copy of anything.

Deterministic: a fixed seed and only `random.Random.random()` (stable across Python
versions), so running it again rewrites byte-identical files. No third-party package.

    python3 data/make_corpus.py          # writes the files
    python3 data/make_corpus.py --check  # exits 1 if the committed files differ
"""
import pathlib
import random
import sys

SEED = 20260502
PARAGRAPHS = {"train": 600, "validation": 60}

CHARACTERS = [
    ("Mira", "she", "her"), ("Tomas", "he", "his"), ("Anika", "she", "her"),
    ("Leo", "he", "his"), ("Yusuf", "he", "his"), ("Hana", "she", "her"),
    ("Pip", "it", "its"), ("Olga", "she", "her"), ("Ravi", "he", "his"),
    ("Nell", "she", "her"), ("Bruno", "he", "his"), ("Ines", "she", "her"),
]
KINDS = ["fox", "baker", "sailor", "painter", "goat", "clockmaker", "gardener", "owl",
         "teacher", "fisherman", "robot", "beekeeper", "mouse", "librarian", "potter"]
ADJS = ["curious", "quiet", "cheerful", "clever", "stubborn", "gentle", "restless",
        "patient", "brave", "forgetful", "kind", "tired", "proud", "shy"]
PLACES = ["by the river", "at the edge of the forest", "in a small town by the sea",
          "on a windy hill", "above the old bakery", "near the railway station",
          "in a village full of bells", "beside a frozen lake", "in a house with a red door",
          "at the end of a long road"]
TIMES = ["morning", "evening", "Sunday", "spring", "night", "market day", "winter"]
ROUTINES = [
    "walked to the market to buy bread", "watered the tomatoes in the garden",
    "counted the boats in the harbour", "read two chapters of an old book",
    "swept the stones in front of the door", "climbed the hill to watch the sunrise",
    "fixed something that someone else had broken", "wrote a letter to a friend far away",
    "fed the ducks at the pond", "listened to the rain on the roof",
]
OBJECTS = ["a silver key", "a map with a torn corner", "a tiny wooden boat",
           "a jar of honey", "a lost glove", "a letter without a name",
           "a bell that would not ring", "a seed as large as a plum", "a blue feather",
           "a broken compass"]
FINDPLACES = ["under a bench", "in the tall grass", "behind the well", "on the doorstep",
              "between two rocks", "inside an empty basket", "at the bottom of a drawer"]
FEELINGS = ["surprised", "worried", "delighted", "puzzled", "excited", "uneasy"]
QUOTES = [
    "Someone must be looking for this", "This changes everything",
    "I have seen this before, but where", "Today will not be an ordinary day",
    "Maybe it is a sign", "I should ask the others", "What a strange thing to find",
]
HELPERS = ["the old miller", "a passing traveller", "the twins next door", "the mayor",
           "a talkative crow", "the woman who sold apples"]
ENDINGS = [
    "In the end, {name} gave {obj} to {helper}, who knew exactly what to do with it.",
    "That night, {name} put {obj} on the shelf and slept better than ever.",
    "By the time the sun went down, the whole {town} was talking about {obj}.",
    "{Pron} never found out where {obj} came from, but {pron} kept it safe for years.",
    "Together with {helper}, {name} followed the clue until the {time} was over.",
    "The next {time}, {obj} was gone, and nobody could explain why.",
]
WEATHER = ["It was raining softly.", "The sky was clear and cold.", "A warm wind blew from the south.",
           "Fog covered the streets.", "Snow had fallen during the night.", ""]


def pick(rng, items):
    return items[int(rng.random() * len(items))]


def paragraph(rng):
    name, pron, poss = pick(rng, CHARACTERS)
    kind, adj, place = pick(rng, KINDS), pick(rng, ADJS), pick(rng, PLACES)
    time, obj = pick(rng, TIMES), pick(rng, OBJECTS)
    article = "an" if adj[0] in "aeiou" else "a"
    s = [f"{name} was {article} {adj} {kind} who lived {place}."]
    s.append(f"Every {time}, {pron} {pick(rng, ROUTINES)}.")
    if rng.random() < 0.5:
        s.append(f"{pick(rng, WEATHER)}")
    s.append(f"One {pick(rng, TIMES)}, {pron} found {obj} {pick(rng, FINDPLACES)}.")
    s.append(f"{pron.capitalize()} was {pick(rng, FEELINGS)}.")
    if rng.random() < 0.7:
        s.append(f"\"{pick(rng, QUOTES)},\" said {name}.")
    if rng.random() < 0.4:
        s.append(f"{pron.capitalize()} showed it to {pick(rng, HELPERS)} and told {poss} story twice.")
    ending = pick(rng, ENDINGS).format(
        name=name, obj=obj.replace("a ", "the ", 1), helper=pick(rng, HELPERS),
        town=pick(rng, ["town", "village", "street"]), time=pick(rng, TIMES),
        pron=pron, Pron=pron.capitalize())
    s.append(ending)
    return " ".join(x for x in s if x)


def render():
    rng = random.Random(SEED)
    return {name: "".join(paragraph(rng) + "\n" for _ in range(n)) for name, n in PARAGRAPHS.items()}


def main():
    folder = pathlib.Path(__file__).parent / "corpus"
    files = render()
    if "--check" in sys.argv:
        stale = [n for n, t in files.items() if (folder / f"{n}.txt").read_text("utf-8") != t]
        if stale:
            sys.exit(f"stale: {stale}; run python3 data/make_corpus.py")
        print("corpus files are up to date")
        return
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.txt").write_text(text, "utf-8")
        print(f"wrote {folder / name}.txt ({len(text.splitlines())} lines, {len(text)} bytes)")


if __name__ == "__main__":
    main()
