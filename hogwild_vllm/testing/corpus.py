"""Deterministic synthetic "reasoning" corpus for the project's tiny test models.

The text imitates what Hogwild! workers write: short English/math paragraphs whose
sentences end in ``.``, ``?`` or ``!``, paragraphs separated by ``"\\n\\n"``, worker
lines such as ``**Alice [2]:** ...``, numbers, and LaTeX answers like ``\\boxed{42}``.
A share of the documents is wrapped in a ChatML conversation with a ``<think>`` block,
so a model trained on it continues a chat-template prompt with paragraphs.

Everything depends only on the seed: no hashing of strings, no set iteration order.
"""

from __future__ import annotations

import random

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

NAMES = ("Alice", "Bob", "Carol", "Dave")
PEOPLE = ("Tom", "Anna", "Maria", "Sam", "Lena", "Omar", "Nina", "Paul", "Yuki", "Ravi",
          "Emma", "Jack", "Sofia", "Leo", "Grace", "Ivan")
THINGS = ("apples", "books", "coins", "marbles", "pencils", "cookies", "stamps")
SYSTEM = "You are a careful assistant. Think step by step."

# A small English lexicon for the free-text sentences (regular plurals and past tenses).
NOUNS = """
garden river teacher student window kitchen market city village road bridge mountain
forest ocean island desert valley farmer doctor writer painter singer player driver
pilot sailor baker builder engineer scientist lawyer nurse chef guard king queen
prince child friend neighbor stranger visitor animal bird horse rabbit tiger dragon
flower tree leaf stone cloud storm rain wind summer winter morning evening night
letter story song poem picture camera phone computer machine engine wheel ladder
hammer basket bottle candle lamp table chair door wall roof floor garden museum
library school office factory station harbor castle tower temple palace theater
question answer problem idea plan reason result method pattern number digit factor
fraction triangle circle square angle line point graph table column row matrix
vector equation formula proof lemma theorem example case step part piece group
""".split()
VERBS = """
walk jump open close paint visit watch cook clean count check add divide multiply
subtract compare measure follow start finish help learn listen look move need play
pull push reach remember repeat return share show solve test try turn use wait want
wonder work explain answer ask call carry climb cross enjoy fill guess join kick
land laugh mark miss name order pass plant prefer print rest roll sail save search
sort study talk travel trust view wash wish
""".split()
ADJECTIVES = """
small large quiet loud bright dark warm cold quick slow happy sad careful clever
simple strange green blue red yellow golden silver ancient modern busy empty full
heavy light narrow wide gentle brave calm curious eager famous honest kind lucky
proud rich polite tidy useful lovely sharp smooth rough soft hard early late young
old odd even prime positive negative rational exact rough fair
""".split()
ADVERBS = """
quickly slowly carefully quietly happily sadly eagerly gently nearly really always
often rarely never sometimes usually clearly simply easily finally suddenly again
""".split()
PLACES = "Paris London Tokyo Cairo Lima Oslo Rome Berlin Madrid Delhi Sydney Toronto".split()


def _plural(w: str) -> str:
    if w.endswith("y") and w[-2] not in "aeiou":
        return w[:-1] + "ies"
    return w + ("es" if w.endswith(("s", "x", "ch", "sh")) else "s")


def _past(v: str) -> str:
    if v.endswith("e"):
        return v + "d"
    if v.endswith("y") and v[-2] not in "aeiou":
        return v[:-1] + "ied"
    return v + "ed"


def _ing(v: str) -> str:
    return (v[:-1] if v.endswith("e") and not v.endswith("ee") else v) + "ing"


def _sentence(rng: random.Random) -> str:
    """One free-text English sentence ending in ``.``, ``?`` or ``!``."""
    n, n2 = rng.choice(NOUNS), rng.choice(NOUNS)
    v, a, adv = rng.choice(VERBS), rng.choice(ADJECTIVES), rng.choice(ADVERBS)
    who, k = rng.choice(PEOPLE), rng.randint(2, 12)
    t = rng.randrange(8)
    if t == 0:
        s = f"The {a} {n} {_past(v)} the {n2} {adv}."
    elif t == 1:
        s = f"{who} {_past(v)} the {n} in {rng.choice(PLACES)}."
    elif t == 2:
        s = f"Why did the {n} {v} the {a} {n2}?"
    elif t == 3:
        s = f"Every {n} {_plural(v)} {k} {_plural(n2)}!"
    elif t == 4:
        s = f"We {v} the {_plural(n)} {adv}, and then we {v} the {n2}."
    elif t == 5:
        m = rng.randint(2, 9)
        s = f"If one {n} has {k} {_plural(n2)}, then {m} of them have {k * m} {_plural(n2)}."
    elif t == 6:
        s = f"I am {adv} {_ing(v)} the {a} {n}."
    else:
        s = f"Is the {n} {a} or {rng.choice(ADJECTIVES)}?"
    return s[0].upper() + s[1:]


def _problem(rng: random.Random) -> tuple[str, int, list[str]]:
    """Return (problem statement, answer, reasoning sentences)."""
    kind = rng.randrange(5)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    who, what = rng.choice(PEOPLE), rng.choice(THINGS)
    if kind == 0:
        ans = a + b
        q = f"{who} has {a} {what} and buys {b} more. How many {what} does {who} have now?"
        steps = [f"{who} starts with {a} {what}.", f"Then {who} buys {b} more.",
                 f"So we add {a} and {b} to get {ans}.", f"Check: {ans} - {b} = {a}, which matches."]
    elif kind == 1:
        ans = a * c
        q = f"There are {c} boxes with {a} {what} in each box. How many {what} are there?"
        steps = [f"Each box holds {a} {what}.", f"There are {c} boxes.",
                 f"We multiply: {c} \\times {a} = {ans}.", f"Dividing back, {ans} / {c} = {a}, so it is right."]
    elif kind == 2:
        x = rng.randint(1, 20)
        rhs = c * x + b
        ans = x
        q = f"Solve for $x$: ${c}x + {b} = {rhs}$."
        steps = [f"Subtract {b} from both sides to get ${c}x = {rhs - b}$.",
                 f"Divide both sides by {c}, so $x = {x}$.",
                 f"Plug it in: ${c} \\cdot {x} + {b} = {rhs}$, which is correct."]
    elif kind == 3:
        big = a + b
        ans = big - b
        q = f"{who} had {big} {what} and gave {b} to a friend. How many are left?"
        steps = [f"We start from {big} {what}.", f"Giving away {b} means we subtract.",
                 f"{big} - {b} = {ans}.", f"Adding back, {ans} + {b} = {big}, good."]
    else:
        n = rng.randint(3, 12)
        ans = n * (n + 1) // 2
        q = f"What is the sum $1 + 2 + \\dots + {n}$?"
        steps = [f"We can use the formula $\\frac{{n(n+1)}}{{2}}$ with $n = {n}$.",
                 f"That gives $\\frac{{{n} \\cdot {n + 1}}}{{2}} = {ans}$.",
                 f"Pairing the first and last terms also gives {ans}."]
    return q, ans, steps


_FILLERS = (
    "Let me think about this carefully.", "Hmm, is that right?", "Wait, let me check again.",
    "That looks correct!", "Good, this agrees with the earlier step.", "Let me write it down.",
    "Is there a faster way?", "I think this is the key step.", "Okay, now the next part.",
    "This is easy to verify!", "Let me double-check the numbers.", "So far so good.",
)


def _paragraphs(rng: random.Random, steps: list[str]) -> list[str]:
    """Group reasoning steps (plus fillers) into paragraphs of one to four sentences."""
    sents = []
    for s in steps:
        r = rng.random()
        if r < 0.3:
            sents.append(rng.choice(_FILLERS))
        elif r < 0.5:
            sents.append(_sentence(rng))
        sents.append(s)
    paras, i = [], 0
    while i < len(sents):
        k = rng.randint(1, 4)
        paras.append(" ".join(sents[i:i + k]))
        i += k
    return paras


def _solo_doc(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        q, ans, steps = _problem(rng)
        parts.append(f"Problem: {q}")
        parts += _paragraphs(rng, steps)
        parts.append(rng.choice(("So the answer is", "Therefore the answer is", "The final answer is"))
                     + f" \\boxed{{{ans}}}.")
    return "\n\n".join(parts)


def _story_doc(rng: random.Random) -> str:
    paras = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
             for _ in range(rng.randint(2, 6))]
    if rng.random() < 0.3:
        k = rng.randint(2, 99)
        paras.append(f"I counted {k} of them, so the answer is \\boxed{{{k}}}.")
    return "\n\n".join(paras)


def _hogwild_doc(rng: random.Random) -> str:
    q, ans, steps = _problem(rng)
    workers = NAMES[: rng.randint(2, 3)]
    parts = [f"Problem: {q}"]
    for i, s in enumerate(_paragraphs(rng, steps)):
        parts.append(f"**{workers[i % len(workers)]} [{i + 1}]:** {s}")
    parts.append(f"**{workers[0]} [{len(parts)}]:** We agree, the answer is \\boxed{{{ans}}}.")
    return "\n\n".join(parts)


def _chat_doc(rng: random.Random) -> str:
    q, ans, steps = _problem(rng)
    think = "\n\n".join(_paragraphs(rng, steps))
    system = f"{IM_START}system\n{SYSTEM}{IM_END}\n" if rng.random() < 0.5 else ""
    return (f"{system}{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{THINK_OPEN}\n{think}\n"
            f"{THINK_CLOSE}\n\nThe answer is \\boxed{{{ans}}}.{IM_END}\n")


def make_documents(n_docs: int = 4000, seed: int = 0) -> list[str]:
    """Return ``n_docs`` synthetic documents (no end-of-text markers)."""
    rng = random.Random(seed)
    makers = (_solo_doc, _story_doc, _hogwild_doc, _chat_doc)
    return [makers[rng.randrange(len(makers))](rng) for _ in range(n_docs)]


def make_corpus(n_docs: int = 4000, seed: int = 0) -> str:
    """All documents joined by ``<|endoftext|>``: the training stream as one string."""
    return EOT.join(make_documents(n_docs, seed)) + EOT
