"""Macro storage per stage with libmilter's invalidation rules.

A DEFINE_MACRO packet replaces the macros of its stage. CONNECT, HELO, MAIL
and RCPT clear the stages after their own (engine.c: mi_clr_macros(ctx,
idx + 1)); OPTNEG, QUIT and QUIT_NC clear everything. Names are stored
without braces, so ``j`` and ``{j}`` are the same macro. Macro packets for
HEADER and BODY (Postfix sends them, usually empty) and for unknown stages
belong to no stage and are dropped, as libmilter drops them.
"""

from __future__ import annotations

from milter_bridge.protocol.constants import MACRO_STAGE_OF_COMMAND, MacroStage


def bare_name(name: str) -> str:
    return name[1:-1] if len(name) > 2 and name[0] == "{" and name[-1] == "}" else name


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class MacroStore:
    """The macros the MTA has sent, by stage."""

    __slots__ = ("_stages",)

    def __init__(self) -> None:
        self._stages: dict[MacroStage, dict[str, str]] = {}

    def define(self, command: bytes, macros: tuple[tuple[bytes, bytes], ...]) -> None:
        stage = MACRO_STAGE_OF_COMMAND.get(command)
        if stage is None:
            return
        self._stages[stage] = {bare_name(_text(n)): _text(v) for n, v in macros}

    def entered(self, stage: MacroStage) -> None:
        """CONNECT, HELO, MAIL or RCPT arrived: every stage numbered after it is stale."""
        for later in [s for s in self._stages if s > stage]:
            del self._stages[later]

    def clear(self) -> None:
        self._stages.clear()

    def of(self, stage: MacroStage) -> dict[str, str]:
        return dict(self._stages.get(stage, {}))

    def value(self, stage: MacroStage, name: str) -> str | None:
        """One macro of one stage, without copying the stage's macros."""
        macros = self._stages.get(stage)
        return None if macros is None else macros.get(name)
