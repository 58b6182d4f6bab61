"""Remote control, signed: the head's commands carry its signature, a worker's replies its node's.

Celery's remote control (ping, inspect, shutdown, revoke, ...) travels through kombu's
mailbox. Ours sends it through the same ``auth`` serializer as jobs, each party with a key
of its own (``worker_tasks.signing``): the head signs its commands, a worker its replies
with its node's key, and each side verifies against what it trusts: a worker the head's
certificates (its trust store), the head and Flower the nodes'.

A worker with a trust store takes
- a command the head signed in the last ``FRESH_S`` seconds that it has not seen before
  (the signed arguments carry the time and a nonce, so a replay is refused);
- an unsigned command only if it only reads or asks for events (``UNSIGNED_COMMANDS``):
  Flower holds no key (its task API would sign jobs with it) and inspects the workers this
  way, and what these show, the Redis password shows anyway.
Everything else is refused in one log line, answered with an error where a reply is
expected. The head skips, in one line, a reply that does not verify, and an unsigned one
once it holds the nodes' certificates.

Parameters (environment): none of its own; the keys and trust stores are ``signing``'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from itertools import count
from typing import Any

from celery.app.control import Control
from kombu import Consumer, pidbox
from kombu.serialization import loads

from worker_tasks import signing
from worker_tasks.spec import node_of_slot, slot_of_worker

logger = logging.getLogger(__name__)

# How far a signed command's time may be from the worker's clock (seconds, either way).
FRESH_S = 120.0
# The signed arguments that make a command fresh and once-only (removed before it runs).
SENT_AT = "sc_sent_at"
NONCE = "sc_nonce"
# The nonces a worker remembers: more than the head sends in FRESH_S, so none expires early.
MAX_NONCES = 100_000
# Commands a worker takes unsigned: they only read (ping, what Flower inspects), or ask for
# the events it sends anyway (Flower sends heartbeat and enable_events every few seconds).
UNSIGNED_COMMANDS = frozenset({"ping", "stats", "active_queues", "active", "reserved",
                               "scheduled", "revoked", "registered", "conf", "query_task",
                               "clock", "heartbeat", "enable_events"})


def is_signed(message: Any) -> bool:
    return getattr(message, "content_type", None) == signing.SIGNED_CONTENT_TYPE


def shown(value: Any) -> str:
    """An untrusted command name as one short printable word for the log."""
    text = value if isinstance(value, str) else repr(value)
    return "".join(c if c.isprintable() else "?" for c in text)[:80]


def reply_address(reply_to: Any) -> bool:
    """Whether an untrusted ``reply_to`` is what kombu replies to: two strings."""
    return (isinstance(reply_to, dict) and isinstance(reply_to.get("exchange"), str)
            and isinstance(reply_to.get("routing_key"), str))


class GatedNode(pidbox.Node):
    """A worker's mailbox: each command verified before Celery runs it."""

    _signed = False  # whether the command being handled came signed by a trusted key

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nonces: OrderedDict[str, float] = OrderedDict()

    def listen(self, channel: Any = None, callback: Any = None) -> Consumer:
        handle = callback or self.handle_message

        def on_message(message: Any) -> None:
            body = self.read_command(message)
            if body is not None:
                handle(body, message)

        consumer = self.Consumer(channel=channel, on_message=on_message)
        consumer.consume()
        return consumer

    def read_command(self, message: Any) -> dict[str, Any] | None:
        """The command's body, verified where it is signed; None (said in one line) when
        it cannot be read."""
        store = signing.trust_store()
        if store is None and is_signed(message):
            logger.error("refused control message: signed, and this worker has no trust store "
                         "to verify it (start it with --trusted-certs DIR); nothing done")
            return None
        try:
            if store is not None:
                signing.reload_if_changed(store)
            body = message.decode()
        except Exception as err:  # SecurityError of a forged or foreign signature, bad JSON
            logger.error("refused control message: it cannot be read or does not verify "
                         "(%s); nothing done", shown(str(err)))
            return None
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            logger.error("refused control message: not a command; nothing done")
            return None
        self._signed = is_signed(message)
        return body

    def dispatch(self, method: str, arguments: Any = None, reply_to: Any = None,
                 ticket: Any = None, **kwargs: Any) -> Any:
        arguments = dict(arguments) if isinstance(arguments, dict) else {}
        stamp = arguments.pop(SENT_AT, None), arguments.pop(NONCE, None)
        where = reply_to if reply_address(reply_to) else None
        refusal = (self.refusal(method, *stamp) if where is not None or reply_to is None
                   else "its reply_to is not an exchange and a routing key")
        if refusal is None:
            return super().dispatch(method, arguments, reply_to, ticket, **kwargs)
        logger.error("refused control command %s: %s; nothing done", shown(method), refusal)
        if where is not None:
            try:
                self.reply({self.hostname: {"error": f"refused: {refusal}"}},
                           exchange=where["exchange"], routing_key=where["routing_key"],
                           ticket=ticket)
            except Exception as err:  # the sender's reply queue may be gone; said, not raised
                logger.error("could not answer the refused command: %s", shown(str(err)))
        return None

    def handle(self, method: str, arguments: Any = None) -> Any:
        """Run the command; one whose arguments its handler rejects is one line and an error
        reply, not kombu's traceback (the arguments are the sender's)."""
        if method not in self.handlers:
            return super().handle(method, arguments)  # KeyError: Celery says it in one line
        try:
            return super().handle(method, arguments)
        except Exception as err:  # SystemExit (a signed shutdown) passes through
            logger.error("control command %s failed: %s", shown(method), shown(repr(err)))
            return {"error": shown(repr(err))}

    def refusal(self, method: str, sent_at: Any, nonce: Any) -> str | None:
        """Why this worker does not run ``method``, or None to run it."""
        if signing.trust_store() is None:
            return None  # signing off: Celery's rules (and worker_tasks.control's)
        if not self._signed:
            if method in UNSIGNED_COMMANDS:
                return None
            return ("not signed by the head node (unsigned, only inspection commands are "
                    "taken)")
        if not isinstance(sent_at, int | float) or abs(time.time() - sent_at) > FRESH_S:
            return (f"signed, but not sent in the last {FRESH_S:g} s (a replay, or this "
                    f"node's clock and the head's disagree: keep them in time with NTP)")
        if not isinstance(nonce, str) or nonce in self._nonces:
            return "signed, but seen before (a replay)"
        self.remember(nonce, sent_at)
        return None

    def remember(self, nonce: str, sent_at: float) -> None:
        self._nonces[nonce] = sent_at
        horizon = time.time() - 2 * FRESH_S  # older ones fail the time check anyway
        while self._nonces and (len(self._nonces) > MAX_NONCES
                                or next(iter(self._nonces.values())) < horizon):
            self._nonces.popitem(last=False)


class SignedMailbox(pidbox.Mailbox):
    """kombu's mailbox, speaking through this process's signing: commands and replies are
    signed where it holds a key, replies verified where it holds the nodes' certificates."""

    node_cls = GatedNode

    @property  # type: ignore[override]
    def serializer(self) -> str:
        return signing.AUTH_SERIALIZER if signing.registration().signs else "json"

    @serializer.setter
    def serializer(self, value: str) -> None:
        """kombu's constructor sets it; this process's key decides instead."""

    def _publish(self, type: str, arguments: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: A002
        if signing.registration().signs:
            arguments = {**(arguments or {}), SENT_AT: time.time(), NONCE: uuid.uuid4().hex}
        return super()._publish(type, arguments, *args, **kwargs)

    def read_reply(self, message: Any) -> Any | None:
        """A reply's body, or None (said in one line) when this process does not take it."""
        store = signing.registration().store
        try:
            if store is None and is_signed(message):
                # No node's certificate known here: taken unverified, as unsigned ones are.
                return loads(*signing.read_unverified(message.body), force=True)
            if store is not None and not is_signed(message):
                logger.warning("skipped an unsigned control reply: replies must be signed by "
                               "a node's key (its certificate in %s; a worker started without "
                               "one: cluster down, then cluster up makes it)", store)
                return None
            body = message.decode()
        except Exception as err:  # SecurityError: an unknown or forged signature
            logger.warning("skipped a control reply that does not verify against %s: %s",
                           store, shown(str(err)))
            return None
        if store is not None:
            # Each node answers for itself only: a reply names workers of the signer's node.
            signer = signing.signer_name(message.body)
            others = [name for name in (body if isinstance(body, dict) else {None: None})
                      if not isinstance(name, str) or node_of_slot(slot_of_worker(name)) != signer]
            if others:
                logger.warning("skipped a control reply for %s signed by node %s's key",
                               shown(others[0]), shown(signer))
                return None
        return body

    def _collect(self, ticket: Any, limit: int | None = None, timeout: float = 1,
                 callback: Any = None, channel: Any = None, accept: Any = None) -> list[Any]:
        """kombu's ``_collect``, reading each reply through ``read_reply``: one that does
        not verify is skipped instead of raising out of the whole wait."""
        chan = channel or self.connection.default_channel
        queue = self.reply_queue
        responses: list[Any] = []
        unclaimed = self.unclaimed
        try:
            return unclaimed.pop(ticket)
        except KeyError:
            pass

        def on_message(message: Any) -> None:
            header = message.headers.get
            self.clock.adjust(header("clock") or 0)
            expires = header("expires")
            if expires and time.time() > expires:
                return
            body = self.read_reply(message)
            if body is None:
                return
            this_id = header("ticket", ticket)
            if this_id == ticket:
                if callback:
                    callback(body)
                responses.append(body)
            else:
                unclaimed[this_id].append(body)

        consumer = Consumer(chan, [queue], accept=accept if accept is not None else self.accept,
                            no_ack=True, on_message=on_message)
        try:
            with consumer:
                for _ in range(limit) if limit else count():
                    try:
                        self.connection.drain_events(timeout=timeout)
                    except TimeoutError:
                        break
                return responses
        finally:
            chan.after_reply_message_received(queue.name)


class SignedControl(Control):
    """Celery's remote-control client over ``SignedMailbox``."""

    Mailbox = SignedMailbox
