"""The MQTT request/reply protocol, as pure functions: topics in, requests out; replies in, payloads out.

Requests arrive on ``<prefix>/<device>/request[/<persona>]`` (or the fleet topic). The payload is plain UTF-8
text, or a JSON object with ``text`` and optionally ``persona``, ``id``, ``reply_to``, ``stream``,
``max_tokens``, ``temperature``, ``format`` (``json`` for a reply that follows the persona's schema),
``conversation`` (the client's name for a conversation, 1 to 64 characters; the reply echoes it) and ``forget``
(``true`` with a ``conversation``: end it; ``text`` may then be left out), or a JSON string (Node-RED). MQTT v5
clients set Response Topic and Correlation Data; MQTT 3.1.1 clients put ``reply_to`` and ``id`` in the JSON. A
reply topic is the client's word, so it is checked: under the allowed prefix, and none of the topics the daemons
themselves use (``Topics.reserved``). A UTF-8 byte-order mark before the payload is dropped; a control character
other than tab, line feed and carriage return, in the payload or in a string field, is a bad request, and so is a
sampling value out of its range (``RANGES``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import BadRequestError, ForbiddenTopicError, PayloadTooLargeError
from .messages import Reply, Request, Sampling

FIELDS: dict[str, type | tuple[type, ...]] = {
    "text": str, "persona": str, "id": (str, int), "reply_to": str, "stream": bool, "max_tokens": int,
    "temperature": (int, float), "format": str, "conversation": str, "forget": bool}

CONVERSATION_CHARS = 64
"""The longest conversation name a client may choose (Home Assistant's conversation ids are 26-character ULIDs)."""

RANGES: dict[str, tuple[int | float, int | float, str]] = {
    "max_tokens": (1, 2**31 - 1, "an integer from 1 to 2147483647"),
    "temperature": (0, 2, "a number from 0 to 2"),
}
"""The sampling settings a request may set, each with its bounds (inclusive) and how an error names them. ``max_tokens``
bounds the answer: llama.cpp's ``n_predict`` is a 32-bit integer whose -1 and -2 (Ollama's ``num_predict``) mean
"no bound", which a request may not ask for; values above ``limits.max_tokens_ceiling`` are clamped to it.
``temperature``: 0 is greedy decoding (llama.cpp samples greedily at 0 or below, so a negative value says nothing
more); above 2 the distribution is close to uniform (OpenAI's API stops at 2 as well); values above
``limits.temperature_ceiling`` are clamped to it. Every sampling setting a request may set has an entry."""

PERSONA_SAMPLING = frozenset(f.name for f in fields(Sampling)) - set(FIELDS)
"""Sampling settings a request cannot change (``top_k``, ``top_p``, ``min_p``, ``repeat_penalty``, ``seed``,
...): they are the persona's, so the same request gives the same bytes."""

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""Control characters other than tab, line feed and carriage return: no text holds them (a NUL, an escape
sequence), so a payload or a string field with one is refused."""

BOM = "\ufeff"

FLEET = "fleet"
"""The device level of requests to the whole fleet."""

DEVICE_TOPICS = ("request", "control", "status", "health", "state", "answer", "voice")
"""The topics under ``<prefix>/<device>/`` that each daemon subscribes to or publishes on: ``Topics`` builds every
one of its topics from these names, and no reply goes to any of them, of any device (``Topics.reserved``)."""


@dataclass(frozen=True)
class Topics:
    """Every topic the daemon uses, derived from the prefix, the device id and Home Assistant's discovery prefix."""

    prefix: str
    device: str
    discovery_prefix: str = "homeassistant"
    listened: tuple[str, ...] = ()
    """Other topic filters the daemon subscribes to (the PLC routes' alarm topics): a reply there would be read as
    a request."""

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    def _topic(self, name: str, device: str = "") -> str:
        """``<prefix>/<device>/<name>``: the one way a device topic is made, so ``reserved`` knows them all."""
        if name not in DEVICE_TOPICS:
            raise ValueError(f"{name!r} is not one of the device topics {DEVICE_TOPICS}")
        return f"{self.prefix}/{device or self.device}/{name}"

    @property
    def request(self) -> str:
        """Requests to this device; a persona may follow as one more level."""
        return self._topic("request")

    @property
    def fleet_request(self) -> str:
        """Requests to any device of the fleet (subscribed through a shared subscription)."""
        return self._topic("request", FLEET)

    @property
    def status(self) -> str:
        """Retained ``online``/``offline``; also the Last Will."""
        return self._topic("status")

    @property
    def health(self) -> str:
        """Periodic health JSON."""
        return self._topic("health")

    @property
    def state(self) -> str:
        """Retained ``{"busy", "queue_depth"}``, published whenever either changes."""
        return self._topic("state")

    @property
    def answer(self) -> str:
        """The last answer, for dashboards and Home Assistant (every reply is copied here)."""
        return self._topic("answer")

    @property
    def control(self) -> str:
        """Commands (cancel, push-to-talk)."""
        return self._topic("control")

    def voice(self, kind: str) -> str:
        """A voice event (``wake``, ``partial``, ``final``, ``answer``, ``barge_in``)."""
        return f"{self._topic('voice')}/{kind}"

    @property
    def home_assistant_status(self) -> str:
        """Home Assistant's birth message (``online``): discovery is published again."""
        return f"{self.discovery_prefix}/status"

    def reserved(self, topic: str) -> str:
        """Why ``topic`` is one the daemons use themselves, or ``""``: a device topic of any device (each name of
        ``DEVICE_TOPICS``, and any level below it), the fleet's requests among them, or anything under the
        discovery prefix. A reply there would be read as a request, a command, a status or a discovery message."""
        levels = topic.split("/")
        own = self.prefix.split("/")
        if levels[:len(own)] == own and len(levels) > len(own) + 1 and levels[len(own) + 1] in DEVICE_TOPICS:
            device, name = levels[len(own)], levels[len(own) + 1]
            return f"the {name} topic of {'the fleet' if device == FLEET else f'device {device!r}'}"
        home = self.discovery_prefix.split("/")
        if self.discovery_prefix and levels[:len(home)] == home:
            return f"under Home Assistant's discovery prefix {self.discovery_prefix!r}"
        for pattern in self.listened:
            if filter_matches(pattern, topic):
                return f"a topic the daemon listens to ({pattern!r})"
        return ""

    def persona_of(self, topic: str) -> str:
        """The persona named by a request topic's last level, or ``""``."""
        for base in (self.request, self.fleet_request):
            if topic.startswith(base + "/"):
                rest = topic[len(base) + 1:]
                return rest if rest and "/" not in rest else ""
        return ""


@dataclass(frozen=True)
class Incoming:
    """A parsed request and where its answer goes."""

    request: Request
    """What to answer."""
    reply_topic: str
    """Where the reply goes; ``""`` when the client gave none (the answer topic still gets it)."""
    correlation: bytes | None
    """MQTT v5 Correlation Data, echoed exactly."""
    key: str
    """Identity for de-duplication: the same key is answered once."""


def filter_matches(pattern: str, topic: str) -> bool:
    """Whether MQTT topic filter ``pattern`` (``+`` one level, ``#`` this level and all below) matches ``topic``."""
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def check_reply_topic(topic: str, allowed_prefix: str, topics: Topics) -> str:
    """``topic`` if it is a plain topic under ``allowed_prefix`` and not one the daemons use themselves
    (``Topics.reserved``); else ``ForbiddenTopicError``."""
    if not topic:
        return ""
    if any(c in topic for c in "#+\x00") or topic.startswith("$"):
        raise ForbiddenTopicError(f"response topic {topic!r} has wildcards or a reserved prefix")
    if not topic.startswith(allowed_prefix):
        raise ForbiddenTopicError(f"response topic {topic!r} is outside the allowed prefix {allowed_prefix!r}")
    why = topics.reserved(topic)
    if why:
        raise ForbiddenTopicError(f"response topic {topic!r} is {why}: replies never go to the daemons' own topics")
    return topic


def decode_payload(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """The request fields of a payload; size is checked before anything is parsed."""
    if len(payload) > max_bytes:
        raise PayloadTooLargeError(f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8").removeprefix(BOM)  # a byte-order mark is no text: JSON after one is JSON
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"payload is not valid UTF-8 (byte {exc.start})") from exc
    bad = CONTROL.search(text)
    if bad:
        raise BadRequestError(f"payload holds the control character U+{ord(bad.group()):04X} at position "
                              f"{bad.start()}: a request is text (tab, line feed and carriage return aside)")
    stripped = text.strip()
    if not stripped.startswith(("{", '"', "[")):
        return {"text": text}
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"payload looks like JSON but does not parse: {exc.msg} at position {exc.pos}") from exc
    except RecursionError as exc:
        raise BadRequestError("payload JSON is nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer longer than Python's conversion limit
        raise BadRequestError(f"payload JSON has a value that cannot be read: {exc}") from exc
    if isinstance(data, str):
        _check_string("text", data)
        return {"text": data}
    if not isinstance(data, dict):
        raise BadRequestError(f"JSON payload must be an object or a string, got {type(data).__name__}")
    for key, value in data.items():
        if key in PERSONA_SAMPLING:
            raise BadRequestError(f"field {key!r} is the persona's sampling setting, not a request's (a request "
                                  f"may set {' and '.join(RANGES)})")
        if key not in FIELDS:
            raise BadRequestError(f"unknown field {key!r} (known: {', '.join(FIELDS)})")
        want = FIELDS[key]
        if isinstance(value, bool) and want is not bool:
            raise BadRequestError(f"field {key!r} has the wrong type (boolean)")
        if not isinstance(value, want):
            raise BadRequestError(f"field {key!r} has the wrong type ({type(value).__name__})")
        if isinstance(value, str):
            _check_string(key, value)
    if "conversation" in data:
        check_conversation(data["conversation"])
    if "forget" in data and "conversation" not in data:
        raise BadRequestError("field 'forget' needs a 'conversation': it names the conversation to end")
    if "text" not in data and not data.get("forget"):
        raise BadRequestError("field 'text' is missing")
    for key, (low, high, allowed) in RANGES.items():
        if key in data and not low <= data[key] <= high:  # NaN and the infinities fail too
            raise BadRequestError(f"field {key!r} is out of range: {allowed}")
    if data.get("format", "text") not in ("text", "json"):
        raise BadRequestError("field 'format' must be \"text\" or \"json\"")
    if isinstance(data.get("id"), int) and not -(2**63) <= data["id"] < 2**63:
        raise BadRequestError("field 'id' is out of range")
    return data


def check_conversation(value: str) -> str:
    """``value`` if it can name a conversation: 1 to ``CONVERSATION_CHARS`` characters, not only white space (control
    characters are refused with every string field); else ``BadRequestError`` naming the field."""
    if not 1 <= len(value) <= CONVERSATION_CHARS or not value.strip():
        raise BadRequestError(f"field 'conversation' must be 1 to {CONVERSATION_CHARS} characters, not only white "
                              f"space (got {len(value)})")
    return value


def _check_string(key: str, value: str) -> None:
    """JSON can carry escapes that are no text: lone surrogates (``"\\ud800"``) and control characters
    (``"\\u0000"``): refuse them here, not later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequestError(f"field {key!r} holds an escape that is not a character (position {exc.start})") from exc
    bad = CONTROL.search(value)
    if bad:
        raise BadRequestError(f"field {key!r} holds the control character U+{ord(bad.group()):04X} at position "
                              f"{bad.start()}")


def parse(topics: Topics, topic: str, payload: bytes, *, max_bytes: int, allowed_prefix: str,
          response_topic: str = "", correlation: bytes | None = None) -> Incoming:
    """Turn one MQTT message into an ``Incoming``; faults raise ``RequestError`` subclasses."""
    data = decode_payload(payload, max_bytes)
    reply_topic = check_reply_topic(response_topic or str(data.get("reply_to", "")), allowed_prefix, topics)
    rid = str(data.get("id", "")) or (correlation_text(correlation) if correlation else "")
    persona = topics.persona_of(topic)
    if data.get("persona") and persona and data["persona"] != persona:
        raise BadRequestError(f"persona {data['persona']!r} in the payload contradicts {persona!r} in the topic")
    request = Request(
        text=str(data.get("text", "")),
        persona=persona or str(data.get("persona", "")),
        id=rid,
        max_tokens=data.get("max_tokens"),
        temperature=float(data["temperature"]) if "temperature" in data else None,
        stream=bool(data.get("stream", False)),
        format="json" if data.get("format") == "json" else "text" if data.get("format") == "text" else "",
        conversation=str(data.get("conversation", "")),
        forget=bool(data.get("forget", False)),
    )
    return Incoming(request, reply_topic, correlation, request_key(reply_topic, correlation, rid, payload))


def request_key(reply_topic: str, correlation: bytes | None, rid: str, payload: bytes) -> str:
    """Identity of a request for de-duplication: where it is answered, its correlation data or id, and its payload.

    A redelivered message has all four the same: it is not run twice, and its stored reply is sent again. A new
    question that reuses a fixed correlation data or id (a Node-RED node with a typed-in value) differs in its
    payload and is answered as new. Without correlation data or an id there is no key.
    """
    if not correlation and not rid:
        return ""
    ident = f"c:{correlation.hex()}" if correlation else f"i:{rid}"
    return f"{reply_topic}|{ident}|{hashlib.sha256(payload).hexdigest()[:24]}"


def salvage(payload: bytes, max_bytes: int) -> tuple[str, str, str]:
    """``(reply_to, id, persona)`` from a request that was refused, where its JSON still says them."""
    if len(payload) > max_bytes:
        return "", "", ""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "", "", ""
    if not isinstance(data, dict):
        return "", "", ""
    out = []
    for name in ("reply_to", "id", "persona"):
        value = data.get(name, "")
        number = name == "id" and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
        text = str(value) if isinstance(value, str) or number else ""
        try:
            _check_string(name, text)
        except BadRequestError:
            text = ""
        out.append(text)
    return out[0], out[1], out[2]


def salvage_conversation(payload: bytes, max_bytes: int) -> str:
    """The conversation a refused request names, where its JSON still says one that is valid; else ``""``."""
    if len(payload) > max_bytes:
        return ""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    value = data.get("conversation") if isinstance(data, dict) else None
    if not isinstance(value, str):
        return ""
    try:
        _check_string("conversation", value)
        return check_conversation(value)
    except BadRequestError:
        return ""


def correlation_text(correlation: bytes) -> str:
    """Correlation data as an id: its text when it is UTF-8, else its hex."""
    try:
        return correlation.decode("utf-8")
    except UnicodeDecodeError:
        return correlation.hex()


def reply_payload(reply: Reply, max_bytes: int, seq: int | None = None) -> bytes:
    """The JSON of a final reply, cut to ``max_bytes`` by shortening the text (``truncated`` says so)."""
    body = reply.to_dict()
    body["done"] = True
    if seq is not None:
        body["seq"] = seq
    raw = _encode(body)
    if len(raw) <= max_bytes:
        return raw
    text = body.get("text", "")
    over = len(raw) - max_bytes + 64
    body["text"] = text.encode()[: max(0, len(text.encode()) - over)].decode("utf-8", errors="ignore")
    body["truncated"] = True
    body.pop("sources", None)
    raw = _encode(body)
    if len(raw) > max_bytes:  # provenance and usage alone are too big: keep the essentials
        body = {"id": reply.id, "status": reply.status, "text": body["text"][:200], "truncated": True,
                "done": True}
        if reply.conversation is not None:
            body["conversation"], body["turn"] = reply.conversation, reply.turn
        raw = _encode(body)
    return raw


def _encode(body: dict[str, Any]) -> bytes:
    """UTF-8 JSON; anything that is not a character is written as its JSON escape rather than failing."""
    return json.dumps(body, ensure_ascii=False).encode("utf-8", errors="backslashreplace")


class Coalescer:
    """Streamed pieces joined into fewer chunks: the first goes at once, later ones wait until ``window_s`` has
    passed since the last chunk left (each chunk wakes the broker and the client on the cores generation runs on).
    ``window_s = 0`` passes every piece as it comes."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.pending = ""
        self.last: float | None = None

    def feed(self, piece: str) -> str:
        """The text to send now ("" when it waits for more)."""
        self.pending += piece
        now = self.clock()
        if self.last is not None and now - self.last < self.window_s:
            return ""
        self.last = now
        return self.flush()

    def flush(self) -> str:
        """What is still waiting (at the end of the answer)."""
        out, self.pending = self.pending, ""
        return out


def chunk_payload(request_id: str, seq: int, text: str) -> bytes:
    """One streamed piece of an answer."""
    return _encode({"id": request_id, "seq": seq, "chunk": text, "done": False})


def answer_payload(reply: Reply, max_bytes: int) -> bytes:
    """The answer topic's JSON: ``state`` is the text a person should read (the answer, the persona's refusal, or
    the error's message), cut to Home Assistant's 255 characters; the full text, status, error code and sources
    are attributes."""
    text = reply.text or (reply.error.message if reply.error else reply.status)
    body: dict[str, Any] = {"state": text[:255], "status": reply.status, "id": reply.id, "persona": reply.persona,
                            "text": text, "error": reply.error.code if reply.error else None,
                            "sources": [asdict(s) for s in reply.sources]}
    if reply.data is not None:
        body["data"] = reply.data
    if reply.conversation is not None:
        body["conversation"], body["turn"] = reply.conversation, reply.turn
    raw = _encode(body)
    if len(raw) > max_bytes:
        body["text"] = text[: max_bytes // 4]
        body["sources"] = [{"document": s.document, "location": s.location} for s in reply.sources]
        raw = _encode(body)
    return raw
