"""The MQTT transport: paho at the edge, the scheduler behind it.

The paho network thread only parses, submits and acknowledges; it never generates. Requests are acknowledged
(QoS 1, manual acks) only once their reply is published, with a persistent session (``clean_start=False`` and a
session expiry), so a request that arrives while the daemon restarts, or that was queued when it stopped, is
delivered again and answered. The scheduler answers every submitted request exactly once; a redelivered one gets
the stored reply.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from . import protocol
from .config import Config, PlcRoute
from .discovery import discovery_payload, discovery_topic
from .errors import BrokerAuthError, EdgeError, ExpiredError, RequestError
from .health import HealthSampler, has_temperature
from .messages import Reply, error_reply
from .plc import PlcGateway
from .scheduler import PRIORITY_CHAT, Scheduler

log = logging.getLogger(__name__)

AUTH_FAILURES = {134, 135, 4, 5}  # v5: bad user name or password, not authorized; v3: the same two


class ShortDrops:
    """Connections the broker closes within seconds of accepting them, in a row: the sign that another client
    connects with the same client id (a second daemon with the same ``device_id``), as each takes the session from
    the other. Mosquitto closes the socket without saying why, so the pattern is all there is to go on."""

    def __init__(self, within_s: float = 5.0, after: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self.within_s = within_s
        self.after = after
        self._clock = clock
        self._since = 0.0
        self.streak = 0

    def connected(self) -> None:
        self._since = self._clock()

    def dropped(self) -> bool:
        """Count a drop; True when the streak reaches ``after`` (once per streak)."""
        self.streak = self.streak + 1 if self._clock() - self._since < self.within_s else 0
        return self.streak == self.after


class MqttService:
    """Serves the scheduler over MQTT. ``start`` connects; ``stop`` says offline and disconnects.

    ``on_control`` gets control commands other than ``cancel`` (``listen``: push-to-talk, routed by the daemon to
    the voice loop, whatever connection it came through).
    """

    def __init__(self, config: Config, scheduler: Scheduler, model: str = "", profile: str = "",
                 on_control: Callable[[str], None] | None = None,
                 make_client: Callable[[], paho.Client] | None = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.model, self.profile = model, profile
        m = config.mqtt
        self.topics = protocol.Topics(m.prefix, config.device, m.discovery_prefix,
                                      tuple(route.topic for route in config.plc))
        self.allowed_prefix = m.response_prefix or f"{m.prefix}/"
        self.health = HealthSampler()
        self.plc = PlcGateway(config.plc)
        self.fatal: EdgeError | None = None
        self.owner = f"mqtt-{id(self):x}"
        self._max_packet = m.max_reply_bytes
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self.on_control = on_control
        self._health_thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._published_state: tuple[bool, int] | None = None
        scheduler.on_change(self._publish_state)
        self._drops = ShortDrops()
        self.client = make_client() if make_client is not None else self._make_client()
        self._wire(self.client)

    # -- connection -------------------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        m = self.config.mqtt
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=m.client_id or f"edge-assistant-"
                             f"{self.config.device}", protocol=paho.MQTTv5, manual_ack=True)
        client.max_queued_messages_set(1000)
        client.reconnect_delay_set(1, 30)
        if log.isEnabledFor(logging.DEBUG):  # paho's own lines (e.g. its loop noticing a closed socket) are noise
            client.enable_logger(logging.getLogger(__name__ + ".paho"))
        password = _password(m.password_file, m.password_env)
        if m.username:
            client.username_pw_set(m.username, password)
        if m.tls:
            client.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None, keyfile=m.key_file or None,
                           cert_reqs=ssl.CERT_REQUIRED)
        return client

    def _wire(self, client: paho.Client) -> None:
        will = Properties(PacketTypes.WILLMESSAGE)
        client.will_set(self.topics.status, "offline", qos=1, retain=True, properties=will)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message

    def start(self, wait_s: float = 30.0) -> bool:
        """Connect (retrying in the background), start the health thread.

        Returns whether the broker accepted the connection within ``wait_s``; raises ``BrokerAuthError`` on bad
        credentials.
        """
        m = self.config.mqtt
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = m.session_expiry_s
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive, clean_start=False, properties=props)
        self.client.loop_start()
        self._health_thread = threading.Thread(target=self._health_loop, name="health", daemon=True)
        self._health_thread.start()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not self._connected.is_set() and self.fatal is None:
            self._connected.wait(0.1)
        if self.fatal is not None:
            raise self.fatal
        if not self._connected.is_set():
            log.warning("broker %s:%d not reachable yet; retrying in the background", m.host, m.port)
        return self._connected.is_set()

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected.is_set()

    def _on_connect(self, client: paho.Client, _userdata: Any, flags: Any, reason: Any,
                    properties: Properties | None) -> None:
        try:
            if reason.is_failure:
                if reason.value in AUTH_FAILURES:
                    self.fatal = BrokerAuthError(f"broker refused the connection: {reason} (check mqtt.username "
                                                 "and the password)")
                    log.error("%s", self.fatal.message)
                    client.disconnect()
                else:
                    log.warning("broker refused the connection: %s; retrying", reason)
                return
            no_delay(client)
            if properties is not None and hasattr(properties, "MaximumPacketSize"):
                self._max_packet = min(self.config.mqtt.max_reply_bytes, int(properties.MaximumPacketSize) - 1024)
            log.info("connected to %s:%d (session present: %s)", self.config.mqtt.host, self.config.mqtt.port,
                     flags.session_present)
            self._drops.connected()
            subs = [self.topics.request, self.topics.request + "/+", self.topics.control]
            if self.config.mqtt.shared_group:
                g = self.config.mqtt.shared_group
                subs += [f"$share/{g}/{self.topics.fleet_request}", f"$share/{g}/{self.topics.fleet_request}/+"]
            subs += [route.topic for route in self.config.plc]
            if self.config.mqtt.discovery:
                subs.append(self.topics.home_assistant_status)
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in subs])
            client.publish(self.topics.status, "online", qos=1, retain=True)
            self._publish_discovery()
            with self._state_lock:
                self._published_state = None
            self._publish_state()
            self._publish_health()  # now, not one interval later: dashboards show this process's figures at once
            self._connected.set()
        except Exception:  # a callback must never take the network loop down
            log.exception("error in on_connect")

    def _on_disconnect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                       _properties: Properties | None) -> None:
        self._connected.clear()
        if not self._stopping.is_set() and self.fatal is None:
            log.warning("disconnected from the broker (%s); reconnecting", reason)
            if self._drops.dropped():
                log.error("the broker closed the connection %d times in a row within %g s of accepting it: another "
                          "client may be using the client id %r (a second daemon with device_id %r?), or the "
                          "broker's limits refuse this client", self._drops.streak, self._drops.within_s,
                          _client_id(client), self.config.device)

    def _publish_discovery(self) -> None:
        if not self.config.mqtt.discovery:
            return
        payload = discovery_payload(self.topics, self.config.device, self.model, self.profile,
                                    temperature=has_temperature(), support_url=self.config.mqtt.support_url)
        self.client.publish(discovery_topic(self.config.mqtt.discovery_prefix, self.config.device),
                            json.dumps(payload), qos=1, retain=True)

    # -- intake (network thread) ------------------------------------------------------------------------------

    def _on_message(self, client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        acked = False
        try:
            acked = self._dispatch(msg)
        except Exception:
            log.exception("error handling a message on %s", msg.topic)
        finally:
            if not acked:
                client.ack(msg.mid, msg.qos)

    def _dispatch(self, msg: paho.MQTTMessage) -> bool:
        """Route one message; returns True when the ack is deferred until the request is answered."""
        topic = msg.topic
        if topic == self.topics.home_assistant_status:
            if msg.payload == b"online":
                log.info("Home Assistant is online: republishing discovery")
                self._publish_discovery()
            return False
        if topic == self.topics.control:
            self._control(bytes(msg.payload))
            return False
        route = self.plc.route_for(topic)
        if route is not None:
            return self._plc_message(route, msg)
        return self._request_message(msg)

    def _control(self, payload: bytes) -> None:
        command = payload.decode("utf-8", errors="replace").strip().lower()
        if command == "cancel":
            log.info("control: cancelling the running generation(s)")
            self.scheduler.cancel()
        elif command == "listen" and self.on_control is not None:
            log.info("control: push-to-talk")
            self.on_control(command)
        else:
            log.warning("control: unknown command %r", command[:40])

    def _request_message(self, msg: paho.MQTTMessage) -> bool:
        props = getattr(msg, "properties", None)
        response_topic = str(getattr(props, "ResponseTopic", "") or "")
        raw_corr = getattr(props, "CorrelationData", None)
        correlation = bytes(raw_corr) if raw_corr else None
        payload = bytes(msg.payload)
        try:
            incoming = protocol.parse(self.topics, msg.topic, payload,
                                      max_bytes=self.config.limits.max_payload_bytes,
                                      allowed_prefix=self.allowed_prefix, response_topic=response_topic,
                                      correlation=correlation)
        except RequestError as exc:
            self._bad_request(msg.topic, payload, response_topic, correlation, exc)
            return False
        expiry = getattr(props, "MessageExpiryInterval", None)
        expires = time.monotonic() + float(expiry) if expiry else None
        return self._submit(incoming, msg.mid, msg.qos, PRIORITY_CHAT, expires, redelivered=bool(msg.dup))

    def _bad_request(self, topic: str, payload: bytes, response_topic: str, correlation: bytes | None,
                     exc: RequestError) -> None:
        """Answer a request that did not parse, with its id and persona where they can still be read.

        The reply topic may be the fault itself: the error goes only where replies may go. It is not copied to
        the answer topic (that shows answers, not other clients' malformed messages).
        """
        reply_to, rid, persona = protocol.salvage(payload, self.config.limits.max_payload_bytes)
        try:
            reply_topic = protocol.check_reply_topic(response_topic or reply_to, self.allowed_prefix, self.topics)
        except RequestError:
            reply_topic = ""
        rid = rid or (protocol.correlation_text(correlation) if correlation else "")
        persona = self.topics.persona_of(topic) or persona
        log.warning("bad request on %s: %s: %s", topic, exc.code, exc.message)
        if reply_topic:
            reply = error_reply(rid, exc.code, exc.message, persona)
            conversation = protocol.salvage_conversation(payload, self.config.limits.max_payload_bytes)
            if conversation:  # echoed where the request named a valid one (the fault was elsewhere)
                reply = replace(reply, conversation=conversation)
            self.client.publish(reply_topic, protocol.reply_payload(reply, self._max_packet),
                                qos=1, properties=self._props(correlation))

    def _submit(self, inc: protocol.Incoming, mid: int, qos: int, priority: int, expires: float | None,
                publish: Callable[[Reply], None] | None = None, redelivered: bool = False) -> bool:
        """Hand a request to the scheduler; the ack goes out once its reply is published. Returns True (the ack
        is deferred: the scheduler always answers, at once when it refuses).

        A copy of a request still being answered is only acknowledged when the broker redelivered it (DUP); a
        client that asked the same again gets the reply too."""
        seq = 0
        chunks = protocol.Coalescer(self.config.mqtt.stream_window_ms / 1000)

        def send_chunk(text: str) -> None:
            nonlocal seq
            if text:
                seq += 1
                self.client.publish(inc.reply_topic, protocol.chunk_payload(inc.request.id, seq, text), qos=1,
                                    properties=self._props(inc.correlation))

        def on_text(piece: str) -> None:  # the request's worker thread, like deliver: no lock needed
            send_chunk(chunks.feed(piece))

        def deliver(reply: Reply) -> None:
            if inc.request.conversation and reply.conversation is None:  # busy, expired, shutting_down: echoed too
                reply = replace(reply, conversation=inc.request.conversation)
            try:
                send_chunk(chunks.flush())  # what waited in the window goes before the final reply
                if reply.error is not None and reply.error.code == ExpiredError.code:
                    log.warning("request %s expired (MQTT message expiry) before it was served; not answered",
                                inc.request.id or "-")
                else:
                    self._send(inc, reply, publish, seq + 1 if inc.request.stream else None)
            finally:
                self.client.ack(mid, qos)

        def ack_only(_reply: Reply) -> None:
            self.client.ack(mid, qos)

        streaming = inc.request.stream and bool(inc.reply_topic)
        self.scheduler.submit(inc.request, deliver, key=inc.key, on_text=on_text if streaming else None,
                              priority=priority, expires=expires, owner=self.owner,
                              on_joined=ack_only if redelivered else deliver)
        return True

    def _plc_message(self, route: PlcRoute, msg: paho.MQTTMessage) -> bool:
        result = self.plc.accept(route, msg.topic, bytes(msg.payload), time.monotonic())
        if result.job is None:
            log.info("PLC %s: %s", msg.topic, result.reason)
            return False
        out_topic = result.reply_topic

        def publish(reply: Reply) -> None:
            self.client.publish(out_topic, protocol.reply_payload(reply, self._max_packet), qos=1)

        return self._submit(result.job, msg.mid, msg.qos, result.priority, None, publish)

    def _props(self, correlation: bytes | None) -> Properties:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.PayloadFormatIndicator = 1
        if correlation:
            props.CorrelationData = correlation
        return props

    def _send(self, inc: protocol.Incoming, reply: Reply, publish: Callable[[Reply], None] | None = None,
              seq: int | None = None) -> None:
        if publish is not None:
            publish(reply)
        elif inc.reply_topic:
            self.client.publish(inc.reply_topic, protocol.reply_payload(reply, self._max_packet, seq), qos=1,
                                properties=self._props(inc.correlation))
        self.client.publish(self.topics.answer, protocol.answer_payload(reply, self._max_packet), qos=1,
                            retain=True)

    def publish_voice(self, kind: str, data: dict[str, Any]) -> None:
        """A voice event (wake, partial, final, answer, barge_in) on ``<prefix>/<device>/voice/<kind>``."""
        self.client.publish(self.topics.voice(kind), json.dumps(data, ensure_ascii=False), qos=0)

    # -- health -----------------------------------------------------------------------------------------------

    def health_payload(self) -> dict[str, Any]:
        """Machine and daemon health, as published on the health topic."""
        data = self.health.sample()
        rt = self.scheduler.runtime
        data.update({"queue_depth": self.scheduler.depth, "busy": self.scheduler.busy, "connected": self.connected,
                     "last_tokens_per_s": round(self.scheduler.last_tokens_per_s, 2), "model": self.model,
                     "quantization": rt.quantization if rt is not None else "", "profile": self.profile,
                     "device": self.config.device})
        return data

    def _publish_health(self) -> None:
        try:
            self.client.publish(self.topics.health, json.dumps(self.health_payload()), qos=0, retain=True)
        except Exception:
            log.exception("error publishing health")

    def _publish_state(self) -> None:
        """``busy`` and ``queue_depth`` when either changed (retained): short generations show as busy too."""
        with self._state_lock:
            state = (self.scheduler.busy, self.scheduler.depth)
            if state == self._published_state:
                return
            self._published_state = state
            self.client.publish(self.topics.state, json.dumps({"busy": state[0], "queue_depth": state[1]}), qos=1,
                                retain=True)

    def _health_loop(self) -> None:
        interval = self.config.mqtt.health_interval_s
        while not self._stopping.wait(interval):
            if self.connected:
                self._publish_health()

    # -- shutdown ---------------------------------------------------------------------------------------------

    def stop(self, handover: bool = False) -> None:
        """Publish ``offline`` and disconnect. Stop the scheduler first, so queued requests get their
        ``shutting_down`` replies through this connection.

        With ``handover`` (a reload that reconnects with new settings), the requests still queued are taken back
        unacknowledged and ``offline`` is not published: the broker delivers them again to the next connection of
        the same session.
        """
        self._stopping.set()
        self.scheduler.remove_listener(self._publish_state)
        if handover:
            left = self.scheduler.withdraw(self.owner)
            if left:
                log.info("handing %d queued request(s) over to the next connection", len(left))
        else:
            info = self.client.publish(self.topics.status, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(5)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()


def _client_id(client: Any) -> str:
    raw = getattr(client, "_client_id", b"")
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def no_delay(client: paho.Client) -> None:
    """Turn off Nagle's algorithm on the client's socket (paho leaves it on).

    With it on, a small publish waits for the ACK of the previous segment, and the peer delays ACKs by up to
    40 ms: every request and every streamed chunk could wait that long.
    """
    sock = client.socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too; WebSocket transports are not
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. a Unix-socket transport
            log.debug("TCP_NODELAY not set: %s", exc)


def _password(path: str, env: str) -> str | None:
    if path:
        try:
            return Path(path).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise BrokerAuthError(f"mqtt.password_file {path}: cannot read the password: {exc}") from exc
    if env:
        value = os.environ.get(env)
        if value is None:
            raise BrokerAuthError(f"mqtt.password_env: environment variable {env} is not set")
        return value
    return None
