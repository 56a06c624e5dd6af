"""The MQTT request/reply protocol, as pure functions: topics in, requests out; replies in, payloads out.

Requests arrive on ``<prefix>/<device>/request[/<persona>]`` (or the fleet topic). The payload is plain UTF-8
text, or a JSON object with ``text`` and optionally ``persona``, ``id``, ``reply_to``, ``stream``,
``max_tokens``, ``temperature``, or a JSON string (Node-RED). MQTT v5 clients set Response Topic and
Correlation Data; MQTT 3.1.1 clients put ``reply_to`` and ``id`` in the JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import BadRequestError, ForbiddenTopicError, PayloadTooLargeError
from .pipeline import Reply, Request

FIELDS: dict[str, type | tuple[type, ...]] = {
    "text": str, "persona": str, "id": (str, int), "reply_to": str, "stream": bool, "max_tokens": int,
    "temperature": (int, float)}


@dataclass(frozen=True)
class Topics:
    """Every topic the daemon uses, derived from the prefix and the device id."""

    prefix: str
    device: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def request(self) -> str:
        """Requests to this device; a persona may follow as one more level."""
        return f"{self.base}/request"

    @property
    def fleet_request(self) -> str:
        """Requests to any device of the fleet (subscribed through a shared subscription)."""
        return f"{self.prefix}/fleet/request"

    @property
    def status(self) -> str:
        """Retained ``online``/``offline``; also the Last Will."""
        return f"{self.base}/status"

    @property
    def health(self) -> str:
        """Periodic health JSON."""
        return f"{self.base}/health"

    @property
    def answer(self) -> str:
        """The last answer, for dashboards and Home Assistant (every reply is copied here)."""
        return f"{self.base}/answer"

    @property
    def control(self) -> str:
        """Commands (cancel, push-to-talk)."""
        return f"{self.base}/control"

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


def check_reply_topic(topic: str, allowed_prefix: str) -> str:
    """``topic`` if it is a plain topic under ``allowed_prefix``; else ``ForbiddenTopicError``."""
    if not topic:
        return ""
    if any(c in topic for c in "#+\x00") or topic.startswith("$"):
        raise ForbiddenTopicError(f"response topic {topic!r} has wildcards or a reserved prefix")
    if not topic.startswith(allowed_prefix):
        raise ForbiddenTopicError(f"response topic {topic!r} is outside the allowed prefix {allowed_prefix!r}")
    return topic


def decode_payload(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """The request fields of a payload; size is checked before anything is parsed."""
    if len(payload) > max_bytes:
        raise PayloadTooLargeError(f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"payload is not valid UTF-8 (byte {exc.start})") from exc
    stripped = text.strip()
    if not stripped.startswith(("{", '"', "[")):
        return {"text": text}
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"payload looks like JSON but does not parse: {exc.msg} at position {exc.pos}") from exc
    if isinstance(data, str):
        return {"text": data}
    if not isinstance(data, dict):
        raise BadRequestError(f"JSON payload must be an object or a string, got {type(data).__name__}")
    for key, value in data.items():
        if key not in FIELDS:
            raise BadRequestError(f"unknown field {key!r} (known: {', '.join(FIELDS)})")
        want = FIELDS[key]
        if isinstance(value, bool) and want is not bool:
            raise BadRequestError(f"field {key!r} has the wrong type (boolean)")
        if not isinstance(value, want):
            raise BadRequestError(f"field {key!r} has the wrong type ({type(value).__name__})")
    if "text" not in data:
        raise BadRequestError("field 'text' is missing")
    if "temperature" in data and not math.isfinite(data["temperature"]):
        raise BadRequestError("field 'temperature' must be a finite number")
    return data


def parse(topics: Topics, topic: str, payload: bytes, *, max_bytes: int, allowed_prefix: str,
          response_topic: str = "", correlation: bytes | None = None) -> Incoming:
    """Turn one MQTT message into an ``Incoming``; faults raise ``RequestError`` subclasses."""
    data = decode_payload(payload, max_bytes)
    reply_topic = check_reply_topic(response_topic or str(data.get("reply_to", "")), allowed_prefix)
    rid = str(data.get("id", "")) or (_corr_text(correlation) if correlation else "")
    persona = topics.persona_of(topic)
    if data.get("persona") and persona and data["persona"] != persona:
        raise BadRequestError(f"persona {data['persona']!r} in the payload contradicts {persona!r} in the topic")
    request = Request(
        text=data["text"],
        persona=persona or str(data.get("persona", "")),
        id=rid,
        max_tokens=data.get("max_tokens"),
        temperature=float(data["temperature"]) if "temperature" in data else None,
        stream=bool(data.get("stream", False)),
    )
    key = ""
    if correlation:
        key = f"{reply_topic}|c|{correlation.hex()}"
    elif rid:
        key = f"{reply_topic}|i|{rid}"
    return Incoming(request, reply_topic, correlation, key)


def salvage(payload: bytes, max_bytes: int) -> tuple[str, str]:
    """``(reply_to, id)`` from a request that was refused, where its JSON still says them (MQTT 3.1.1 clients)."""
    if len(payload) > max_bytes:
        return "", ""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    reply_to, rid = data.get("reply_to", ""), data.get("id", "")
    return (reply_to if isinstance(reply_to, str) else "", str(rid) if isinstance(rid, str | int) else "")


def _corr_text(correlation: bytes) -> str:
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
    raw = json.dumps(body, ensure_ascii=False).encode()
    if len(raw) <= max_bytes:
        return raw
    text = body.get("text", "")
    over = len(raw) - max_bytes + 64
    body["text"] = text.encode()[: max(0, len(text.encode()) - over)].decode("utf-8", errors="ignore")
    body["truncated"] = True
    raw = json.dumps(body, ensure_ascii=False).encode()
    if len(raw) > max_bytes:  # provenance and usage alone are too big: keep the essentials
        body = {"id": reply.id, "status": reply.status, "text": body["text"][:200], "truncated": True,
                "done": True}
        raw = json.dumps(body, ensure_ascii=False).encode()
    return raw


def chunk_payload(request_id: str, seq: int, text: str) -> bytes:
    """One streamed piece of an answer."""
    return json.dumps({"id": request_id, "seq": seq, "chunk": text, "done": False}, ensure_ascii=False).encode()


def answer_payload(reply: Reply, max_bytes: int) -> bytes:
    """The answer topic's JSON: ``state`` fits Home Assistant's 255-character cap, the full text is an attribute."""
    text = reply.text if reply.status == "ok" else (reply.error.message if reply.error else reply.status)
    body = {"state": text[:255], "status": reply.status, "id": reply.id, "persona": reply.persona,
            "text": text, "error": reply.error.code if reply.error else None}
    raw = json.dumps(body, ensure_ascii=False).encode()
    if len(raw) > max_bytes:
        body["text"] = text[: max_bytes // 4]
        raw = json.dumps(body, ensure_ascii=False).encode()
    return raw
