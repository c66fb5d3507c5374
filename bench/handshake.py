"""
handshake: the gateway's CPU per TLS handshake, full and resumed, in
memory (no sockets, no WebSocket): the server side is the gateway's own
TLS context (L{ocppgw.tls.build_context}), the client a pyOpenSSL
connection offering the key shares a charger's TLS stack offers
(X25519, P-256); only the server's calls are timed (CPU time of this process,
C{time.process_time}), so the client's work is not counted.

For each server key (ECDSA P-256, RSA-2048), TLS version (1.2, 1.3) and
profile (2: no client certificate, 3: an ECDSA client certificate the
server verifies), prints the server CPU per full handshake, per resumed
handshake (a session ticket), and the ratio.

    python -m bench.handshake [-n 2000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from bench._common import make_certificate, print_table, write_json
from bench.storm import charger_certificates
from ocppgw.tls import TLSFiles, build_context

VERSIONS = {"TLS 1.2": SSL.TLS1_2_VERSION, "TLS 1.3": SSL.TLS1_3_VERSION}


def _client_context(version: int, certfile: str) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    # the key shares of a charger's TLS stack (and of the storm's clients,
    # Python's ssl on OpenSSL 3.0), not OpenSSL 4's post-quantum hybrid
    _lib.SSL_CTX_set1_curves_list(context._context, b"X25519:P-256")
    if certfile:
        context.use_certificate_chain_file(certfile)
        context.use_privatekey_file(certfile)
    return context


def handshake(server_context, client_context, session=None) -> tuple:
    """
    One handshake in memory: (server CPU seconds, the client's session,
    whether it was resumed).
    """
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    server_cpu = 0.0
    started = time.process_time()
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    server_cpu += time.process_time() - started
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        _move(client, server)
        started = time.process_time()
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        outgoing = _read(server)
        server_cpu += time.process_time() - started
        if outgoing:
            client.bio_write(outgoing)
        if server.get_state_string() == b"SSL negotiation finished successfully" and not outgoing:
            break
    try:
        client.recv(1)  # TLS 1.3 tickets follow the handshake
    except SSL.WantReadError:
        pass
    # as the gateway does (ocppgw.resumption) and CPython's ssl: freed
    # without a close_notify, OpenSSL would mark the session not resumable
    for side in (client, server):
        side.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
    return server_cpu, client.get_session(), bool(_lib.SSL_session_reused(client._ssl))


def _read(connection) -> bytes:
    try:
        return connection.bio_read(1 << 16)
    except SSL.WantReadError:
        return b""


def _move(source, target) -> None:
    data = _read(source)
    if data:
        target.bio_write(data)


def measure(server_context, client_context, count: int) -> dict:
    full = resumed = 0.0
    reused = 0
    for _ in range(count):
        cpu, session, _ = handshake(server_context, client_context)
        full += cpu
        cpu, _, was_reused = handshake(server_context, client_context, session)
        resumed += cpu
        reused += was_reused
    if reused != count:
        raise RuntimeError(f"only {reused} of {count} handshakes resumed")
    return {"full_us": full / count * 1e6, "resumed_us": resumed / count * 1e6}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--count", type=int, default=2000,
                        help="handshakes of each kind per configuration")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="bench-handshake-")
    cafile = charger_certificates(directory, ["CP1"])
    charger = os.path.join(directory, "CP1.pem")
    results, rows = [], []
    for key in ("ec", "rsa"):
        certfile, keyfile = make_certificate(key)
        for profile in (2, 3):
            files = TLSFiles(certfile=certfile, keyfile=keyfile,
                             cacertfile=cafile if profile == 3 else "",
                             verify_peer=profile == 3)
            server_context = build_context(files)
            for name, version in VERSIONS.items():
                client_context = _client_context(version, charger if profile == 3 else "")
                figures = measure(server_context, client_context, args.count)
                results.append({"key": key, "profile": profile, "version": name, **figures})
                rows.append((
                    f"{key} key, profile {profile}, {name}",
                    f"full {figures['full_us']:.0f} µs",
                    f"resumed {figures['resumed_us']:.0f} µs",
                    f"{figures['full_us'] / figures['resumed_us']:.1f}x",
                ))
    print_table(f"gateway CPU per TLS handshake (server side, {args.count} of each)", rows)
    write_json(args.json, {"benchmark": "handshake", "args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
