"""A generated suite of NLI-style tasks for the offline demo. Deterministic, and each task tests a distinct
skill, so single-task adapters really differ and the interference between them is visible when fused:

- `syn_negation`   (contradiction/entailment): is the hypothesis the premise or its negation?
- `syn_numbers`    (contradiction/entailment): numeric comparison ("has 7 apples" ⇒ "more than 4 apples"?)
- `syn_category`   (entailment/neutral): hypernymy (a sparrow is a bird; a sparrow is not a fish)
- `syn_quantifier` (contradiction/entailment/neutral): all / some / some-not over a changed or kept scope
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lorafuse.tasks.registry import Example, Task, register_task

SIZES = {"train": 480, "validation": 120, "test": 240}
NAMES = ["Alice", "Bob", "Chen", "Dana", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kira", "Lars"]
NOUNS = ["door", "lamp", "river", "car", "window", "soup", "road", "garden", "shirt", "bridge", "coffee", "tower"]
ADJECTIVES = ["open", "bright", "cold", "red", "clean", "quiet", "broken", "wet", "old", "heavy", "empty", "warm"]
ITEMS = ["apples", "books", "coins", "stamps", "pencils", "shells", "tickets", "keys"]
CATEGORIES = {
    "bird": ["sparrow", "eagle", "robin", "parrot", "owl", "pigeon"],
    "fish": ["salmon", "trout", "tuna", "cod", "carp", "herring"],
    "tree": ["oak", "maple", "pine", "birch", "willow", "cedar"],
    "tool": ["hammer", "wrench", "chisel", "saw", "drill", "shovel"],
}
TIMES = ["yesterday", "this morning", "last week", "at noon"]
PLURALS = ["students", "dogs", "chairs", "paintings", "cars", "guests"]
PLACES = ["room", "house", "garden", "hall", "office", "yard"]


def _negation(rng: random.Random) -> Example:
    owner, noun, adj = rng.choice(NAMES), rng.choice(NOUNS), rng.choice(ADJECTIVES)
    negated = rng.random() < 0.5
    premise_neg = rng.random() < 0.3
    premise = f"{owner}'s {noun} is {'not ' if premise_neg else ''}{adj}."
    hyp_neg = premise_neg != negated
    hypothesis = f"{owner}'s {noun} is {'not ' if hyp_neg else ''}{adj}."
    return Example(premise, hypothesis, "contradiction" if negated else "entailment")


def _numbers(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.sample(range(1, 20), 2)
    return Example(f"{name} has {a} {item}.", f"{name} has more than {b} {item}.",
                   "entailment" if a > b else "contradiction")


def _category(rng: random.Random) -> Example:
    name, when = rng.choice(NAMES), rng.choice(TIMES)
    category, members = rng.choice(list(CATEGORIES.items()))
    member = rng.choice(members)
    premise = f"{name} saw a {member} {when}."
    if rng.random() < 0.5:
        return Example(premise, f"{name} saw a {category} {when}.", "entailment")
    other = rng.choice([c for c in CATEGORIES if c != category])
    return Example(premise, f"{name} saw a {other} {when}.", "neutral")


def _quantifier(rng: random.Random) -> Example:
    plural, place, adj = rng.choice(PLURALS), rng.choice(PLACES), rng.choice(ADJECTIVES)
    premise = f"All {plural} in the {place} are {adj}."
    kind = rng.randrange(3)
    if kind == 0:
        return Example(premise, f"Some {plural} in the {place} are {adj}.", "entailment")
    if kind == 1:
        return Example(premise, f"Some {plural} in the {place} are not {adj}.", "contradiction")
    other = rng.choice([p for p in PLACES if p != place])
    return Example(premise, f"All {plural} in the {other} are {adj}.", "neutral")


GENERATORS: dict[str, tuple[Callable[[random.Random], Example], tuple[str, ...], str]] = {
    "syn_negation": (_negation, ("contradiction", "entailment"), "negation: the premise or its negation"),
    "syn_numbers": (_numbers, ("contradiction", "entailment"), "numeric comparison"),
    "syn_category": (_category, ("entailment", "neutral"), "hypernymy: category membership"),
    "syn_quantifier": (_quantifier, ("contradiction", "entailment", "neutral"), "quantifiers and scope"),
}


def generate(task: str, split: str) -> list[Example]:
    """The split's examples, the same on every machine (seeded by task and split); splits share no pair."""
    make = GENERATORS[task][0]
    rng = random.Random(f"lorafuse-{task}-{split}")
    taken = set() if split == "train" else {(e.premise, e.hypothesis) for s in _earlier(split) for e in generate(task, s)}
    out: list[Example] = []
    for _ in range(100 * SIZES[split]):
        if len(out) == SIZES[split]:
            break
        ex = make(rng)
        if (ex.premise, ex.hypothesis) in taken:
            continue
        taken.add((ex.premise, ex.hypothesis))
        out.append(Example(ex.premise, ex.hypothesis, ex.label, f"{task}-{split}-{len(out)}"))
    if len(out) < SIZES[split]:
        raise RuntimeError(f"{task}: cannot generate {SIZES[split]} distinct {split} examples")
    return out


def _earlier(split: str) -> tuple[str, ...]:
    return {"validation": ("train",), "test": ("train", "validation")}.get(split, ())


def register_all() -> None:
    for name, (_, labels, description) in GENERATORS.items():
        register_task(Task(name, labels, description, loader=lambda split, n=name: generate(n, split)), replace=True)
