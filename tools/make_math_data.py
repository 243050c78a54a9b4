"""Grade-school arithmetic word problems with short, human-style solutions ending in \\boxed{N}.

    python tools/make_math_data.py --n 128 --seed 0 --out data/math_sft.jsonl

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
    args = p.parse_args(argv)
    write_jsonl(make_rows(args.n, args.seed), args.out)


if __name__ == "__main__":
    main()
