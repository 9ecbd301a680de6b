// A shared list through automerge-repo. The page's URL says where to sync and what:
//   ?ws=ws://HOST:PORT/&token=aspen-token-v1:...[&doc=automerge:...]
// Without `doc`, the page creates a list and puts its URL in the address bar, so the same
// list opens in another tab (with another member's `ws`, say).

import { Repo, initializeBase64Wasm } from "@automerge/automerge-repo/slim"
import { automergeWasmBase64 } from "@automerge/automerge/automerge.wasm.base64"
import { BrowserWebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const $ = (id) => document.getElementById(id)
const params = new URLSearchParams(location.search)
const status = (text, kind = "") => {
  $("status").textContent = text
  $("status").className = kind
}

async function main() {
  const ws = params.get("ws")
  const token = params.get("token")
  if (!ws || !token) {
    status("Open this page with ?ws=ws://HOST:PORT/&token=... (see the example's README).", "error")
    return
  }
  await initializeBase64Wasm(automergeWasmBase64)
  const url = new URL(ws)
  url.searchParams.set("token", token)
  const adapter = new BrowserWebSocketClientAdapter(url.toString(), 1000)
  adapter.on("peer-candidate", ({ peerId }) => status(`connected to ${url.host} (${peerId})`, "ok"))
  adapter.on("peer-disconnected", () => status(`disconnected from ${url.host}; retrying`, "error"))
  const repo = new Repo({ network: [adapter] })

  let handle
  if (params.get("doc")) {
    handle = await repo.find(params.get("doc"))
  } else {
    handle = repo.create({ items: [] })
    params.set("doc", handle.url)
    history.replaceState(null, "", `?${params}`)
  }
  $("doc").textContent = handle.url
  $("doc").dataset.url = handle.url

  const render = () => {
    const doc = handle.doc()
    const list = $("items")
    list.replaceChildren(
      ...(doc?.items ?? []).map((item, i) => {
        const li = document.createElement("li")
        const text = document.createElement("span")
        text.textContent = String(item)
        const remove = document.createElement("button")
        remove.textContent = "✕"
        remove.title = "remove"
        remove.onclick = () => handle.change((d) => d.items.splice(i, 1))
        li.append(text, remove)
        return li
      }),
    )
  }
  handle.on("change", render)
  render()

  $("add").onsubmit = (e) => {
    e.preventDefault()
    const text = $("text").value.trim()
    if (!text) return
    handle.change((d) => d.items.push(text))
    $("text").value = ""
  }
  document.body.dataset.ready = "true"
}

main().catch((e) => status(String(e), "error"))
