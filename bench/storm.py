"""
storm: N chargers connect at once, each sends BootNotification answered by
a worker. Run twice: new chargers (their queues are declared now) and the
same chargers returning (their queues exist).

Prints the time until all are booted, connect (TCP start -> 101) and boot
(TCP start -> BootNotification answer) latency percentiles, refusals, the
server's peak RSS and the CPU each process spent per charger.

With C{--tls} the chargers connect over wss:// with security profile 2
(Basic credentials, C{--security 2}) or 3 (a client certificate each), to
a server key of C{--key} (ECDSA P-256 or RSA-2048), and return twice:
once offering the TLS session they kept (as a charger does after a blip;
resumed handshakes) and once without it (full handshakes). The gateway's
CPU seconds of the two returning storms give what resumption saves.

    python -m bench.storm                     # 10,000 chargers, gateway
    python -m bench.storm -n 2000 --targets gateway,bridge,echo
    python -m bench.storm -n 50000 --set listener.workers=3 --own-broker
    python -m bench.storm --tls --security 3 --key rsa --tls-version 1.2

A charger refused with 503 tries again after its Retry-After (--retries
times): a refusal counts only when it was final.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench._common import (
    add_settings_argument, apply_settings,
    start_profile, stop_profile, loadgen_processes, LoadGen, broker_pid, delete_amqp, free_port, merge_samples, ms, percentiles,
    print_table, split, start_target, start_worker, unique, write_json, ws_url,
)
from bench.roundtrip import WORKER_KEYS, Meter


def one_storm(loadgen, urls, meter, retries: int = 0, basic: bool = False) -> dict:
    before = meter.snapshot()
    runs = loadgen.send([("connect", {"urls": part, "retries": retries, "basic": basic})
                         for part in split(urls, len(loadgen))])
    after = meter.snapshot()
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    refused: dict = {}
    for r in runs:
        for k, v in r["refused"].items():
            refused[k] = refused.get(k, 0) + v
    booted = sum(r["booted"] for r in runs)
    resumed = sum(r["resumed"] for r in runs)
    start = min(r["started"] for r in runs)
    last = max(r["last"] for r in runs)
    delta = Meter.delta(before, after)
    return {
        "chargers": len(urls), "booted": booted, "refused": refused, "resumed": resumed,
        "retried": sum(r.get("retried", 0) for r in runs),
        "cpu_seconds": {k: v for k, v in delta.items() if k != "t"},
        "seconds": last - start,
        "connect": percentiles(merge_samples(runs, "connect")),
        "boot": percentiles(merge_samples(runs, "boot")),
        "cpu_per_charger_us": {k: v / max(1, booted) * 1e6 for k, v in delta.items() if k != "t"},
    }


def charger_credentials(identities: list, security: int) -> tuple:
    """
    What the gateway needs to know the chargers, and the certificate
    directory of the load generators: (gateway settings, certdir).

    Profile 2: a password file whose hashes are scrypt with N=2 (the
    password is the identity), so that a storm measures TLS, not scrypt
    (at the production N=2^14 each check costs ~50 ms of a hash thread),
    and no login cache, so that each storm checks every password.
    Profile 3: a CA and an ECDSA P-256 certificate per charger.
    """
    directory = tempfile.mkdtemp(prefix="bench-chargers-")
    if security == 2:
        from ocppgw.auth import hash_password

        path = os.path.join(directory, "passwords")
        with open(path, "w") as out:
            for identity in identities:
                out.write(f"{identity}:{hash_password(identity.encode(), log_n=1)}\n")
        return ({"listener": {"ssl.profile": "2"},
                 "auth": {"password_file": path, "cache_ttl": "0", "failure_delay": "0"}}, "")
    if security == 3:
        cafile = charger_certificates(directory, identities)
        return {"listener": {"ssl.profile": "3", "ssl.cacertfile": cafile}}, directory
    return {}, ""


def charger_certificates(directory: str, identities: list) -> str:
    """A CA and C{<identity>.pem} (certificate and key) per charger; the CA's file."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])

    def certificate(subject, key, ca: bool):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))

    cafile = os.path.join(directory, "ca.pem")
    with open(cafile, "wb") as out:
        out.write(certificate(ca_name, ca_key, True).public_bytes(serialization.Encoding.PEM))
    for identity in identities:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])
        with open(os.path.join(directory, f"{identity}.pem"), "wb") as out:
            out.write(certificate(name, key, False).public_bytes(serialization.Encoding.PEM))
            out.write(key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return cafile


def bench_target(target: str, args) -> dict:
    exchange = unique("bench-storm")
    port = free_port()
    identities = [unique("st") for _ in range(args.chargers)]
    urls = [ws_url(port, i, args.tls) for i in identities]
    extra, certdir = charger_credentials(identities, args.security) if args.tls else ({}, "")
    server = start_target(target, port, exchange, ping=60, expires_ms=args.expires_ms,
                          tls=args.tls, key=args.key, extra=extra)
    worker = start_worker(exchange, WORKER_KEYS) if target != "echo" else None
    loadgen = LoadGen(loadgen_processes(args.chargers, args.procs))
    meter = Meter(server, worker, loadgen, broker_pid())
    result: dict = {"target": target}
    basic = args.tls and args.security == 2
    try:
        if args.tls:
            loadgen.send([("prepare_tls", {"urls": part, "certdir": certdir,
                                           "version": args.tls_version})
                          for part in split(urls, len(loadgen))])
        spy = start_profile(server.pid, args.profile) if args.profile and target == "gateway" else None
        result["new"] = one_storm(loadgen, urls, meter, args.retries, basic)
        stop_profile(spy)
        result["new"]["peak_rss"] = server.memory()["hwm"]
        loadgen.all("close")
        time.sleep(args.pause)
        spy = start_profile(server.pid, args.profile_returning) \
            if args.profile_returning and target == "gateway" else None
        result["returning"] = one_storm(loadgen, urls, meter, args.retries, basic)
        stop_profile(spy)
        result["returning"]["peak_rss"] = server.memory()["hwm"]
        loadgen.all("close")
        if args.tls:
            # the same chargers once more, without the sessions they kept
            time.sleep(args.pause)
            loadgen.all("forget_sessions")
            result["returning, full handshakes"] = one_storm(loadgen, urls, meter, args.retries,
                                                             basic)
            result["returning, full handshakes"]["peak_rss"] = server.memory()["hwm"]
            loadgen.all("close")
    finally:
        loadgen.close()
        if worker is not None:
            worker.stop()
        server.stop()
        if target == "gateway":
            result["cleanup_seconds"] = delete_amqp(exchange, ["ocpp." + i for i in identities])
        elif target == "bridge":
            delete_amqp(exchange, [])
    return result


def report(results, args) -> None:
    base = {r["target"]: r for r in results}
    for r in results:
        rows = []
        phases = [phase for phase in r if phase.startswith(("new", "returning"))]
        for phase in phases:
            s = r[phase]
            cpu = ", ".join(f"{k} {v:.0f} µs" for k, v in s["cpu_per_charger_us"].items())
            rows += [
                (f"{phase}: all booted", f"{s['seconds']:.2f} s",
                 f"{s['booted']} of {s['chargers']}", f"refused {s['refused'] or 0}",
                 f"retried after 503: {s['retried']}",
                 *([f"TLS sessions resumed {s['resumed']}"] if args.tls else [])),
                ("  connect latency", *(f"{k} {ms(v)}" for k, v in s["connect"].items())),
                ("  boot latency", *(f"{k} {ms(v)}" for k, v in s["boot"].items())),
                ("  CPU per charger", cpu),
                ("  CPU seconds", ", ".join(f"{k} {v:.2f} s" for k, v in s["cpu_seconds"].items())),
                ("  server peak RSS", f"{s['peak_rss'] / 2**20:.1f} MiB"),
            ]
            for ref in ("bridge", "echo"):
                if ref in base and ref != r["target"]:
                    other = base[ref][phase]
                    rows.append((
                        f"  vs {ref}",
                        f"time {s['seconds'] / max(other['seconds'], 1e-9):.2f}x",
                        f"server CPU {s['cpu_per_charger_us']['server'] / max(other['cpu_per_charger_us']['server'], 1e-9):.2f}x",
                    ))
        if "returning, full handshakes" in r:
            full = r["returning, full handshakes"]["cpu_seconds"]["server"]
            resumed = r["returning"]["cpu_seconds"]["server"]
            rows.append(("returning: server CPU, full / resumed handshakes",
                         f"{full:.2f} s / {resumed:.2f} s = {full / max(resumed, 1e-9):.2f}x"))
        over = (f"wss (TLS {args.tls_version}), profile {args.security}, {args.key} server key, "
                if args.tls else "")
        print_table(f"storm: {r['target']}, {over}{args.procs} load processes", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--chargers", type=int, default=10000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--targets", default="gateway")
    parser.add_argument("--retries", type=int, default=5,
                        help="times a charger refused with 503 tries again after Retry-After")
    parser.add_argument("--tls", action="store_true",
                        help="wss://; the chargers return twice: resuming their TLS session, and not")
    parser.add_argument("--security", type=int, choices=(0, 2, 3), default=2,
                        help="with --tls: security profile (2 = Basic, 3 = client certificates)")
    parser.add_argument("--key", choices=("ec", "rsa"), default="ec",
                        help="with --tls: the server key, ECDSA P-256 or RSA-2048")
    parser.add_argument("--tls-version", choices=("1.2", "1.3"), default="1.3",
                        help="with --tls: the newest TLS version the chargers offer")
    parser.add_argument("--pause", type=float, default=5.0,
                        help="seconds between the two storms (old connections close)")
    parser.add_argument("--expires-ms", type=int, default=600000,
                        help="x-expires of the charger queues: a safety net, they are deleted at the end")
    add_settings_argument(parser)
    parser.add_argument("--json")
    parser.add_argument("--profile", help="py-spy collapsed stacks of the gateway, new chargers' storm")
    parser.add_argument("--profile-returning",
                        help="py-spy collapsed stacks of the gateway, returning chargers' storm")
    args = parser.parse_args(argv)
    apply_settings(args)
    results = [bench_target(t, args) for t in args.targets.split(",")]
    report(results, args)
    write_json(args.json, {"benchmark": "storm", "args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
