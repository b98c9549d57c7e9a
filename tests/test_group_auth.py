"""The worker group's socket: only a connection that proves it holds the key gets through, and a connection
that never speaks (or speaks too slowly) is dropped without holding up the group's rank 0.

Real Unix sockets and real processes throughout: a stand-in rank 0 (a small script that talks the group's
protocol) replaces `torchrun`, so no model is loaded.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest

from flows.group import HANDSHAKE_TIMEOUT_S, RankListener, WorkerGroup
from flows.group_protocol import ADDRESS_ENV, AUTHKEY_ENV

# A local process that connects to the group's socket and then says nothing for `hold` seconds.
SILENT = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
print("connected", flush=True)
time.sleep(float(sys.argv[2]))
"""

# Rank 0 of a group, as far as the flow process can tell: it connects back with the key and says `Ready`,
# then waits for `Stop`. Before it connects, it starts a silent process that connects first.
RANK0 = f"""
import os, subprocess, sys
from multiprocessing.connection import Client
from flows.group_protocol import Ready, Stop
address, key = os.environ[{ADDRESS_ENV!r}], bytes.fromhex(os.environ[{AUTHKEY_ENV!r}])
silent = subprocess.Popen([sys.executable, "-c", sys.argv[1], address, sys.argv[2]], stdout=subprocess.PIPE)
assert silent.stdout.readline().strip() == b"connected"
conn = Client(address, family="AF_UNIX", authkey=key)
conn.send(Ready({{"pids": [os.getpid()], "device": "cpu", "dtype": "torch.float32", "layout": {{}},
                 "silent_pid": silent.pid}}))
try:
    assert isinstance(conn.recv(), Stop)
finally:
    silent.kill()
    silent.wait()
"""


class StandInGroup(WorkerGroup):
    """A `WorkerGroup` whose processes are the stand-in rank 0 above instead of `torchrun`."""

    def __init__(self, hold_s: float) -> None:
        super().__init__("tiny-t2v", None, 1)
        self.hold_s = hold_s

    def command(self) -> list[str]:
        return [sys.executable, "-c", RANK0, SILENT, str(self.hold_s)]


def test_a_silent_connection_does_not_hold_up_the_group_start() -> None:
    """Another local process connects to the group's socket first and stays silent for 15 s: the group
    still starts as soon as its rank 0 connects (before, it waited until the silent one went away)."""
    group = StandInGroup(hold_s=15.0)
    started = time.monotonic()
    try:
        group.start()
        took = time.monotonic() - started
        assert group.alive and group.starts == 1 and group.info["silent_pid"] > 0
        assert took < HANDSHAKE_TIMEOUT_S + 2.0, f"the start took {took:.1f} s"
    finally:
        group.close(grace_s=10.0)
    assert group._dir is None and not group.alive


def _read_until_closed(sock: socket.socket, limit_s: float) -> float:
    """Read `sock` until the other side closes it; the seconds that took (fails after `limit_s`)."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    while sock.recv(4096):
        pass
    return time.monotonic() - started


def test_the_listener_drops_silent_slow_and_keyless_connections(tmp_path: Path) -> None:
    """Three bad connections come first: a silent one, one that sends its answer a byte at a time (each
    byte within the timeout, the whole answer not), and one with the wrong key. The right one is handed
    out at once; each bad one is cut at the handshake timeout, not later."""
    key, timeout = b"k" * 32, 2.0
    listener = RankListener(tmp_path / "socket", key, handshake_timeout_s=timeout)
    try:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(listener.path)

        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(listener.path)
        slow_cut: list[float] = []

        def drip() -> None:  # a 4-byte length, then one byte every 0.3 s
            started = time.monotonic()
            slow.recv(4096)  # the challenge
            try:
                slow.sendall((200).to_bytes(4, "big"))
                for _ in range(200):
                    time.sleep(0.3)
                    slow.sendall(b"x")
            except OSError:
                slow_cut.append(time.monotonic() - started)

        keyless_errors: list[BaseException] = []

        def keyless() -> None:
            try:
                Client(listener.path, family="AF_UNIX", authkey=b"wrong" * 8)
            except (AuthenticationError, EOFError, OSError) as exc:
                keyless_errors.append(exc)

        threads = [threading.Thread(target=drip), threading.Thread(target=keyless)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)  # the three are in before the right one

        started = time.monotonic()
        client: list = []
        right = threading.Thread(target=lambda: client.append(Client(listener.path, "AF_UNIX", authkey=key)))
        right.start()
        conn = listener.accept(timeout=10)
        handed_out = time.monotonic() - started
        right.join(10)
        assert conn is not None and client, "the connection with the key was not accepted"
        assert handed_out < timeout / 2, f"the right connection waited {handed_out:.2f} s"
        client[0].send(("ready", {"pids": [1]}))
        assert conn.recv() == ("ready", {"pids": [1]})
        conn.send(("stop",))
        assert client[0].recv() == ("stop",)

        closed_after = _read_until_closed(silent, limit_s=5 * timeout)
        assert closed_after < 2 * timeout, f"the silent connection was kept {closed_after:.1f} s"
        for thread in threads:
            thread.join(10)
        assert slow_cut and slow_cut[0] < 2 * timeout, f"the slow connection was cut after {slow_cut}"
        assert len(keyless_errors) == 1 and isinstance(keyless_errors[0], AuthenticationError)
        deadline = time.monotonic() + 5
        while listener.dropped < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.dropped == 3
        assert listener.accept(timeout=0.1) is None  # nothing else got through
        for sock in (silent, slow):
            sock.close()
        conn.close()
        client[0].close()
    finally:
        listener.close()
    assert not Path(listener.path).exists()
    with pytest.raises(OSError, match="closed"):
        listener.accept(timeout=0.1)
