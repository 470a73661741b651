"""Rebuilding a job's text from its stream, whatever resets happened.

A ``reset`` entry voids every ``token`` written before it: the previous attempt
died (reason ``restart``) or the model call failed and is being retried (reason
``retry``). A reader that prints tokens live should, on ``reset``, discard what it
showed; a reader that wants the final text feeds every event to a
:class:`TextAssembler` (or calls :func:`final_text`) and gets every token the
surviving attempt streamed, in order. For an ``llm`` actor that is the record's
``result.text``; for agents and graphs the record holds only the last model
call's answer, while the stream also carries earlier calls' text (tagged with
their node).
"""

from __future__ import annotations

from collections.abc import Iterable

from .schema import Event, EventType, JobStatus

__all__ = ["TextAssembler", "final_text"]


class TextAssembler:
    """Feed it a job's events in order; ``text`` is the output that still counts."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.resets = 0
        self.attempt = 0
        self.status: JobStatus | None = None

    def feed(self, event: Event) -> None:
        """Take one event. Returns nothing; read ``text`` / ``done`` / ``status``."""
        if event.type == EventType.TOKEN.value:
            self._parts.append(event.text)
        elif event.type == EventType.RESET.value:
            self._parts.clear()
            self.resets += 1
        elif event.type == EventType.START.value:
            self.attempt = int(event.fields.get("attempt") or self.attempt + 1)
        elif event.terminal:
            self.status = event.status

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def done(self) -> bool:
        return self.status is not None


def final_text(events: Iterable[Event]) -> str:
    """The text that counts after every reset in ``events`` (e.g. ``stream_events(id)``)."""
    assembler = TextAssembler()
    for event in events:
        assembler.feed(event)
    return assembler.text
