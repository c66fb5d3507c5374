"""
The benchmark's CSMS worker: answers every CALL it receives with a
CALLRESULT, published to the exchange with the message's reply_to as
routing key and its correlation_id, as the README's worker does, but lean:
one auto-ack consumer with a large prefetch, no publisher confirms.

    python bench/worker.py AMQP_URL EXCHANGE QUEUE|- BINDING_KEY...

It prints "worker ready" once consuming, and its answered count on SIGTERM.
"""

import signal
import sys

import orjson
import pika

ANSWERS = {
    "BootNotification": b'{"currentTime":"2026-01-01T00:00:00Z","interval":300,"status":"Accepted"}',
    "Heartbeat": b'{"currentTime":"2026-01-01T00:00:00Z"}',
}


def main() -> None:
    url, exchange, queue, *keys = sys.argv[1:]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    if queue == "-":
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    else:  # shared by several workers
        channel.queue_declare(queue, auto_delete=True)
    for key in keys:
        channel.queue_bind(queue, exchange, routing_key=key)
    channel.basic_qos(prefetch_count=2000)
    count = [0]
    publish = channel.basic_publish

    def on_message(_channel, method, properties, body):
        frame = orjson.loads(body)
        action = frame[2] if len(frame) == 4 else ""
        answer = b'[3,"' + frame[1].encode() + b'",' + ANSWERS.get(action, b"{}") + b"]"
        publish(exchange, properties.reply_to, answer,
                pika.BasicProperties(correlation_id=properties.correlation_id))
        count[0] += 1

    channel.basic_consume(queue, on_message, auto_ack=True)

    def stop(*_):
        print(f"answered {count[0]}", flush=True)
        connection.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("worker ready", flush=True)
    channel.start_consuming()


if __name__ == "__main__":
    main()
