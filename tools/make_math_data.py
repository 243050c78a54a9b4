"""Grade-school arithmetic word problems with short, human-style solutions ending in \\boxed{N}.

    python tools/make_math_data.py --n 128 --seed 0 --out data/math_sft.jsonl
    python tools/make_math_data.py --split train --n 512 --out data/math_train.jsonl   # and test, ood, general

Rows are {"prompt", "response", "answer"}. The same --n and --seed give the same bytes. Solutions
stay short (a few sentences) so that a 135M model can score and realign them on a CPU; they are
written the way a person would, i.e. off-policy text for the DDT statistics to detect."""
import argparse
import json
import os
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "George", "Hana", "Ivan", "Jade", "Kofi",
         "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor"]
THINGS = ["marbles", "stickers", "pencils", "trading cards", "stamps", "seashells", "beads",
          "cookies", "crayons", "toy cars"]
GOODS = ["notebooks", "pens", "apples", "mangoes", "comic books", "juice boxes", "erasers", "candles"]
EXTRAS = ["backpack", "lunch box", "water bottle", "scarf", "board game", "kite"]
VEHICLES = ["train", "bus", "car", "truck", "boat"]
CLOSERS = ["The answer is \\boxed{{{}}}.", "So the answer is \\boxed{{{}}}.", "Final answer: \\boxed{{{}}}."]


def shopping(r):
    name, goods, extra = r.choice(NAMES), r.choice(GOODS), r.choice(EXTRAS)
    a, p, q = r.randint(2, 9), r.randint(2, 12), r.randint(5, 30)
    total = a * p + q
    return (f"{name} buys {a} {goods} for ${p} each and a {extra} for ${q}. "
            f"How many dollars does {name} spend in all?",
            f"The {goods} cost {a} x {p} = {a * p} dollars. Adding the {extra} gives "
            f"{a * p} + {q} = {total} dollars.", total)


def change(r):
    name, goods = r.choice(NAMES), r.choice(GOODS)
    a, p = r.randint(2, 8), r.randint(2, 9)
    bill = r.choice([bill for bill in (20, 50, 100) if bill > a * p])
    return (f"{name} buys {a} {goods} at ${p} each and pays with a ${bill} bill. "
            f"How much change, in dollars, does {name} get back?",
            f"The {goods} cost {a} x {p} = {a * p} dollars. The change is {bill} - {a * p} = "
            f"{bill - a * p} dollars.", bill - a * p)


def sharing(r):
    name, things = r.choice(NAMES), r.choice(THINGS)
    k, each = r.randint(2, 9), r.randint(2, 15)
    return (f"{name} has {k * each} {things} and shares them equally among {k} friends. "
            f"How many {things} does each friend get?",
            f"We split {k * each} {things} into {k} equal groups. {k * each} / {k} = {each}, "
            f"so each friend gets {each}.", each)


def bagging(r):
    name, things = r.choice(NAMES), r.choice(THINGS)
    k, bags = r.randint(3, 12), r.randint(2, 12)
    return (f"{name} puts {k * bags} {things} into bags of {k}. How many bags does {name} fill?",
            f"Each bag holds {k} {things}. {k * bags} / {k} = {bags}, so {name} fills {bags} bags.", bags)


def speed(r):
    vehicle = r.choice(VEHICLES)
    s, h = r.choice(range(20, 85, 5)), r.randint(2, 6)
    return (f"A {vehicle} travels at {s} miles per hour. How many miles does it go in {h} hours?",
            f"Distance is speed times time. {s} x {h} = {s * h} miles.", s * h)


def reading(r):
    name = r.choice(NAMES)
    per_day, days = r.choice(range(5, 45, 5)), r.randint(3, 12)
    return (f"{name} reads {per_day} pages a day. How many days does it take {name} to finish "
            f"a {per_day * days}-page book?",
            f"The book has {per_day * days} pages and {name} reads {per_day} a day. "
            f"{per_day * days} / {per_day} = {days} days.", days)


def difference(r):
    first, second = r.sample(NAMES, 2)
    things = r.choice(THINGS)
    b = r.randint(5, 60)
    a = b + r.randint(3, 40)
    return (f"{first} has {a} {things} and {second} has {b}. How many more {things} does "
            f"{first} have than {second}?",
            f"To compare, subtract: {a} - {b} = {a - b}. {first} has {a - b} more {things}.", a - b)


def give_and_buy(r):
    name, things = r.choice(NAMES), r.choice(THINGS)
    a = r.randint(10, 40)
    b, c, d = r.randint(2, a - 2), r.randint(2, 5), r.randint(3, 10)
    total = a - b + c * d
    return (f"{name} had {a} {things}, gave {b} to a friend, and then bought {c} packs of {d}. "
            f"How many {things} does {name} have now?",
            f"After giving some away, {name} has {a} - {b} = {a - b}. The packs add {c} x {d} = "
            f"{c * d}. Then {a - b} + {c * d} = {total}.", total)


def savings(r):
    name, extra = r.choice(NAMES), r.choice(EXTRAS)
    s, w = r.randint(3, 15), r.randint(4, 10)
    cost = r.randint(5, s * w - 1)
    return (f"{name} saves ${s} every week for {w} weeks and then spends ${cost} on a {extra}. "
            f"How many dollars does {name} have left?",
            f"{name} saves {s} x {w} = {s * w} dollars. After buying the {extra}, "
            f"{s * w} - {cost} = {s * w - cost} dollars are left.", s * w - cost)


TEMPLATES = [shopping, change, sharing, bagging, speed, reading, difference, give_and_buy, savings]


def make_rows(n: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, steps, answer = r.choice(TEMPLATES)(r)
        response = f"{steps} {r.choice(CLOSERS).format(answer)}"
        rows.append({"prompt": prompt, "response": response, "answer": str(answer)})
    return rows


# The task splits (`--split`): multi-step problems whose reference solutions are written in one
# fixed textbook layout ("Step 1. ... Answer: \\boxed{N}"), far from how the model itself writes.
# Each problem is (prompt, [(what the step finds, expression, value)], answer).


def _purchase(r):
    name, goods, extra = r.choice(NAMES), r.choice(GOODS), r.choice(EXTRAS)
    a, p, q = r.randint(2, 9), r.randint(2, 12), r.randint(3, 25)
    bill = next(b for b in (20, 50, 100, 200) if b > a * p + q)
    return (f"{name} buys {a} {goods} at ${p} each and a {extra} for ${q}, and pays with a ${bill} bill. "
            f"How many dollars of change does {name} get?",
            [(f"cost of the {goods}", f"{a} x {p}", a * p), ("total cost", f"{a * p} + {q}", a * p + q),
             ("change", f"{bill} - {a * p + q}", bill - a * p - q)], bill - a * p - q)


def _saving(r):
    name, extra = r.choice(NAMES), r.choice(EXTRAS)
    s, w, gift = r.randint(3, 15), r.randint(3, 10), r.randint(5, 30)
    cost = r.randint(5, s * w + gift - 1)
    return (f"{name} saves ${s} a week for {w} weeks, gets ${gift} as a gift, and then spends ${cost} on a "
            f"{extra}. How many dollars does {name} have left?",
            [("money saved", f"{s} x {w}", s * w), ("money with the gift", f"{s * w} + {gift}", s * w + gift),
             ("money left", f"{s * w + gift} - {cost}", s * w + gift - cost)], s * w + gift - cost)


def _packs(r):
    name, things = r.choice(NAMES), r.choice(THINGS)
    packs, per, friends = r.randint(2, 9), r.randint(4, 12), r.randint(2, 6)
    total = packs * per
    kept = total % friends or friends  # at least one kept, and the rest splits evenly
    share = (total - kept) // friends
    return (f"{name} buys {packs} packs of {per} {things}, keeps {kept}, and shares the rest equally among "
            f"{friends} friends. How many {things} does each friend get?",
            [(f"{things} in all", f"{packs} x {per}", total), ("number to share", f"{total} - {kept}", total - kept),
             ("share of each friend", f"{total - kept} / {friends}", share)], share)


def _trip(r):  # out of domain: two legs at different speeds, then a comparison
    vehicle = r.choice(VEHICLES)
    s1, h1, s2, h2 = r.choice(range(20, 70, 5)), r.randint(2, 5), r.choice(range(30, 90, 5)), r.randint(1, 4)
    rest = r.randint(10, 60)
    d1, d2 = s1 * h1, s2 * h2
    goal = d1 + d2 + rest
    return (f"A {vehicle} has to cover {goal} miles. It drives {h1} hours at {s1} miles per hour, then {h2} "
            f"hours at {s2} miles per hour. How many miles are still left?",
            [("first leg", f"{s1} x {h1}", d1), ("second leg", f"{s2} x {h2}", d2),
             ("distance driven", f"{d1} + {d2}", d1 + d2), ("distance left", f"{goal} - {d1 + d2}", rest)], rest)


def _fence(r):  # out of domain: geometry, several quantities
    w, length, post_gap = r.randint(3, 20), r.randint(21, 40), r.choice([1, 2])
    price = r.randint(2, 9)
    perimeter = 2 * (w + length)
    return (f"A rectangular garden is {length} m long and {w} m wide. Fencing costs ${price} per meter. "
            f"A gate that is {post_gap} m wide needs no fencing. How many dollars does the fencing cost?",
            [("long sides", f"2 x {length}", 2 * length), ("short sides", f"2 x {w}", 2 * w),
             ("perimeter", f"{2 * length} + {2 * w}", perimeter), ("fence length", f"{perimeter} - {post_gap}",
                                                                   perimeter - post_gap),
             ("cost", f"{perimeter - post_gap} x {price}", (perimeter - post_gap) * price)],
            (perimeter - post_gap) * price)


def _ages(r):  # out of domain: ages over time
    first, second = r.sample(NAMES, 2)
    a, gap, years = r.randint(5, 15), r.randint(2, 9), r.randint(2, 10)
    b = a + gap
    return (f"{first} is {a} years old and {second} is {gap} years older. In {years} years, what will their "
            f"ages add up to?",
            [(f"age of {second}", f"{a} + {gap}", b), (f"age of {first} in {years} years", f"{a} + {years}", a + years),
             (f"age of {second} in {years} years", f"{b} + {years}", b + years),
             ("sum of the ages", f"{a + years} + {b + years}", a + b + 2 * years)], a + b + 2 * years)


def _workers(r):  # out of domain: rates
    n, per_hour, hours, done = r.randint(2, 6), r.randint(3, 12), r.randint(2, 8), r.randint(5, 40)
    made = n * per_hour * hours
    return (f"{n} workers each pack {per_hour} boxes an hour for {hours} hours. {done} boxes were already "
            f"packed before they started. How many boxes are packed at the end?",
            [("boxes per hour for the team", f"{n} x {per_hour}", n * per_hour),
             ("boxes packed in the shift", f"{n * per_hour} x {hours}", made),
             ("boxes at the end", f"{made} + {done}", made + done)], made + done)


SPLIT_FAMILIES = {"train": [_purchase, _saving, _packs], "test": [_purchase, _saving, _packs],
                  "ood": [_trip, _fence, _ages, _workers]}
SPLIT_SEED_OFFSETS = {"train": 1000, "test": 2000, "ood": 3000}  # disjoint random streams per split

GENERAL_PROMPTS = [
    "Write a short poem about the sea.", "Explain photosynthesis in two sentences.",
    "Give three tips for sleeping better.", "What is the capital of France, and what is it known for?",
    "Describe a cat to someone who has never seen one.", "Write a polite email declining a meeting.",
    "Why is the sky blue?", "Suggest a name for a small bakery and explain it.",
    "Summarize the story of Cinderella in three sentences.", "What are the benefits of drinking water?",
    "Explain what a computer program is to a child.", "List four fruits that are rich in vitamin C.",
    "How do I make a cup of tea?", "Write a haiku about autumn leaves.",
    "What should I pack for a weekend camping trip?", "Explain the difference between weather and climate.",
    "Give me a fun fact about octopuses.", "Write a short thank-you note to a teacher.",
    "What is the water cycle?", "Describe your ideal weekend in a few sentences.",
    "How can I be more productive when working from home?", "Explain why exercise is good for the brain.",
    "Write a two-line dialogue between a robot and a bird.", "What are some good habits for saving money?",
]


def textbook_solution(steps, answer) -> str:
    lines = [f"Step {i}. The {what}: {expr} = {value}." for i, (what, expr, value) in enumerate(steps, 1)]
    return "\n".join(lines + [f"Answer: \\boxed{{{answer}}}"])


def make_split(split: str, n: int, seed: int, exclude=()) -> list[dict]:
    """n distinct problems of a split; prompts in `exclude` (the training set) are skipped."""
    if split == "general":
        return [{"prompt": p} for p in GENERAL_PROMPTS[:n]]
    r = random.Random(seed * 10_000 + SPLIT_SEED_OFFSETS[split])
    seen, rows = set(exclude), []
    while len(rows) < n:
        prompt, steps, answer = r.choice(SPLIT_FAMILIES[split])(r)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "response": textbook_solution(steps, answer), "answer": str(answer)})
    return rows


def write_jsonl(rows: list[dict], out: Path) -> None:
    """To a temporary name, then renamed: a crash never leaves a half-written file at `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128, help="number of problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output JSONL file")
    p.add_argument("--split", choices=["sft", "train", "test", "ood", "general"], default="sft",
                   help="sft: the bundled short solutions (data/math_sft.jsonl); train / test: multi-step "
                        "problems with textbook solutions (test holds none of train's prompts, made with the "
                        "same --seed and --train-n); ood: other families, more steps; general: prompts for "
                        "the retention check")
    p.add_argument("--train-n", type=int, default=512, help="with --split test: the training set to hold out")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.split == "general" and args.n > len(GENERAL_PROMPTS):
        p.error(f"--split general has {len(GENERAL_PROMPTS)} prompts, not --n {args.n}")
    if args.split == "sft":
        rows = make_rows(args.n, args.seed)
    else:
        exclude = [r["prompt"] for r in make_split("train", args.train_n, args.seed)] if args.split == "test" else ()
        rows = make_split(args.split, args.n, args.seed, exclude)
    write_jsonl(rows, args.out)


if __name__ == "__main__":
    main()
