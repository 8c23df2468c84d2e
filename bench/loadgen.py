"""A load generator for the callback endpoint: TWIN-shaped callbacks over keep-alive HTTP/1.1.

    from bench.loadgen import run_load
    result = run_load("127.0.0.1", 8000, "/callbacks/<token>", connections=32, duration=15)

`python -m bench ingest` loads with wrk instead (bench/ingest.lua: its figures are wrk's, and it checks
storage by counting per id space after every request was answered). This generator stays for what
must know *which* callbacks were acknowledged while connections die mid-request (the kill -9 test in
tests/reliability/test_gunicorn_kill.py) and for `python -m bench memory`; wrk's Lua `response()`
cannot tell which request an answer belongs to. It is a small generator on raw sockets: several processes, each driving its
share of the connections with `selectors`, one request in flight per connection (as TWIN's callback
threads do), bodies built from a seeded Random. Its own cost is measured and printed (CPU seconds per
request, and its throughput against a trivial server: `python -m bench.loadgen`), so that nobody has to
take "it is not the bottleneck" on trust.

Each message gets TWIN's two callbacks, CREATED->PENDING and PENDING->final, and a share of requests
(`duplicates`) repeats an earlier callback byte for byte, as TWIN does when it retries.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import resource
import selectors
import socket
import time
import uuid
from array import array
from dataclasses import dataclass, field

FINALS = (("DELIVERED", 6), ("DELIVERED", 6), ("DELIVERED", 6), ("DELIVERED", 6), ("DELIVERED", 6),
          ("DELIVERED", 6), ("DELIVERED", 6), ("DELIVERED", 6), ("UNDELIVERED", 7), ("ERROR", 8))


def key_of(message_id: str, old: str, new: str) -> str:
    """The event's identity, as the receiver deduplicates it: (message id, old status, new status)."""
    return f"{message_id}|{old}|{new}"


class Callbacks:
    """An endless, seeded stream of (key, body) pairs: distinct messages, two callbacks each, some repeats."""

    def __init__(self, seed: int, duplicates: float = 0.05, mailing: str = "bench"):
        self.rng = random.Random(seed)
        self.duplicates = duplicates
        self.mailing = mailing
        self.sent: list[tuple[str, bytes]] = []
        self.pending: tuple[str, bytes] | None = None
        bulk = self._uuid()
        self.ids = (bulk, self._uuid(), self._uuid())

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _body(self, message_id, old, old_code, new, new_code, price) -> bytes:
        bulk, group, flow = self.ids
        return (
            f'{{"id":"{message_id}","bulkId":"{bulk}","groupId":"{group}","flowId":"{flow}",'
            f'"oldStatus":"{old}","newStatus":"{new}","oldStatusCode":{old_code},"newStatusCode":{new_code},'
            f'"price":{price},"partCount":1,"callbackData":"{self.mailing}"}}'
        ).encode()

    def next(self) -> tuple[str, bytes]:
        if self.sent and self.rng.random() < self.duplicates:
            return self.sent[self.rng.randrange(len(self.sent))]
        if self.pending is not None:
            item, self.pending = self.pending, None
        else:
            message_id = self._uuid()
            final, code = FINALS[self.rng.randrange(len(FINALS))]
            price = 1.2 if final == "DELIVERED" else 0
            item = (key_of(message_id, "CREATED", "PENDING"),
                    self._body(message_id, "CREATED", 1, "PENDING", 2, 0))
            self.pending = (key_of(message_id, "PENDING", final),
                            self._body(message_id, "PENDING", 2, final, code, price))
        if len(self.sent) < 4096:
            self.sent.append(item)
        else:
            self.sent[self.rng.randrange(4096)] = item
        return item


@dataclass
class LoadResult:
    duration: float = 0.0
    requests: int = 0                  # answered, whatever the status
    statuses: dict = field(default_factory=dict)
    acknowledged: set = field(default_factory=set)   # keys answered 2xx
    unknown: set = field(default_factory=set)        # keys sent whose answer never came (connection lost)
    connect_errors: int = 0
    latencies: array = field(default_factory=lambda: array("d"))   # seconds, answered requests
    cpu_seconds: float = 0.0           # the generator's own CPU (user + system), all processes

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def rate(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    def merge(self, other: LoadResult) -> None:
        self.duration = max(self.duration, other.duration)
        self.requests += other.requests
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        self.acknowledged |= other.acknowledged
        self.unknown |= other.unknown
        self.connect_errors += other.connect_errors
        self.latencies.extend(other.latencies)
        self.cpu_seconds += other.cpu_seconds


class _Conn:
    __slots__ = ("sock", "out", "buf", "key", "started", "head_end", "length", "status", "close")

    def __init__(self, sock):
        self.sock, self.out, self.buf = sock, b"", b""
        self.key = None
        self.started = 0.0
        self.head_end = -1
        self.length = 0
        self.status = 0
        self.close = False


def _connect(host, port):
    sock = socket.create_connection((host, port), timeout=2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _drive(host, port, path, connections, duration, seed, duplicates, max_requests, stop_file,
           mailing) -> LoadResult:
    """One process: `connections` keep-alive connections, one request in flight on each."""
    result = LoadResult()
    stream = Callbacks(seed, duplicates, mailing)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: twin24-bench\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: ").encode()
    sel = selectors.DefaultSelector()
    conns: list[_Conn | None] = [None] * connections
    retry_at = [0.0] * connections
    issued = 0
    begin = time.monotonic()
    deadline = begin + duration
    stopping = False

    def issue(i):
        nonlocal issued
        conn = conns[i]
        key, body = stream.next()
        conn.key, conn.started = key, time.perf_counter()
        conn.out = head + str(len(body)).encode() + b"\r\n\r\n" + body
        conn.buf, conn.head_end = b"", -1
        issued += 1
        if flush(i):
            sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0), i)

    def flush(i) -> bool:
        """Send what the socket takes of the request; False when the connection died."""
        conn = conns[i]
        try:
            sent = conn.sock.send(conn.out)
            conn.out = conn.out[sent:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            lost(i)
            return False
        return True

    def lost(i, delay=0.05):
        conn = conns[i]
        if conn is None:
            return
        if conn.key is not None:
            result.unknown.add(conn.key)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conns[i] = None
        retry_at[i] = time.monotonic() + delay

    def open_conn(i) -> bool:
        try:
            sock = _connect(host, port)
        except OSError:
            result.connect_errors += 1
            retry_at[i] = time.monotonic() + 0.05
            return False
        conns[i] = _Conn(sock)
        sel.register(sock, selectors.EVENT_READ, i)
        return True

    def may_issue() -> bool:
        return not stopping and (max_requests is None or issued < max_requests)

    for i in range(connections):
        if open_conn(i) and may_issue():
            issue(i)

    while True:
        now = time.monotonic()
        if not stopping and (now >= deadline or (max_requests is not None and issued >= max_requests)
                             or (stop_file and os.path.exists(stop_file))):
            stopping = True
            grace_until = now + 10.0
        busy = [c for c in conns if c is not None and c.key is not None]
        if stopping and (not busy or now >= grace_until):
            break
        if not stopping:
            for i in range(connections):
                if conns[i] is None and now >= retry_at[i]:
                    if open_conn(i):
                        issue(i)
        events = sel.select(timeout=0.05)
        for selkey, mask in events:
            i = selkey.data
            conn = conns[i]
            if conn is None:
                continue
            if mask & selectors.EVENT_WRITE and conn.out:
                if not flush(i):
                    continue
                if not conn.out:
                    sel.modify(conn.sock, selectors.EVENT_READ, i)
            if not mask & selectors.EVENT_READ:
                continue
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                lost(i)
                continue
            conn.buf += data
            if conn.head_end < 0:
                conn.head_end = conn.buf.find(b"\r\n\r\n")
                if conn.head_end < 0:
                    continue
                head_text = conn.buf[:conn.head_end].decode("latin-1").lower()
                conn.status = int(head_text[9:12])
                conn.length = 0
                conn.close = False
                for line in head_text.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name == "content-length":
                        conn.length = int(value)
                    elif name == "connection" and "close" in value:
                        conn.close = True
            if len(conn.buf) < conn.head_end + 4 + conn.length:
                continue
            # A whole answer.
            result.latencies.append(time.perf_counter() - conn.started)
            result.requests += 1
            result.statuses[conn.status] = result.statuses.get(conn.status, 0) + 1
            if 200 <= conn.status < 300:
                result.acknowledged.add(conn.key)
            conn.key = None
            if conn.close:
                lost(i, delay=0.0)      # the server closes after each answer (gunicorn's sync workers)
                if may_issue() and open_conn(i):
                    issue(i)
            elif may_issue():
                issue(i)
    for i, conn in enumerate(conns):
        if conn is not None:
            lost(i)
    result.duration = time.monotonic() - begin
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_seconds = usage.ru_utime + usage.ru_stime
    return result


def _child(pipe, args):
    try:
        pipe.send(_drive(*args))
    except BaseException as error:  # reported to the parent, which raises
        pipe.send(error)
    finally:
        pipe.close()


def run_load(host: str, port: int, path: str, *, connections: int = 32, duration: float = 15.0,
             processes: int = 2, duplicates: float = 0.05, max_requests: int | None = None,
             stop_file: str | None = None, seed: int | None = None, mailing: str = "bench") -> LoadResult:
    """Load the endpoint until `duration` passes, `max_requests` were sent or `stop_file` exists.

    Requests in flight at the end are waited for (up to 10 s); what never got an answer is in `unknown`.
    """
    seed = random.SystemRandom().getrandbits(64) if seed is None else seed
    processes = max(1, min(processes, connections))
    ctx = multiprocessing.get_context("fork")
    children = []
    for p in range(processes):
        share = connections // processes + (1 if p < connections % processes else 0)
        quota = None if max_requests is None else max_requests // processes + (
            1 if p < max_requests % processes else 0)
        parent_end, child_end = ctx.Pipe(duplex=False)
        args = (host, port, path, share, duration, seed + p, duplicates, quota, stop_file, mailing)
        process = ctx.Process(target=_child, args=(child_end, args), daemon=True)
        process.start()
        child_end.close()
        children.append((process, parent_end))
    total = LoadResult()
    try:
        for _process, pipe in children:
            if not pipe.poll(duration + 60 if max_requests is None else 3600):
                raise RuntimeError("load generator process did not report")
            part = pipe.recv()
            if isinstance(part, BaseException):
                raise part
            total.merge(part)
    finally:
        for process, _ in children:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return total


# --- `python -m bench.loadgen`: the generator alone, against a server that does nothing ------------
CANNED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
          b'{"stored":true}\n')


def _trivial_server(listener: socket.socket) -> None:
    """Answers every request with a canned 200 (one process, selectors); parses only the length."""
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    buffers: dict = {}
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffers[sock] = b""
                sel.register(sock, selectors.EVENT_READ, sock)
                continue
            sock = key.data
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                buffers.pop(sock, None)
                continue
            buf = buffers[sock] + data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                lower = buf[:end].lower()
                at = lower.find(b"content-length:")
                length = int(lower[at + 15:lower.find(b"\r\n", at) if lower.find(b"\r\n", at) > 0 else None]) \
                    if at >= 0 else 0
                if len(buf) < end + 4 + length:
                    break
                buf = buf[end + 4 + length:]
                sock.sendall(CANNED)
            buffers[sock] = buf


def calibrate(duration: float = 5.0, connections: int = 32, processes: int = 2) -> LoadResult:
    """The generator against a trivial server in another process: its ceiling on this machine."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    server = multiprocessing.get_context("fork").Process(target=_trivial_server, args=(listener,), daemon=True)
    server.start()
    listener.close()
    try:
        return run_load("127.0.0.1", port, "/callbacks/x", connections=connections, duration=duration,
                        processes=processes)
    finally:
        server.kill()
        server.join()


def main() -> None:
    result = calibrate()
    print("load generator alone, against a trivial one-process server (both share this machine's cores):")
    print(f"  {result.rate:,.0f} requests/s, p50 {result.percentile(50) * 1000:.2f} ms, "
          f"p99 {result.percentile(99) * 1000:.2f} ms, "
          f"generator CPU {result.cpu_seconds / max(result.requests, 1) * 1e6:.0f} µs per request")


if __name__ == "__main__":
    main()
