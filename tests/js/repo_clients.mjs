// Unmodified automerge-repo clients against Tidesync nodes. Run by the Rust test
// `automerge_repo` with the nodes' API addresses and scoped tokens in the environment;
// exits 0 when every check holds, and prints what failed otherwise.
//
// EDGE_A, HUB, EDGE_B: http://host:port of each node's API.
// TOKEN_RW, TOKEN_RO: tokens granting repo=rw and repo=ro.
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import * as Automerge from "@automerge/automerge"

const { EDGE_A, HUB, EDGE_B, TOKEN_RW, TOKEN_RO } = process.env
const NS = process.env.REPO_NS ?? "repo"

function fail(why) {
  console.error(`FAIL: ${why}`)
  process.exit(1)
}

async function until(what, check, ms = 20000) {
  const start = Date.now()
  for (;;) {
    const v = await check()
    if (v) return v
    if (Date.now() - start > ms) fail(`timed out waiting for ${what}`)
    await new Promise(r => setTimeout(r, 50))
  }
}

function repoAt(api, token) {
  const url = `${api.replace("http", "ws")}/v1/automerge-repo?token=${encodeURIComponent(token)}`
  return new Repo({ network: [new WebSocketClientAdapter(url, 1000)] })
}

async function getJson(api, id, token = TOKEN_RW) {
  const r = await fetch(`${api}/v1/docs/${NS}/${id}`, { headers: { authorization: `Bearer ${token}` } })
  return r.status === 200 ? r.json() : null
}

// 1. A client of edge A creates a document and edits it.
const a = repoAt(EDGE_A, TOKEN_RW)
const handle = a.create({ title: "draft", meta: { region: "eu-west" }, tags: ["x"] })
handle.change(d => {
  d.title = "hello"
  d.count = 1
})
const id = handle.documentId
await until("the edit at edge A", async () => (await getJson(EDGE_A, id))?.title === "hello")
console.log(`created ${handle.url}; edge A holds the edit`)

// 2. A client of the hub finds it, edit included.
await until("the document at the hub", async () => (await getJson(HUB, id))?.count === 1)
const h = repoAt(HUB, TOKEN_RW)
const found = await h.find(handle.url)
const seen = found.doc()
if (seen.title !== "hello" || seen.count !== 1) fail(`the hub's client found ${JSON.stringify(seen)}`)
if (seen.meta.region !== "eu-west") fail("a string written in JS does not read as one")
console.log("the hub's client found the document with the edit")

// 3. A JSON merge patch at edge B reaches the first client as a change event, and its
//    strings are plain JS strings there.
await until("the document at edge B", async () => (await getJson(EDGE_B, id))?.count === 1)
const changed = new Promise(resolve => {
  handle.on("change", ({ doc }) => {
    if (doc.status !== undefined) resolve(doc)
  })
})
const patch = await fetch(`${EDGE_B}/v1/docs/${NS}/${id}`, {
  method: "PATCH",
  headers: { authorization: `Bearer ${TOKEN_RW}`, "content-type": "application/json" },
  body: JSON.stringify({ status: "approved", meta: { owner: "ops" } }),
})
if (patch.status !== 200) fail(`PATCH at edge B answered ${patch.status}: ${await patch.text()}`)
const after = await Promise.race([
  changed,
  new Promise(r => setTimeout(() => r(null), 20000)),
])
if (!after) fail("no change event for the PATCH made at edge B")
if (after.status !== "approved") fail(`status reads ${String(after.status)} (${typeof after.status})`)
if (after.meta.owner !== "ops" || after.meta.region !== "eu-west")
  fail(`meta reads ${JSON.stringify(after.meta)}`)
console.log("the PATCH at edge B arrived as a change event with plain strings")

// 4. A client whose token grants only ro cannot change anything.
const ro = repoAt(EDGE_A, TOKEN_RO)
const roHandle = await ro.find(handle.url)
const roWrite = await fetch(`${EDGE_A}/v1/docs/${NS}/${id}`, {
  method: "PATCH",
  headers: { authorization: `Bearer ${TOKEN_RO}`, "content-type": "application/json" },
  body: JSON.stringify({ hacked: true }),
})
if (roWrite.status !== 403) fail(`a ro token's PATCH answered ${roWrite.status}`)
roHandle.change(d => {
  d.hacked = true
})
// An honest write after it, which must arrive while the ro one never does.
handle.change(d => {
  d.marker = "after-ro"
})
await until("the marker at the hub", async () => (await getJson(HUB, id))?.marker === "after-ro")
await new Promise(r => setTimeout(r, 1000))
for (const [name, api] of [["edge A", EDGE_A], ["hub", HUB], ["edge B", EDGE_B]]) {
  const doc = await getJson(api, id)
  if (doc.hacked !== undefined) fail(`the ro client's change reached ${name}`)
}
console.log("the ro client's change was stored nowhere")

// 5. An ephemeral message reaches the other client of the node.
const heard = new Promise(resolve => roHandle.on("ephemeral-message", ({ message }) => resolve(message)))
handle.broadcast({ cursor: 42, who: "a" })
const message = await Promise.race([heard, new Promise(r => setTimeout(() => r(null), 10000))])
if (!message || message.cursor !== 42) fail(`the ephemeral message arrived as ${JSON.stringify(message)}`)
console.log("the ephemeral message reached the other client")

// 6. The document exported as Automerge bytes loads in JS with the patched strings as
//    JS strings.
const bytes = await fetch(`${EDGE_A}/v1/docs/${NS}/${id}/automerge`, {
  headers: { authorization: `Bearer ${TOKEN_RW}` },
})
if (bytes.status !== 200) fail(`export answered ${bytes.status}`)
const loaded = Automerge.load(new Uint8Array(await bytes.arrayBuffer()))
if (loaded.status !== "approved" || loaded.meta.owner !== "ops" || loaded.title !== "hello")
  fail(`the exported document reads ${JSON.stringify(loaded)}`)
if (typeof loaded.status !== "string") fail(`status is a ${typeof loaded.status}`)
console.log("the exported document loads with plain strings")

console.log("OK")
process.exit(0)
