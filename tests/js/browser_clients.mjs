// The automerge-repo checks of repo_clients.mjs, with the clients in a web page in
// headless Chromium: the page is bundled with esbuild, served from its own origin (so
// the node sees a cross-origin page that must bring its token), and driven with
// playwright-core. Environment: EDGE_A, HUB, EDGE_B, TOKEN_RW, TOKEN_RO as for
// repo_clients.mjs, and CHROMIUM (default /usr/bin/chromium).
import http from "node:http"
import fs from "node:fs"
import path from "node:path"
import { fileURLToPath } from "node:url"
import * as esbuild from "esbuild"
import { chromium } from "playwright-core"

const { EDGE_A, HUB, EDGE_B, TOKEN_RW, TOKEN_RO } = process.env
const NS = process.env.REPO_NS ?? "repo"
const here = path.dirname(fileURLToPath(import.meta.url))

let browser
async function fail(why) {
  console.error(`FAIL: ${why}`)
  await browser?.close()
  process.exit(1)
}

async function until(what, check, ms = 20000) {
  const start = Date.now()
  for (;;) {
    const v = await check()
    if (v) return v
    if (Date.now() - start > ms) await fail(`timed out waiting for ${what}`)
    await new Promise(r => setTimeout(r, 50))
  }
}

async function getJson(api, id) {
  const r = await fetch(`${api}/v1/docs/${NS}/${id}`, { headers: { authorization: `Bearer ${TOKEN_RW}` } })
  return r.status === 200 ? r.json() : null
}

// The page: one bundle, served with the HTML from a port of its own.
const out = fs.mkdtempSync(path.join(process.env.TMPDIR ?? "/tmp", "tidesync-page-"))
await esbuild.build({
  entryPoints: [path.join(here, "browser/app.mjs")],
  bundle: true,
  format: "esm",
  platform: "browser",
  outfile: path.join(out, "app.js"),
  logLevel: "error",
})
const html = `<!doctype html><meta charset="utf-8"><title>tidesync</title><script type="module" src="/app.js"></script>`
const server = http.createServer((req, res) => {
  if (req.url === "/app.js") {
    res.writeHead(200, { "content-type": "text/javascript" })
    res.end(fs.readFileSync(path.join(out, "app.js")))
  } else {
    res.writeHead(200, { "content-type": "text/html" })
    res.end(html)
  }
})
await new Promise(r => server.listen(0, "127.0.0.1", r))
const origin = `http://127.0.0.1:${server.address().port}`

browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
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
const page = await browser.newPage()
const errors = []
page.on("pageerror", e => errors.push(String(e)))
await page.goto(origin)
await page.waitForFunction(() => window.ready === true, null, { timeout: 30000 }).catch(async () =>
  fail(`the page did not start: ${errors.join("; ")}`),
)

// 1. A client of edge A creates and edits a document.
await page.evaluate(([a, h, tok]) => {
  t.connect("a", a, tok)
  t.connect("hub", h, tok)
}, [EDGE_A, HUB, TOKEN_RW])
await new Promise(r => setTimeout(r, 500))
const url = await page.evaluate(() => t.create("a", { title: "draft", meta: { region: "eu-west" } }))
await page.evaluate(u => t.change("a", u, { title: "hello", count: 1 }), url)
const id = url.slice("automerge:".length)
await until("the edit at edge A", async () => (await getJson(EDGE_A, id))?.title === "hello")
console.log(`created ${url} in the page; edge A holds the edit`)

// 2. A client of the hub, in the same page, finds it with the edit.
await until("the document at the hub", async () => (await getJson(HUB, id))?.count === 1)
const found = await page.evaluate(u => t.read("hub", u), url)
if (found.doc.title !== "hello" || found.doc.count !== 1) await fail(`the hub's client found ${JSON.stringify(found)}`)
console.log("the hub's client found the document with the edit")

// 3. A JSON patch at edge B arrives as a change, its strings JS strings.
await until("the document at edge B", async () => (await getJson(EDGE_B, id))?.count === 1)
const arrived = page.evaluate(u => t.waitFor("a", u, "status", "approved", 20000), url)
const patch = await fetch(`${EDGE_B}/v1/docs/${NS}/${id}`, {
  method: "PATCH",
  headers: { authorization: `Bearer ${TOKEN_RW}`, "content-type": "application/json" },
  body: JSON.stringify({ status: "approved" }),
})
if (patch.status !== 200) await fail(`PATCH at edge B answered ${patch.status}`)
if (!(await arrived)) await fail("no change event for the PATCH made at edge B")
const after = await page.evaluate(u => t.read("a", u), url)
if (after.types.status !== "string") await fail(`status reads as a ${after.types.status}`)
console.log("the PATCH at edge B arrived as a change with a plain string")

// 4. A ro client changes nothing.
await page.evaluate(([a, tok]) => t.connect("ro", a, tok), [EDGE_A, TOKEN_RO])
await page.evaluate(u => t.read("ro", u), url)
await page.evaluate(u => t.change("ro", u, { hacked: true }), url)
await page.evaluate(u => t.change("a", u, { marker: "after-ro" }), url)
await until("the marker at the hub", async () => (await getJson(HUB, id))?.marker === "after-ro")
await new Promise(r => setTimeout(r, 1000))
for (const [name, api] of [["edge A", EDGE_A], ["hub", HUB], ["edge B", EDGE_B]]) {
  if ((await getJson(api, id)).hacked !== undefined) await fail(`the ro client's change reached ${name}`)
}
console.log("the ro client's change was stored nowhere")

// 5. Ephemeral messages pass between two clients of edge A.
await page.evaluate(u => t.listen("ro", u), url)
await page.evaluate(u => t.broadcast("a", u, { cursor: 7 }), url)
await until("the ephemeral message", async () =>
  (await page.evaluate(() => t.heard("ro"))).some(m => m.cursor === 7),
)
console.log("the ephemeral message reached the other client")

if (errors.length) await fail(`page errors: ${errors.join("; ")}`)
await browser.close()
server.close()
console.log("OK")
process.exit(0)
