// A js-libp2p peer that checks mana speaks plain libp2p. Run by tests/interop_js.rs:
//
//   node peer.mjs --bootstrap <multiaddr> --node <multiaddr> --topic <t> [--topic <t>...]
//                 [--listen-topic <t>] [--publish <text>] [--timeout-ms <n>]
//
// It dials the mana bootstrap and the mana node over TCP (noise + yamux), waits for identify from both,
// subscribes to the topics with gossipsub restricted to /meshsub/1.1.0, waits until the node's subscription
// to every topic is seen, waits for one message on --listen-topic (a mana heartbeat), optionally publishes
// --publish on that topic, and prints one JSON object on stdout. Any failure prints {"error": ...} and exits 1.

// js-libp2p 3.x calls Promise.withResolvers (Node 22); Node 20 lacks it. Installed before libp2p loads,
// which is why the imports below are dynamic.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve
    let reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { ping } = await import('@libp2p/ping')
const { gossipsub } = await import('@libp2p/gossipsub')
const { multiaddr } = await import('@multiformats/multiaddr')

const GOSSIP_PROTOCOL = '/meshsub/1.1.0'

function parseArgs (argv) {
  const args = { topics: [], timeoutMs: 30000 }
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]]
    if (value === undefined) throw new Error(`missing value after ${flag}`)
    switch (flag) {
      case '--bootstrap': args.bootstrap = value; break
      case '--node': args.node = value; break
      case '--topic': args.topics.push(value); break
      case '--listen-topic': args.listenTopic = value; break
      case '--publish': args.publish = value; break
      case '--timeout-ms': args.timeoutMs = Number(value); break
      default: throw new Error(`unknown flag ${flag}`)
    }
  }
  if (!args.bootstrap || !args.node) throw new Error('--bootstrap and --node are required')
  return args
}

const hex = (bytes) => Buffer.from(bytes).toString('hex')
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Polls `check` until it returns a value other than undefined, or throws naming `what` at the deadline. */
async function until (deadline, what, check) {
  for (;;) {
    const value = await check()
    if (value !== undefined) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(50)
  }
}

async function main () {
  const args = parseArgs(process.argv.slice(2))
  const deadline = Date.now() + args.timeoutMs
  const identified = new Map()
  const messages = []

  const libp2p = await createLibp2p({
    start: false,
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      ping: ping(),
      pubsub: gossipsub({ allowPublishToZeroTopicPeers: false, emitSelf: false })
    }
  })
  // Speak only gossipsub v1.1, the version mana documents as its public one (the option of that name is not
  // read by this gossipsub version, so the list is set before start).
  libp2p.services.pubsub.protocols = [GOSSIP_PROTOCOL]
  await libp2p.start()
  libp2p.addEventListener('peer:identify', (evt) => {
    const { peerId, agentVersion, protocolVersion, protocols } = evt.detail
    identified.set(peerId.toString(), { agentVersion, protocolVersion, protocols })
  })
  libp2p.services.pubsub.addEventListener('message', (evt) => {
    const msg = evt.detail
    messages.push({ topic: msg.topic, from: msg.from?.toString() ?? null, data_hex: hex(msg.data) })
  })
  try {
    const report = {}
    for (const [role, addr] of [['bootstrap', args.bootstrap], ['node', args.node]]) {
      const ma = multiaddr(addr)
      const connection = await libp2p.dial(ma, { signal: AbortSignal.timeout(Math.max(1, deadline - Date.now())) })
      const peer = connection.remotePeer.toString()
      const info = await until(deadline, `identify from the ${role}`, () => identified.get(peer))
      const rtt = await libp2p.services.ping.ping(ma, { signal: AbortSignal.timeout(Math.max(1, deadline - Date.now())) })
      report[role] = {
        peer_id: peer,
        agent: info.agentVersion ?? null,
        protocol_version: info.protocolVersion ?? null,
        protocols: info.protocols,
        encryption: connection.encryption ?? null,
        multiplexer: connection.multiplexer ?? null,
        ping_ms: rtt
      }
    }

    for (const topic of args.topics) libp2p.services.pubsub.subscribe(topic)
    const nodePeer = report.node.peer_id
    await until(deadline, 'the node to be subscribed to every topic', () => {
      const all = args.topics.every((t) => libp2p.services.pubsub.getSubscribers(t).some((p) => p.toString() === nodePeer))
      return all ? true : undefined
    })
    report.node.subscribed_topics = args.topics.filter((t) =>
      libp2p.services.pubsub.getSubscribers(t).some((p) => p.toString() === nodePeer))
    report.node.gossip_streams = libp2p.getConnections()
      .filter((c) => c.remotePeer.toString() === nodePeer)
      .flatMap((c) => c.streams.map((s) => s.protocol))
      .filter((p) => p != null && p.startsWith('/meshsub/'))

    if (args.listenTopic) {
      report.message = await until(deadline, `a message on ${args.listenTopic}`, () =>
        messages.find((m) => m.topic === args.listenTopic && m.from === nodePeer))
    }
    if (args.publish !== undefined && args.listenTopic) {
      const result = await libp2p.services.pubsub.publish(args.listenTopic, new TextEncoder().encode(args.publish))
      report.published = { topic: args.listenTopic, recipients: result.recipients.map((p) => p.toString()) }
      // Give the message time to leave before the connection closes.
      await sleep(300)
    }
    report.local_peer_id = libp2p.peerId.toString()
    process.stdout.write(JSON.stringify(report) + '\n')
  } finally {
    await libp2p.stop()
  }
}

try {
  await main()
  process.exit(0)
} catch (err) {
  process.stdout.write(JSON.stringify({ error: String(err?.stack ?? err) }) + '\n')
  process.exit(1)
}
