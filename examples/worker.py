#!/usr/bin/env python3
"""
A small CSMS worker for ocppgw, written with nothing but pika.

It shows both directions of ocppgw's AMQP contract (docs/amqp-contract.md,
"AMQP contract for back-end authors"):

``serve``
    Declares its own durable queue, binds it to the OCPP exchange for the
    CALLs it can answer -- BootNotification, Heartbeat and
    StatusNotification of OCPP 1.6 and 2.0/2.0.1/2.1 -- and for the gateway's
    presence events, and answers every CALL with a CALLRESULT shaped for the
    charger's version. The answer is published to the exchange with the
    routing key the message's ``reply_to`` names (the charger identity), and
    the CALL is acknowledged only after the broker has confirmed the answer,
    so a worker that dies halfway gets the CALL again.

    CALLs of other actions are not bound, so no queue takes them and the
    gateway itself answers the charger with CALLERROR ``NotImplemented``.

    The queue outlives the worker (a restart loses nothing) but not by
    long: it is declared with ``x-expires`` (``--expires``, 30 minutes), so
    RabbitMQ deletes it once no worker has consumed it for that long, and
    it stops collecting every charger's frames on a shared broker.
    ``--purge`` drops what it collected while no worker ran.

``clean``
    Deletes the worker's queue now, with whatever waits in it.

``call IDENTITY ACTION [PAYLOAD]``
    Sends one CALL to a charger (routing key = its identity) with RabbitMQ's
    direct reply-to, waits for the charger's answer and prints it. Exit
    status: 0 CALLRESULT, 1 CALLERROR (the charger's, or the gateway's
    timeout error), 3 no answer in ``--timeout`` seconds, 4 no charger queue
    (the charger never connected, or its queue expired), 5 broker error.

Examples::

    python examples/worker.py serve
    python examples/worker.py serve --purge        # forget what came meanwhile
    python examples/worker.py clean                # delete the queue
    python examples/worker.py call CP1 Reset '{"type": "Soft"}'
    python examples/worker.py call CP1 GetConfiguration        # 1.6, payload {}

The defaults of ``--url`` and ``--exchange`` are those of etc/ocppgw.ini.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import time
import uuid

import pika
import pika.exceptions

#: Defaults of [amqp] url and [amqp] exchange in etc/ocppgw.ini.
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_EXCHANGE = "ocpp"
DEFAULT_QUEUE = "csms.example-worker"
#: Seconds the worker's queue is kept with no consumer (its x-expires).
DEFAULT_EXPIRES = 1800

#: RabbitMQ's direct reply-to pseudo-queue: no queue to declare or clean up.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

#: First word of ocppgw's routing keys, per OCPP version.
VERSION_PREFIXES = ("ocpp16", "ocpp20", "ocpp201", "ocpp21")

#: Header ocppgw sets on the StatusNotification it publishes for a charger
#: that went away; nobody is there to receive an answer to it.
HEADER_SYNTHETIC = "x-ocppgw-synthetic"
#: Header ocppgw sets on the CALLERROR it publishes when a charger did not
#: answer a command within [ocpp] call_timeout.
HEADER_TIMEOUT = "x-ocppgw-timeout"

#: Seconds between Heartbeats that BootNotification asks of a charger.
HEARTBEAT_INTERVAL = 300

# exit statuses of "call"
EXIT_RESULT, EXIT_ERROR, EXIT_TIMEOUT, EXIT_NO_CHARGER, EXIT_BROKER = 0, 1, 3, 4, 5

CALL, CALLRESULT, CALLERROR = 2, 3, 4


def say(text: str) -> None:
    """One line on stdout, at once (the tests wait for lines)."""
    print(text, flush=True)


def now() -> str:
    """The current UTC time as OCPP wants it (RFC 3339 with a Z)."""
    moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# -- serve -------------------------------------------------------------------

# The answers, per OCPP generation. 1.6 and 2.0.1 agree on these three
# response payloads except for optional fields; 2.0 and 2.1 use 2.0.1's.


def boot_notification(payload: dict) -> dict:
    # 1.6 BootNotification.conf and 2.0.1 BootNotificationResponse: the same
    # three required fields.
    return {"status": "Accepted", "currentTime": now(), "interval": HEARTBEAT_INTERVAL}


def heartbeat(payload: dict) -> dict:
    return {"currentTime": now()}


def status_notification(payload: dict) -> dict:
    # 1.6 StatusNotification.conf and 2.0.1 StatusNotificationResponse are
    # empty objects.
    return {}


HANDLERS = {
    "BootNotification": boot_notification,
    "Heartbeat": heartbeat,
    "StatusNotification": status_notification,
}


def describe(action: str, version: str, payload: dict) -> str:
    """A short human line about a CALL (what a real CSMS would store)."""
    if action == "BootNotification":
        if version == "ocpp1.6":
            return f"{payload.get('chargePointVendor')} {payload.get('chargePointModel')}"
        station = payload.get("chargingStation", {})
        return f"{station.get('vendorName')} {station.get('model')} ({payload.get('reason')})"
    if action == "StatusNotification":
        if version == "ocpp1.6":
            return f"connector {payload.get('connectorId')} {payload.get('status')}"
        return (
            f"EVSE {payload.get('evseId')} connector {payload.get('connectorId')} "
            f"{payload.get('connectorStatus')}"
        )
    return ""


class Worker:
    def __init__(self, channel, exchange: str) -> None:
        self.channel = channel
        self.exchange = exchange

    def on_message(self, channel, method, properties, body: bytes) -> None:
        headers = properties.headers or {}
        if method.routing_key.startswith("ocppgw."):
            self.on_event(body)
        else:
            try:
                self.on_call(properties, headers, body)
            except pika.exceptions.NackError:
                # The broker did not take the answer: let the CALL come
                # back and answer it again.
                channel.basic_nack(method.delivery_tag, requeue=True)
                return
        # Only now, with the answer confirmed, is the CALL done with.
        channel.basic_ack(method.delivery_tag)

    def on_event(self, body: bytes) -> None:
        event = json.loads(body)
        say(
            f"{event.get('identity')} {event.get('event')} "
            f"({event.get('version')}, gateway {event.get('node')})"
        )

    def on_call(self, properties, headers, body: bytes) -> None:
        identity = properties.reply_to
        version = headers.get("x-ocpp-version", "?")
        frame = json.loads(body)
        if frame[0] != CALL:
            return  # an OCPP 2.1 SEND: it is never answered
        _, message_id, action, payload = frame
        if headers.get(HEADER_SYNTHETIC):
            # Published by the gateway when the charger went away: record
            # it, but do not answer -- the charger never sent this CALL.
            say(f"{identity} is offline (StatusNotification from the gateway)")
            return
        handler = HANDLERS.get(action)
        if handler is None:
            return  # not bound by us; someone bound the queue by hand
        answer = handler(payload)
        say(f"{identity} {version} {action} {describe(action, version, payload)}".rstrip())
        try:
            # The channel is in confirm mode: this returns once the broker
            # has the answer, and raises if it could not route it.
            self.channel.basic_publish(
                self.exchange,
                identity,
                json.dumps([CALLRESULT, message_id, answer]).encode(),
                pika.BasicProperties(content_type="application/json", delivery_mode=2),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            # The charger's queue is gone (it expired): nobody to answer.
            say(f"{identity}: no queue to answer {action} to")


def serve(options) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(options.url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(options.exchange, exchange_type="topic", durable=True)
    try:
        declared = channel.queue_declare(
            options.queue, durable=True,
            arguments={"x-expires": int(options.expires * 1000)},
        )
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 406:  # PRECONDITION_FAILED
            raise
        print(
            f"queue {options.queue} exists with other arguments ({error.reply_text}); "
            f"delete it with: {sys.argv[0]} clean --queue {options.queue}",
            file=sys.stderr,
        )
        connection.close()
        return 1
    if options.purge:
        purged = channel.queue_purge(options.queue).method.message_count
        say(f"purged {purged} messages that waited in {options.queue}")
    elif declared.method.message_count:
        say(
            f"{declared.method.message_count} messages waited in {options.queue} "
            "(answered now; --purge drops them)"
        )
    keys = [
        f"{prefix}.{action}.req" for prefix in VERSION_PREFIXES for action in HANDLERS
    ]
    keys += ["ocppgw.connected", "ocppgw.disconnected"]
    for key in keys:
        channel.queue_bind(options.queue, options.exchange, routing_key=key)
    channel.basic_qos(prefetch_count=50)
    worker = Worker(channel, options.exchange)
    channel.basic_consume(options.queue, worker.on_message)
    say(
        f"ready: consuming {options.queue} on exchange {options.exchange} "
        f"(deleted after {options.expires:g} s unused)"
    )
    try:
        channel.start_consuming()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass
    return 0


def clean(options) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(options.url))
    channel = connection.channel()
    try:
        deleted = channel.queue_delete(options.queue).method.message_count
    finally:
        if connection.is_open:
            connection.close()
    say(f"deleted {options.queue} ({deleted} messages)")
    return 0


# -- call --------------------------------------------------------------------


def call(options) -> int:
    try:
        payload = json.loads(options.payload)
    except ValueError as error:
        print(f"PAYLOAD is not JSON: {error}", file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print("PAYLOAD must be a JSON object", file=sys.stderr)
        return 2
    message_id = str(uuid.uuid4())  # 36 characters, the OCPP-J maximum
    frame = json.dumps([CALL, message_id, options.action, payload]).encode()

    connection = pika.BlockingConnection(pika.URLParameters(options.url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(options.exchange, exchange_type="topic", durable=True)
    answers = []

    def on_reply(_channel, _method, properties, body):
        if properties.correlation_id == message_id:
            answers.append((properties, body))

    # Direct reply-to: consume the pseudo-queue (no-ack) on the channel that
    # publishes, before publishing.
    channel.basic_consume(DIRECT_REPLY_TO, on_reply, auto_ack=True)
    try:
        channel.basic_publish(
            options.exchange,
            options.identity,  # the routing key of a charger is its identity
            frame,
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                reply_to=DIRECT_REPLY_TO,
                correlation_id=message_id,
                # If the charger is offline the command waits in its queue;
                # let it expire when we stop waiting, rather than run later
                # with nobody to see the answer.
                expiration=str(int(options.timeout * 1000)),
            ),
            mandatory=True,
        )
    except pika.exceptions.UnroutableError:
        print(
            f"no queue for charger {options.identity!r}: it never connected "
            "to a gateway on this exchange, or its queue expired",
            file=sys.stderr,
        )
        connection.close()
        return EXIT_NO_CHARGER

    deadline = time.monotonic() + options.timeout
    while not answers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        connection.process_data_events(time_limit=remaining)
    connection.close()
    if not answers:
        print(
            f"no answer from {options.identity!r} within {options.timeout:g} s",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT

    properties, body = answers[0]
    sys.stdout.write(body.decode("utf-8") + "\n")
    answer = json.loads(body)
    if answer[0] == CALLRESULT:
        return EXIT_RESULT
    code, description = answer[2], answer[3]
    if (properties.headers or {}).get(HEADER_TIMEOUT):
        print(f"the charger did not answer in time: {description}", file=sys.stderr)
    else:
        print(f"the charger answered {code}: {description}", file=sys.stderr)
    return EXIT_ERROR


# -- command line --------------------------------------------------------------


def parse_arguments(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=DEFAULT_URL, help="AMQP URL of the broker (default: %(default)s)"
    )
    common.add_argument(
        "--exchange",
        default=DEFAULT_EXCHANGE,
        help="ocppgw's exchange, [amqp] exchange in its config (default: %(default)s)",
    )
    parser = argparse.ArgumentParser(
        description="Example CSMS worker for ocppgw (pika, no framework)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    queue = argparse.ArgumentParser(add_help=False)
    queue.add_argument(
        "--queue",
        default=DEFAULT_QUEUE,
        help="name of the worker's durable queue (default: %(default)s)",
    )
    serve_parser = commands.add_parser(
        "serve",
        parents=[common, queue],
        help="answer BootNotification, Heartbeat and StatusNotification",
    )
    serve_parser.add_argument(
        "--expires",
        type=float,
        default=DEFAULT_EXPIRES,
        help="seconds the queue is kept while no worker consumes it, its x-expires "
        "(default: %(default)s)",
    )
    serve_parser.add_argument(
        "--purge",
        action="store_true",
        help="drop the messages that waited in the queue before serving",
    )
    serve_parser.set_defaults(run=serve)

    clean_parser = commands.add_parser(
        "clean", parents=[common, queue], help="delete the worker's queue and what waits in it"
    )
    clean_parser.set_defaults(run=clean)

    call_parser = commands.add_parser(
        "call", parents=[common], help="send a CALL to a charger and print its answer"
    )
    call_parser.add_argument("identity", help="the charger identity")
    call_parser.add_argument("action", help="the OCPP action, e.g. Reset")
    call_parser.add_argument(
        "payload", nargs="?", default="{}", help="the payload as a JSON object (default: %(default)s)"
    )
    call_parser.add_argument(
        "--timeout",
        type=float,
        default=35.0,
        help="seconds to wait for the answer (default 35: a little longer "
        "than the gateway's call_timeout, whose timeout error is printed)",
    )
    call_parser.set_defaults(run=call)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse_arguments(argv)
    # twistd, systemd and the tests stop us with SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return options.run(options)
    except pika.exceptions.AMQPError as error:
        print(f"broker error: {error!r}", file=sys.stderr)
        return EXIT_BROKER


if __name__ == "__main__":
    sys.exit(main())
