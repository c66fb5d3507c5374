"""
CSMS -> charger load: publishes CALLs to chargers' routing keys and times
the chargers' answers, which the gateway publishes as <version>.Reset.conf.

    python bench/commander.py AMQP_URL EXCHANGE SECONDS RATE IDENTITY...

RATE 0 = closed loop (each charger always has one command outstanding:
saturation); otherwise RATE commands/s round-robin over the chargers.
Prints one JSON line: count, latencies (sorted sample), CPU seconds.
"""

import json
import sys
import time

import pika

url, exchange, seconds, rate, *identities = sys.argv[1:]
seconds, rate = float(seconds), float(rate)
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
channel.queue_bind(queue, exchange, routing_key="ocpp16.Reset.conf")
sent = {}
latencies = []
seq = [0]
stopping = [False]


def command(identity):
    seq[0] += 1
    message_id = f"c{seq[0]}"
    sent[message_id] = time.perf_counter()
    channel.basic_publish(exchange, identity, b'[2,"' + message_id.encode() + b'","Reset",{"type":"Soft"}]')


def answered(_channel, _method, properties, _body):
    started = sent.pop(properties.correlation_id, None)
    if started is None:
        return
    latencies.append(time.perf_counter() - started)
    if rate == 0 and not stopping[0]:
        command(properties.reply_to)


channel.basic_consume(queue, answered, auto_ack=True)
cpu0 = time.process_time()
start = time.perf_counter()
if rate == 0:
    for identity in identities:
        command(identity)
    while time.perf_counter() - start < seconds:
        connection.process_data_events(time_limit=0.05)
    count = len(latencies)
else:
    i = 0
    total = int(rate * seconds)
    while seq[0] < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while seq[0] < due:
            command(identities[i % len(identities)])
            i += 1
        connection.process_data_events(time_limit=0.001)
    count = len(latencies)
stopping[0] = True
end = time.perf_counter() + 1.5
while time.perf_counter() < end:
    connection.process_data_events(time_limit=0.05)
cpu = time.process_time() - cpu0
print(json.dumps({"count": count, "answered": len(latencies), "lost": len(sent),
                  "lat": sorted(latencies), "cpu": cpu}), flush=True)
connection.close()
