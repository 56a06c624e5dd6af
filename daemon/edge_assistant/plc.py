"""PLC gateways: alarms published by a gateway become explanation requests.

A route maps a topic filter (``plant/+/alarm``) to a persona and a prompt template filled from the JSON payload
(``tag``, ``value``, ``unit``, ``alarm``, and any other scalar field). Every field is quoted as data, cut to a
bounded length and stripped of line breaks, so a field cannot smuggle instructions. The gateway's identity is
the topic level the first ``+`` matched: with a broker ACL such as ``pattern write plant/%u/alarm`` it cannot be
forged from the payload. The same alarm from the same gateway is explained once per window, and each gateway is
rate limited.

What the gateway remembers is bounded: tags, alarm texts and gateway names come from payloads and topic levels, so
at most ``MAX_ALARMS`` alarms and ``MAX_GATEWAYS`` rate buckets are kept (the least recently used forgotten first),
and an entry is dropped once it no longer changes anything: an alarm when its window has passed, a bucket when it
has been idle for a minute (it is full again by then).
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections import OrderedDict
from dataclasses import dataclass, field

from .config import PlcRoute
from .errors import BadRequestError, PayloadTooLargeError, RequestError
from .messages import PRIORITY_ALARM, Request
from .protocol import Incoming

log = logging.getLogger(__name__)

MAX_FIELD = 200

MAX_ALARMS = 4096
"""Most alarms remembered for de-duplication (all routes together). Beyond it the alarm explained least recently
is forgotten: sent again within its window, it is explained again (each gateway's rate limit still holds)."""

MAX_GATEWAYS = 1024
"""Most gateways whose rate bucket is remembered. Beyond it the gateway heard from least recently is forgotten: its
next alarm finds a full bucket, as after a minute of silence."""

BUCKET_IDLE_S = 60.0
"""A rate bucket idle this long has refilled (its rate is per minute) and is dropped."""


@dataclass
class PlcResult:
    """What became of one alarm message."""

    job: Incoming | None
    """The request to queue, or None when refused or de-duplicated."""
    reason: str
    """Why it was not queued (for the log)."""
    reply_topic: str
    """Where the explanation goes."""
    priority: int = PRIORITY_ALARM
    """Alarms go before chat."""


def topic_match(filt: str, topic: str) -> list[str] | None:
    """The levels matched by wildcards if ``topic`` matches the filter ``filt``, else None."""
    f_parts, t_parts = filt.split("/"), topic.split("/")
    matched: list[str] = []
    for i, f in enumerate(f_parts):
        if f == "#":
            return [*matched, "/".join(t_parts[i:])]
        if i >= len(t_parts):
            return None
        if f == "+":
            matched.append(t_parts[i])
        elif f != t_parts[i]:
            return None
    return matched if len(f_parts) == len(t_parts) else None


def quote_field(value: object) -> str:
    """A payload value as quoted, bounded, single-line data."""
    text = value if isinstance(value, str) else json.dumps(value)
    text = " ".join(text.split())[:MAX_FIELD]
    return json.dumps(text, ensure_ascii=False)


def alarm_key(request: Request, reply_topic: str) -> str:
    """Identity of an alarm's request for the stored replies: a digest of everything that makes the request.

    The canonical JSON (sorted keys, no spacing) of the reply topic and the request's id, text (the template filled
    with the gateway and the quoted fields), persona, format, length and lookup values. The same alarm delivered
    again, however its JSON was spelled, has the same key and gets its stored reply; a new alarm that reuses an id
    (gateways' alarm ids are often counters that wrap or restart) differs in its fields and is explained anew.
    ``plc:`` and hex digits only: never equal to a key of the old form (``plc|<id>``, still in a state directory
    written before) nor to a chat request's key (which holds a ``|``).
    """
    canonical = json.dumps({"reply_topic": reply_topic, "id": request.id, "text": request.text,
                            "persona": request.persona, "format": request.format, "max_tokens": request.max_tokens,
                            "lookup": list(request.lookup)}, sort_keys=True, separators=(",", ":"))
    return "plc:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _digest(*parts: str) -> bytes:
    """A fixed-size memory key for values of any length (a topic level may be 64 KiB)."""
    return hashlib.blake2b(json.dumps(parts).encode("ascii"), digest_size=16).digest()


@dataclass
class PlcGateway:
    """Turns alarm messages into requests: routing, templating, de-duplication and rate limits."""

    routes: tuple[PlcRoute, ...]
    max_alarms: int = MAX_ALARMS
    """Most alarms remembered for de-duplication."""
    max_gateways: int = MAX_GATEWAYS
    """Most gateways' rate buckets remembered."""
    _seen: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    """Alarm (gateway, tag, alarm text) -> when its window ends; oldest explained first."""
    _buckets: OrderedDict[bytes, tuple[float, float]] = field(default_factory=OrderedDict)
    """Gateway -> (tokens, when last touched); least recently touched first."""

    def route_for(self, topic: str) -> PlcRoute | None:
        """The first route whose filter matches ``topic``."""
        return next((r for r in self.routes if topic_match(r.topic, topic) is not None), None)

    def tracked(self, now: float) -> tuple[int, int]:
        """How many alarms and gateways are remembered at ``now``, once those past their window are dropped."""
        self._expire(now)
        return len(self._seen), len(self._buckets)

    def accept(self, route: PlcRoute, topic: str, payload: bytes, now: float) -> PlcResult:
        """Build the explanation request for one alarm, or say why there is none."""
        self._expire(now)
        levels = topic_match(route.topic, topic) or []
        gateway = levels[0] if levels else topic
        reply_topic = route.reply_topic.format(gateway=gateway, topic=topic)
        try:
            fields = self._fields(route, payload)
        except RequestError as exc:
            return PlcResult(None, f"{exc.code}: {exc.message}", reply_topic)
        tag = str(fields.get("tag", ""))
        alarm = _digest(gateway, tag, str(fields.get("alarm", "")))
        until = self._seen.get(alarm)
        if until is not None and now < until:
            return PlcResult(None, f"repeated alarm {tag[:MAX_FIELD]!r} from {gateway} within "
                                   f"{route.dedupe_window_s:g} s: already explained", reply_topic)
        bucket = _digest(gateway)
        tokens, stamp = self._buckets.get(bucket, (route.rate_per_minute, now))
        tokens = min(route.rate_per_minute, tokens + (now - stamp) * route.rate_per_minute / 60.0)
        if tokens < 1.0:
            self._remember_bucket(bucket, tokens, now)
            return PlcResult(None, f"gateway {gateway} is over its rate of {route.rate_per_minute:g} per minute",
                             reply_topic)
        self._remember_bucket(bucket, tokens - 1.0, now)
        self._seen.pop(alarm, None)
        if route.dedupe_window_s > 0:
            self._seen[alarm] = now + route.dedupe_window_s
            while len(self._seen) > self.max_alarms:
                self._seen.popitem(last=False)
        values = {name: quote_field(fields.get(name, "")) for _, name, _, _ in
                  string.Formatter().parse(route.template) if name}
        values["gateway"] = quote_field(gateway)
        text = route.template.format(**values)
        rid = str(fields.get("id", "")) or f"{gateway}:{tag}:{int(now * 1000)}"
        # The alarm's code and tag are looked up in the plant's documents first: a row of the alarm table wins.
        lookup = tuple(" ".join(str(fields[n]).split())[:MAX_FIELD] for n in ("code", "alarm_code", "tag", "alarm")
                       if str(fields.get(n, "")).strip())
        request = Request(text=text, persona=route.persona, id=rid, max_tokens=route.max_tokens, quoted=True,
                          format=route.format, lookup=lookup)
        return PlcResult(Incoming(request, reply_topic, None, alarm_key(request, reply_topic)), "", reply_topic)

    def _remember_bucket(self, bucket: bytes, tokens: float, now: float) -> None:
        self._buckets[bucket] = (tokens, now)
        self._buckets.move_to_end(bucket)
        while len(self._buckets) > self.max_gateways:
            self._buckets.popitem(last=False)

    def _expire(self, now: float) -> None:
        """Drop, oldest first, the alarms whose window has passed and the buckets idle for ``BUCKET_IDLE_S``.

        Both are kept in the order they were last set, so the expired ones lead (for alarms, exactly so while one
        window applies; behind a route's longer window a shorter one's alarm waits, inert, until it leads)."""
        while self._seen:
            first, until = next(iter(self._seen.items()))
            if now < until:
                break
            del self._seen[first]
        while self._buckets:
            first, (_, stamp) = next(iter(self._buckets.items()))
            if now - stamp < BUCKET_IDLE_S:
                break
            del self._buckets[first]

    def _fields(self, route: PlcRoute, payload: bytes) -> dict[str, object]:
        if len(payload) > route.max_payload_bytes:
            raise PayloadTooLargeError(f"alarm payload is {len(payload)} bytes; limit {route.max_payload_bytes}")
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequestError(f"alarm payload is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BadRequestError("alarm payload must be a JSON object")
        return {k: v for k, v in data.items() if isinstance(v, str | int | float | bool)}
