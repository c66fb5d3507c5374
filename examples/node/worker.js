#!/usr/bin/env node
/*
 * A CSMS worker for ocppgw in Node.js, with nothing but amqplib: proof that
 * the back end of the gateway is language-neutral. It follows the same AMQP
 * contract as examples/worker.py (docs/amqp-contract.md, "AMQP contract
 * for back-end authors").
 *
 *   node worker.js serve [--queue NAME]
 *       Declares a durable queue, binds it to the OCPP exchange for
 *       BootNotification and Heartbeat of every OCPP version, and answers
 *       each CALL with a CALLRESULT shaped for the charger's version,
 *       published to the exchange with the message's reply_to (the charger
 *       identity) as routing key. The CALL is acknowledged only once the
 *       broker has confirmed the answer. Prints "ready: ..." once consuming,
 *       then one line per CALL answered.
 *
 *   node worker.js call IDENTITY ACTION [PAYLOAD] [--timeout SECONDS]
 *       Sends one CALL to a charger (routing key = its identity) with
 *       RabbitMQ's direct reply-to and prints the charger's answer frame.
 *       Exit status: 0 CALLRESULT, 1 CALLERROR, 3 no answer in time,
 *       5 broker error.
 *
 * Both take --url (default amqp://guest:guest@127.0.0.1:5672/%2F) and
 * --exchange (default ocpp), the defaults of etc/ocppgw.ini.
 */
'use strict';

const crypto = require('node:crypto');
const amqp = require('amqplib');

const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';
const VERSION_PREFIXES = ['ocpp16', 'ocpp20', 'ocpp201', 'ocpp21'];
const HEARTBEAT_INTERVAL = 300;

function parseArguments(argv) {
  const options = {
    url: 'amqp://guest:guest@127.0.0.1:5672/%2F',
    exchange: 'ocpp',
    queue: 'csms.example-node-worker',
    timeout: 35,
    positional: [],
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--url' || arg === '--exchange' || arg === '--queue' || arg === '--timeout') {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      const value = argv[++i];
      options[arg.slice(2)] = arg === '--timeout' ? Number(value) : value;
    } else {
      options.positional.push(arg);
    }
  }
  return options;
}

function now() {
  return new Date().toISOString();
}

// Answers by action; the payloads of 1.6 and 2.0.1 agree for these two.
const HANDLERS = {
  BootNotification: () => ({ status: 'Accepted', currentTime: now(), interval: HEARTBEAT_INTERVAL }),
  Heartbeat: () => ({ currentTime: now() }),
};

async function serve(options) {
  const connection = await amqp.connect(options.url);
  const channel = await connection.createConfirmChannel();
  await channel.assertExchange(options.exchange, 'topic', { durable: true });
  await channel.assertQueue(options.queue, { durable: true });
  for (const prefix of VERSION_PREFIXES) {
    for (const action of Object.keys(HANDLERS)) {
      await channel.bindQueue(options.queue, options.exchange, `${prefix}.${action}.req`);
    }
  }
  await channel.prefetch(10);
  await channel.consume(options.queue, (message) => {
    if (message === null) return; // cancelled by the broker
    answer(channel, options.exchange, message).catch((error) => {
      console.error(`error: ${error.message}`);
      channel.nack(message, false, true);
    });
  });
  console.log(`ready: consuming ${options.queue} on exchange ${options.exchange}`);
  const stop = async () => {
    await connection.close();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

async function answer(channel, exchange, message) {
  const headers = message.properties.headers || {};
  const identity = message.properties.replyTo;
  let frame;
  try {
    frame = JSON.parse(message.content.toString('utf8'));
  } catch (error) {
    channel.reject(message, false);
    return;
  }
  const [type, messageId, action, payload] = frame;
  const handler = HANDLERS[action];
  // The gateway's own offline StatusNotification is not bound here, but a
  // worker must never answer a message marked synthetic.
  if (type !== 2 || !handler || !identity || headers['x-ocppgw-synthetic']) {
    channel.ack(message);
    return;
  }
  const body = Buffer.from(JSON.stringify([3, messageId, handler(payload)]));
  channel.publish(exchange, identity, body, {
    contentType: 'application/json',
    persistent: true,
  });
  await channel.waitForConfirms();
  channel.ack(message);
  console.log(`${identity} ${headers['x-ocpp-version']} ${action} answered`);
}

async function call(options) {
  const [identity, action, payloadText = '{}'] = options.positional;
  if (!identity || !action) throw new Error('usage: call IDENTITY ACTION [PAYLOAD]');
  const payload = JSON.parse(payloadText);
  const connection = await amqp.connect(options.url);
  try {
    const channel = await connection.createChannel();
    const correlationId = crypto.randomUUID();
    let resolveReply;
    const reply = new Promise((resolve) => { resolveReply = resolve; });
    // Direct reply-to: consume the pseudo-queue (no-ack) on the channel
    // that publishes, before publishing.
    await channel.consume(DIRECT_REPLY_TO, (message) => {
      if (message && message.properties.correlationId === correlationId) resolveReply(message);
    }, { noAck: true });
    const frame = [2, crypto.randomUUID(), action, payload];
    channel.publish(options.exchange, identity, Buffer.from(JSON.stringify(frame)), {
      contentType: 'application/json',
      persistent: true,
      replyTo: DIRECT_REPLY_TO,
      correlationId,
    });
    let timer;
    const timeout = new Promise((resolve) => {
      timer = setTimeout(() => resolve(null), options.timeout * 1000);
    });
    const message = await Promise.race([reply, timeout]);
    clearTimeout(timer);
    if (message === null) {
      console.error(`no answer from ${identity} within ${options.timeout} s`);
      return 3;
    }
    const text = message.content.toString('utf8');
    console.log(text);
    return JSON.parse(text)[0] === 3 ? 0 : 1;
  } finally {
    await connection.close();
  }
}

async function main() {
  const options = parseArguments(process.argv.slice(2));
  const command = options.positional.shift();
  if (command === 'serve') {
    await serve(options);
    return;
  }
  if (command === 'call') {
    process.exitCode = await call(options);
    return;
  }
  console.error('usage: node worker.js serve | call IDENTITY ACTION [PAYLOAD]');
  process.exitCode = 2;
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(5);
});
