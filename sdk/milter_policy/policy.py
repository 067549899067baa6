"""A Policy: handlers registered per event, and the capabilities derived from them.

    policy = Policy("stamper")

    @policy.end_of_message
    def stamp(ctx: Context) -> None:
        ctx.add_header("X-Stamped", "yes")

Every handler is optional. An event without a handler is never sent (the MTA
is told not to send it). ``observe=True`` means the handler only looks: the
MTA does not wait for it and its verdict is ignored. Handlers may be plain or
``async`` functions; plain ones run in a thread pool, so a blocking handler
never stalls other connections.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from milter_bridge.v1 import policy_pb2 as pb
from milter_policy.security import ServerTls

__all__ = ["EVENTS", "Policy"]

Handler = Callable[..., Any]
H = TypeVar("H", bound=Handler)

# Events in the order of an SMTP session, with their handler's arguments after ctx.
EVENTS = (
    "connect",  # (ctx)
    "helo",  # (ctx, name: str)
    "mail_from",  # (ctx, address: str, args: list[str])
    "rcpt_to",  # (ctx, address: str, args: list[str])
    "data",  # (ctx)
    "header",  # (ctx, name: str, value: bytes)
    "end_of_headers",  # (ctx)
    "body",  # (ctx, chunk: bytes)
    "end_of_message",  # (ctx)
    "unknown",  # (ctx, command: str)
    "abort",  # (ctx)
    "close",  # (ctx)
)
ACTIONS = tuple(f.name for f in pb.Actions.DESCRIPTOR.fields)


@dataclass(frozen=True)
class Registered:
    func: Handler
    observe: bool


class Policy:
    """Handlers per event, error handling, and how the policy is served."""

    def __init__(
        self,
        name: str = "policy",
        *,
        error_action: str = "tempfail",
        macros: Mapping[str, Sequence[str]] | None = None,
        workers: int = 32,
    ) -> None:
        """``error_action``: the verdict when a handler raises ("tempfail", "reject",
        "accept" or "continue"). ``macros``: macro names wanted per stage, e.g.
        ``{"connect": ["j", "{daemon_name}"], "end_of_message": ["i"]}``.
        ``workers``: threads for plain (non-async) handlers."""
        actions = {"tempfail": pb.ACTION_TEMPFAIL, "reject": pb.ACTION_REJECT}
        actions |= {"accept": pb.ACTION_ACCEPT, "continue": pb.ACTION_CONTINUE}
        if error_action not in actions:
            msg = f"error_action must be one of {', '.join(actions)}, not {error_action!r}"
            raise ValueError(msg)
        unknown = set(macros or {}) - {f.name for f in pb.MacroRequest.DESCRIPTOR.fields}
        if unknown:
            msg = f"macros for unknown stages: {', '.join(sorted(unknown))}"
            raise ValueError(msg)
        self.name = name
        self.error_action = actions[error_action]
        self.macros = {stage: list(names) for stage, names in (macros or {}).items()}
        self.workers = workers
        self.handlers: dict[str, Registered] = {}
        self.header_batch = False
        self.eom_envelope = True
        self.eom_headers = True
        self.eom_body: int = 0  # > 0: buffer the body up to this many bytes
        self.actions: frozenset[str] = frozenset()

    # -- registration --------------------------------------------------------

    def on(self, event: str, func: H, *, observe: bool = False) -> H:
        """milterjs style: ``policy.on("helo", handler)``."""
        if event not in EVENTS:
            msg = f"unknown event {event!r}; events: {', '.join(EVENTS)}"
            raise ValueError(msg)
        if event in ("abort", "close"):
            observe = True  # never answered
        if event == "body" and self.eom_body:
            msg = "a body handler and end_of_message(body=...) exclude each other"
            raise ValueError(msg)
        self.handlers[event] = Registered(func, observe)
        return func

    def _decorator(self, event: str, func: H | None, *, observe: bool) -> Any:
        if func is not None:
            return self.on(event, func, observe=observe)
        return lambda f: self.on(event, f, observe=observe)

    @overload
    def connect(self, func: H) -> H: ...
    @overload
    def connect(self, *, observe: bool = ...) -> Callable[[H], H]: ...
    def connect(self, func: H | None = None, *, observe: bool = False) -> Any:
        """Handler(ctx) when the SMTP client connects; ``ctx.client`` tells who."""
        return self._decorator("connect", func, observe=observe)

    @overload
    def helo(self, func: H) -> H: ...
    @overload
    def helo(self, *, observe: bool = ...) -> Callable[[H], H]: ...
    def helo(self, func: H | None = None, *, observe: bool = False) -> Any:
        """Handler(ctx, name) for HELO/EHLO."""
        return self._decorator("helo", func, observe=observe)

    @overload
    def mail_from(self, func: H) -> H: ...
    @overload
    def mail_from(self, *, observe: bool = ...) -> Callable[[H], H]: ...
    def mail_from(self, func: H | None = None, *, observe: bool = False) -> Any:
        """Handler(ctx, address, args) for MAIL FROM: a message starts."""
        return self._decorator("mail_from", func, observe=observe)

    @overload
    def rcpt_to(self, func: H) -> H: ...
    @overload
    def rcpt_to(self, *, observe: bool = ...) -> Callable[[H], H]: ...
    def rcpt_to(self, func: H | None = None, *, observe: bool = False) -> Any:
        """Handler(ctx, address, args) per RCPT TO; a refusal refuses that recipient only."""
        return self._decorator("rcpt_to", func, observe=observe)

    @overload
    def data(self, func: H) -> H: ...
    @overload
    def data(self, *, observe: bool = ...) -> Callable[[H], H]: ...
    def data(self, func: H | None = None, *, observe: bool = False) -> Any:
        """Handler(ctx) for DATA."""
        return self._decorator("data", func, observe=observe)

    @overload
    def header(self, func: H) -> H: ...
    @overload
    def header(self, *, observe: bool = ..., batch: bool = ...) -> Callable[[H], H]: ...
    def header(self, func: H | None = None, *, observe: bool = False, batch: bool = False) -> Any:
        """Handler(ctx, name, value: bytes) per header. ``batch=True``: the headers come
        together at end of headers (one round trip) and the handler is called for each."""
        self.header_batch = batch
        return self._decorator("header", func, observe=observe)

    @overload
    def end_of_headers(self, func: H) -> H: ...
    @overload
    def end_of_headers(self, *, observe: bool = ...) -> Callable[[H], H]: ...
    def end_of_headers(self, func: H | None = None, *, observe: bool = False) -> Any:
        """Handler(ctx) after the last header; ``ctx.headers`` holds them."""
        return self._decorator("end_of_headers", func, observe=observe)

    @overload
    def body(self, func: H) -> H: ...
    @overload
    def body(self, *, observe: bool = ...) -> Callable[[H], H]: ...
    def body(self, func: H | None = None, *, observe: bool = False) -> Any:
        """Handler(ctx, chunk: bytes) per body piece (CRLF line ends); ctx.skip() stops them."""
        return self._decorator("body", func, observe=observe)

    @overload
    def end_of_message(self, func: H) -> H: ...
    @overload
    def end_of_message(
        self,
        *,
        observe: bool = ...,
        envelope: bool = ...,
        headers: bool = ...,
        body: bool | int = ...,
        actions: Iterable[str] | None = ...,
    ) -> Callable[[H], H]: ...
    def end_of_message(
        self,
        func: H | None = None,
        *,
        observe: bool = False,
        envelope: bool = True,
        headers: bool = True,
        body: bool | int = False,
        actions: Iterable[str] | None = None,
    ) -> Any:
        """Handler(ctx) at end of message: the place for modifications and the final verdict.

        ``envelope`` / ``headers``: fill ``ctx.envelope`` / ``ctx.headers`` without any
        other handler (one round trip per message). ``body``: fill ``ctx.body``, True for
        up to 1 MiB or a number of bytes. ``actions``: the modifications the handler may
        make (default: all; see ``ACTIONS``)."""
        if body and "body" in self.handlers:
            msg = "a body handler and end_of_message(body=...) exclude each other"
            raise ValueError(msg)
        chosen = frozenset(ACTIONS if actions is None else actions)
        if chosen - set(ACTIONS):
            msg = f"unknown actions: {', '.join(sorted(chosen - set(ACTIONS)))}"
            raise ValueError(msg)
        self.eom_envelope, self.eom_headers = envelope, headers
        self.eom_body = (1 << 20 if body is True else int(body)) if body else 0
        self.actions = frozenset() if observe else chosen
        return self._decorator("end_of_message", func, observe=observe)

    @overload
    def unknown(self, func: H) -> H: ...
    @overload
    def unknown(self, *, observe: bool = ...) -> Callable[[H], H]: ...
    def unknown(self, func: H | None = None, *, observe: bool = False) -> Any:
        """Handler(ctx, command) for an SMTP command the MTA did not recognise."""
        return self._decorator("unknown", func, observe=observe)

    def abort(self, func: H) -> H:
        """Handler(ctx) when a message ends without end of message; never answered."""
        return self.on("abort", func)

    def close(self, func: H) -> H:
        """Handler(ctx) when the SMTP session ends."""
        return self.on("close", func)

    # -- serving -------------------------------------------------------------

    def serve(
        self,
        address: str = "[::]:50051",
        *,
        max_connection_age: float | None = None,
        tls: ServerTls | None = None,
        token_file: str | None = None,
    ) -> None:
        """Serve until SIGTERM or SIGINT (then finish what is in flight).

        ``max_connection_age``, ``tls``, ``token_file``: see PolicyServer."""
        import asyncio  # noqa: PLC0415

        from milter_policy.server import serve_async  # noqa: PLC0415 - server imports policy

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        asyncio.run(
            serve_async(
                self,
                address,
                max_connection_age=max_connection_age,
                tls=tls,
                token_file=token_file,
            )
        )

    async def serve_async(
        self,
        address: str = "[::]:50051",
        *,
        max_connection_age: float | None = None,
        tls: ServerTls | None = None,
        token_file: str | None = None,
    ) -> None:
        """The async variant of serve(), for an application's own event loop."""
        from milter_policy.server import serve_async  # noqa: PLC0415

        await serve_async(
            self, address, max_connection_age=max_connection_age, tls=tls, token_file=token_file
        )

    # -- capabilities --------------------------------------------------------

    def _mode(self, event: str) -> int:
        registered = self.handlers.get(event)
        if registered is None:
            return pb.EVENT_MODE_SKIP
        return pb.EVENT_MODE_OBSERVE if registered.observe else pb.EVENT_MODE_DECIDE

    def capabilities(self) -> pb.Capabilities:
        """What the bridge should ask of the MTA for these handlers."""
        events: dict[str, Any] = {e: self._mode(e) for e in EVENTS if e != "close"}
        streamed = "body" in self.handlers
        body = (
            pb.BODY_DELIVERY_STREAM
            if streamed
            else pb.BODY_DELIVERY_BUFFERED
            if self.eom_body
            else pb.BODY_DELIVERY_NONE
        )
        has_eom = "end_of_message" in self.handlers
        return pb.Capabilities(
            events=pb.EventModes(**events),
            header_delivery=pb.HEADER_DELIVERY_BATCH
            if self.header_batch
            else pb.HEADER_DELIVERY_EACH,
            body_delivery=body,
            body_limit=self.eom_body,
            end_of_message_content=pb.EndOfMessageContent(
                envelope=has_eom and self.eom_envelope, headers=has_eom and self.eom_headers
            ),
            actions=pb.Actions(**{a: a in self.actions for a in ACTIONS}),
            macros=pb.MacroRequest(**self.macros),
            # PolicyServer serves SharedPolicyService too (milter_policy/shared.py).
            shared_streams=True,
        )

    @property
    def fingerprint(self) -> str:
        """Identifies these capabilities; a stream negotiated with others is refused."""
        data = self.capabilities().SerializeToString(deterministic=True)
        return hashlib.sha256(data).hexdigest()[:16]
