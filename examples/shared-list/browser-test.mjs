// Two pages of the shared list in headless Chromium (Debian's, /usr/bin/chromium), each
// syncing through a different Aspen member: an item added in one appears in the other, both
// ways. Used by node/tests/integration/automerge_repo.rs:
//   node browser-test.mjs PAGE_URL WS_A WS_B TOKEN SCREENSHOT.png
// Prints one JSON line: {"ok": true, ...} or {"ok": false, "error": ...}.
import { chromium } from "playwright-core"

const [page, wsA, wsB, token, screenshot] = process.argv.slice(2)
const WAIT_MS = Number(process.env.WAIT_MS ?? 60_000)
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium"
const open = (ws, doc) => {
  const u = new URL(page)
  u.searchParams.set("ws", ws)
  u.searchParams.set("token", token)
  if (doc) u.searchParams.set("doc", doc)
  return u.toString()
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
})
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 480 } })
  const a = await context.newPage()
  const b = await context.newPage()
  const errors = []
  for (const p of [a, b]) p.on("pageerror", (e) => errors.push(String(e)))

  await a.goto(open(wsA))
  await a.waitForSelector("body[data-ready=true]", { timeout: WAIT_MS })
  await a.waitForSelector("#status.ok", { timeout: WAIT_MS })
  const doc = await a.getAttribute("#doc", "data-url")
  await a.fill("#text", "milk (from member A)")
  await a.click("#add button")

  await b.goto(open(wsB, doc))
  await b.waitForSelector("body[data-ready=true]", { timeout: WAIT_MS })
  await b.waitForSelector("#items li:has-text('milk (from member A)')", { timeout: WAIT_MS })
  await b.fill("#text", "bread (from member B)")
  await b.click("#add button")
  await a.waitForSelector("#items li:has-text('bread (from member B)')", { timeout: WAIT_MS })

  const items = async (p) => p.$$eval("#items li span", (spans) => spans.map((s) => s.textContent))
  const [itemsA, itemsB] = [await items(a), await items(b)]
  // Both pages side by side in one picture: page A above, page B below.
  await a.screenshot({ path: screenshot.replace(/\.png$/, "-a.png") })
  await b.screenshot({ path: screenshot.replace(/\.png$/, "-b.png") })
  const same = JSON.stringify(itemsA) === JSON.stringify(itemsB)
  console.log(JSON.stringify({ ok: same && errors.length === 0, doc, itemsA, itemsB, errors }))
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e?.stack ?? e) }))
} finally {
  await browser.close()
}
