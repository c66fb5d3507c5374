#!/usr/bin/env python3
"""
A tiny charger simulator for trying ocppgw by hand (not a test tool: see
ocppgw.testing.FakeCharger for that).

It connects to ``<url>/<identity>`` offering one OCPP version, sends
BootNotification and StatusNotification shaped for that version, then
stays connected: it sends a Heartbeat every interval the CSMS asked for,
and answers every CALL from the CSMS with ``{"status": "Accepted"}``
(the shape of most OCPP command responses: Reset, ChangeAvailability,
RemoteStartTransaction, ...), except the few whose response has another
shape (GetConfiguration: no keys). Every frame is printed as it goes by.

It uses the ``websockets`` package, which ``make venv`` installs (it is in
ocppgw's ``test`` extra)::

    python examples/charger.py CP1                        # OCPP 1.6
    python examples/charger.py --version ocpp2.0.1 CP2
    python examples/charger.py 'RDAM 123'                 # percent-encoded in the URL

Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import uuid
from urllib.parse import quote

from websockets.sync.client import connect

CALL, CALLRESULT, CALLERROR = 2, 3, 4

#: responses that are not {"status": "Accepted"}, valid under the schemas
ANSWERS = {
    "GetConfiguration": {"configurationKey": []},  # 1.6: no keys to show
}


def say(text: str) -> None:
    print(text, flush=True)


def now() -> str:
    moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def boot_notification(version: str) -> dict:
    if version == "ocpp1.6":
        return {"chargePointVendor": "Example", "chargePointModel": "Simulator"}
    return {
        "reason": "PowerUp",
        "chargingStation": {"vendorName": "Example", "model": "Simulator"},
    }


def status_notification(version: str) -> dict:
    if version == "ocpp1.6":
        return {"connectorId": 1, "errorCode": "NoError", "status": "Available", "timestamp": now()}
    return {"timestamp": now(), "connectorStatus": "Available", "evseId": 1, "connectorId": 1}


class Charger:
    def __init__(self, websocket) -> None:
        self.websocket = websocket

    def send(self, frame: list) -> None:
        text = json.dumps(frame)
        say(f"> {text}")
        self.websocket.send(text)

    def receive(self, timeout=None) -> list:
        text = self.websocket.recv(timeout=timeout)
        say(f"< {text}")
        return json.loads(text)

    def call(self, action: str, payload: dict) -> list:
        """Send a CALL and wait for its answer, serving CSMS CALLs meanwhile."""
        message_id = str(uuid.uuid4())
        self.send([CALL, message_id, action, payload])
        while True:
            frame = self.receive()
            if frame[0] == CALL:
                self.answer(frame)
            elif frame[1] == message_id:
                return frame

    def answer(self, frame: list) -> None:
        _, message_id, action, payload = frame
        say(f"CSMS called {action} {json.dumps(payload)}: accepting")
        self.send([CALLRESULT, message_id, ANSWERS.get(action, {"status": "Accepted"})])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Charger simulator for ocppgw.")
    parser.add_argument("identity", help="the charger identity")
    parser.add_argument(
        "--url",
        default="ws://127.0.0.1:19520/ocpp",
        help="the gateway's URL without the identity (default: %(default)s)",
    )
    parser.add_argument(
        "--version",
        default="ocpp1.6",
        choices=["ocpp1.6", "ocpp2.0.1"],
        help="the OCPP subprotocol to offer (default: %(default)s)",
    )
    options = parser.parse_args(argv)
    # SIGTERM (the tests, a supervisor) stops it like Ctrl-C: a clean close.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    url = f"{options.url.rstrip('/')}/{quote(options.identity, safe='')}"
    # No permessage-deflate: OCPP-J frames are small and ocppgw does not
    # negotiate compression.
    with connect(url, subprotocols=[options.version], compression=None) as websocket:
        say(f"connected to {url} speaking {websocket.subprotocol}")
        charger = Charger(websocket)
        boot = charger.call("BootNotification", boot_notification(options.version))
        if boot[0] != CALLRESULT or boot[2].get("status") != "Accepted":
            say(f"BootNotification not accepted: {boot}")
            return 1
        interval = boot[2].get("interval") or 300
        say(f"BootNotification: Accepted, heartbeat every {interval} s")
        charger.call("StatusNotification", status_notification(options.version))
        try:
            while True:
                try:
                    frame = charger.receive(timeout=interval)
                except TimeoutError:
                    charger.call("Heartbeat", {})
                    continue
                if frame[0] == CALL:
                    charger.answer(frame)
        except KeyboardInterrupt:
            say("closing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
