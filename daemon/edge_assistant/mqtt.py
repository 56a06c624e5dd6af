"""The MQTT transport: paho at the edge, the pipeline behind a queue.

The paho network thread only parses, queues and acknowledges; one worker thread generates. Requests are
acknowledged (QoS 1, manual acks) only once answered, with a persistent session (``clean_start=False`` and a
session expiry), so a request that arrives while the daemon restarts, or that was queued when it stopped, is
delivered again and answered; a key seen before is answered once.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from . import protocol
from .config import Config
from .discovery import discovery_payload, discovery_topic
from .errors import BrokerAuthError, BusyError, EdgeError, RequestError, ShuttingDownError
from .health import HealthSampler
from .jobqueue import PRIORITY_CHAT, JobQueue
from .pipeline import Pipeline, Reply, Request, error_reply
from .plc import PlcGateway

log = logging.getLogger(__name__)

AUTH_FAILURES = {134, 135, 4, 5}  # v5: bad user name or password, not authorized; v3: the same two


@dataclass
class Job:
    """A request waiting for the worker."""

    incoming: protocol.Incoming
    """The parsed request."""
    mid: int
    """MQTT message id, for the manual acknowledgement."""
    qos: int
    """QoS it arrived with."""
    received: float
    """``time.monotonic()`` on arrival."""
    expires: float | None = None
    """``time.monotonic()`` after which it is not answered (MQTT v5 Message Expiry)."""
    publish: Callable[[Reply], None] | None = None
    """Where the reply goes, when not to the reply topic (PLC explanations)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Transport details for logs."""


class MqttService:
    """Serves a pipeline over MQTT. ``start`` connects and starts the worker; ``stop`` drains and says offline."""

    def __init__(self, config: Config, pipeline: Pipeline, model: str = "", profile: str = "") -> None:
        self.config = config
        self.pipeline = pipeline
        self.model, self.profile = model, profile
        m = config.mqtt
        self.topics = protocol.Topics(m.prefix, config.device)
        self.allowed_prefix = m.response_prefix or f"{m.prefix}/"
        self.queue: JobQueue[Job] = JobQueue(config.limits.queue_size)
        self.health = HealthSampler()
        self.plc = PlcGateway(config.plc)
        self.fatal: EdgeError | None = None
        self._max_packet = m.max_reply_bytes
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._cancel_current = threading.Event()
        self.on_listen: Callable[[], None] | None = None
        self._worker: threading.Thread | None = None
        self._health_thread: threading.Thread | None = None
        self.client = self._make_client()

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
        will = Properties(PacketTypes.WILLMESSAGE)
        client.will_set(self.topics.status, "offline", qos=1, retain=True, properties=will)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def start(self, wait_s: float = 30.0) -> bool:
        """Connect (retrying in the background), start the worker and health threads.

        Returns whether the broker accepted the connection within ``wait_s``; raises ``BrokerAuthError`` on bad
        credentials.
        """
        m = self.config.mqtt
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = m.session_expiry_s
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive, clean_start=False, properties=props)
        self.client.loop_start()
        self._worker = threading.Thread(target=self._work, name="generate", daemon=True)
        self._worker.start()
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
            subs = [self.topics.request, self.topics.request + "/+", self.topics.control]
            if self.config.mqtt.shared_group:
                g = self.config.mqtt.shared_group
                subs += [f"$share/{g}/{self.topics.fleet_request}", f"$share/{g}/{self.topics.fleet_request}/+"]
            subs += [route.topic for route in self.config.plc]
            if self.config.mqtt.discovery:
                subs.append(f"{self.config.mqtt.discovery_prefix}/status")
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in subs])
            client.publish(self.topics.status, "online", qos=1, retain=True)
            self._publish_discovery()
            self._connected.set()
        except Exception:  # a callback must never take the network loop down
            log.exception("error in on_connect")

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                       _properties: Properties | None) -> None:
        self._connected.clear()
        if not self._stopping.is_set() and self.fatal is None:
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _publish_discovery(self) -> None:
        if not self.config.mqtt.discovery:
            return
        payload = discovery_payload(self.topics, self.config.device, self.model, self.profile)
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
        if topic == f"{self.config.mqtt.discovery_prefix}/status":
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
            log.info("control: cancelling the current generation")
            self._cancel_current.set()
        elif command == "listen" and self.on_listen is not None:
            log.info("control: push-to-talk")
            self.on_listen()
        else:
            log.warning("control: unknown command %r", command[:40])

    def _request_message(self, msg: paho.MQTTMessage) -> bool:
        props = getattr(msg, "properties", None)
        response_topic = str(getattr(props, "ResponseTopic", "") or "")
        correlation = getattr(props, "CorrelationData", None)
        try:
            incoming = protocol.parse(self.topics, msg.topic, bytes(msg.payload),
                                      max_bytes=self.config.limits.max_payload_bytes,
                                      allowed_prefix=self.allowed_prefix, response_topic=response_topic,
                                      correlation=bytes(correlation) if correlation else None)
        except RequestError as exc:
            # The reply topic may be the fault itself; send the error only where it is allowed to go.
            body_reply_to, rid = protocol.salvage(bytes(msg.payload), self.config.limits.max_payload_bytes)
            try:
                topic = protocol.check_reply_topic(response_topic or body_reply_to, self.allowed_prefix)
            except RequestError:
                topic = ""
            log.warning("bad request on %s: %s: %s", msg.topic, exc.code, exc.message)
            self._send(protocol.Incoming(Request(text=""), topic, bytes(correlation) if correlation else None, ""),
                       error_reply(rid, exc))
            return False
        expiry = getattr(props, "MessageExpiryInterval", None)
        job = Job(incoming, msg.mid, msg.qos, time.monotonic(),
                  expires=time.monotonic() + float(expiry) if expiry else None)
        return self._enqueue(job, PRIORITY_CHAT)

    def _enqueue(self, job: Job, priority: int) -> bool:
        why = self.queue.put(job, priority, job.incoming.key)
        if why == "":
            return True
        if why == "full":
            self._send(job.incoming, error_reply(job.incoming.request.id, BusyError(
                f"the queue is full ({self.queue.maxsize} waiting); try again shortly")), job.publish)
        elif why == "closed":
            self._send(job.incoming, error_reply(job.incoming.request.id, ShuttingDownError(
                "the daemon is shutting down")), job.publish)
        return False  # duplicates are acknowledged and not answered again

    def _plc_message(self, route: Any, msg: paho.MQTTMessage) -> bool:
        result = self.plc.accept(route, msg.topic, bytes(msg.payload), time.monotonic())
        if result.job is None:
            log.info("PLC %s: %s", msg.topic, result.reason)
            return False
        out_topic = result.reply_topic

        def publish(reply: Reply) -> None:
            self.client.publish(out_topic, protocol.reply_payload(reply, self._max_packet), qos=1)

        job = Job(result.job, msg.mid, msg.qos, time.monotonic(), publish=publish)
        return self._enqueue(job, result.priority)

    # -- work (worker thread) ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            got = self.queue.get(timeout=1.0)
            if got is None:
                if self._stopping.is_set() and len(self.queue) == 0:
                    return
                continue
            job, key = got
            try:
                self._serve(job)
                self.queue.done(key)
            except Exception:
                log.exception("error serving request %s", job.incoming.request.id or "-")
                self.queue.forget(key)
            finally:
                self.client.ack(job.mid, job.qos)

    def _serve(self, job: Job) -> None:
        inc = job.incoming
        if job.expires is not None and time.monotonic() > job.expires:
            log.warning("request %s expired before it was served (MQTT message expiry); not answered",
                        inc.request.id or "-")
            return
        self._cancel_current.clear()
        seq = 0

        def on_text(piece: str) -> None:
            nonlocal seq
            if inc.request.stream and inc.reply_topic:
                seq += 1
                self.client.publish(inc.reply_topic, protocol.chunk_payload(inc.request.id, seq, piece), qos=1,
                                    properties=self._props(inc.correlation))

        reply = self.pipeline.handle(inc.request, on_text=on_text, cancel=self._cancel_current)
        self._send(inc, reply, job.publish, seq + 1 if inc.request.stream else None)

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
        self.client.publish(f"{self.topics.base}/voice/{kind}", json.dumps(data, ensure_ascii=False), qos=0)

    # -- health -----------------------------------------------------------------------------------------------

    def health_payload(self) -> dict[str, Any]:
        """Machine and daemon health, as published on the health topic."""
        data = self.health.sample()
        data.update({"queue_depth": len(self.queue), "busy": self.pipeline.busy, "connected": self.connected,
                     "last_tokens_per_s": round(self.pipeline.last_tokens_per_s, 2), "model": self.model,
                     "quantization": self.pipeline.quantization, "profile": self.profile,
                     "device": self.config.device})
        return data

    def _health_loop(self) -> None:
        interval = self.config.mqtt.health_interval_s
        while not self._stopping.wait(interval):
            try:
                if self.connected:
                    self.client.publish(self.topics.health, json.dumps(self.health_payload()), qos=0)
            except Exception:
                log.exception("error publishing health")

    # -- shutdown ---------------------------------------------------------------------------------------------

    def stop(self, grace_s: float = 10.0, handover: bool = False) -> None:
        """Refuse new requests, answer queued ones ``shutting_down``, let the current one finish within
        ``grace_s`` (then cancel it), publish ``offline`` and disconnect.

        With ``handover`` (a reload that reconnects), queued requests are left unacknowledged instead: the broker
        delivers them again to the next connection of the same session.
        """
        self._stopping.set()
        for job, key in self.queue.close():
            if handover:
                continue
            self._send(job.incoming, error_reply(job.incoming.request.id, ShuttingDownError(
                "the daemon is shutting down; the request was not served")), job.publish)
            self.queue.done(key)
            self.client.ack(job.mid, job.qos)
        if self._worker is not None:
            self._worker.join(grace_s)
            if self._worker.is_alive():
                log.warning("the current generation did not finish within %.0f s: cancelling it", grace_s)
                self._cancel_current.set()
                self._worker.join(10)
        if not handover:
            info = self.client.publish(self.topics.status, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(5)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()


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
