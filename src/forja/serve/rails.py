"""The guardrails in the server: one `RequestRails` per request screens the prompts before they reach the
engine and wraps each answer's stream in the output rails. A blocked prompt never reaches the engine: its
answers are the refusal with finish_reason "content_filter"; a blocked answer is cut where it stands
(nothing unsafe is sent), its generation cancelled and the refusal sent instead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from forja.engine import Delta, Prompt, Stream, Usage
from forja.guard import Finding, Guard, OutputFilter
from forja.serve.deps import ApiError

if TYPE_CHECKING:
    from forja.serve.deps import ServerState, Target

CONTENT_FILTER = "content_filter"


class RequestRails:
    """The rails of one request: its persona's Guard, and every decision taken, for the audit log and metrics."""

    def __init__(self, state: "ServerState", target: "Target", param: str | None = None):
        self.state = state
        self.guard: Guard = state.guards.for_persona(target.persona, target.published)
        self.findings: list[Finding] = []
        self.conversations: list[list[dict[str, str]]] = []
        self.param = param  # the body field errors name; default: "prompt" for text, "messages" for chat

    def screen(self, prompts: list[Prompt]) -> list[tuple[Prompt, str | None]]:
        """Each prompt redacted as the config says, with the refusal when the input rails block it. A prompt
        longer than the rails take is an error of the request (400 with the numbers), not a refusal."""
        for prompt in prompts:
            self.check_length(prompt)
        screened = []
        for prompt in prompts:
            verdict = self.guard.check_input(prompt)
            self.record(verdict.findings)
            prompt = self.guard.apply_input(prompt, verdict)
            screened.append((prompt, verdict.refusal))
            self.conversations.append(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
        return screened

    def check_length(self, prompt: Prompt) -> None:
        rails = self.guard.rails
        length = self.guard.input_chars(prompt)
        if rails.enabled and length > rails.max_input_chars:
            param = self.param or ("prompt" if isinstance(prompt, str) else "messages")
            what = "the input is" if isinstance(prompt, str) else "a message is"
            raise ApiError(400, f"{param}: {what} {length} characters long; this server takes at most "
                           f"{rails.max_input_chars} (guard.max_input_chars): shorten it", param=param,
                           code="input_too_long")

    def answer(self, index: int, fixed: tuple[str, str] | None, submitted: Stream | None) -> Stream:
        """The stream of one answer to prompt `index`: a fixed answer (text, finish_reason: the refusal of a
        blocked prompt, a persona's "not found") the engine is not asked for, else the engine's stream behind
        the output rails."""
        if fixed is not None or submitted is None:
            return FixedStream(*(fixed or ("", CONTENT_FILTER)))
        return GuardedStream(submitted, self.guard.output_filter(self.conversations[index]), self)

    def record(self, findings: list[Finding]) -> None:
        self.findings += findings
        for finding in findings:
            self.state.metrics.guard_actions.labels(finding.stage, finding.category, finding.action).inc()


class FixedStream(Stream):
    """An answer the engine is not asked for: its text, then its finish_reason (content_filter for a refusal)."""

    def __init__(self, text: str, finish_reason: str):
        self.text, self.finish_reason = text, finish_reason

    async def __aiter__(self) -> AsyncIterator[Delta]:
        yield Delta(text=self.text)
        yield Delta(finish_reason=self.finish_reason, usage=Usage())

    def cancel(self) -> None:
        pass


class GuardedStream(Stream):
    """An engine stream behind the output rails: text is released as the filter allows; when it blocks,
    generation is cancelled and the refusal ends the answer (finish_reason content_filter)."""

    def __init__(self, inner: Stream, output: OutputFilter, rails: RequestRails):
        self.inner, self.output, self.rails = inner, output, rails
        self.recorded = False

    async def _run(self, step: Any, *args: Any) -> str:
        # regex rails take microseconds; a classifier call (HTTP or a model) goes to a thread
        return await asyncio.to_thread(step, *args) if self.output.classifying else step(*args)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for delta in self._filtered():
                if delta.finish_reason is not None:
                    self._record()  # before the last delta: the exchange is stored as soon as it is seen
                yield delta
        finally:  # also when the client left mid-answer: its decisions still reach the audit log
            self._record()

    def _record(self) -> None:
        if not self.recorded:
            self.recorded = True
            self.rails.record(self.output.verdict.findings)

    async def _filtered(self) -> AsyncIterator[Delta]:
        sent, delta = False, None
        logprobs: list[Any] | None = None  # of tokens whose text the filter still holds back
        async for delta in self.inner:
            if delta.logprobs is not None:
                logprobs = (logprobs or []) + delta.logprobs
            if self.output.verdict.blocked:  # cancelled: wait for the engine's last delta (its usage)
                if delta.finish_reason is not None:
                    break
                continue
            text = await self._run(self.output.feed, delta.text) if delta.text else ""
            if delta.finish_reason is not None and not self.output.verdict.blocked and delta.finish_reason in ("stop", "length"):
                text += await self._run(self.output.finish)
            if self.output.verdict.blocked:
                self.inner.cancel()
                if delta.finish_reason is not None:
                    break
                continue
            if text:
                sent = True
                yield Delta(text=text, logprobs=logprobs)
                logprobs = None
            if delta.finish_reason is not None:
                yield Delta(finish_reason=delta.finish_reason, usage=delta.usage, error=delta.error, logprobs=logprobs,
                            status=delta.status)
                return
        refusal = self.output.verdict.refusal or ""
        yield Delta(text=("\n\n" if sent else "") + refusal)
        yield Delta(finish_reason=CONTENT_FILTER, usage=(delta.usage if delta is not None else None) or Usage())

    def cancel(self) -> None:
        self.inner.cancel()
