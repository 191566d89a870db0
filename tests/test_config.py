"""GroupConfig / Templates: defaults, parsing from plain request options, and errors that name the bad option."""

from __future__ import annotations

import re

import pytest

from hogwild_vllm.config import (
    DEFAULT_WORKER_NAMES,
    FEW_SHOT_EXAMPLES,
    MAX_WORKERS,
    GroupConfig,
    HogwildConfigError,
    Layout,
    Templates,
    templates_from_dict,
)


def _error(options: object) -> str:
    with pytest.raises(HogwildConfigError) as info:
        GroupConfig.from_dict(options)  # type: ignore[arg-type]
    return str(info.value)


# ---- defaults and round trips ---------------------------------------------------------------------------------

def test_defaults() -> None:
    cfg = GroupConfig()
    assert cfg.workers == 2
    assert cfg.layout is Layout.COMBINED
    assert cfg.worker_names == ("Alice", "Bob")
    assert cfg.templates == Templates()
    assert cfg.max_tokens >= 1 and cfg.collab_check_every >= 0
    assert GroupConfig.from_dict({}) == cfg


def test_default_names_cover_max_workers() -> None:
    assert len(DEFAULT_WORKER_NAMES) == MAX_WORKERS == 16
    assert len(set(DEFAULT_WORKER_NAMES)) == 16
    cfg = GroupConfig.from_dict({"workers": 16})
    assert cfg.worker_names == DEFAULT_WORKER_NAMES


@pytest.mark.parametrize("layout", ["combined", "interleaved", "contiguous"])
def test_layout_from_string(layout: str) -> None:
    cfg = GroupConfig.from_dict({"layout": layout})
    assert cfg.layout is Layout(layout)
    assert cfg.layout.has_steps == (layout != "contiguous")


def test_from_dict_full() -> None:
    cfg = GroupConfig.from_dict({
        "workers": 3,
        "layout": "interleaved",
        "worker_names": ["Ann", "Ben", "Cy"],
        "templates": {"step_header": "<{name} {step}> ", "unfinished_marker": " ..."},
        "max_tokens": 77,
        "collab_check_every": 0,
        "finisher": True,
        "finisher_max_tokens": 5,
        "banned_token_ids": [3, 4],
    })
    assert cfg.workers == 3 and cfg.layout is Layout.INTERLEAVED
    assert cfg.worker_names == ("Ann", "Ben", "Cy")
    assert cfg.templates.step_header == "<{name} {step}> "
    assert cfg.templates.unfinished_marker == " ..."
    assert cfg.templates.intro == Templates().intro  # untouched templates keep their defaults
    assert (cfg.max_tokens, cfg.collab_check_every, cfg.finisher, cfg.finisher_max_tokens) == (77, 0, True, 5)
    assert cfg.banned_token_ids == (3, 4)


def test_to_dict_round_trip() -> None:
    cfg = GroupConfig.from_dict({"workers": 4, "layout": "contiguous", "templates": {"intro": "I am {name}."},
                                 "banned_token_ids": [9], "finisher": True})
    d = cfg.to_dict()
    assert d["layout"] == "contiguous" and d["worker_names"] == ["Alice", "Bob", "Carol", "Dave"]
    assert d["banned_token_ids"] == [9] and d["templates"]["intro"] == "I am {name}."
    assert GroupConfig.from_dict(d) == cfg


def test_templates_texts() -> None:
    t = Templates()
    assert t.intro_text("Bob") == "**Bob [1]:** Hi, I'm Bob."
    assert t.header_text("Bob", 3, check=False) == "**Bob [3]:** "
    assert t.header_text("Bob", 3, check=True) == "**Bob [3]:** " + t.check_question
    assert "3 workers (Alice, Bob and Carol)" in t.system_text(("Alice", "Bob", "Carol"))
    assert "1 workers (Alice)" in t.system_text(("Alice",))
    assert "\\boxed{answer}" in t.system_text(("Alice", "Bob"))  # the doubled braces are a literal


def test_few_shot_examples_are_off_by_default_and_follow_the_rules_when_set() -> None:
    names = ("Alice", "Bob")
    plain = Templates().system_text(names)
    assert "Example" not in plain and Templates().few_shot_examples == ""
    shot = Templates(few_shot_examples=FEW_SHOT_EXAMPLES)
    assert shot.system_text(names) == plain + "\n\n" + FEW_SHOT_EXAMPLES  # after the rules, taken literally
    assert Templates(few_shot_examples="  \n").system_text(names) == plain  # blank: off
    cfg = GroupConfig.from_dict({"templates": {"few_shot_examples": "Ex: {not a placeholder}"}})
    assert cfg.templates.system_text(names).endswith("\n\nEx: {not a placeholder}")
    assert GroupConfig.from_dict(cfg.to_dict()) == cfg
    assert "few_shot_examples" in _error({"templates": {"few_shot_examples": 3}})


def test_project_examples_use_the_default_templates() -> None:
    """The examples show workers what their own steps will look like: the default intro and step headers, steps
    cut by the default separator after punctuation, and the default answer marker."""
    tpl = Templates()
    for block in FEW_SHOT_EXAMPLES.split("\n\nExample ")[1:]:
        steps = block.split("\n", 1)[1].split(tpl.step_separator)
        seen: dict[str, int] = {}
        for step in steps:
            name = step[2:step.index(" [")]
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1:
                assert step.startswith(tpl.intro_text(name)), step
            else:
                assert step.startswith(tpl.header_text(name, seen[name], check=False)), step
            assert step.rstrip()[-1] in tpl.sentence_end + "}", step
        assert tpl.answer_marker in steps[-1]


# ---- errors name the option -----------------------------------------------------------------------------------

def test_not_a_mapping() -> None:
    assert "mapping" in _error(["workers", 2])


def test_unknown_option() -> None:
    msg = _error({"workers": 2, "num_workers": 3})
    assert "num_workers" in msg and "unknown" in msg


@pytest.mark.parametrize("layout", ["Combined", "parallel", "", 3, None, ["combined"]])
def test_bad_layout(layout: object) -> None:
    msg = _error({"layout": layout})
    assert "'layout'" in msg and "combined" in msg


@pytest.mark.parametrize("workers", [0, 17, -1, 2.0, "2", None, True])
def test_bad_workers(workers: object) -> None:
    msg = _error({"workers": workers})
    assert "'workers'" in msg and "16" in msg


@pytest.mark.parametrize("workers", [1, 16])
def test_workers_bounds_ok(workers: int) -> None:
    assert GroupConfig.from_dict({"workers": workers}).workers == workers


@pytest.mark.parametrize("names", [
    ["Alice"],  # too few
    ["A", "B", "C"],  # too many
    ["Alice", "Alice"],  # duplicate
    ["Alice", ""],  # empty
    ["Alice", "   "],  # blank
    ["Alice", 7],  # not a string
    "AliceBob",  # a string, not a list
    None,
    5,
])
def test_bad_names(names: object) -> None:
    assert "'worker_names'" in _error({"workers": 2, "worker_names": names})


@pytest.mark.parametrize("option,value", [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("max_tokens", "10"), ("max_tokens", True),
    ("collab_check_every", -1), ("collab_check_every", None),
    ("finisher_max_tokens", 0),
    ("finisher", "yes"), ("finisher", 1),
    ("banned_token_ids", [-1]), ("banned_token_ids", ["a"]), ("banned_token_ids", [1.0]),
    ("banned_token_ids", [True]), ("banned_token_ids", 5), ("banned_token_ids", None),
])
def test_bad_scalars(option: str, value: object) -> None:
    assert f"'{option}'" in _error({option: value})


@pytest.mark.parametrize("templates,name", [
    ("not a mapping", "templates"),
    (None, "templates"),
    ({"intro": 3}, "intro"),
    ({"introduction": "x"}, "introduction"),  # unknown template
    ({"intro": "Hi, I'm here."}, "intro"),  # no {name}
    ({"step_header": "[{step}] "}, "step_header"),  # no {name}
    ({"step_header": "**{name}:** "}, "step_header"),  # no {step}
    ({"step_separator": ""}, "step_separator"),
    ({"answer_marker": "\\boxed"}, "answer_marker"),  # must end with the open brace
    ({"answer_marker": ""}, "answer_marker"),
    ({"intro": "{name} {step}"}, "intro"),  # unknown placeholder
    ({"intro": "{name} {0}"}, "intro"),  # positional placeholder
    ({"step_header": "{name} [{step}] {"}, "step_header"),  # unbalanced brace
    ({"system_prompt": "We are {workers}: {names}, you are {name}."}, "system_prompt"),
    ({"system_prompt": "Answer in \\boxed{answer}."}, "system_prompt"),  # literal braces must be doubled
])
def test_bad_templates(templates: object, name: str) -> None:
    msg = _error({"templates": templates})
    assert re.search(rf"'{name}'", msg), msg


def test_templates_from_dict_direct() -> None:
    assert templates_from_dict({}) == Templates()
    with pytest.raises(HogwildConfigError, match="'bogus'"):
        templates_from_dict({"bogus": "x"})


def test_templates_instance_is_kept() -> None:
    t = Templates(intro="{name} here.")
    assert GroupConfig.from_dict({"templates": t}).templates is t


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        GroupConfig(workers=0)


def test_empty_glue_templates_allowed() -> None:
    cfg = GroupConfig.from_dict({"templates": {"others_header": "", "unfinished_marker": "", "own_header": ""}})
    assert cfg.templates.own_header == ""
