"""Makes cli/bundled/sentiment/{train,validation}.jsonl: a small synthetic sentiment set.

Every example is a short review of a film, a restaurant, a book, a hotel, a game or a
gadget, written from templates with a varied vocabulary, labelled "positive" or
"negative". A bag of words is not enough to get all of it right: negation flips an
adjective ("was not good"), contrast makes the clause after "but" decide ("the plot was
dull, but the acting was superb"), "not bad" is praise and some sentences carry no
opinion at all. Classes are balanced in each split.

Deterministic: a fixed seed and only `random.Random.random()` (stable across Python
versions), so running it again rewrites byte-identical files. No third-party package.

    python3 cli/bundled/make_sentiment.py          # writes the files
    python3 cli/bundled/make_sentiment.py --check  # exits 1 if the committed files differ
"""
import json
import pathlib
import random
import sys

SEED = 20260501
SIZES = {"train": 1600, "validation": 320}

DOMAINS = {
    "film": {
        "items": ["film", "movie", "picture", "documentary", "thriller", "comedy", "sequel"],
        "parts": ["plot", "acting", "soundtrack", "ending", "dialogue", "cast", "pacing",
                  "camera work", "script", "lead actor", "special effects", "first hour"],
        "verbs": ["watched", "saw", "streamed"],
    },
    "restaurant": {
        "items": ["restaurant", "bistro", "café", "diner", "pizzeria", "noodle bar"],
        "parts": ["food", "service", "soup", "dessert", "staff", "menu", "coffee",
                  "atmosphere", "wine list", "main course", "bread", "terrace"],
        "verbs": ["visited", "tried", "ate at"],
    },
    "book": {
        "items": ["book", "novel", "memoir", "short story collection", "cookbook", "biography"],
        "parts": ["writing", "story", "characters", "final chapter", "prose", "translation",
                  "opening", "narrator", "plot twist", "illustrations"],
        "verbs": ["read", "finished", "borrowed"],
    },
    "hotel": {
        "items": ["hotel", "hostel", "guesthouse", "resort", "inn"],
        "parts": ["room", "bed", "breakfast", "reception", "pool", "view", "shower",
                  "location", "cleaning", "wifi"],
        "verbs": ["stayed at", "booked", "checked into"],
    },
    "game": {
        "items": ["game", "puzzle game", "board game", "racing game", "role-playing game"],
        "parts": ["controls", "graphics", "music", "level design", "story mode", "multiplayer",
                  "tutorial", "boss fights", "difficulty curve", "map"],
        "verbs": ["played", "bought", "finished"],
    },
    "gadget": {
        "items": ["phone", "laptop", "blender", "headset", "camera", "kettle", "smartwatch"],
        "parts": ["battery", "screen", "build quality", "speaker", "charger", "manual",
                  "keyboard", "price", "software", "design"],
        "verbs": ["bought", "used", "ordered"],
    },
}

POS_ADJ = ["good", "great", "excellent", "superb", "wonderful", "delightful", "charming",
           "brilliant", "lovely", "impressive", "fantastic", "solid", "clever", "moving",
           "fresh", "generous", "reliable", "gorgeous", "friendly", "memorable", "smooth",
           "thoughtful", "polished", "outstanding", "pleasant", "tasty", "comfortable",
           "gripping", "elegant", "fun"]
NEG_ADJ = ["bad", "terrible", "awful", "dull", "boring", "disappointing", "bland", "sloppy",
           "clumsy", "weak", "mediocre", "tedious", "rude", "noisy", "flimsy", "confusing",
           "overpriced", "forgettable", "stale", "cold", "dirty", "broken", "slow", "messy",
           "shallow", "annoying", "uncomfortable", "predictable", "lazy", "painful"]
INTENS = ["", "", "", "really ", "very ", "truly ", "quite ", "remarkably ", "rather ",
          "absolutely ", "surprisingly "]
POS_VERB = ["loved", "enjoyed", "adored", "liked", "appreciated", "admired"]
NEG_VERB = ["hated", "disliked", "regretted", "could not stand", "was bored by",
            "was annoyed by"]
POS_OVERALL = ["I would happily go back.", "Highly recommended.", "Worth every penny.",
               "I will tell my friends about it.", "A real pleasure.", "Five stars from me.",
               "I would do it again tomorrow.", "Easily the best this year."]
NEG_OVERALL = ["I want my money back.", "Avoid it.", "Not worth the money.",
               "I will not go back.", "A complete waste of time.", "One star, sadly.",
               "I would not do it again.", "Easily the worst this year."]
NEUTRAL = ["We went on a Tuesday.", "It was my second time.", "My brother came along.",
           "I had read a few reviews first.", "It had rained all morning.",
           "The place was easy to find.", "I went in with no expectations.",
           "It lasted about two hours.", "A friend had suggested it.", ""]
OPENERS = ["", "", "Honestly, ", "Overall, ", "To be fair, ", "In short, ", "Frankly, ",
           "All in all, ", "I have to say "]
NEGATORS = ["was not", "was never", "was hardly", "wasn't", "was not at all", "was far from"]


def pick(rng, items):
    return items[int(rng.random() * len(items))]


def adjective(rng, positive):
    return pick(rng, POS_ADJ if positive else NEG_ADJ)


def capital(text):
    return text[:1].upper() + text[1:]


def simple(rng, d, positive):
    part = pick(rng, d["parts"])
    return f"{pick(rng, OPENERS)}the {part} was {pick(rng, INTENS)}{adjective(rng, positive)}."


def negated(rng, d, positive):
    # "not good" is negative, "not bad" is positive.
    part = pick(rng, d["parts"])
    return f"The {part} {pick(rng, NEGATORS)} {adjective(rng, not positive)}."


def contrast(rng, d, positive):
    a, b = pick(rng, d["parts"]), pick(rng, d["parts"])
    if rng.random() < 0.5:
        return (f"The {a} was {adjective(rng, not positive)}, but the {b} was "
                f"{pick(rng, INTENS)}{adjective(rng, positive)}.")
    verb = pick(rng, POS_VERB if positive else NEG_VERB)
    return (f"Although the {a} was {adjective(rng, not positive)}, I {verb} the "
            f"{pick(rng, d['items'])}.")


def verb_sentence(rng, d, positive):
    item = pick(rng, d["items"])
    if rng.random() < 0.3:
        # Negated verb: "did not enjoy" is negative, "did not hate" is mildly positive.
        verb = pick(rng, ["enjoy", "like", "love"] if not positive else ["hate", "mind", "regret"])
        return f"I did not {verb} this {item}."
    return f"I {pick(rng, POS_VERB if positive else NEG_VERB)} this {item}."


def recommend(rng, d, positive):
    item = pick(rng, d["items"])
    if positive:
        return f"I would {pick(rng, ['', 'definitely ', 'gladly '])}recommend this {item}."
    return f"I would {pick(rng, ['not', 'never', 'not really'])} recommend this {item}."


def overall(rng, positive):
    return pick(rng, POS_OVERALL if positive else NEG_OVERALL)


FORMS = [simple, negated, contrast, verb_sentence, recommend]


def review(rng, positive):
    d = DOMAINS[pick(rng, sorted(DOMAINS))]
    verb, item = pick(rng, d["verbs"]), pick(rng, d["items"])
    sentences = []
    if rng.random() < 0.4:
        sentences.append(f"I {verb} this {item} last {pick(rng, ['week', 'month', 'weekend', 'summer'])}.")
    sentences.append(pick(rng, NEUTRAL))
    # One to three opinion sentences of the review's polarity.
    for _ in range(1 + int(rng.random() * 3)):
        sentences.append(pick(rng, FORMS)(rng, d, positive))
    if rng.random() < 0.35:
        sentences.append(overall(rng, positive))
    text = " ".join(capital(s) for s in sentences if s)
    return text


def split(rng, n):
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        rows.append({"text": review(rng, positive), "label": "positive" if positive else "negative"})
    # Shuffle with random() only (Fisher-Yates), so the file does not alternate labels.
    for i in range(len(rows) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        rows[i], rows[j] = rows[j], rows[i]
    return rows


def render():
    rng = random.Random(SEED)
    out = {}
    seen = set()
    for name, n in SIZES.items():
        rows = split(rng, n)
        out[name] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        overlap = seen.intersection(r["text"] for r in rows)
        if name == "validation":
            # Identical texts across splits would inflate validation accuracy; report it.
            print(f"validation texts also in train: {len(overlap)} of {n}")
        seen.update(r["text"] for r in rows)
    return out


def main():
    folder = pathlib.Path(__file__).parent / "sentiment"
    files = render()
    if "--check" in sys.argv:
        stale = [n for n, t in files.items() if (folder / f"{n}.jsonl").read_text("utf-8") != t]
        if stale:
            sys.exit(f"stale: {stale}; run python3 cli/bundled/make_sentiment.py")
        print("sentiment files are up to date")
        return
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.jsonl").write_text(text, "utf-8")
        print(f"wrote {folder / name}.jsonl ({len(text.splitlines())} rows, {len(text)} bytes)")


if __name__ == "__main__":
    main()
