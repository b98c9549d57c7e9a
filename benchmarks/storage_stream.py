"""Streaming a video into storage: VideoWriter to a local directory and to S3, against ffmpeg alone.

    python benchmarks/storage_stream.py                  # 81 frames of 832x480, a panning pattern
    python benchmarks/storage_stream.py --noise          # random frames, the encoder's worst case

Frames are made lazily, 1 then 4 at a time like the VAE's streaming decode, so the producer never holds
the video. Each variant gets the same frames:
- ffmpeg: the same encoder graph (`storage.video.encoder_stream`) writing to /dev/null, fed from Python;
- local: VideoWriter into a temporary directory (atomic rename at the end);
- s3: VideoWriter into a moto S3 server on 127.0.0.1, started here in its own process so its memory
  and CPU are not counted as ours.

Quality signals (`storage.signals`, measured by VideoWriter on every frame): the local write is also timed
with them off (`local_unmeasured`), and the meter alone over the same frames (`signals_alone`); target: the
signals add at most 5% to the local write (`signals_overhead`, from the meter's own time, which the
encoder's run-to-run noise does not blur).

Memory: the growth of this process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above its
RSS before the write; target: below the raw video (frames x H x W x 3 bytes). Time: the median of
interleaved runs; target: VideoWriter / ffmpeg alone <= 1.15. Prints a summary, then one JSON object.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from common import emit, interleaved_times, peak_memory, rss_now
from PIL import Image

from storage.signals import SignalMeter
from storage.video import VideoWriter, encoder_stream, ffmpeg_executable

BUCKET = "bench"
PAN = 4  # pixels the pattern moves per frame


def frame_chunks(frames: int, height: int, width: int, noise: bool, seed: int = 0) -> Iterator[np.ndarray]:
    """uint8 chunks [n, height, width, 3], n = 1 then up to 4, made on demand.

    Smooth mode: a blurred random texture panning sideways, overlaid with moving colour bands (motion
    the encoder can predict, detail it must spend bits on). Noise mode: fresh random pixels per frame.
    """
    rng = np.random.default_rng(seed)
    if not noise:
        panorama = (width + PAN * frames, height)
        small = rng.integers(0, 256, (height // 8, panorama[0] // 8, 3), dtype=np.uint8)
        texture = np.asarray(Image.fromarray(small).resize(panorama, Image.Resampling.BICUBIC), np.uint16)
        x = np.arange(width, dtype=np.uint16)[None, :, None]
        phase = np.array([0, 85, 170], np.uint16)
    start = 0
    while start < frames:
        n = 1 if start == 0 else min(4, frames - start)
        if noise:
            chunk = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
        else:
            chunk = np.empty((n, height, width, 3), np.uint8)
            for i, t in enumerate(range(start, start + n)):
                bands = (x + 3 * t + phase) % 256
                chunk[i] = (texture[:, PAN * t : PAN * t + width] * 3 + bands) // 4
        yield chunk
        start += n


def signal_seconds(chunks: list[np.ndarray], fps: int, repeats: int) -> float:
    """Median seconds of the quality-signal meter alone over the video's chunks (made beforehand)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        meter = SignalMeter(fps)
        for chunk in chunks:
            meter.update(chunk)
        meter.result()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server() -> tuple[subprocess.Popen, dict]:
    """moto's S3 server in a child process on 127.0.0.1; returns it and s3fs storage options."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)
    options = {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "key": "bench",
        "secret": "bench",
    }
    return server, options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--crf", type=int, default=18)
    p.add_argument("--preset", default="medium")
    p.add_argument("--noise", action="store_true", help="random frames instead of the panning pattern")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # moto refuses a location constraint
    import s3fs

    cpu = torch.device("cpu")
    binary = ffmpeg_executable()
    server, options = start_s3_server()
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    workdir = tempfile.TemporaryDirectory(prefix="wanflow-bench-")
    encoded: dict[str, int] = {}

    def chunks() -> Iterator[np.ndarray]:
        return frame_chunks(args.frames, args.height, args.width, args.noise)

    def run_ffmpeg() -> None:
        stream = encoder_stream(args.width, args.height, args.fps, crf=args.crf, preset=args.preset,
                                output="/dev/null").overwrite_output()  # fmt: skip
        proc = stream.run_async(cmd=binary, pipe_stdin=True)
        for chunk in chunks():
            proc.stdin.write(memoryview(chunk).cast("B"))
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg exited with {proc.returncode}")

    def writer_run(
        name: str, url: str, storage_options: dict | None, measure: bool = True
    ) -> Callable[[], None]:
        def run() -> None:
            with VideoWriter(url, width=args.width, height=args.height, fps=args.fps, crf=args.crf,
                             preset=args.preset, storage_options=storage_options,
                             measure=measure) as writer:  # fmt: skip
                for chunk in chunks():
                    writer.write(chunk)
            encoded[name] = writer.nbytes

        return run

    runs = {
        "ffmpeg": run_ffmpeg,
        "local": writer_run("local", f"{workdir.name}/run/video.mp4", None),
        "s3": writer_run("s3", f"s3://{BUCKET}/run/video.mp4", options),
        "local_unmeasured": writer_run("local_unmeasured", f"{workdir.name}/run/plain.mp4", None, False),
    }
    try:
        for run in runs.values():  # warm-up: page cache, the s3fs session, ffmpeg's first start
            run()
        growth: dict[str, int] = {}
        for name in ("local", "s3"):
            samples = []
            for _ in range(2):  # the smaller of two: allocator noise only ever adds to a peak
                before = rss_now()
                _, peak = peak_memory(runs[name], cpu)
                samples.append(peak - before)
            growth[name] = min(samples)
        times = interleaved_times(runs, args.repeats, cpu)
        times["signals_alone"] = signal_seconds(list(chunks()), args.fps, max(args.repeats, 5))
    finally:
        server.kill()
        server.wait()
        workdir.cleanup()

    raw = args.frames * args.height * args.width * 3
    ratios = {name: round(times[name] / times["ffmpeg"], 3) for name in ("local", "s3")}
    result = {
        "benchmark": "storage_stream",
        "frames": args.frames,
        "size": f"{args.width}x{args.height}",
        "pattern": "noise" if args.noise else "smooth",
        "crf": args.crf,
        "preset": args.preset,
        "raw_video_bytes": raw,
        "encoded_bytes": encoded["local"],
        "seconds_ffmpeg_devnull": round(times["ffmpeg"], 3),
        "seconds_local": round(times["local"], 3),
        "seconds_s3": round(times["s3"], 3),
        "time_ratio_local": ratios["local"],
        "time_ratio_s3": ratios["s3"],
        "seconds_local_unmeasured": round(times["local_unmeasured"], 3),
        "seconds_signals_alone": round(times["signals_alone"], 4),
        "signals_overhead": round(times["signals_alone"] / times["local_unmeasured"], 4),
        "signals_ok": times["signals_alone"] <= 0.05 * times["local_unmeasured"],
        "peak_growth_bytes_local": growth["local"],
        "peak_growth_bytes_s3": growth["s3"],
        "memory_ok": max(growth.values()) < raw,
        "time_ok": max(ratios.values()) <= 1.15,
    }
    mib = 2**20
    print(
        f"{args.frames} {result['pattern']} frames of {result['size']}, crf {args.crf} {args.preset}, "
        f"median of {args.repeats}: ffmpeg to /dev/null {times['ffmpeg']:.2f}s, "
        f"local {times['local']:.2f}s (x{ratios['local']}), s3 {times['s3']:.2f}s (x{ratios['s3']}); "
        f"encoded {encoded['local'] / mib:.2f} MiB\n"
        f"peak RSS growth: local {growth['local'] / mib:.1f} MiB, s3 {growth['s3'] / mib:.1f} MiB "
        f"(raw video {raw / mib:.1f} MiB)\n"
        f"quality signals: {times['signals_alone'] * 1000:.1f} ms over the video = "
        f"{100 * result['signals_overhead']:.2f}% of the local write without them "
        f"({times['local_unmeasured']:.2f}s)"
    )
    emit(result)


if __name__ == "__main__":
    main()
