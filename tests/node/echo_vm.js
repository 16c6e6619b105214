#!/usr/bin/env node
// An echo server inside a VM, written against protos/hvsock/v1/hvsock.proto alone (loaded at
// run time with @grpc/proto-loader): it proves the API is usable without the Python library.
//
//   node echo_vm.js --host unix:/run/hvsock.sock --vm-id GUID --token TOKEN --service GUID
//
// Every option also reads the environment: HVSOCK_HOST, HVSOCK_VM_ID, HVSOCK_VM_TOKEN,
// HVSOCK_SERVICE_ID. It attaches as the VM, listens on (WILDCARD, service), accepts the
// channels offered, echoes every byte back over a ChannelData relay stream without ever sending
// beyond send_limit (the credit the host grants as the peer frees ring space), sends FIN after
// the peer's FIN, closes the channel once the peer has closed it, and after --connections
// channels (default 1) detaches and exits 0. Progress goes to stdout, one line each:
//   LISTENING <listener id>
//   OPENED <channel id>
//   ECHOED <channel id> <bytes>
//   DONE
// Any failure is printed to stderr and exits 1.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const MAX_FRAME = 65536;
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

/** One accepted channel: a ChannelData stream that echoes what it reads, within credit. */
class Echo {
  constructor(stub, session, channelId, onFinished) {
    this.channelId = channelId;
    this.onFinished = onFinished;
    this.limit = 0n; // latest send_limit: total bytes we may have sent
    this.sent = 0n;
    this.received = 0;
    this.pending = []; // Buffers read, not yet echoed
    this.peerFin = false;
    this.finSent = false;
    this.peerClosed = false;
    this.rescinded = false; // the host tore the channel down: its id is gone, no Close
    this.finished = false;
    this.call = stub.ChannelData();
    this.call.on('data', (frame) => this.onFrame(frame));
    this.call.on('error', (err) => {
      // The host ends the stream after a rescind or when the channel is gone; only an error
      // before our echo is complete is a failure.
      if (!this.finSent) fail(`channel ${channelId}: ChannelData: ${err.code} ${err.details}`);
    });
    this.call.on('end', () => this.maybeFinish());
    this.call.write({ open: { session, channel_id: channelId } });
  }

  onFrame(frame) {
    const limit = BigInt(frame.send_limit);
    if (limit > this.limit) this.limit = limit;
    if (frame.data && frame.data.length) {
      this.received += frame.data.length;
      this.pending.push(frame.data);
    }
    if (frame.fin) this.peerFin = true;
    this.pump();
  }

  pump() {
    while (this.pending.length && this.sent < this.limit) {
      const chunk = this.pending[0];
      const room = this.limit - this.sent;
      const take = Number(room < BigInt(MAX_FRAME) ? room : BigInt(MAX_FRAME));
      const piece = chunk.length <= take ? chunk : chunk.subarray(0, take);
      this.call.write({ data: piece });
      this.sent += BigInt(piece.length);
      if (piece.length === chunk.length) this.pending.shift();
      else this.pending[0] = chunk.subarray(piece.length);
    }
    if (this.peerFin && !this.pending.length && !this.finSent) {
      this.call.write({ fin: true });
      this.finSent = true;
      process.stdout.write(`ECHOED ${this.channelId} ${this.received}\n`);
    }
    this.maybeFinish();
  }

  peerClosedNow(rescinded) {
    this.peerClosed = true;
    this.rescinded = rescinded;
    this.maybeFinish();
  }

  maybeFinish() {
    // Close only after the peer closed: by then it has read our echo and FIN, so nothing we
    // wrote can be lost to the close.
    if (this.finished || !this.finSent || !this.peerClosed) return;
    this.finished = true;
    this.call.end();
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
  let session = '';
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
    const done = () => {
      echoes.delete(echo.channelId);
      finished += 1;
      if (finished >= options.connections) {
        detaching = true;
        process.stdout.write('DONE\n');
        attach.end();
      }
    };
    if (echo.rescinded) {
      done(); // after a rescind the channel id must not be used again, not even to close
      return;
    }
    request('close', { channel_id: echo.channelId }, (response) => {
      expect('ack', `close ${echo.channelId}`)(response);
      done();
    });
  }

  attach.on('data', (response) => {
    if (response.kind === 'welcome') {
      session = response.welcome.session;
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
      // force_relay: this client moves its bytes over ChannelData, never shared memory.
      request('accept', { channel_id: channelId, force_relay: true }, (accepted) => {
        const channel = expect('opened', `accept ${channelId}`)(accepted);
        if (channel.data_path !== 'DATA_PATH_GRPC_RELAY') {
          fail(`channel ${channelId}: data path ${channel.data_path}, wanted the relay`);
        }
        process.stdout.write(`OPENED ${channelId}\n`);
        echoes.set(channelId, new Echo(stub, session, channelId, onEchoFinished));
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
        // The host rescinds a channel once an end has closed it: the peer is done.
        echo.peerClosedNow(true);
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
