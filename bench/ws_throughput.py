"""Websocket file transfer vs a plain TCP `socket.sendfile`, same file, same run, loopback.

    python3 bench/ws_throughput.py [--mb 100] [--repeat 3]

The agent side runs in a child process (as it would on the device): the real `WsServer` over a
real `EventStore`; the TCP peer is another child that answers each connection with
`socket.sendfile` of the same file. The parent is the receiver. Four figures, median of
`--repeat` runs each:

- tcp raw: receive and discard;  ws raw: a bare websockets client receives and discards
  (the protocol's own cost: framing, JSON control messages, the agent's session);
- tcp full: receive, write, sha256, fsync;  ws full: `AgentClient.download` (the same work
  plus its verification and rename), i.e. what the controller really does.

The agent's peak memory (VmHWM of the server process) is printed for a small file and for the
big one: it must not grow with file size. So is the share of the bytes the agent sent by
sendfile(2) (plain ws://, `SOUNDEDGE_WS__SENDFILE`, default on; `WS_BENCH_SENDFILE=0` turns it
off) rather than copied through Python, which it does when the socket is full.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MB = 1024 * 1024
TOKEN = "bench-token"
DEVICE = "bench"


def vm_hwm_kb() -> int:
    """Peak resident memory of this process in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


# -- fixtures -------------------------------------------------------------------------------------


def make_event(data_dir: Path, megabytes: float) -> str:
    """A WAV event of about `megabytes` MB in a fresh store; returns its event id."""
    import numpy as np
    import soundfile as sf

    from edge.settings import StorageSettings
    from edge.store import EventStore
    from tests.fixtures.ws_helpers import add_file_event

    store = EventStore(data_dir, DEVICE, StorageSettings(max_disk_mb=100_000, min_free_mb=0))
    store.open()
    frames = int(megabytes * MB / 2)
    rng = np.random.default_rng(1)

    def write(pending: Path) -> None:
        with sf.SoundFile(pending, "w", 48000, 1, "PCM_16", format="WAV") as out:
            for start in range(0, frames, 4 * MB):
                count = min(4 * MB, frames - start)
                out.write((rng.standard_normal(count) * 3000).astype(np.int16))

    record = add_file_event(
        store, store.reserve_seq(), write, onset=datetime(2026, 11, 25, 12, tzinfo=UTC),
        duration_s=frames / 48000, samplerate=48000,
    )  # fmt: skip
    store.close()
    return record.event_id


# -- children -------------------------------------------------------------------------------------


async def serve_ws(data_dir: Path) -> None:
    """Child: the agent's websocket server until stdin closes; reports its peak memory."""
    from edge.bus import EventBus
    from edge.runtime import RuntimeConfig
    from edge.settings import AgentSettings, StorageSettings, WsSettings
    from edge.store import EventStore
    from edge.wsserver import WsServer

    chunk_bytes = int(os.environ.get("WS_BENCH_CHUNK_BYTES", WsSettings().chunk_bytes))
    sendfile = os.environ.get("WS_BENCH_SENDFILE", "1") != "0"
    ws = WsSettings(
        host="127.0.0.1", port=0, token=TOKEN, chunk_bytes=chunk_bytes, sendfile=sendfile
    )
    settings = AgentSettings(device_id=DEVICE, data_dir=data_dir, ws=ws)
    store = EventStore(data_dir, DEVICE, StorageSettings(max_disk_mb=100_000, min_free_mb=0))
    store.open()
    server = WsServer(ws, DEVICE, RuntimeConfig(settings), store, EventBus())
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await server.started.wait()
    print(json.dumps({"port": server.port, "hwm_kb": vm_hwm_kb()}), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    stop.set()
    await task
    store.close()
    stats = server.stats
    end = {
        "hwm_kb": vm_hwm_kb(),
        "bytes_sent": stats.bytes_sent,
        "bytes_sendfile": stats.bytes_sendfile,
    }
    print(json.dumps(end), flush=True)


def serve_tcp(path: Path) -> None:
    """Child: answer every connection with the file via sendfile, until stdin closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)

    def accept_forever() -> None:
        while True:
            conn, _ = listener.accept()
            with conn, path.open("rb") as handle:
                conn.sendfile(handle)

    threading.Thread(target=accept_forever, daemon=True).start()
    sys.stdin.read()  # until the parent closes our stdin
    print(json.dumps({}), flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        self.info = json.loads(self.process.stdout.readline())

    def finish(self) -> dict[str, int]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()
        last = self.process.stdout.read().decode().strip().splitlines()
        self.process.wait(60)
        return json.loads(last[-1]) if last else {}


# -- receivers ------------------------------------------------------------------------------------


def tcp_receive(port: int, size: int, out: Path | None) -> float:
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    received = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        handle = out.open("wb") if out else None
        try:
            while count := sock.recv_into(view):
                received += count
                if handle is not None:
                    handle.write(view[:count])
                    digest.update(view[:count])
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            if handle is not None:
                handle.close()
    elapsed = time.perf_counter() - start
    assert received == size, (received, size)
    return elapsed


async def ws_raw_receive(port: int, event_id: str, size: int) -> float:
    from websockets.asyncio.client import connect

    start = time.perf_counter()
    async with connect(
        f"ws://127.0.0.1:{port}",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        compression=None,
        max_size=32 * MB,
        proxy=None,
    ) as ws:
        hello = {
            "type": "hello",
            "protocol": 1,
            "client_id": "bench",
            "config": {"download_mode": "pull"},
        }
        await ws.send(json.dumps(hello))
        await ws.recv()
        await ws.send(json.dumps({"type": "get", "request_id": "1", "event_id": event_id}))
        received = 0
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                received += len(message)
            elif json.loads(message)["type"] == "file_end":
                break
    elapsed = time.perf_counter() - start
    assert received == size, (received, size)
    return elapsed


async def ws_full_receive(port: int, event_id: str, size: int, dest: Path) -> float:
    from controller.wsclient import AgentClient

    start = time.perf_counter()
    async with AgentClient(f"ws://127.0.0.1:{port}", TOKEN, "bench", "pull") as client:
        path = await client.download(event_id, dest)
    elapsed = time.perf_counter() - start
    assert path.stat().st_size == size
    path.unlink()
    return elapsed


# -- main -----------------------------------------------------------------------------------------


def measure(megabytes: float, repeat: int, work: Path) -> dict[str, object]:
    data_dir = work / f"agent-{megabytes:g}"
    event_id = make_event(data_dir, megabytes)
    event_path = next(data_dir.glob("events/*/*.wav"))
    size = event_path.stat().st_size
    dest = work / "received"
    dest.mkdir(exist_ok=True)
    ws_child = Child("--serve-ws", str(data_dir))
    tcp_child = Child("--serve-tcp", str(event_path))
    times: dict[str, list[float]] = {"tcp raw": [], "ws raw": [], "tcp full": [], "ws full": []}
    agent_cpu: list[float] = []
    try:
        for _ in range(repeat):
            times["tcp raw"].append(tcp_receive(tcp_child.info["port"], size, None))
            before = cpu_seconds(ws_child.process.pid)
            times["ws raw"].append(
                asyncio.run(ws_raw_receive(ws_child.info["port"], event_id, size))
            )
            agent_cpu.append(cpu_seconds(ws_child.process.pid) - before)
            out = dest / "tcp.bin"
            times["tcp full"].append(tcp_receive(tcp_child.info["port"], size, out))
            out.unlink()
            times["ws full"].append(
                asyncio.run(ws_full_receive(ws_child.info["port"], event_id, size, dest))
            )
    finally:
        tcp_child.finish()
        ws_end = ws_child.finish()
    rates = {name: size / MB / statistics.median(values) for name, values in times.items()}
    return {
        "file_mb": size / MB,
        "rates_mb_s": rates,
        "ratio_raw": rates["ws raw"] / rates["tcp raw"],
        "ratio_full": rates["ws full"] / rates["tcp full"],
        "agent_cpu_s": statistics.median(agent_cpu),
        "agent_hwm_start_mb": ws_child.info["hwm_kb"] / 1024,
        "agent_hwm_end_mb": ws_end.get("hwm_kb", -1) / 1024,
        "sendfile_share": ws_end.get("bytes_sendfile", 0) / max(ws_end.get("bytes_sent", 0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the big file in MB")
    parser.add_argument("--small-mb", type=float, default=10.0, help="size of the small file")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--serve-ws", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-tcp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ws:
        asyncio.run(serve_ws(args.serve_ws))
        return
    if args.serve_tcp:
        serve_tcp(args.serve_tcp)
        return
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        results = [measure(mb, args.repeat, Path(tmp)) for mb in (args.small_mb, args.mb)]
    for result in results:
        rates = result["rates_mb_s"]
        assert isinstance(rates, dict)
        print(f"file {result['file_mb']:.1f} MB, median of {args.repeat}:")
        for name, rate in rates.items():
            print(f"  {name:9s} {rate:8.1f} MB/s")
        print(f"  ratio ws/tcp raw  {result['ratio_raw']:.2f}")
        print(f"  ratio ws/tcp full {result['ratio_full']:.2f}")
        print(f"  agent sent {result['sendfile_share']:.0%} of the bytes by sendfile")
        print(f"  agent CPU per ws transfer {result['agent_cpu_s']:.2f} s")
        print(
            f"  agent peak RSS {result['agent_hwm_end_mb']:.1f} MB "
            f"(after start-up {result['agent_hwm_start_mb']:.1f} MB)"
        )


if __name__ == "__main__":
    main()
