"""Home Assistant device-based MQTT discovery (``homeassistant/device/<id>/config``)."""

from __future__ import annotations

from typing import Any

from . import __version__
from .protocol import Topics


def discovery_topic(discovery_prefix: str, device: str) -> str:
    """Where the device's discovery payload is published (retained)."""
    return f"{discovery_prefix}/device/edge-assistant-{device}/config"


def discovery_payload(topics: Topics, device: str, model: str, profile: str,
                      temperature: bool = True, support_url: str = "") -> dict[str, Any]:
    """One device with a text entity to ask, the last answer, a busy flag and health sensors (a temperature
    sensor only where the machine has one); the origin links to ``support_url`` when one is configured."""
    uid = f"edge_assistant_{device}"

    def health_sensor(name: str, key: str, unit: str | None = None, device_class: str | None = None,
                      icon: str | None = None, topic: str = topics.health) -> dict[str, Any]:
        cmp: dict[str, Any] = {"p": "sensor", "name": name, "uniq_id": f"{uid}_{key}", "stat_t": topic,
                               "val_tpl": f"{{{{ value_json.{key} }}}}", "ent_cat": "diagnostic",
                               "stat_cla": "measurement"}
        if icon:
            cmp["icon"] = icon
        if unit:
            cmp["unit_of_meas"] = unit
        if device_class:
            cmp["dev_cla"] = device_class
        return cmp

    cmps: dict[str, dict[str, Any]] = {
        "ask": {"p": "text", "name": "Ask", "uniq_id": f"{uid}_ask", "cmd_t": topics.request, "min": 1, "max": 255,
                "icon": "mdi:chat-question"},
        "answer": {"p": "sensor", "name": "Last answer", "uniq_id": f"{uid}_answer", "stat_t": topics.answer,
                   "val_tpl": "{{ value_json.state }}", "json_attr_t": topics.answer,
                   "json_attr_tpl": "{{ {'text': value_json.text, 'id': value_json.id, "
                                    "'persona': value_json.persona, 'status': value_json.status, "
                                    "'error': value_json.error, 'sources': value_json.sources} | tojson }}",
                   "icon": "mdi:chat"},
        "busy": {"p": "binary_sensor", "name": "Busy", "uniq_id": f"{uid}_busy", "stat_t": topics.state,
                 "val_tpl": "{{ 'ON' if value_json.busy else 'OFF' }}", "dev_cla": "running"},
        "queue": health_sensor("Queue depth", "queue_depth", icon="mdi:tray-full", topic=topics.state),
        "tokens_per_s": health_sensor("Tokens per second", "last_tokens_per_s", "tok/s", icon="mdi:speedometer"),
        "cpu": health_sensor("CPU", "cpu_percent", "%", icon="mdi:cpu-64-bit"),
        "memory": health_sensor("Memory", "mem_percent", "%", icon="mdi:memory"),
    }
    if temperature:
        cmps["temperature"] = health_sensor("Temperature", "temperature_c", "°C", "temperature")
    for cmp in cmps.values():  # Home Assistant does not pass a device-level qos on to the components
        cmp["qos"] = 1
    origin: dict[str, Any] = {"name": "edge-assistant", "sw": __version__}
    if support_url:
        origin["url"] = support_url
    return {
        "dev": {"ids": [uid], "name": f"Edge assistant {device}", "mf": "edge-assistant", "mdl": model,
                "sw": __version__, "hw": profile},
        "o": origin,
        "avty_t": topics.status,
        "pl_avail": "online",
        "pl_not_avail": "offline",
        "qos": 1,
        "cmps": cmps,
    }
