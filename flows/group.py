"""Jobs that each run on several GPUs: one `torchrun` worker group per shard, driven from the flow process.

`GroupPipeline` stands in for a `WanPipeline` in `flows.shard` when `gpus_per_job > 1`. It starts
`torchrun --standalone --nproc_per_node N -m flows.group_worker` once (every rank loads the model once and
spreads it over the group: context parallelism, CFG halves, ZeRO-3), then sends it one job at a time over
an authenticated local connection. Rank 0 decodes and streams the frames back; the flow process writes
the video and the catalog row exactly as for a one-GPU job (one writer, credentials only here).

A rank that dies makes torchrun end the group: the job in flight fails with `WorkerGroupDied` (transient,
so the job task's retry runs it again), and the next request starts a fresh group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.group_protocol import (
    ADDRESS_ENV,
    AUTHKEY_ENV,
    Answer,
    AskSettings,
    AskVideoSize,
    Chunk,
    Done,
    Failed,
    Generate,
    GroupSpec,
    Ready,
    Stop,
    UseLoras,
)

__all__ = ["GroupPipeline", "RankListener", "WorkerGroup", "WorkerGroupDied"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0  # loading 14B of weights on every rank can take minutes
POLL_S = 0.5
HANDSHAKE_TIMEOUT_S = 5.0  # how long a connection to the group's socket gets to prove it holds the key


class WorkerGroupDied(RuntimeError):
    """The worker group ended (a rank died or was killed): the job in flight is retried on a new group."""


class WorkerGroup:
    """One `torchrun` process group serving one model; `request`/`stream` talk to its rank 0."""

    def __init__(
        self, model: str, ckpt_dir: str | None, nproc: int, *, dtype: str | None = None,
        layout: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.model, self.ckpt_dir, self.nproc, self.dtype = model, ckpt_dir, nproc, dtype
        self.layout = dict(layout or {})
        self.spec = GroupSpec.from_layout(model, ckpt_dir, dtype, self.layout)  # what every rank loads
        self.starts = 0  # how many times the group was started (the model loaded)
        self.generations = 0  # how many generations were sent to it
        self.last_done: dict[str, Any] = {}  # rank 0's report on the last finished generation
        self.info: dict[str, Any] = {}
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._log: Path | None = None
        self._dir: Path | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    def command(self) -> list[str]:
        """`torchrun` for `nproc` ranks of `flows.group_worker`, with the group's spec as its arguments."""
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return [*launcher, f"--nproc_per_node={self.nproc}", "-m", "flows.group_worker", *self.spec.to_argv()]

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._conn is not None

    def start(self) -> None:
        """Start the group and wait until every rank has loaded the model (rank 0 says "ready").

        Rank 0 connects back over a Unix socket in a private (0700) directory, with an HMAC key given in
        its environment (`RankListener`: any other connection gets `HANDSHAKE_TIMEOUT_S` to authenticate,
        and none holds up rank 0's); the group's log lives beside it until the group is closed.
        """
        self.close()
        key = secrets.token_bytes(32)
        self._dir = Path(tempfile.mkdtemp(prefix=f"wanflow-group-{self.model}-"))
        listener = RankListener(self._dir / "socket", key)
        self._log = self._dir / "group.log"
        env = {**os.environ, ADDRESS_ENV: listener.path, AUTHKEY_ENV: key.hex()}
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.nproc)))
        try:
            with self._log.open("w") as out:
                self._proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True)  # fmt: skip
            self.starts += 1
            log.info("worker group %d for %s: %d processes, log %s", self.starts, self.model, self.nproc,
                     self._log)  # fmt: skip
            deadline = time.monotonic() + START_TIMEOUT_S
            conn = None
            while conn is None:
                conn = listener.accept(POLL_S)
                if conn is None and (self._proc.poll() is not None or time.monotonic() > deadline):
                    raise WorkerGroupDied(f"the worker group for {self.model} did not start: {self._tail()}")
            self._conn = conn
            message = self._recv()
            if not isinstance(message, Ready):
                raise WorkerGroupDied(f"unexpected first message from the worker group: {message!r:.80}")
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()
            if listener.dropped:
                log.warning("worker group for %s: %d connections to its socket were turned away (no key, "
                            "or too slow to authenticate)", self.model, listener.dropped)  # fmt: skip
        self.info = message.info
        log.info("worker group ready: %s", self.info)

    def close(self, *, grace_s: float = 30.0) -> None:
        """Ask the group to stop, then make sure every process of it is gone and its files removed."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(Stop())
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, 9)
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = self._log = None

    def abort(self) -> None:
        """End the group now, mid-request (its rank 0 may be sending frames nobody will read)."""
        if self._conn is not None:
            self._conn.close()  # rank 0's next send fails, and torchrun ends the other ranks
            self._conn = None
        self.close(grace_s=10.0)

    def pids(self) -> list[int]:
        """The ranks' process ids, rank order (empty before the group is ready)."""
        return list(self.info.get("pids", []))

    # ---------------------------------------------------------------------------------------- talking
    def _tail(self, lines: int = 15) -> str:
        code = self._proc.poll() if self._proc is not None else None
        text = self._log.read_text(errors="replace") if self._log and self._log.exists() else ""
        tail = "\n".join(line for line in text.splitlines() if "Warning" not in line)
        tail = "\n".join(tail.splitlines()[-lines:])
        return f"torchrun exit code {code}; last log lines ({self._log}):\n{tail}"

    def _recv(self) -> Any:
        """The next message from rank 0; `WorkerGroupDied` when the group ends first."""
        assert self._conn is not None
        while True:
            try:
                if self._conn.poll(POLL_S):
                    return self._conn.recv()
            except (EOFError, OSError):
                break
            if self._proc is None or self._proc.poll() is not None:
                break
        if self._proc is not None:  # torchrun is ending the other ranks: let it finish, for its log
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=30)
        message = f"the worker group for {self.model} ended mid-request: {self._tail()}"
        self._conn.close()
        self._conn = None
        raise WorkerGroupDied(message)

    def request(self, message: AskSettings | AskVideoSize | UseLoras) -> Any:
        """Send one request and return rank 0's answer; a bad request raises ValueError."""
        if not self.alive:
            self.start()
        assert self._conn is not None
        self._conn.send(message)
        reply = self._recv()
        if isinstance(reply, Failed):
            raise ValueError(reply.message)
        if not isinstance(reply, Answer):
            raise WorkerGroupDied(f"unexpected answer from the worker group: {reply!r:.80}")
        return reply.value

    def stream(self, request: Generate) -> Iterator[torch.Tensor]:
        """Run one generation on the group; yields uint8 frame chunks [n, H, W, 3] as rank 0 decodes."""
        if not self.alive:
            self.start()
        assert self._conn is not None
        self._conn.send(request)
        self.generations += 1
        finished = False
        try:
            while True:
                reply = self._recv()
                if isinstance(reply, Chunk):
                    yield torch.from_numpy(reply.frames)
                elif isinstance(reply, Done):
                    self.last_done = {"peak_memory_bytes": reply.peak_memory_bytes,
                                      "cache_counts": reply.cache_counts, "latents": reply.latents,
                                      "latents_metadata": reply.latents_metadata}  # fmt: skip
                    finished = True
                    return
                elif isinstance(reply, Failed):
                    finished = True
                    raise ValueError(reply.message)
                else:
                    raise WorkerGroupDied(f"unexpected message from the worker group: {reply!r:.80}")
        finally:
            if not finished and self._conn is not None:
                # The caller stopped reading (a storage error mid-video): frames of this job are still on
                # their way, and must never be read as the next job's. Start afresh next time.
                self.abort()


class RankListener:
    """Where a worker group's rank 0 connects back: a Unix socket, each connection authenticated by HMAC.

    The socket lives in a private (0700) directory, but any process of the same user can still connect to
    it. Every connection is accepted at once and authenticated on a thread of its own, with
    `handshake_timeout_s` to complete the (multiprocessing) challenge exchange: one that stays silent,
    answers too slowly or without the key is dropped, and never holds up rank 0 behind it. `accept` hands
    out the connections that passed.
    """

    def __init__(
        self, path: str | os.PathLike[str], authkey: bytes, *,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.path = str(path)
        self.handshake_timeout_s = handshake_timeout_s
        self.dropped = 0  # connections turned away: no key, a wrong key, or too slow
        self._key = authkey
        self._passed: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._socket.bind(self.path)
            self._socket.listen(16)
            self._socket.settimeout(0.2)  # how often the accepting thread looks whether it was closed
        except BaseException:
            self._socket.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="wanflow-group-listener", daemon=True)
        self._thread.start()

    def accept(self, timeout: float) -> Connection | None:
        """The next connection that authenticated, waiting at most `timeout` seconds (None if none did)."""
        if self._closed.is_set():
            raise OSError("the listener is closed")
        try:
            return self._passed.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop accepting, remove the socket, and close any authenticated connection nobody took."""
        with self._lock:
            self._closed.set()
            while True:
                try:
                    self._passed.get_nowait().close()
                except queue.Empty:
                    break
        self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> RankListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        """The accepting thread: every new connection gets its own authenticating thread."""
        with self._socket:
            while not self._closed.is_set():
                try:
                    sock, _ = self._socket.accept()
                except TimeoutError:
                    continue
                except OSError:  # out of descriptors, say: try again shortly
                    time.sleep(0.2)
                    continue
                sock.setblocking(True)
                threading.Thread(target=self._authenticate, args=(sock,), daemon=True).start()

    def _authenticate(self, sock: socket.socket) -> None:
        """Run the listener's side of the challenge exchange on `sock`, cut short after the timeout."""
        try:
            conn = Connection(os.dup(sock.fileno()))  # `sock` stays, to cut the exchange short
        except OSError:
            sock.close()
            with self._lock:
                self.dropped += 1
            return
        lock = threading.Lock()
        over = [False]  # the exchange ended, one way or the other

        def cut() -> None:  # out of time: wake the blocked read with an end of file
            with lock:
                if not over[0]:
                    over[0] = True
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.handshake_timeout_s, cut)
        timer.daemon = True
        timer.start()
        try:
            deliver_challenge(conn, self._key)
            answer_challenge(conn, self._key)
            passed = True
        except (AuthenticationError, EOFError, OSError):
            passed = False
        timer.cancel()
        with lock:
            passed = passed and not over[0]
            over[0] = True
        sock.close()  # `conn` holds a descriptor of its own
        with self._lock:
            if passed and not self._closed.is_set():
                self._passed.put(conn)
                return
            self.dropped += 1
        if passed:
            log.debug("a connection authenticated after the listener closed")
        conn.close()


class GroupPipeline:
    """A `flows.backend.GenerationBackend` served by a `WorkerGroup` of `nproc` processes: the slice of
    `WanPipeline` that `flows.shard` uses."""

    def __init__(self, group: WorkerGroup) -> None:
        from wan.lora import LoraSet
        from wan.pipeline import MemoryOptions

        self.group = group
        self.memory = MemoryOptions.parse(**group.spec.memory())
        self._loras = LoraSet()  # the set merged in the group's processes
        self._merged_in = 0  # the group start (`WorkerGroup.starts`) that merged it
        if not group.alive:
            group.start()

    @property
    def device(self) -> torch.device:
        """Rank 0's device type (the group spans one device per rank)."""
        return torch.device(self.group.info.get("device", "cpu").split(":")[0])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.group.info.get("dtype", "torch.float32").removeprefix("torch."))

    def reset_peak_memory(self) -> None:
        """Nothing here: rank 0 measures each generation afresh and reports it when the video is done."""

    @property
    def peak_memory_bytes(self) -> int | None:
        """Rank 0's peak GPU memory during the last generation (None on the CPU), once its frames are in."""
        return self.group.last_done.get("peak_memory_bytes")

    def describe(self) -> dict[str, Any]:
        """For the sidecars: how the group ran the job (the memory options are recorded apart)."""
        return {"processes": self.group.nproc, **self.group.info.get("layout", {})}

    @property
    def last_cache_counts(self) -> Any:
        """Rank 0's step-cache counts of the last generation (`wan.cache.CacheCounts`; None without one)."""
        from wan.cache import CacheCounts

        counts = self.group.last_done.get("cache_counts")
        return None if counts is None else CacheCounts(**counts)

    def use_loras(self, loras: Any) -> bool:
        """Merge a `wan.lora.LoraSet` (None: the base weights) into every rank's DiT; the set travels to the
        group only when it differs from the one merged there. Returns whether the weights changed."""
        from wan.lora import LoraSet

        loras = loras or LoraSet()
        if loras.identity == self._loras.identity and self._merged():
            return False
        changed = bool(self.group.request(UseLoras.of(loras)))
        self._loras, self._merged_in = loras, self.group.starts
        return changed

    def _merged(self) -> bool:
        """Whether the group running now holds `self._loras` (a restarted group starts from the base)."""
        return self.group.alive and self._merged_in == self.group.starts

    @property
    def last_latents(self) -> torch.Tensor | None:
        """The last generation's final latents [z, T, h, w] (float32, CPU), when it kept them."""
        latents = self.group.last_done.get("latents")
        return None if latents is None else torch.from_numpy(latents)

    def latents_metadata(self) -> dict[str, str]:
        """The metadata rank 0 gave the last kept latents (see `WanPipeline.latents_metadata`)."""
        return dict(self.group.last_done.get("latents_metadata") or {})

    def settings(self, **kwargs: Any) -> Any:
        from wan.pipeline import GenerationSettings

        return GenerationSettings.from_dict(self.group.request(AskSettings(kwargs)))

    def video_size(self, settings: Any, image: Any | None = None) -> tuple[int, int]:
        if image is None:
            return settings.size
        import dataclasses

        from wan.conditioning import image_tensor

        height, width = image_tensor(image).shape[1:]
        return tuple(self.group.request(AskVideoSize(dataclasses.asdict(settings), height, width)))

    def generate_stream(
        self, prompt: str, *, seed: int = 0, image: Any = None, last_image: Any = None,
        progress: bool = False, **settings: Any,
    ) -> Iterator[torch.Tensor]:  # fmt: skip
        if self._loras.entries and not self._merged():  # the group restarted: merge the set again first
            self.group.request(UseLoras.of(self._loras))
            self._merged_in = self.group.starts
        given = {"image": image, "last_image": last_image}
        images = {name: np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
                  for name, img in given.items() if img is not None}  # fmt: skip
        return self.group.stream(Generate(prompt, seed, images, settings))
