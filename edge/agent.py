"""The agent: wires capture, ring, pipeline, store, MQTT and the websocket server together.

Shutdown order (SIGTERM from `systemctl stop`, or Ctrl-C): capture and pipeline stop first and
finish the file being written; then the publishers deliver what is left and MQTT says
`stopped`. A second signal does not cut this short; systemd's stop timeout is the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from typing import Protocol

from edge.bus import EventBus
from edge.capture import AudioSource, CaptureSupervisor, SoundCardSource
from edge.pipeline import Pipeline
from edge.ring import AudioBlock, AudioRing
from edge.runtime import RuntimeConfig
from edge.settings import AgentSettings
from edge.state import AgentState, CaptureState
from edge.store import EventStore, LogCompactor
from edge.watchdog import ServiceWatchdog

logger = logging.getLogger(__name__)


class Component(Protocol):
    """A long-lived part of the agent that runs until `stop` is set."""

    async def run(self, stop: asyncio.Event) -> None: ...


class Agent:
    """One running edge agent."""

    def __init__(self, settings: AgentSettings, source: AudioSource | None = None) -> None:
        self.settings = settings
        self.state = AgentState()
        self.runtime = RuntimeConfig(settings)
        self.store = EventStore(settings.data_dir, settings.device_id, settings.storage)
        if not settings.mqtt.enabled:
            # Nothing delivers event messages, so nothing holds the history back: not even the
            # cursor an earlier run with MQTT left behind. With MQTT on, the outbox hands its
            # cursor over when it opens; until then the store keeps everything.
            self.store.set_delivery_horizon(None)
        self.bus = EventBus()
        self.source: AudioSource = source or SoundCardSource(settings.audio)
        audio = settings.audio
        self.ring = AudioRing.from_buffers(
            audio.ring_buffers, audio.buffer_s, audio.samplerate, audio.channels
        )
        self.stop_capture = asyncio.Event()
        self.stop_publishers = asyncio.Event()
        self.supervisor: CaptureSupervisor | None = None
        self.ws_url: str = (
            settings.ws.public_url or f"ws://{socket.gethostname()}:{settings.ws.port}"
        )

    def request_stop(self) -> None:
        if not self.stop_capture.is_set():
            logger.info("stopping: finishing the current file and delivering what is left")
        self.stop_capture.set()

    async def run(self) -> None:
        """Run until `request_stop()` (or SIGTERM/SIGINT when installed); raises StorageError
        if the data directory is unusable at start."""
        await asyncio.to_thread(self.store.open)
        self.runtime.load()
        loop = asyncio.get_running_loop()
        pipeline = Pipeline(
            runtime=self.runtime,
            ring=self.ring,
            store=self.store,
            bus=self.bus,
            state=self.state,
            source=self.source,
            source_generation=lambda: supervisor.generation,
        )

        wake_pending = False

        def on_loop_wake() -> None:
            nonlocal wake_pending
            wake_pending = False
            pipeline.wake()

        def on_audio_thread_wake(block: AudioBlock | None) -> None:
            # Runs on the PortAudio thread: the pipeline's batching check and a hand-over to
            # the loop, nothing else. One pending wake-up at a time, so a misbehaving driver
            # calling back in a tight loop cannot flood the loop with handles.
            nonlocal wake_pending
            if not pipeline.on_audio_block(block) or wake_pending:
                return
            wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(on_loop_wake)

        supervisor = CaptureSupervisor(
            self.settings.audio,
            self.source,
            self.ring,
            on_audio_thread_wake,
            self._on_capture,
            on_wedged=self.request_stop,
        )
        self.supervisor = supervisor
        publishers = self._publishers()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(supervisor.run(self.stop_capture), name="capture")
                pipeline_task = tasks.create_task(pipeline.run(self.stop_capture), name="pipeline")
                for name, component in publishers:
                    tasks.create_task(component.run(self.stop_publishers), name=name)
                compactor = LogCompactor(self.store)
                tasks.create_task(compactor.run(self.stop_publishers), name="log-compaction")
                tasks.create_task(self._stop_publishers_after(pipeline_task), name="shutdown")
                # systemd readiness and liveness: pings only while audio is really flowing.
                watchdog = ServiceWatchdog(self.state, stall_s=self.settings.audio.ring_s)
                tasks.create_task(watchdog.run(self.stop_capture), name="systemd")
        finally:
            self.state.capture_state = "stopped"
            await asyncio.to_thread(self.store.close)
        logger.info("stopped; %d events recorded this run", self.state.events_recorded)
        logger.info(
            "input overflows: %d; frames lost: %d", self.source.overflows, self.state.frames_lost
        )

    async def _stop_publishers_after(self, pipeline_task: asyncio.Task[None]) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(pipeline_task)
        self.stop_publishers.set()

    def _publishers(self) -> list[tuple[str, Component]]:
        components: list[tuple[str, Component]] = []
        if self.settings.ws.enabled:
            from edge.wsserver import WsServer  # noqa: PLC0415

            server = WsServer(
                self.settings.ws, self.settings.device_id, self.runtime, self.store, self.bus
            )
            components.append(("websocket", server))
        if self.settings.mqtt.enabled:
            from edge.mqtt import MqttPublisher  # noqa: PLC0415

            publisher = MqttPublisher(
                self.settings, self.runtime, self.store, self.bus, self.state, self.ws_url
            )
            components.append(("mqtt", publisher))
        return components

    def _on_capture(self, capture_state: CaptureState, error: str | None) -> None:
        self.state.capture_state = capture_state
        self.state.capture_error = error
        self.state.device_name = self.source.name
        if self.supervisor is not None:
            self.state.stream_restarts = self.supervisor.restarts

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT (Ctrl-C) stop the agent cleanly, finishing the current file."""
        loop = asyncio.get_running_loop()
        if sys.platform == "win32":
            # No loop signal handlers on Windows: a plain handler hands over to the loop, so
            # Ctrl-C stops cleanly instead of cancelling the main task mid-file.
            signal.signal(signal.SIGINT, lambda *_: loop.call_soon_threadsafe(self.request_stop))
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)

    @property
    def needs_restart(self) -> bool:
        """The audio driver hung: only a new process can capture again."""
        return self.supervisor is not None and self.supervisor.wedged


async def run_agent(settings: AgentSettings, source: AudioSource | None = None) -> bool:
    """Run an agent until stopped; True if it stopped because it needs a restart."""
    agent = Agent(settings, source)
    agent.install_signal_handlers()
    await agent.run()
    return agent.needs_restart
