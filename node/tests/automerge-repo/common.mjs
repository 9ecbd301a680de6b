// What repo-client.mjs and bench.mjs share: connecting a repo to Aspen members, and waiting
// on a document.

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

export const WAIT_MS = Number(process.env.WAIT_MS ?? 60_000)

/// Rejects after `ms` unless `p` settles first.
export function withTimeout(p, what, ms = WAIT_MS) {
  let t
  return Promise.race([
    p,
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms)
    }),
  ]).finally(() => clearTimeout(t))
}

/// A repo with one adapter per URL (retrying every 500 ms); resolves once every server
/// answered the join, with what each said of itself.
export async function connect(name, ...urls) {
  const adapters = urls.map((u) => new WebSocketClientAdapter(u, 500))
  const repo = new Repo({ network: adapters, peerId: `${name}-${process.pid}` })
  const servers = await withTimeout(
    Promise.all(adapters.map((a) => new Promise((res) => a.once("peer-candidate", res)))),
    `${name}: the server's peer message`,
  )
  return { repo, adapters, servers, server: servers[0] }
}

/// Resolves once the cluster (the server's storage) has the handle's current heads, as the
/// sync protocol reports them to the app.
export function stored(handle, storageId, what = "the cluster storing the document") {
  const has = () => {
    const info = handle.getSyncInfo(storageId)
    return info && handle.heads().every((h) => info.lastHeads.includes(h))
  }
  return withTimeout(
    new Promise((res) => {
      const check = () => {
        if (has()) {
          handle.off("remote-heads", check)
          res()
        }
      }
      handle.on("remote-heads", check)
      check()
    }),
    what,
  )
}

/// Resolves with the document once `pred(doc)` holds.
export function until(handle, pred, what = "the document") {
  return withTimeout(
    new Promise((res) => {
      const check = () => {
        const doc = handle.doc()
        if (doc && pred(doc)) {
          handle.off("change", check)
          res(doc)
        }
      }
      handle.on("change", check)
      check()
    }),
    what,
  )
}
