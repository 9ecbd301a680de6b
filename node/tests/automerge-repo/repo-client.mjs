// The real automerge-repo (2.5.6) with its WebSocket adapter, driven by
// node/tests/integration/automerge_repo.rs against aspen nodes' --automerge-repo listeners.
//
//   node repo-client.mjs converge URL_A URL_B N     two repos on two members edit one list
//   node repo-client.mjs await URL DOC_URL KEY JSON  wait until doc[KEY] equals the value
//   node repo-client.mjs failover URL1 URL2          lines on stdin/stdout, see failover()
//   node repo-client.mjs refused URL                  expects the upgrade to be refused
//   node repo-client.mjs unavailable URL DOC_URL      expects find() to report unavailable
//
// Every URL carries the token (?token=...). Output: one JSON object per line; the last one
// has "ok": true or "ok": false with "error". Every wait has a timeout (WAIT_MS).

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import readline from "node:readline"
import { connect, stored, until, withTimeout } from "./common.mjs"

const out = (o) => console.log(JSON.stringify(o))
const fail = (error) => {
  out({ ok: false, error: String(error?.stack ?? error) })
  process.exit(1)
}
process.on("uncaughtException", (e) => {
  if (mode === "refused") {
    // Node's ws turns a refused upgrade into an exception the adapter rethrows.
    out({ ok: true, refused: e.message })
    process.exit(0)
  }
  fail(e)
})

const plain = (v) => (v === undefined ? null : JSON.parse(JSON.stringify(v)))
const [mode, ...args] = process.argv.slice(2)

async function converge([urlA, urlB, n]) {
  n = Number(n)
  const A = await connect("A", urlA)
  const B = await connect("B", urlB)
  const a = A.repo.create({ items: [] })
  const storageId = A.servers[0].peerMetadata.storageId
  if (!storageId) fail("the server names no storage (peerMetadata.storageId)")
  await stored(a, storageId, "the cluster storing A's new document")
  // Concurrent edits: B finds the document while A keeps writing, then both write.
  const writes = (async () => {
    for (let i = 0; i < n; i++) {
      a.change((d) => d.items.push(`a${i}`))
      await new Promise((r) => setTimeout(r, 5))
    }
  })()
  const b = await withTimeout(B.repo.find(a.url), "B finding A's document")
  for (let i = 0; i < n; i++) {
    b.change((d) => d.items.push(`b${i}`))
    await new Promise((r) => setTimeout(r, 5))
  }
  await writes
  const full = (d) => d.items.length === 2 * n
  const [da, db] = await Promise.all([
    until(a, full, `A seeing ${2 * n} items`),
    until(b, full, `B seeing ${2 * n} items`),
  ])
  const same = JSON.stringify(plain(da)) === JSON.stringify(plain(db))
  out({ ok: same, url: a.url, items: plain(da).items, heads_a: a.heads(), heads_b: b.heads() })
  await Promise.all([A.repo.shutdown(), B.repo.shutdown()])
  process.exit(same ? 0 : 1)
}

async function awaitValue([url, docUrl, key, json]) {
  const want = JSON.parse(json)
  const C = await connect("C", url)
  const h = await withTimeout(C.repo.find(docUrl), "finding the document")
  const doc = await until(h, (d) => JSON.stringify(plain(d[key])) === JSON.stringify(want), `${key} = ${json}`)
  out({ ok: true, doc: plain(doc) })
  await C.repo.shutdown()
  process.exit(0)
}

// Connected to URL1 only: creates a document, says {"ready": url}; on the stdin line
// "killed" (URL1's node is gone) edits offline, connects to URL2, says {"moved": true}, then
// waits for doc.fromCli == 7 (set by the test through `aspen doc`).
async function failover([url1, url2]) {
  const R = await connect("R", url1)
  const h = R.repo.create({ before: 1 })
  out({ ready: h.url })
  const lines = readline.createInterface({ input: process.stdin })
  for await (const line of lines) {
    if (line.trim() === "killed") break
  }
  h.change((d) => {
    d.after = 2
  })
  const adapter = new WebSocketClientAdapter(url2, 500)
  const joined = new Promise((res) => adapter.once("peer-candidate", res))
  R.repo.networkSubsystem.addNetworkAdapter(adapter)
  await withTimeout(joined, "the second member's peer message")
  out({ moved: true })
  const doc = await until(h, (d) => d.fromCli === 7, "the CLI's change")
  out({ ok: true, doc: plain(doc) })
  await R.repo.shutdown()
  process.exit(0)
}

async function refused([url]) {
  const adapter = new WebSocketClientAdapter(url, 500)
  const repo = new Repo({ network: [adapter], peerId: `X-${process.pid}` })
  const joined = new Promise((res) => adapter.once("peer-candidate", res))
  await withTimeout(joined, "a refusal", 15_000).then(
    () => fail("the server accepted the connection"),
    (e) => fail(e),
  )
  await repo.shutdown()
}

async function unavailable([url, docUrl]) {
  const C = await connect("U", url)
  try {
    await withTimeout(C.repo.find(docUrl), "find")
    fail("the document was found")
  } catch (e) {
    out({ ok: /unavailable/.test(String(e)), error: String(e) })
  }
  await C.repo.shutdown()
  process.exit(0)
}

const modes = { converge, await: awaitValue, failover, refused, unavailable }
if (!modes[mode]) fail(`unknown mode '${mode}'`)
modes[mode](args).catch(fail)
