#!/usr/bin/env node
// An echo server inside a VM, written against protos/hvsock/v1/hvsock.proto alone (loaded at
// run time with @grpc/proto-loader): it proves the API is usable without the Python library,
// and is an example to copy for a client in another language (README: "Writing a client in
// another language").
//
//   node echo_vm.js --host unix:/run/hvsock.sock --vm-id GUID --token TOKEN --service GUID
//
// Every option also reads the environment: HVSOCK_HOST, HVSOCK_VM_ID, HVSOCK_VM_TOKEN,
// HVSOCK_SERVICE_ID. It attaches as the VM (the Attach stream: control), listens on
// (WILDCARD, service), accepts the channels offered on the relay path, and moves every
// channel's bytes over the session's one SessionData stream: it echoes every byte back without
// ever sending beyond the channel's send limit (RelayFrame.credit from the host), grants
// receive credit as it echoes (so a peer faster than its echo waits), sends FIN after the
// peer's FIN, closes its end once the peer has closed, and after --connections channels
// (default 1) detaches and exits 0. Progress goes to stdout, one line each:
//   LISTENING <listener id>
//   OPENED <channel id>
//   ECHOED <channel id> <bytes>
//   DONE
// Any failure is printed to stderr and exits 1.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const MAX_FRAME_DATA = 262144; // the API's largest RelayFrame.data
const ACCEPTOR = 1; // RelayFrame.end of a channel this session accepted
const WILDCARD = '00000000-0000-0000-0000-000000000000';

function parseArgs(argv) {
  const options = {
    host: process.env.HVSOCK_HOST || '127.0.0.1:50051',
    vmId: process.env.HVSOCK_VM_ID || '',
    token: process.env.HVSOCK_VM_TOKEN || '',
    service: process.env.HVSOCK_SERVICE_ID || '',
    connections: 1,
    proto: path.resolve(__dirname, '..', '..', 'protos', 'hvsock', 'v1', 'hvsock.proto'),
  };
  const names = {
    '--host': 'host',
    '--vm-id': 'vmId',
    '--token': 'token',
    '--service': 'service',
    '--connections': 'connections',
    '--proto': 'proto',
  };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (key === undefined || i + 1 >= argv.length) {
      throw new Error(`usage: echo_vm.js [--host H] --vm-id GUID --token T --service GUID ` +
        `[--connections N] [--proto FILE] (bad argument ${argv[i]})`);
    }
    options[key] = argv[i + 1];
  }
  options.connections = Number(options.connections);
  for (const key of ['vmId', 'token', 'service']) {
    if (!options[key]) throw new Error(`missing ${key} (argument or environment)`);
  }
  if (!Number.isInteger(options.connections) || options.connections < 1) {
    throw new Error('--connections must be a positive integer');
  }
  return options;
}

function loadApi(protoFile) {
  const definition = protoLoader.loadSync(protoFile, {
    keepCase: true, // field names exactly as in the .proto (snake_case)
    longs: String, // uint64 ids and credits as decimal strings: no precision loss
    enums: String,
    defaults: true,
    oneofs: true, // the virtual `kind` field names the oneof member that is set
  });
  return grpc.loadPackageDefinition(definition).hvsock.v1;
}

function fail(message) {
  process.stderr.write(`echo_vm: ${message}\n`);
  process.exit(1);
}

/**
 * The session's SessionData stream: frames of every relayed channel, batched per message.
 * Each channel's frames stay in order; nothing else is ordered between channels.
 */
class SessionData {
  constructor(stub, session, onFrame) {
    this.call = stub.SessionData();
    this.call.on('data', (response) => {
      for (const frame of response.frames) onFrame(frame);
    });
    this.call.on('error', (err) => {
      if (!this.ending) fail(`SessionData: ${err.code} ${err.details}`);
    });
    this.pending = [];
    this.ending = false;
    this.call.write({ session, frames: [] }); // the first message names the session
  }

  /** Queue a frame; all frames queued in this turn of the event loop go in one message. */
  send(frame) {
    this.pending.push(frame);
    if (this.pending.length === 1) {
      setImmediate(() => {
        const frames = this.pending;
        this.pending = [];
        this.call.write({ frames });
      });
    }
  }

  end() {
    this.ending = true;
    this.call.end();
  }
}

/** One accepted channel: echoes what it reads, within the windows both ways. */
class Echo {
  constructor(data, channel, onFinished) {
    this.data = data;
    this.channelId = channel.channel_id; // a decimal string (longs: String)
    this.onFinished = onFinished;
    this.limit = BigInt(channel.relay_send_limit); // total bytes we may have sent
    this.window = BigInt(channel.relay_receive_window); // credit to keep ahead of our reads
    this.sent = 0n;
    this.echoed = 0n; // bytes taken from `pending` and sent back: what we have "read"
    this.granted = 0n;
    this.received = 0;
    this.pending = []; // Buffers received, not yet echoed
    this.peerFin = false;
    this.finSent = false;
    this.peerClosed = false;
    this.closing = false;
    this.finished = false;
    this.grant();
  }

  frame(fields) {
    this.data.send({ channel_id: this.channelId, end: ACCEPTOR, ...fields });
  }

  /** Receive credit: the host sends nothing before the first, and no more than the last. */
  grant() {
    const credit = this.echoed + this.window;
    // A quarter of the window at a time is enough to keep data flowing.
    if (credit - this.granted >= this.window / 4n || this.granted === 0n) {
      this.granted = credit;
      this.frame({ credit: credit.toString() });
    }
  }

  onFrame(frame) {
    const credit = BigInt(frame.credit);
    if (credit > this.limit) this.limit = credit;
    if (frame.data && frame.data.length) {
      this.received += frame.data.length;
      this.pending.push(frame.data);
    }
    if (frame.fin) this.peerFin = true;
    if (frame.reset) {
      // The host tore the channel down: its id is over on this stream. It does so once both
      // ends have sent FIN (the channel is closed), so after our FIN it is the normal end.
      if (!this.finSent) fail(`channel ${this.channelId} reset: ${frame.reset.message}`);
      this.finish();
      return;
    }
    if (frame.close_done) {
      this.finish();
      return;
    }
    this.pump();
  }

  pump() {
    while (this.pending.length && this.sent < this.limit) {
      const chunk = this.pending[0];
      const room = this.limit - this.sent;
      const most = room < BigInt(MAX_FRAME_DATA) ? Number(room) : MAX_FRAME_DATA;
      const piece = chunk.length <= most ? chunk : chunk.subarray(0, most);
      this.frame({ data: piece });
      this.sent += BigInt(piece.length);
      this.echoed += BigInt(piece.length);
      if (piece.length === chunk.length) this.pending.shift();
      else this.pending[0] = chunk.subarray(piece.length);
    }
    if (!this.peerFin) this.grant();
    if (this.peerFin && !this.pending.length && !this.finSent) {
      this.frame({ fin: true });
      this.finSent = true;
      process.stdout.write(`ECHOED ${this.channelId} ${this.received}\n`);
    }
    this.maybeClose();
  }

  peerClosedNow() {
    this.peerClosed = true;
    this.maybeClose();
  }

  maybeClose() {
    // Close only after the peer closed: by then it has read our echo and FIN, so nothing we
    // wrote can be lost to the close. The host answers close_done.
    if (this.closing || this.finished || !this.finSent || !this.peerClosed) return;
    this.closing = true;
    this.frame({ close: true });
  }

  finish() {
    if (this.finished) return;
    this.finished = true;
    this.onFinished(this);
  }
}

function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err.message}\n`);
    process.exit(2);
  }
  const api = loadApi(options.proto);
  const stub = new api.HostService(options.host, grpc.credentials.createInsecure());

  let nextId = 1;
  const pendingAnswers = new Map(); // request_id -> callback(response)
  const echoes = new Map(); // channel id -> Echo
  let data = null; // the session's SessionData stream, opened after the welcome
  let finished = 0;
  let detaching = false;

  const attach = stub.Attach();
  function request(kind, body, onAnswer) {
    const requestId = nextId++;
    pendingAnswers.set(String(requestId), onAnswer);
    attach.write({ request_id: requestId, [kind]: body });
  }
  function expect(kindWanted, what) {
    return (response) => {
      if (response.kind !== kindWanted) {
        const error = response.error || {};
        fail(`${what}: expected ${kindWanted}, got ${response.kind} ${error.code} ${error.message}`);
      }
      return response[kindWanted];
    };
  }

  function onEchoFinished(echo) {
    // Closed (close_done) or reset: the channel id is over on the data stream; no Close is
    // needed on the attach stream.
    echoes.delete(echo.channelId);
    finished += 1;
    if (finished >= options.connections) {
      detaching = true;
      process.stdout.write('DONE\n');
      data.end();
      attach.end();
    }
  }

  attach.on('data', (response) => {
    if (response.kind === 'welcome') {
      data = new SessionData(stub, response.welcome.session, (frame) => {
        // Frames for a channel already finished (crossed a reset) are dropped.
        const echo = echoes.get(frame.channel_id);
        if (echo !== undefined && frame.end === ACCEPTOR) echo.onFrame(frame);
      });
      request(
        'listen',
        // WILDCARD: connections from any partition allowed to reach this VM (the host).
        { address: { vm_id: WILDCARD, service_id: options.service }, backlog: 0 },
        (answer) => {
          const listening = expect('listening', 'listen')(answer);
          process.stdout.write(`LISTENING ${listening.listener_id}\n`);
        },
      );
      return;
    }
    const answer = pendingAnswers.get(response.request_id);
    if (answer !== undefined) {
      pendingAnswers.delete(response.request_id);
      answer(response);
      return;
    }
    if (response.kind === 'offer') {
      const channelId = response.offer.channel.channel_id;
      // force_relay: this client moves its bytes over SessionData, never shared memory.
      request('accept', { channel_id: channelId, force_relay: true }, (accepted) => {
        const channel = expect('opened', `accept ${channelId}`)(accepted);
        if (channel.data_path !== 'DATA_PATH_GRPC_RELAY') {
          fail(`channel ${channelId}: data path ${channel.data_path}, wanted the relay`);
        }
        process.stdout.write(`OPENED ${channelId}\n`);
        echoes.set(channelId, new Echo(data, channel, onEchoFinished));
      });
      return;
    }
    if (response.kind === 'notice') {
      const notice = response.notice;
      const echo = echoes.get(notice.channel_id);
      if (echo === undefined) return;
      if (notice.kind === 'KIND_RESCINDED' && !echo.finSent) {
        fail(`channel ${notice.channel_id} rescinded: ${notice.reason}`);
      } else if (notice.kind === 'KIND_RESCINDED') {
        // The host rescinds a channel once both ends sent FIN or one closed: the peer is done.
        echo.peerClosedNow();
      }
      return;
    }
    if (response.kind === 'error') {
      fail(`attach: unsolicited error ${response.error.code} ${response.error.message}`);
    }
  });
  attach.on('error', (err) => {
    if (detaching && err.code === grpc.status.CANCELLED) return;
    fail(`attach: ${err.code} ${err.details}`);
  });
  attach.on('end', () => {
    if (!detaching) fail('attach stream ended by the host');
    stub.close();
    process.exit(0);
  });

  attach.write({
    request_id: 0,
    hello: { vm_id: options.vmId, token: options.token, client: 'hvsock node echo_vm.js' },
  });
}

main();
