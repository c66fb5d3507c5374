"""
One load-generator process: many chargers over raw asyncio sockets.

The WebSocket client is written for the benchmark so that the load
generator stays cheap: no handshake checks beyond the status line, a zero
masking key (legal, and it makes masking a copy), no compression, frames
parsed in place. Each charger answers server pings and CSMS CALLs at once.

The process is driven over a pipe by bench/_common.LoadGen; every command
returns a dict that includes the process's own CPU time, so the benchmark
can show that the load generator was not the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
import time
from array import array
from typing import Optional

import orjson

_HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ocpp1.6\r\n{extra}\r\n"
)
_MASK = b"\0\0\0\0"

BOOT = b',"BootNotification",{"chargePointVendor":"bench","chargePointModel":"m1"}]'
HEARTBEAT = b',"Heartbeat",{}]'
METER_VALUES = (b',"MeterValues",{"connectorId":1,"meterValue":[{"timestamp":'
                b'"2026-12-05T12:00:00Z","sampledValue":[{"value":"12345.6",'
                b'"measurand":"Energy.Active.Import.Register","unit":"Wh"}]}]}]')
#: what open_loop can send, by name
CALLS = {"Heartbeat": HEARTBEAT, "MeterValues": METER_VALUES}
#: the message type of a CALLERROR: the gateway's answer when nothing on
#: the broker took the CALL; never counted as an answered round trip
CALLERROR = 4


def encode(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    return header + _MASK + payload


class Charger(asyncio.Protocol):
    __slots__ = ("host", "path", "extra", "transport", "buf", "is_open", "status",
                 "retry_after", "opened", "closed", "pending", "seq", "on_answer", "on_lost",
                 "t_start", "t_open", "pings", "commands")

    def __init__(self, path: str, opened: asyncio.Future, extra: str = "") -> None:
        self.path = path
        #: more request header lines (each ending in CRLF), e.g. Basic auth
        self.extra = extra
        self.transport = None
        self.buf = b""
        self.is_open = False
        self.status = None
        self.retry_after = None
        self.opened = opened
        self.closed = None
        self.pending: dict = {}
        self.seq = 0
        self.on_answer = None
        self.on_lost = None
        self.t_start = time.perf_counter()
        self.t_open = None
        self.pings = 0
        self.commands = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(_HANDSHAKE.format(path=self.path, extra=self.extra).encode())

    def connection_lost(self, exc) -> None:
        self.is_open = False
        if self.on_lost is not None:
            self.on_lost(self)
            self.on_lost = None
        if not self.opened.done():
            self.opened.set_result(False)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.is_open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.status = int(buf[9:12])
            if self.status != 101:
                for line in buf[:end].split(b"\r\n"):
                    if line.lower().startswith(b"retry-after:"):
                        self.retry_after = float(line.split(b":", 1)[1])
            buf = buf[end + 4:]
            if self.status != 101:
                self.transport.close()
                self.opened.set_result(False)
                return
            self.is_open = True
            self.t_open = time.perf_counter()
            self.opened.set_result(True)
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if n - pos < head + length:
                break
            payload = buf[pos + head:pos + head + length]
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 1:
                self.text(payload)
            elif opcode == 9:
                self.pings += 1
                self.transport.write(encode(payload, 0xA))
            elif opcode == 8:
                self.transport.write(encode(payload[:2], 0x8))
                self.transport.close()
                self.is_open = False
                break
        self.buf = buf[pos:] if pos < n else b""

    def text(self, payload: bytes) -> None:
        frame = orjson.loads(payload)
        kind, message_id = frame[0], frame[1]
        sent = self.pending.pop(message_id, None)
        if sent is not None:  # an answer to our CALL (or its echo)
            if self.on_answer is not None:
                self.on_answer(self, time.perf_counter() - sent, kind)
            return
        if kind == 2:  # a CSMS command: accept it at once
            self.commands += 1
            self.transport.write(encode(b'[3,"' + message_id.encode() + b'",{"status":"Accepted"}]'))

    def call(self, tail: bytes) -> None:
        self.seq += 1
        message_id = str(self.seq)
        self.pending[message_id] = time.perf_counter()
        self.transport.write(encode(b'[2,"' + message_id.encode() + b'"' + tail))

    def close(self) -> None:
        if self.is_open:
            self.transport.write(encode(b"\x03\xe8", 0x8))
        self.closed = asyncio.get_running_loop().create_future()
        self.transport.close()


#: the TLS session a charger offers, read by L{_ResumingContext} when
#: asyncio wraps the charger's socket (inside the charger's own task)
_OFFER: contextvars.ContextVar = contextvars.ContextVar("offer", default=None)


class _ResumingContext(ssl.SSLContext):
    """
    A client context whose connections offer the session in L{_OFFER}:
    asyncio's C{create_connection} has no argument for a session to resume.
    """

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None,
                 session=None):
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname,
                                session or _OFFER.get())


#: the newest TLS version the chargers offer (L{Runner.prepare_tls})
_TLS_VERSION = [ssl.TLSVersion.MAXIMUM_SUPPORTED]


def _client_tls(certfile: str = "") -> ssl.SSLContext:
    """
    A charger's TLS context (the bench's server certificate is
    self-signed: not verified); with C{certfile} (certificate and key),
    for profile 3.
    """
    context = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = _TLS_VERSION[0]
    if certfile:
        context.load_cert_chain(certfile)
    return context


def _basic(identity: str) -> str:
    """The Authorization header of profile 2: the bench's password is the identity."""
    import base64

    token = base64.b64encode(f"{identity}:{identity}".encode()).decode()
    return f"Authorization: Basic {token}\r\n"


async def _drained(chargers, timeout: float) -> None:
    """Wait until no charger has a CALL outstanding (or C{timeout})."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and any(c.pending for c in chargers if c.is_open):
        await asyncio.sleep(0.05)


#: Linux's IP_BIND_ADDRESS_NO_PORT: bind() to a source address without
#: taking a port yet; connect() picks one that is free for that peer, so
#: one source address serves the whole ephemeral range per gateway port.
_BIND_ADDRESS_NO_PORT = 24


class Runner:
    """
    The chargers of one load-generator process. With a C{source} address
    (127.0.0.2, ...) its sockets connect from there instead of 127.0.0.1:
    every (source, destination) pair has its own ephemeral port range
    (about 28,000 ports here), so several processes with several sources
    hold more chargers than one address could.
    """

    def __init__(self, index: int, source: Optional[str] = None) -> None:
        self.index = index
        self.source = source
        self.chargers: list[Charger] = []
        #: the URL each charger connected to, for reconnect
        self.urls: dict = {}
        #: wss: URL -> the charger's TLS context, and its last session
        self.tls: dict = {}
        self.sessions: dict = {}
        self._shared_tls = None

    def _tls_for(self, url: str) -> ssl.SSLContext:
        context = self.tls.get(url)
        if context is None:
            if self._shared_tls is None:
                self._shared_tls = _client_tls()
            context = self._shared_tls
        return context

    async def prepare_tls(self, urls, certdir="", version=""):
        """
        Make each wss charger's TLS context now (not during a storm); with
        C{certdir}, each loads its client certificate C{<identity>.pem}.

        @param version: the newest TLS version offered (C{"1.2"}, C{"1.3"}).
        """
        if version:
            _TLS_VERSION[0] = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
        self._shared_tls = None
        for url in urls:
            identity = url.rsplit("/", 1)[1]
            self.tls[url] = (_client_tls(f"{certdir}/{identity}.pem") if certdir
                             else self._tls_for(url))
        self.sessions.clear()
        return {"cpu": time.process_time()}

    async def forget_sessions(self):
        self.sessions.clear()
        return {"cpu": time.process_time()}

    async def _open(self, loop, factory, host: str, port: int, tls) -> None:
        """Connect one socket (from C{self.source} when set)."""
        if self.source is None:
            await loop.create_connection(factory, host, port, ssl=tls)
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        await loop.create_connection(factory, sock=sock, ssl=tls,
                                     server_hostname="localhost" if tls else None)

    async def connect(self, urls, boot=True, spread=0.0, retries=0, basic=False):
        """
        Connect every URL at once; each sends BootNotification when open.
        A charger refused with 503 tries again after its Retry-After, up to
        C{retries} times (a real charger does, and a storm may be answered
        503 + Retry-After by design); C{retried} counts those retries.

        wss chargers offer the TLS session they kept from their last
        connection, as a charger does after a blip; C{resumed} counts the
        handshakes that resumed one.

        @param basic: send Basic credentials (profile 2).
        """
        loop = asyncio.get_running_loop()
        connect_lat = array("d")
        boot_lat = array("d")
        refused: dict = {}
        retried = [0]
        resumed = [0]
        done = loop.create_future()
        remaining = [len(urls)]
        last = [0.0]

        def finished():
            remaining[0] -= 1
            if remaining[0] == 0 and not done.done():
                done.set_result(None)

        def answered(charger, _latency, kind):
            if kind == CALLERROR:
                # not booted: nothing answered it (an unroutable publish,
                # no CSMS worker on the broker the gateway uses)
                refused["BootNotification answered CALLERROR"] = \
                    refused.get("BootNotification answered CALLERROR", 0) + 1
            else:
                boot_lat.append(time.perf_counter() - charger.t_start)
            charger.on_answer = None
            charger.on_lost = None
            last[0] = time.time()
            finished()

        def lost_before_boot(_charger):
            refused["closed before its boot was answered"] = \
                refused.get("closed before its boot was answered", 0) + 1
            finished()

        async def one(url):
            scheme, rest = url.split("://", 1)
            host_port, path = rest.split("/", 1)
            host, port = host_port.split(":")
            identity = path.rsplit("/", 1)[1]
            context = None
            if scheme == "wss":
                context = self._tls_for(url)
                _OFFER.set(self.sessions.get(url))
            t_first = time.perf_counter()
            for attempt in range(retries + 1):
                opened = loop.create_future()
                charger = Charger("/" + path, opened, _basic(identity) if basic else "")
                try:
                    await self._open(loop, lambda: charger, host, int(port), context)
                except OSError as error:
                    refused[type(error).__name__] = refused.get(type(error).__name__, 0) + 1
                    finished()
                    return
                if await opened:
                    break
                if charger.status == 503 and attempt < retries:
                    retried[0] += 1
                    await asyncio.sleep(charger.retry_after or 1.0)
                    continue
                key = str(charger.status or "dropped")
                refused[key] = refused.get(key, 0) + 1
                finished()
                return
            # latencies from the first attempt: a retry is part of the wait
            charger.t_start = t_first
            connect_lat.append(charger.t_open - charger.t_start)
            if context is not None:
                # read after the 101: TLS 1.3 tickets have arrived by then
                tls = charger.transport.get_extra_info("ssl_object")
                self.sessions[url] = tls.session
                resumed[0] += tls.session_reused
            self.chargers.append(charger)
            self.urls[charger] = url
            if boot:
                charger.on_answer = answered
                charger.on_lost = lost_before_boot
                charger.call(BOOT)
            else:
                last[0] = time.time()
                finished()

        started = time.time()
        cpu0 = time.process_time()
        tasks = []
        for i, url in enumerate(urls):
            tasks.append(loop.create_task(one(url)))
            if spread and i % 100 == 99:
                await asyncio.sleep(spread)
        if urls:
            await done
        return {
            "connected": len(connect_lat), "booted": len(boot_lat), "refused": refused,
            "retried": retried[0], "resumed": resumed[0],
            "started": started, "last": last[0],
            "connect": connect_lat.tobytes(), "boot": boot_lat.tobytes(),
            "cpu": time.process_time() - cpu0,
        }

    async def closed_loop(self, seconds, chargers=None):
        """Every charger keeps one Heartbeat CALL outstanding for C{seconds}."""
        lat = array("d")
        errors = [0]
        stop = [False]
        # spread over all of them (not the first to connect: with several
        # gateway workers those may all be on the one that started first)
        active = self.chargers if chargers is None \
            else self.chargers[::max(1, len(self.chargers) // chargers)][:chargers]

        def answered(charger, latency, kind):
            if kind == CALLERROR:
                errors[0] += 1
            else:
                lat.append(latency)
            if not stop[0]:
                charger.call(HEARTBEAT)

        cpu0 = time.process_time()
        for charger in active:
            charger.on_answer = answered
            charger.call(HEARTBEAT)
        await asyncio.sleep(seconds)
        stop[0] = True
        count = len(lat)
        # drain: answers still in flight would otherwise queue ahead of the
        # next phase's CALLs and inflate its latencies
        await _drained(active, 30.0)
        for charger in active:
            charger.on_answer = None
            charger.pending.clear()
        return {"count": count, "errors": errors[0], "lat": lat.tobytes(),
                "cpu": time.process_time() - cpu0}

    async def open_loop(self, rate, seconds, mix=("Heartbeat",)):
        """
        Offer C{rate} CALLs/s spread over the chargers for C{seconds}, the
        actions of C{mix} (names in L{CALLS}) in turn.
        """
        loop = asyncio.get_running_loop()
        lat = array("d")
        errors = [0]
        chargers = [c for c in self.chargers if c.is_open]

        def answered(_charger, latency, kind):
            if kind == CALLERROR:
                errors[0] += 1
            else:
                lat.append(latency)

        for charger in chargers:
            charger.on_answer = answered
        cpu0 = time.process_time()
        start = loop.time()
        sent = 0
        i = 0
        total = int(rate * seconds)
        tails = [CALLS[name] for name in mix]
        while sent < total:
            due = int((loop.time() - start) * rate) + 1
            while sent < min(due, total):
                # each charger in turn gets one of each: rounds of the mix
                chargers[i].call(tails[(sent // len(chargers)) % len(tails)])
                i = (i + 1) % len(chargers)
                sent += 1
            await asyncio.sleep(0.001)
        await _drained(chargers, 10.0)
        lost = sum(len(c.pending) for c in chargers)
        for charger in chargers:
            charger.on_answer = None
            charger.pending.clear()
        return {"sent": sent, "answered": len(lat), "errors": errors[0], "lost": lost,
                "lat": lat.tobytes(),
                "cpu": time.process_time() - cpu0}

    async def reconnect(self, retries=0):
        """
        Connect again (and boot) every charger whose connection was
        closed, as a real charger does after its gateway went away.
        """
        gone = [c for c in self.chargers if not c.is_open]
        self.chargers = [c for c in self.chargers if c.is_open]
        urls = [self.urls.pop(c) for c in gone]
        return await self.connect(urls, retries=retries)

    async def idle(self, seconds):
        cpu0 = time.process_time()
        pings0 = sum(c.pings for c in self.chargers)
        await asyncio.sleep(seconds)
        return {"open": sum(c.is_open for c in self.chargers),
                "pings": sum(c.pings for c in self.chargers) - pings0,
                "cpu": time.process_time() - cpu0}

    async def stats(self):
        return {"open": sum(c.is_open for c in self.chargers),
                "commands": sum(c.commands for c in self.chargers),
                "cpu": time.process_time()}

    async def close(self):
        closing = []
        for charger in self.chargers:
            charger.close()
            closing.append(charger.closed)
        if closing:
            await asyncio.wait(closing, timeout=10)
        self.chargers = []
        self.urls = {}
        return {"cpu": time.process_time()}


async def _serve(pipe, index: int, source: Optional[str]) -> None:
    loop = asyncio.get_running_loop()
    runner = Runner(index, source)
    while True:
        name, kwargs = await loop.run_in_executor(None, pipe.recv)
        if name == "exit":
            return
        try:
            result = await getattr(runner, name)(**kwargs)
        except Exception as error:  # report, do not hang the orchestrator
            result = {"error": repr(error)}
        pipe.send(result)


def main(pipe, index: int, source: Optional[str] = None) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve(pipe, index, source))
