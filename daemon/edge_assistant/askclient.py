"""``edge-assistant ask``: publish one request over MQTT v5 and stream the answer."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .errors import AskError
from .mqtt import no_delay


def ask(host: str, port: int, request_topic: str, reply_topic: str, body: dict[str, Any],
        on_chunk: Callable[[str], None] | None = None, timeout_s: float = 120.0,
        username: str = "", password: str | None = None) -> dict[str, Any]:
    """Send ``body`` to ``request_topic`` and return the final reply; ``on_chunk`` gets streamed pieces."""
    correlation = uuid.uuid4().bytes
    done = threading.Event()
    subscribed = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            result["error"] = f"broker refused the connection: {reason}"
            done.set()
            return
        no_delay(client)
        client.subscribe([(reply_topic, SubscribeOptions(qos=1))])

    def on_subscribe(_c: paho.Client, _u: Any, _mid: int, _codes: Any, _p: Any) -> None:
        subscribed.set()

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        if getattr(props, "CorrelationData", None) not in (None, correlation):
            return
        try:
            data = json.loads(msg.payload)
        except json.JSONDecodeError:
            return
        if data.get("done") is False:
            if on_chunk is not None:
                on_chunk(str(data.get("chunk", "")))
            return
        result.update(data)
        done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-assistant-ask-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    if username:
        client.username_pw_set(username, password)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise AskError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
    client.loop_start()
    try:
        if not subscribed.wait(10) and "error" not in result:
            raise AskError(f"no subscription acknowledgement from {host}:{port}")
        if "error" in result:
            raise AskError(str(result["error"]))
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        props.ContentType = "application/json"
        client.publish(request_topic, json.dumps(body), qos=1, properties=props)
        if not done.wait(timeout_s):
            raise AskError(f"no reply within {timeout_s:g} s")
        if "error" in result and "status" not in result:
            raise AskError(str(result["error"]))
        return result
    finally:
        client.disconnect()
        client.loop_stop()
