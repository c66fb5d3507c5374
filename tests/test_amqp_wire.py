"""
The directly encoded publish and ack frames are byte for byte pika's.
"""

from pika import frame, spec
from twisted.trial import unittest

from ocppgw.amqp.wire import (
    FixedHeaders, encode_ack, encode_basic_consume, encode_publish, encode_queue_bind,
    encode_queue_declare,
)


def pika_publish(channel, frame_max, exchange, routing_key, mandatory, body, properties):
    out = [
        frame.Method(channel, spec.Basic.Publish(
            exchange=exchange, routing_key=routing_key, mandatory=mandatory)).marshal(),
        frame.Header(channel, len(body), properties).marshal(),
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        out.append(frame.Body(channel, body[start:start + chunk]).marshal())
    return b"".join(out)


class PublishTests(unittest.TestCase):
    def test_all_properties(self):
        headers = {"x-ocpp-identity": "CP 1|é", "x-ocpp-version": "ocpp1.6",
                   "x-ocppgw-node": "gw:1", "x-ocppgw-timeout": True}
        ours = encode_publish(
            3, 131072, "ocpp", "ocpp16.Heartbeat.req", True, b'[2,"1","Heartbeat",{}]',
            content_type="application/json", headers=headers, persistent=True,
            correlation_id="1", reply_to="CP 1|é", message_id="3.abcd.17",
            timestamp=1700000000, type="Heartbeat", app_id="ocppgw",
        )
        theirs = pika_publish(
            3, 131072, "ocpp", "ocpp16.Heartbeat.req", True, b'[2,"1","Heartbeat",{}]',
            spec.BasicProperties(
                content_type="application/json", headers=headers, delivery_mode=2,
                correlation_id="1", reply_to="CP 1|é", message_id="3.abcd.17",
                timestamp=1700000000, type="Heartbeat", app_id="ocppgw",
            ),
        )
        self.assertEqual(ours, theirs)
        # a charger's fixed headers: encoded on first use, then kept
        fixed = FixedHeaders(headers)
        self.assertIsNone(fixed.encoded)
        self.assertEqual(ours, encode_publish(
            3, 131072, "ocpp", "ocpp16.Heartbeat.req", True, b'[2,"1","Heartbeat",{}]',
            content_type="application/json", headers=fixed, persistent=True,
            correlation_id="1", reply_to="CP 1|é", message_id="3.abcd.17",
            timestamp=1700000000, type="Heartbeat", app_id="ocppgw",
        ))
        self.assertIn(fixed.encoded, ours)
        fixed.encoded = b"\x00\x00\x00\x00"  # what a second publish uses
        # flags (headers, delivery mode), the kept table, delivery mode 2
        self.assertIn(b"\x30\x00" + b"\x00\x00\x00\x00" + b"\x02", encode_publish(
            3, 131072, "ocpp", "k", True, b"", headers=fixed, persistent=True))

    def test_few_properties_and_default_exchange(self):
        ours = encode_publish(1, 4096, "", "amq.rabbitmq.reply-to.x", False, b"[3]",
                              correlation_id="c", message_id="m")
        theirs = pika_publish(1, 4096, "", "amq.rabbitmq.reply-to.x", False, b"[3]",
                              spec.BasicProperties(correlation_id="c", message_id="m"))
        self.assertEqual(ours, theirs)

    def test_body_split_into_frames(self):
        body = bytes(range(256)) * 40  # 10240 bytes over 4096-byte frames
        ours = encode_publish(2, 4096, "ocpp", "k", False, body, message_id="m")
        theirs = pika_publish(2, 4096, "ocpp", "k", False, body,
                              spec.BasicProperties(message_id="m"))
        self.assertEqual(ours, theirs)

    def test_empty_body_has_no_body_frame(self):
        ours = encode_publish(2, 4096, "ocpp", "k", False, b"")
        self.assertEqual(ours, pika_publish(2, 4096, "ocpp", "k", False, b"",
                                            spec.BasicProperties()))

    def test_unhashable_header_value(self):
        headers = {"list": [1, 2]}
        ours = encode_publish(2, 4096, "ocpp", "k", False, b"x", headers=headers)
        self.assertEqual(ours, pika_publish(2, 4096, "ocpp", "k", False, b"x",
                                            spec.BasicProperties(headers=headers)))

    def test_too_long_short_string(self):
        self.assertRaises(ValueError, encode_publish, 1, 4096, "ocpp", "k" * 256, False, b"x")


class AckTests(unittest.TestCase):
    def test_ack(self):
        for tag, multiple in ((1, False), (2**40 + 5, True)):
            self.assertEqual(
                encode_ack(7, tag, multiple),
                frame.Method(7, spec.Basic.Ack(delivery_tag=tag, multiple=multiple)).marshal(),
            )


class DeclareTests(unittest.TestCase):
    def test_queue_declare(self):
        arguments = {"x-expires": 604800000, "x-message-ttl": 300000,
                     "x-queue-type": "classic", "x-single-active-consumer": True}
        for durable in (True, False):
            for nowait in (True, False):
                self.assertEqual(
                    encode_queue_declare(5, "ocpp.CP 1|é", durable=durable, nowait=nowait,
                                         arguments=arguments),
                    frame.Method(5, spec.Queue.Declare(
                        queue="ocpp.CP 1|é", durable=durable, nowait=nowait,
                        arguments=arguments)).marshal(),
                )
        self.assertEqual(
            encode_queue_declare(1, "q", durable=True, nowait=True),
            frame.Method(1, spec.Queue.Declare(queue="q", durable=True, nowait=True)).marshal(),
        )

    def test_queue_bind(self):
        self.assertEqual(
            encode_queue_bind(7, "ocpp.CP 1|é", "ocpp", "CP 1|é"),
            frame.Method(7, spec.Queue.Bind(
                queue="ocpp.CP 1|é", exchange="ocpp", routing_key="CP 1|é")).marshal(),
        )

    def test_basic_consume(self):
        self.assertEqual(
            encode_basic_consume(4, "ocpp.CP 1|é", "ocppgw.ab12.7"),
            frame.Method(4, spec.Basic.Consume(
                queue="ocpp.CP 1|é", consumer_tag="ocppgw.ab12.7")).marshal(),
        )
