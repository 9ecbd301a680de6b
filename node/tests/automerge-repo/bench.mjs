// Load from real automerge-repo clients into an Aspen cluster's --automerge-repo listeners
// (BENCHMARKS.md "automerge-repo apps"):
//
//   node bench.mjs throughput URL_A URL_B CLIENTS CHANGES
//       CLIENTS repos connected to member A, each in a process of its own (as apps in
//       their own browsers), share one list; each pushes CHANGES items as fast as
//       automerge-repo sends them; a repo on member B waits for every item. Prints
//       changes/s (all items / time from the start signal until B has them all).
//   node bench.mjs latency URL_A URL_B ROUNDS
//       One repo on member A sets a counter, one on member B waits to see it, ROUNDS times,
//       150 ms apart. Prints p50/p90/p99/max in ms: app A's change to app B's view, through
//       the cluster (commit through Raft, the other member applying it and pushing it).
//
// URLs carry the token (?token=...). automerge-repo sends a document's changes at most every
// 100 ms (its DocSynchronizer's throttle: a change waits until 100 ms after the previous
// send); the latency rounds are 150 ms apart so that they measure the cluster, not that wait.

import { connect, stored, until } from "./common.mjs"

const out = (o) => console.log(JSON.stringify(o))

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]

async function throughput([urlA, urlB, clients, changes]) {
  ;[clients, changes] = [Number(clients), Number(changes)]
  const first = await connect("w0", urlA)
  const doc = first.repo.create({ items: [] })
  await stored(doc, first.server.peerMetadata.storageId)
  const reader = await connect("r", urlB)
  const seen = await reader.repo.find(doc.url)
  // One process per writer; each says "ready" once it has the document, then waits for "go".
  const { spawn } = await import("node:child_process")
  const { createInterface } = await import("node:readline")
  const writers = []
  for (let c = 0; c < clients; c++) {
    const w = spawn(process.execPath, [process.argv[1], "writer", urlA, doc.url, String(changes), String(c)], {
      stdio: ["pipe", "pipe", "inherit"],
    })
    const lines = createInterface({ input: w.stdout })
    const ready = new Promise((res) => lines.once("line", res))
    writers.push({ w, ready })
  }
  await Promise.all(writers.map((w) => w.ready))
  const total = clients * changes
  const started = performance.now()
  for (const { w } of writers) w.stdin.write("go\n")
  await until(seen, (d) => d.items.length === total)
  const secs = (performance.now() - started) / 1000
  out({ mode: "throughput", clients, changes: total, secs, changes_per_sec: total / secs })
  for (const { w } of writers) w.kill()
  await first.repo.shutdown()
  await reader.repo.shutdown()
  process.exit(0)
}

// One writer process of `throughput`.
async function writer([url, docUrl, changes, tag]) {
  const W = await connect(`w${tag}`, url)
  const h = await W.repo.find(docUrl)
  console.log("ready")
  const { createInterface } = await import("node:readline")
  const lines = createInterface({ input: process.stdin })
  for await (const line of lines) if (line.trim() === "go") break
  for (let i = 0; i < Number(changes); i++) {
    h.change((d) => d.items.push(`${tag}:${i}`))
    // Let the repo's timers (its sync throttle) and the socket run.
    await new Promise((r) => setImmediate(r))
  }
  // Stay connected until the coordinator is done (it kills this process).
  await new Promise(() => {})
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
    await new Promise((r) => setTimeout(r, 150))
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
const modes = { throughput, writer, latency }
if (!modes[mode]) {
  console.error("usage: node bench.mjs throughput|latency ...")
  process.exit(2)
}
modes[mode](args).catch((e) => {
  console.error(e)
  process.exit(1)
})
