"""The broker configuration in mosquitto/: no anonymous access, and each device confined to its
own topics by the ACL (the test broker uses the project's mosquitto.conf and acl)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.fixtures.broker import Broker, MqttRecorder

pytestmark = pytest.mark.system

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_anonymous_clients_and_wrong_passwords_are_refused(
    recorder_factory: Callable[..., MqttRecorder], protocol: str
) -> None:
    anonymous = recorder_factory(user=None, protocol=protocol).connect()
    assert anonymous.is_failure
    assert anonymous.value in (NOT_AUTHORIZED, BAD_CREDENTIALS)

    impostor = recorder_factory(user="dev-a", protocol=protocol)
    impostor.client.username_pw_set("dev-a", "not-the-password")
    assert impostor.connect().is_failure


def test_a_device_cannot_publish_into_another_devices_topics(
    recorder_factory: Callable[..., MqttRecorder],
) -> None:
    controller = recorder_factory()
    assert not controller.connect().is_failure
    controller.subscribe("soundedge/#")

    device_a = recorder_factory("dev-a")
    assert not device_a.connect().is_failure
    for topic in ("soundedge/dev-b/status", "soundedge/dev-b/event", "soundedge/dev-b/set",
                  "soundedge/dev-b/config", "soundedge/other/info", "elsewhere/x",
                  "homeassistant/sensor/dev-b/level/config"):  # fmt: skip
        info = device_a.client.publish(topic, b"forged", qos=1)
        info.wait_for_publish(timeout=10)
    # A device may of course publish under its own prefix: this marks the end of the run.
    device_a.client.publish("soundedge/dev-a/status", b"online", qos=1).wait_for_publish(10)
    received = controller.wait_for(
        lambda ms: any(m.topic == "soundedge/dev-a/status" for m in ms), 30
    )
    forged = [m.topic for m in received if m.payload == b"forged"]
    assert forged == []


def test_a_device_reads_only_its_own_commands(
    recorder_factory: Callable[..., MqttRecorder], broker: Broker
) -> None:
    device_a = recorder_factory("dev-a")
    device_a.connect()
    device_a.subscribe("soundedge/dev-a/set")
    device_a.subscribe("soundedge/dev-b/set")
    device_a.subscribe("soundedge/#")

    controller = recorder_factory()
    controller.connect()
    controller.client.publish("soundedge/dev-b/set", b'{"enabled": false}', qos=1)
    controller.client.publish("soundedge/dev-a/set", b'{"enabled": true}', qos=1)
    received = device_a.wait_for(lambda ms: any(m.topic == "soundedge/dev-a/set" for m in ms))
    time.sleep(0.5)  # a stray message to dev-b's topic would have arrived by now, in order
    assert [m.topic for m in device_a.messages if "dev-b" in m.topic] == []
    assert received


def test_a_device_cannot_send_commands_to_another_device(
    recorder_factory: Callable[..., MqttRecorder],
) -> None:
    device_b = recorder_factory("dev-b")
    device_b.connect()
    device_b.subscribe("soundedge/dev-b/set")
    device_a = recorder_factory("dev-a")
    device_a.connect()
    device_a.client.publish("soundedge/dev-b/set", b'{"enabled": false}', qos=1).wait_for_publish(
        10
    )
    controller = recorder_factory()
    controller.connect()
    controller.client.publish("soundedge/dev-b/set", b'{"enabled": true}', qos=1)
    received = device_b.wait_for(lambda ms: len(ms) >= 1)
    assert [m.payload for m in received] == [b'{"enabled": true}']
