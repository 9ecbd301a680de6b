// Serves this directory's page (index.html and dist/app.js) on loopback:
//   node serve.mjs [PORT]   (0 or nothing: a free port). Prints the page's address.
import http from "node:http"
import { readFile } from "node:fs/promises"
import { fileURLToPath } from "node:url"
import path from "node:path"

const root = path.dirname(fileURLToPath(import.meta.url))
const files = {
  "/": ["index.html", "text/html; charset=utf-8"],
  "/index.html": ["index.html", "text/html; charset=utf-8"],
  "/dist/app.js": ["dist/app.js", "text/javascript; charset=utf-8"],
}
const server = http.createServer(async (req, res) => {
  const file = files[new URL(req.url, "http://x").pathname]
  if (!file) {
    res.writeHead(404).end("not found\n")
    return
  }
  try {
    const body = await readFile(path.join(root, file[0]))
    res.writeHead(200, { "content-type": file[1], "cache-control": "no-store" }).end(body)
  } catch {
    res.writeHead(500).end(`${file[0]} is missing: run npm run build\n`)
  }
})
server.listen(Number(process.argv[2] ?? 0), "127.0.0.1", () => {
  console.log(`http://127.0.0.1:${server.address().port}/`)
})
