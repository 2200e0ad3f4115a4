// The browser side of the browser test: automerge-repo as a web app bundles it (the slim
// entry with Automerge's wasm inlined), driven from the test through `window.t`.
import { Repo, initializeBase64Wasm } from "@automerge/automerge-repo/slim"
import { automergeWasmBase64 } from "@automerge/automerge/automerge.wasm.base64"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

await initializeBase64Wasm(automergeWasmBase64)

const repos = {}
const heard = {}

async function handle(name, url) {
  return repos[name].find(url)
}

window.t = {
  connect(name, api, token) {
    const url = `${api.replace("http", "ws")}/v1/automerge-repo?token=${encodeURIComponent(token)}`
    repos[name] = new Repo({ network: [new WebSocketClientAdapter(url, 1000)] })
    heard[name] = []
  },
  create(name, init) {
    return repos[name].create(init).url
  },
  async change(name, url, fields) {
    const h = await handle(name, url)
    h.change(d => Object.assign(d, fields))
  },
  async read(name, url) {
    const d = (await handle(name, url)).doc()
    // Plain JSON, and the JS type of each top-level field.
    return { doc: JSON.parse(JSON.stringify(d)), types: Object.fromEntries(Object.entries(d).map(([k, v]) => [k, typeof v])) }
  },
  async waitFor(name, url, key, value, ms) {
    const h = await handle(name, url)
    if (h.doc()[key] === value) return true
    return new Promise(resolve => {
      const timer = setTimeout(() => resolve(false), ms)
      h.on("change", ({ doc }) => {
        if (doc[key] === value) {
          clearTimeout(timer)
          resolve(true)
        }
      })
    })
  },
  async listen(name, url) {
    const h = await handle(name, url)
    h.on("ephemeral-message", ({ message }) => heard[name].push(message))
  },
  async broadcast(name, url, message) {
    ;(await handle(name, url)).broadcast(message)
  },
  heard(name) {
    return heard[name]
  },
}
window.ready = true
