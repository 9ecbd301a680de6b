// Load from real automerge-repo clients into an Aspen cluster's --automerge-repo listeners
// (BENCHMARKS.md "automerge-repo apps"):
//
//   node bench.mjs throughput URL_A URL_B CLIENTS CHANGES
//       CLIENTS repos connected to member A share one list; each pushes CHANGES items as
//       fast as automerge-repo sends them; a repo on member B waits for every item.
//       Prints changes/s (all items / time until B has them all).
//   node bench.mjs latency URL_A URL_B ROUNDS
//       One repo on member A sets a counter, one on member B waits to see it, ROUNDS times
//       in a row. Prints p50/p90/p99/max in ms: app A's change to app B's view, through
//       the cluster (commit through Raft included).
//
// URLs carry the token (?token=...). automerge-repo sends a document's changes at most every
// 100 ms per peer (its DocSynchronizer's throttle), which is part of what apps see.

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const WAIT_MS = Number(process.env.WAIT_MS ?? 300_000)
const out = (o) => console.log(JSON.stringify(o))

async function connect(name, url) {
  const adapter = new WebSocketClientAdapter(url, 500)
  const repo = new Repo({ network: [adapter], peerId: `${name}-${process.pid}` })
  const server = await new Promise((res) => adapter.once("peer-candidate", res))
  return { repo, server }
}

function stored(handle, storageId) {
  const has = () => {
    const info = handle.getSyncInfo(storageId)
    return info && handle.heads().every((h) => info.lastHeads.includes(h))
  }
  return new Promise((res) => {
    const check = () => {
      if (has()) {
        handle.off("remote-heads", check)
        res()
      }
    }
    handle.on("remote-heads", check)
    check()
  })
}

function until(handle, pred) {
  return new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error("timed out")), WAIT_MS)
    const check = () => {
      const d = handle.doc()
      if (d && pred(d)) {
        clearTimeout(t)
        handle.off("change", check)
        res(d)
      }
    }
    handle.on("change", check)
    check()
  })
}

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]

async function throughput([urlA, urlB, clients, changes]) {
  ;[clients, changes] = [Number(clients), Number(changes)]
  const first = await connect("w0", urlA)
  const doc = first.repo.create({ items: [] })
  await stored(doc, first.server.peerMetadata.storageId)
  const writers = [first]
  for (let i = 1; i < clients; i++) writers.push(await connect(`w${i}`, urlA))
  const handles = [doc]
  for (const w of writers.slice(1)) handles.push(await w.repo.find(doc.url))
  const reader = await connect("r", urlB)
  const seen = await reader.repo.find(doc.url)
  const total = clients * changes
  const started = performance.now()
  await Promise.all(
    handles.map(async (h, c) => {
      for (let i = 0; i < changes; i++) {
        h.change((d) => d.items.push(`${c}:${i}`))
        // Let the repo's timers (its sync throttle) and the socket run.
        await new Promise((r) => setImmediate(r))
      }
    }),
  )
  await until(seen, (d) => d.items.length === total)
  const secs = (performance.now() - started) / 1000
  out({ mode: "throughput", clients, changes: total, secs, changes_per_sec: total / secs })
  for (const r of [...writers, reader]) await r.repo.shutdown()
  process.exit(0)
}

async function latency([urlA, urlB, rounds]) {
  rounds = Number(rounds)
  const A = await connect("a", urlA)
  const doc = A.repo.create({ n: 0 })
  await stored(doc, A.server.peerMetadata.storageId)
  const B = await connect("b", urlB)
  const seen = await B.repo.find(doc.url)
  const times = []
  for (let i = 1; i <= rounds; i++) {
    const t0 = performance.now()
    doc.change((d) => {
      d.n = i
    })
    await until(seen, (d) => d.n === i)
    times.push(performance.now() - t0)
  }
  times.sort((x, y) => x - y)
  out({
    mode: "latency",
    rounds,
    p50_ms: pct(times, 50),
    p90_ms: pct(times, 90),
    p99_ms: pct(times, 99),
    max_ms: times[times.length - 1],
  })
  await A.repo.shutdown()
  await B.repo.shutdown()
  process.exit(0)
}

const [mode, ...args] = process.argv.slice(2)
const modes = { throughput, latency }
if (!modes[mode]) {
  console.error("usage: node bench.mjs throughput|latency ...")
  process.exit(2)
}
modes[mode](args).catch((e) => {
  console.error(e)
  process.exit(1)
})
