"""Typed, validated settings of one hogwild group: layout, workers, templates, budgets.

A request asks for a group with a plain dict (``SamplingParams.extra_args["hogwild"]``, the OpenAI API's
``vllm_xargs``); :meth:`GroupConfig.from_dict` turns it into this dataclass or raises
:class:`HogwildConfigError` naming the bad option. Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

MAX_WORKERS = 16
# ``SamplingParams.extra_args`` keys. CONFIG_KEY holds a request's group options (a dict, or a JSON string: the
# OpenAI ``vllm_xargs`` field admits no nested objects) and, in ``additional_config``, the engine-wide switch.
CONFIG_KEY = "hogwild"
# Written by the frontend validator on a group request with ``n > 1``: vLLM fans such a request out into n engine
# requests with ``n = 1`` each (one per worker), and this is how the engine learns how many siblings to wait for.
CHOICES_KEY = "hogwild_choices"

DEFAULT_WORKER_NAMES: tuple[str, ...] = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi",
    "Ivan", "Judy", "Kevin", "Laura", "Mike", "Nina", "Oscar", "Peggy",
)


class HogwildConfigError(ValueError):
    """A hogwild setting (engine-wide or per request) is invalid; the message names it."""


class Layout(str, Enum):
    COMBINED = "combined"
    INTERLEAVED = "interleaved"
    CONTIGUOUS = "contiguous"

    @property
    def has_steps(self) -> bool:
        return self is not Layout.CONTIGUOUS


@dataclass(frozen=True)
class Templates:
    """Every piece of text the system writes. ``{name}`` is a worker name, ``{step}`` a step number (from 1)."""

    # The common prompt: system message ({workers} = count, {names} = "Alice, Bob and Carol"), then the chat
    # template's user turn with the problem, then ``history_header`` opening the shared record.
    system_prompt: str = (
        "You are one of {workers} workers ({names}) solving one problem together, at the same time. "
        "Everyone writes in short paragraphs called steps; a step opens with its author and number in bold, "
        "like **Name [2]:**. All of you read one shared record: the finished steps of all workers in the order "
        "they were finished, then what the other workers are writing right now (marked unfinished), then your "
        "own current step. Read the others before you write: split the work, never redo what someone else has "
        "done or is doing, use their results, and switch to a better idea when a peer has one. "
        "When the group is sure, write the final answer once as \\boxed{{answer}}."
    )
    # Worked examples of a collaboration, placed in the system message after the rules (off when empty;
    # ``FEW_SHOT_EXAMPLES`` is the project's own set). Literal text: no placeholders.
    few_shot_examples: str = ""
    history_header: str = "### Shared record (finished steps, in order)\n\n"
    # Forced first own tokens of each worker (its step 1 starts with this).
    intro: str = "**{name} [1]:** Hi, I'm {name}."
    # Forced start of every later step.
    step_header: str = "**{name} [{step}]:** "
    # Appended to a step header when a collaboration check is due.
    check_question: str = "(Check: is another worker already doing what I am about to do? If yes, I switch.) "
    # A step ends at the token that completes this text right after sentence punctuation (spaces and tabs between
    # them allowed); the text may span tokens ("\n" then "\n") and the completing token belongs to the step.
    step_separator: str = "\n\n"
    sentence_end: str = ".?!"
    # Glue: fixed texts placed in views; their KV is computed once per group.
    others_header: str = "### Steps in progress (other workers, unfinished)\n\n"
    unfinished_marker: str = " [...unfinished]\n\n"
    own_header: str = "### My step in progress\n\n"
    # The final answer is the balanced {...} following this marker.
    answer_marker: str = "\\boxed{"
    # Finisher: forced text after the transcript when no worker answered.
    finisher_suffix: str = "\n\nTime is up. Putting everything together, the final answer is \\boxed{"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise HogwildConfigError(f"template {f.name!r} must be a string")
        for name in ("intro", "step_header"):
            if "{name}" not in getattr(self, name):
                raise HogwildConfigError(f"template {name!r} must contain '{{name}}'")
        if "{step}" not in self.step_header:
            raise HogwildConfigError("template 'step_header' must contain '{step}'")
        if not self.step_separator:
            raise HogwildConfigError("template 'step_separator' must not be empty")
        if not self.answer_marker.endswith("{"):
            raise HogwildConfigError("template 'answer_marker' must end with '{' (the answer is the balanced {...})")
        for name, fields in (("system_prompt", {"workers": 2, "names": "x and y"}), ("intro", {"name": "x"}),
                             ("step_header", {"name": "x", "step": 1})):
            try:
                getattr(self, name).format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise HogwildConfigError(
                    f"template {name!r} has a bad placeholder ({e!r}); it may use {{{'}, {'.join(fields)}}} "
                    "and literal braces must be doubled"
                ) from e

    def system_text(self, names: tuple[str, ...]) -> str:
        joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        rules = self.system_prompt.format(workers=len(names), names=joined)
        return f"{rules}\n\n{self.few_shot_examples.strip()}" if self.few_shot_examples.strip() else rules

    def intro_text(self, name: str) -> str:
        return self.intro.format(name=name)

    def header_text(self, name: str, step: int, check: bool) -> str:
        return self.step_header.format(name=name, step=step) + (self.check_question if check else "")


# The project's few-shot set for ``Templates.few_shot_examples``: two short problems where the workers split the
# work, use each other's results and check them, in the default templates' format.
FEW_SHOT_EXAMPLES = """Two examples of workers collaborating (other problems, other groups):

Example 1, two workers. Problem: how many minutes are there in 3 days?
**Alice [1]:** Hi, I'm Alice. I take the hours: 3 days are 3 x 24 = 72 hours.

**Bob [1]:** Hi, I'm Bob. Alice is on the hours, so I will turn her hours into minutes once she has them.

**Bob [2]:** Alice found 72 hours, and an hour has 60 minutes: 72 x 60 = 4320.

**Alice [2]:** I checked Bob's product another way: 70 x 60 = 4200 and 2 x 60 = 120, so 4320. \\boxed{4320}

Example 2, three workers. Problem: the sum of the even numbers from 2 to 20.
**Alice [1]:** Hi, I'm Alice. Splitting the list in three: I add 2 to 6, Bob 8 to 14, Carol 16 to 20.

**Bob [1]:** Hi, I'm Bob. Following Alice's split: 8 + 10 + 12 + 14 = 44.

**Carol [1]:** Hi, I'm Carol. My part: 16 + 18 + 20 = 54.

**Alice [2]:** Mine is 2 + 4 + 6 = 12. With Bob's 44 and Carol's 54 the total is 110. \\boxed{110}"""


@dataclass(frozen=True)
class GroupConfig:
    """One group's settings. ``max_tokens`` is per worker: the group ends when any worker's own tokens
    (forced ones included) reach it, so the group's budget is ``workers * max_tokens``."""

    workers: int = 2
    layout: Layout = Layout.COMBINED
    worker_names: tuple[str, ...] = ()
    templates: Templates = field(default_factory=Templates)
    max_tokens: int = 1024
    # A worker's next step header carries the check question once the group has generated this many tokens
    # since that worker's last check; 0 turns checks off.
    collab_check_every: int = 1024
    finisher: bool = False
    finisher_max_tokens: int = 32
    # Extra token ids to ban while workers generate (on top of the defaults derived from the tokenizer).
    banned_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        workers = self.workers
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
            raise HogwildConfigError(f"'workers' must be an integer in 1..{MAX_WORKERS}, got {self.workers!r}")
        if not isinstance(self.layout, Layout):
            object.__setattr__(self, "layout", _parse_layout(self.layout))
        if not self.worker_names:
            object.__setattr__(self, "worker_names", DEFAULT_WORKER_NAMES[: self.workers])
        names = tuple(self.worker_names)
        object.__setattr__(self, "worker_names", names)
        if len(names) != self.workers:
            raise HogwildConfigError(f"'worker_names' has {len(names)} names for {self.workers} workers")
        if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
            raise HogwildConfigError("'worker_names' must be distinct non-empty strings")
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("collab_check_every", self.collab_check_every, 0)
        _check_int("finisher_max_tokens", self.finisher_max_tokens, 1)
        if not isinstance(self.finisher, bool):
            raise HogwildConfigError(f"'finisher' must be true or false, got {self.finisher!r}")
        if not isinstance(self.templates, Templates):
            raise HogwildConfigError("'templates' must be a Templates instance or a dict of template strings")
        ids = tuple(self.banned_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise HogwildConfigError("'banned_token_ids' must be non-negative integers")
        object.__setattr__(self, "banned_token_ids", ids)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> GroupConfig:
        """Build from a request's plain options; unknown keys and bad values raise HogwildConfigError."""
        if not isinstance(options, Mapping):
            raise HogwildConfigError(f"hogwild options must be a mapping, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise HogwildConfigError(f"unknown hogwild option(s) {unknown}; known: {sorted(known)}")
        kwargs = dict(options)
        if "templates" in kwargs and not isinstance(kwargs["templates"], Templates):
            kwargs["templates"] = templates_from_dict(kwargs["templates"])
        for name, what in (("worker_names", "names"), ("banned_token_ids", "token ids")):
            if name in kwargs:
                value = kwargs[name]
                if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                    raise HogwildConfigError(f"{name!r} must be a list of {what}, got {value!r}")
                kwargs[name] = tuple(value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layout"] = self.layout.value
        d["worker_names"] = list(self.worker_names)
        d["banned_token_ids"] = list(self.banned_token_ids)
        return d


def templates_from_dict(options: Any) -> Templates:
    if not isinstance(options, Mapping):
        raise HogwildConfigError("'templates' must be a mapping of template name to text")
    known = {f.name for f in dataclasses.fields(Templates)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise HogwildConfigError(f"unknown template(s) {unknown}; known: {sorted(known)}")
    return Templates(**options)


def _parse_layout(value: Any) -> Layout:
    try:
        return Layout(value)
    except ValueError:
        raise HogwildConfigError(
            f"'layout' must be one of {[m.value for m in Layout]}, got {value!r}"
        ) from None


def _check_int(name: str, value: Any, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise HogwildConfigError(f"'{name}' must be an integer >= {lowest}, got {value!r}")
