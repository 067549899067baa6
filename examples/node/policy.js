#!/usr/bin/env node
// A milter-bridge policy service in Node.js.
//
// The bridge speaks milter to Postfix or Sendmail and forwards SMTP events
// over gRPC; a policy service only implements the PolicyService of
// proto/milter_bridge/v1/policy.proto. This one:
//
//   * rejects RCPT TO:<blocked@example.test> with "550 5.7.1 blocked by node
//     policy" and lets every other recipient through;
//   * at end of message adds "X-Node-Policy: seen <n> recipients" and appends
//     a footer line to the body.
//
// Run it:   npm ci && node policy.js 127.0.0.1:50061
// and point the bridge at it:   milter-bridge --upstream 127.0.0.1:50061
//
// No code generation step: @grpc/proto-loader reads the .proto file at start.

'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// --- Loading the contract --------------------------------------------------

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');
const PROTO_FILE = path.join(PROTO_ROOT, 'milter_bridge', 'v1', 'policy.proto');

const packageDefinition = protoLoader.loadSync(PROTO_FILE, {
  includeDirs: [PROTO_ROOT],
  // Field names exactly as in the .proto (reply_expected, not replyExpected).
  keepCase: true,
  // uint64 fields (sequence, body_limit, body_size) become decimal strings:
  // a JavaScript number loses precision above 2^53. We never do arithmetic on
  // `sequence`; we only echo it back, and a string round-trips exactly.
  longs: String,
  // Enums as their names ('EVENT_MODE_DECIDE'), both when reading and when
  // writing; numbers are accepted on output too.
  enums: String,
  // bytes fields (header values, bodies) become Node Buffers. This is the
  // default; it is spelled out because it matters: on OUTPUT a bytes field
  // must be a Buffer (or Uint8Array). A plain JavaScript string given for a
  // bytes field is decoded as base64 by protobufjs, silently.
  bytes: Buffer,
  // Unset fields appear with their default values ('' / 0 / false / empty
  // Buffer / []), so `request.reply_expected` is always a boolean.
  defaults: true,
  // Each oneof gets a virtual field naming the member that is set:
  // request.event === 'rcpt_to', response.response === 'verdict'.
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(packageDefinition).milter_bridge.v1;

// --- What the policy declares (Describe) ------------------------------------

// Every event must have a mode: EVENT_MODE_UNSPECIFIED (0, what an omitted
// field means) makes the capabilities invalid. So list them all.
const CAPABILITIES = {
  events: {
    connect: 'EVENT_MODE_SKIP',
    helo: 'EVENT_MODE_SKIP',
    mail_from: 'EVENT_MODE_SKIP',
    // We decide on each recipient: the MTA waits for our answer.
    rcpt_to: 'EVENT_MODE_DECIDE',
    data: 'EVENT_MODE_SKIP',
    header: 'EVENT_MODE_SKIP',
    end_of_headers: 'EVENT_MODE_SKIP',
    // With BODY_DELIVERY_BUFFERED the body is not streamed (body must be SKIP):
    // the bridge collects it and hands it over in end_of_message.
    body: 'EVENT_MODE_SKIP',
    end_of_message: 'EVENT_MODE_DECIDE',
    unknown: 'EVENT_MODE_SKIP',
    abort: 'EVENT_MODE_SKIP',
  },
  // Not strictly needed with header/end_of_headers SKIP, but always valid.
  header_delivery: 'HEADER_DELIVERY_EACH',
  body_delivery: 'BODY_DELIVERY_BUFFERED',
  // The most body bytes end_of_message carries (uint64: a string or number).
  body_limit: String(256 * 1024),
  // The bridge collects the envelope and the headers without making the MTA
  // wait, and puts them into end_of_message: one round trip per message.
  end_of_message_content: { envelope: true, headers: true },
  // Exactly the modifications we make; anything else would be refused.
  actions: { add_header: true, replace_body: true },
};

// Any string that changes when CAPABILITIES change. The bridge echoes it in
// the first request of each stream (StreamStart), so that a policy restarted
// with other capabilities can refuse sessions negotiated with the old ones.
const FINGERPRINT =
  'node-example-' +
  crypto.createHash('sha256').update(JSON.stringify(CAPABILITIES)).digest('hex').slice(0, 16);

function describe(call, callback) {
  callback(null, { capabilities: CAPABILITIES, fingerprint: FINGERPRINT });
}

// --- The rules ----------------------------------------------------------------

const BLOCKED = '<blocked@example.test>';
const FOOTER = Buffer.from('-- \r\nChecked by the milter-bridge Node.js example policy.\r\n');

// Addresses come as the MTA sent them, normally in angle brackets; compare
// case-insensitively, as mail domains are.
function isBlocked(address) {
  return address.toLowerCase() === BLOCKED;
}

function verdict(action, reply) {
  return reply ? { action, reply } : { action };
}

// The answer to one rcpt_to event.
function onRcptTo(rcpt) {
  if (isBlocked(rcpt.address)) {
    return verdict('ACTION_REJECT', {
      code: 550,
      enhanced_code: '5.7.1',
      lines: ['blocked by node policy'],
    });
  }
  return verdict('ACTION_CONTINUE');
}

// The answer to end_of_message: modifications in order, then the verdict.
function onEndOfMessage(eom) {
  // The policy sees no mail_from or abort event here (both SKIP), so it
  // cannot tell where one message of a session ends and the next begins by
  // counting rcpt_to events. The envelope of end_of_message has the
  // recipients of this message only. It lists every RCPT TO the MTA sent,
  // also those this policy rejected, so apply the same rule again.
  const recipients = eom.envelope ? eom.envelope.recipients : [];
  const accepted = recipients.filter((r) => !r.rejected && !isBlocked(r.address)).length;

  const modifications = [
    // bytes: a Buffer, never a plain string (see `bytes` above).
    { add_header: { name: 'X-Node-Policy', value: Buffer.from(`seen ${accepted} recipients`) } },
  ];
  // A truncated body (longer than body_limit) must not be written back: the
  // message would lose its end. Only replace a body we have whole.
  if (!eom.body_truncated) {
    modifications.push({ replace_body: { body: Buffer.concat([eom.body, FOOTER]) } });
  }
  return { modifications, verdict: verdict('ACTION_CONTINUE') };
}

// --- One Process stream per SMTP session -------------------------------------

function process_(call) {
  let sessionId = '?';

  call.on('data', (request) => {
    // `request.event` names the oneof member that is set (oneofs: true).
    switch (request.event) {
      case 'start': {
        // The first request: how this session was negotiated.
        sessionId = request.start.session_id;
        const fp = request.start.fingerprint;
        if (fp !== '' && fp !== FINGERPRINT) {
          // Negotiated with capabilities we no longer have: refuse. The
          // bridge applies its failure action and calls Describe again.
          call.emit('error', {
            code: grpc.status.FAILED_PRECONDITION,
            details: `capabilities changed (have ${FINGERPRINT}, session has ${fp})`,
          });
        }
        return;
      }
      case 'rcpt_to':
        if (request.reply_expected) {
          call.write({ sequence: request.sequence, verdict: onRcptTo(request.rcpt_to) });
        }
        return;
      case 'end_of_message':
        if (request.reply_expected) {
          call.write({
            sequence: request.sequence,
            end_of_message: onEndOfMessage(request.end_of_message),
          });
        }
        return;
      default:
        // We asked for nothing else. An event we do not handle but that
        // expects a reply must still get exactly one, or the MTA waits
        // until the bridge's deadline.
        if (request.reply_expected) {
          call.write({ sequence: request.sequence, verdict: verdict('ACTION_CONTINUE') });
        }
    }
  });

  // The bridge half-closes the stream when the SMTP session ends: that is the
  // "close" event. Finish the call with status OK.
  call.on('end', () => call.end());

  // The bridge cancels a stream only on failure (e.g. its deadline passed).
  call.on('cancelled', () => {
    console.error(`session ${sessionId}: stream cancelled by the bridge`);
  });
  // Without an 'error' listener a failed write would crash the process.
  call.on('error', (err) => {
    console.error(`session ${sessionId}: ${err.message || err.details || err}`);
  });
}

// --- The server ----------------------------------------------------------------

function main() {
  const address = process.argv[2] || '127.0.0.1:50061';
  const server = new grpc.Server();
  server.addService(v1.PolicyService.service, { Describe: describe, Process: process_ });

  server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (err, port) => {
    if (err) {
      console.error(`cannot listen on ${address}: ${err.message}`);
      process.exit(1);
    }
    // grpc-js 1.10+ starts serving on bind; no server.start() needed.
    console.log(`node policy ${FINGERPRINT} listening on ${address} (port ${port})`);
  });

  // SIGTERM (systemd, Kubernetes, docker stop): stop accepting new streams,
  // let running SMTP sessions finish for a while, then cut the rest.
  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    console.log(`node policy stopping (${signal})`);
    const force = setTimeout(() => {
      console.log('node policy: sessions still open, closing them');
      server.forceShutdown();
      process.exit(0);
    }, 5000);
    force.unref();
    server.tryShutdown((error) => {
      clearTimeout(force);
      if (error) console.error(`shutdown: ${error.message}`);
      console.log('node policy stopped');
      process.exit(0);
    });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main();
