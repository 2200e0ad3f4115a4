//! Writes to a store in a loop and prints one line per acknowledged write, so a test can
//! kill it at any moment and check that every printed write survived.
//!
//! Usage: `tidesync-crash-writer DB_PATH FIRST_COUNTER`. Eight tasks write concurrently (so
//! writes share group commits); task `t` sets field `v{k}` of document `crash/t{t}-{k % 5}`
//! and, once the write is durable, prints `ack t{t}-{k % 5} v{k}`.

use std::io::Write;

use anyhow::Context;
use serde_json::json;
use tidesync::model::{DocId, Namespace};
use tidesync::store::{Store, StoreConfig};

const TASKS: u64 = 8;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: tidesync-crash-writer DB_PATH FIRST_COUNTER")?;
    let first: u64 = args
        .next()
        .context("missing FIRST_COUNTER")?
        .parse()
        .context("FIRST_COUNTER must be a number")?;
    let store = Store::open(&path, StoreConfig::default()).context("opening the store")?;
    let ns = Namespace::new("crash")?;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (store, ns) = (store.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = first + t;
            loop {
                let doc = format!("t{t}-{}", k % 5);
                let id = DocId::new(doc.clone())?;
                store
                    .patch(&ns, &id, json!({ format!("v{k}"): k }), None)
                    .await?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "ack {doc} v{k}")?;
                out.flush()?;
                k += TASKS;
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
