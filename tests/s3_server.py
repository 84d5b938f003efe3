"""A real S3-compatible server (moto_server) on 127.0.0.1 for tests, a TCP proxy that cuts its first
connection mid-response (to test resuming reads) and one that holds a response (to test hedged reads)."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, from this pytest-xdist worker's own 2000 (4000-5999 for gw0,
    6000-7999 for gw1, ...), below the ports SLURM jobs derive from their id (20000+, see
    train/slurm_env.py) and Linux's ephemeral range (32768+): a port handed to a server that binds
    it seconds later (torchrun's store) cannot meanwhile go to another worker or a client socket."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = 4000 + 2000 * (int(worker) % 8 if worker.isdigit() else 0)
    rng = random.Random(os.getpid() ^ time.time_ns())
    for port in rng.sample(range(base, base + 2000), 2000):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {base}-{base + 1999}")


class MotoServer:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def use_endpoint(monkeypatch, url: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


class _Proxy:
    """Forwards 127.0.0.1:port to a target port; `_serve` handles each client connection."""

    def __init__(self, target_port: int):
        self.target_port, self.connections = target_port, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client, self.connections), daemon=True).start()

    def _serve(self, client, number: int) -> None:
        raise NotImplementedError

    @staticmethod
    def _pipe(src, dst, limit) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        _Proxy._hang_up(src, dst)

    @staticmethod
    def _hang_up(*socks) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


class CuttingProxy(_Proxy):
    """The first connection is closed after `cut_after` bytes of response, the following ones pass through."""

    def __init__(self, target_port: int, cut_after: int):
        self.cut_after = cut_after
        super().__init__(target_port)

    def _serve(self, client, number: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
        self._pipe(upstream, client, self.cut_after if number == 1 else None)


class HoldingProxy(_Proxy):
    """The first connection whose first request is a GET of a `.tar` (a sample's ranged read) gets no
    response bytes until `release()`: a request that hangs."""

    def __init__(self, target_port: int):
        self.released, self.held = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        super().__init__(target_port)

    def _serve(self, client, number: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        try:
            first = client.recv(65536)
        except OSError:
            first = b""
        line = first.split(b"\r\n", 1)[0]
        with self._lock:
            hold = line.startswith(b"GET ") and b".tar" in line and not self.held.is_set()
            if hold:
                self.held.set()
        upstream.sendall(first)
        threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
        if hold:
            self.released.wait()
        self._pipe(upstream, client, None)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        super().close()


os.environ.setdefault("INFD_S3_BACKOFF", "0.05")


class CountingProxy(_Proxy):
    """Passes everything through and records each GET of a `.tar` (path, Range header): what the object
    store served, counted outside the loader."""

    def __init__(self, target_port: int):
        self.gets: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        super().__init__(target_port)

    def _serve(self, client, number: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()
        buffer = b""
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
                buffer += data
                while b"\r\n\r\n" in buffer:  # GETs have no body: a request is its head
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    self._record(head)
        except OSError:
            pass
        self._hang_up(client, upstream)

    def _record(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method, path = (lines[0].split(" ") + ["", ""])[:2]
        if method == "GET" and ".tar" in path:
            ranges = [line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("range:")]
            with self._lock:
                self.gets.append((path.split("?")[0], ranges[0] if ranges else ""))

    def tar_gets(self) -> int:
        with self._lock:
            return len(self.gets)
