"""Regenerate `sharegpt_mini.jsonl`: synthetic ShareGPT-format conversations for benchmarks.

The real ShareGPT dump is 600+ MB and must be downloaded; a benchmark needs only prompts and
answers of realistic, *varied* lengths. This script writes them from templates with a fixed
seed, so the file is reproducible and carries no third-party text:

    .venv/bin/python pdcore/bench/data/make_sharegpt_mini.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("sharegpt_mini.jsonl")
COUNT = 240

TOPICS: dict[str, list[str]] = {
    "cooking": [
        "a sourdough starter",
        "a weeknight curry",
        "roast vegetables",
        "fresh pasta",
        "a lemon tart",
        "miso soup",
        "a braised short rib",
        "pickled onions",
    ],
    "programming": [
        "a Python decorator",
        "a SQL join",
        "a REST API",
        "a race condition",
        "a binary search",
        "a Rust borrow error",
        "a memory leak",
        "a unit test",
    ],
    "travel": [
        "a week in Lisbon",
        "a train trip across Japan",
        "a hike in Patagonia",
        "a weekend in Montreal",
        "a road trip through Morocco",
        "a ferry to the islands",
    ],
    "fitness": [
        "a beginner running plan",
        "a kettlebell routine",
        "stretching after work",
        "a swimming drill",
        "recovering from a sprain",
        "a rowing workout",
    ],
    "finance": [
        "a monthly budget",
        "an emergency fund",
        "index funds",
        "a mortgage refinance",
        "paying off a credit card",
        "saving for a sabbatical",
    ],
    "history": [
        "the printing press",
        "the Silk Road",
        "the Hanseatic League",
        "the Meiji era",
        "the Roman aqueducts",
        "the Bronze Age collapse",
    ],
    "science": [
        "photosynthesis",
        "plate tectonics",
        "black holes",
        "CRISPR",
        "ocean currents",
        "the immune system",
        "superconductors",
        "the water cycle",
    ],
    "writing": [
        "a cover letter",
        "a short story opening",
        "a wedding toast",
        "a product review",
        "a haiku about autumn",
        "an apology email",
        "a grant proposal",
    ],
    "gardening": [
        "tomatoes on a balcony",
        "composting",
        "pruning roses",
        "a herb spiral",
        "raised beds",
        "watering succulents",
    ],
    "music": [
        "learning the guitar",
        "music theory for beginners",
        "mixing a podcast",
        "writing a chorus",
        "practising scales",
        "tuning a violin",
    ],
    "career": [
        "a salary negotiation",
        "a job interview",
        "switching to data science",
        "giving feedback",
        "managing a remote team",
        "asking for a promotion",
    ],
    "math": [
        "a proof by induction",
        "eigenvalues",
        "Bayes' theorem",
        "the birthday paradox",
        "integration by parts",
        "prime numbers",
        "a geometric series",
    ],
}

OPENERS = [
    "Can you help me with {s}?",
    "I have a question about {s}.",
    "Explain {s} to me.",
    "What should I know about {s}?",
    "Give me a plan for {s}.",
    "I am stuck on {s}; where do I start?",
    "Write something about {s}.",
    "Compare two ways of approaching {s}.",
    "Summarize the key ideas behind {s}.",
]
CONTEXT = [
    "I am a complete beginner and have about {n} minutes a day.",
    "Last time I tried, it went wrong after step {n}.",
    "My friend says it takes {n} weeks, which sounds too long.",
    "I would like a list, not an essay.",
    "Please keep it short.",
    "Assume I already know the basics.",
    "I need to explain it to a {n}-year-old.",
    "The deadline is in {n} days.",
    "I have a budget of about {n} dollars.",
    "Here is what I wrote so far, tell me what is wrong with it.",
]
FILLER = [
    "It is {adj} and I keep thinking about it.",
    "The {adj} part is what confuses me.",
    "Everyone online gives a {adj} answer.",
    "I read three articles and they disagree.",
    "My notes from last month say something different.",
    "I tried the usual advice and it did not help much.",
    "There is probably a {adj} detail I am missing.",
    "To be honest I am not sure the question even makes sense.",
]
ADJ = ["tricky", "simple", "surprising", "subtle", "important", "boring", "strange", "useful"]
ANSWER_OPEN = [
    "Sure. Here is a clear way to think about {s}.",
    "Good question.",
    "Let us break {s} into a few steps.",
    "Short answer: it depends, but here is how.",
    "Here is an overview of {s}, followed by practical tips.",
]
ANSWER_STEP = [
    "First, {v} the {o} before anything else.",
    "Next, {v} the {o} carefully.",
    "A common mistake is to skip the {o}; {v} it instead.",
    "If the {o} looks wrong, {v} it again and compare.",
    "Many people {v} the {o} too early, which causes problems later.",
    "Measure how long it takes to {v} the {o}; that tells you a lot.",
    "You can {v} the {o} in about {n} minutes once you have practised.",
]
VERBS = [
    "check",
    "prepare",
    "review",
    "adjust",
    "simplify",
    "test",
    "write down",
    "measure",
    "organize",
    "revisit",
    "compare",
    "estimate",
]
OBJECTS = [
    "basics",
    "first draft",
    "assumptions",
    "numbers",
    "schedule",
    "ingredients",
    "edge cases",
    "main idea",
    "materials",
    "goals",
    "budget",
    "examples",
]
ANSWER_CLOSE = [
    "Let me know if you want more detail on any step.",
    "In summary: start small, check often, and adjust as you go.",
    "That should be enough to get you started.",
    "If anything is unclear, ask and I will expand on it.",
]


def _fill(rng: random.Random, template: str, subject: str) -> str:
    return template.format(
        s=subject,
        n=rng.randint(2, 90),
        adj=rng.choice(ADJ),
        v=rng.choice(VERBS),
        o=rng.choice(OBJECTS),
    )


def _prompt(rng: random.Random, subject: str) -> str:
    parts = [_fill(rng, rng.choice(OPENERS), subject)]
    extra = rng.choice([0, 0, 1, 1, 2, 3, 5, 8, 12])  # mostly short, sometimes long
    for _ in range(extra):
        parts.append(_fill(rng, rng.choice(CONTEXT + FILLER), subject))
    return " ".join(parts)


def _answer(rng: random.Random, subject: str) -> str:
    paragraphs = [_fill(rng, rng.choice(ANSWER_OPEN), subject)]
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 5])):
        steps = [_fill(rng, rng.choice(ANSWER_STEP), subject) for _ in range(rng.randint(1, 4))]
        paragraphs.append(" ".join(steps))
    if rng.random() < 0.6:
        paragraphs.append(rng.choice(ANSWER_CLOSE))
    return "\n\n".join(paragraphs)


def main() -> None:
    rng = random.Random(20241127)
    topics = sorted(TOPICS)
    lines = []
    for i in range(COUNT):
        subject = rng.choice(TOPICS[topics[i % len(topics)]])
        turns = [_prompt(rng, subject), _answer(rng, subject)]
        if rng.random() < 0.1:  # a few multi-turn conversations; benchmarks use the first pair
            turns += [_prompt(rng, subject), _answer(rng, subject)]
        conv = [{"from": "human" if j % 2 == 0 else "gpt", "value": t} for j, t in enumerate(turns)]
        lines.append(
            json.dumps({"id": f"mini-{i:04d}", "conversations": conv}, separators=(",", ":"))
        )
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
