"""``HogwildScheduler``: the vLLM scheduler used by engines that switch the plugin on.

The config hook (``compat.py``, patch 2) sets ``scheduler_config.scheduler_cls`` to this class. For now it is the
stock synchronous ``Scheduler``: requests outside any group are scheduled exactly as without the plugin, and
requests that ask for a group are rejected in the frontend (``hogwild_vllm.validation``) while
``GROUPS_AVAILABLE`` is False, so none reaches this class. Group expansion, gang scheduling, the unfinished-count
and ``finish_requests`` overrides arrive with groups (docs/vllm_integration_plan.md, sections 1-2).
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler


class HogwildScheduler(Scheduler):
    """The synchronous vLLM scheduler; hogwild groups will be driven from here."""
