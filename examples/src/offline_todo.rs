//! An offline-first to-do app that embeds Tidesync as a library: no HTTP, no separate
//! process. Two replicas of the app (a phone and a laptop) each own a [`Store`] and a
//! sync [`Node`]; a hub relays between them. Both edit while disconnected, then reconnect
//! and merge: every item added anywhere survives, a concurrent rename of the same item
//! resolves the same way on both, and the conflict is there to show the user.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use tidesync::model::{DocId, Grant, Namespace, NodeId};
use tidesync::net::{Ca, Node, NodeConfig};
use tidesync::store::{Store, StoreConfig};
use tidesync::sync::Role;

use crate::local::wait_for;

/// One running replica of the app.
struct Replica {
    store: Store,
    node: Node,
    cfg: NodeConfig,
}

impl Replica {
    fn start(path: PathBuf, cfg: NodeConfig) -> Result<Self> {
        let store = Store::open(&path, StoreConfig::default())?;
        let node = Node::start(store.clone(), cfg.clone())?;
        Ok(Self { store, node, cfg })
    }

    /// Goes offline: sync stops, the app keeps its store and keeps writing.
    async fn go_offline(&self) {
        self.node.shutdown().await;
    }

    /// Back online: a new node on the same store resumes from its saved cursors.
    fn go_online(&mut self) -> Result<()> {
        self.node = Node::start(self.store.clone(), self.cfg.clone())?;
        Ok(())
    }

    async fn add(&self, list: &DocId, item: &str, title: &str) -> Result<()> {
        let patch = json!({ "items": { item: { "title": title, "done": false } } });
        self.store.patch(&todo_ns()?, list, patch, None).await?;
        Ok(())
    }

    async fn set(&self, list: &DocId, item: &str, field: &str, value: Value) -> Result<()> {
        let patch = json!({ "items": { item: { field: value } } });
        self.store.patch(&todo_ns()?, list, patch, None).await?;
        Ok(())
    }

    fn items(&self, list: &DocId) -> Result<Map<String, Value>> {
        let doc = self
            .store
            .get(&todo_ns()?, list)?
            .context("the list exists")?;
        Ok(doc
            .content
            .get("items")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default())
    }
}

fn todo_ns() -> Result<Namespace> {
    Ok(Namespace::new("todo")?)
}

/// What the example ended with, for its test.
#[derive(Debug)]
pub struct TodoReport {
    /// The merged items on the phone.
    pub phone: Map<String, Value>,
    /// The merged items on the laptop.
    pub laptop: Map<String, Value>,
    /// The concurrent titles of the item renamed on both replicas.
    pub rename_conflict: Vec<Value>,
}

/// Runs the example, narrating to `out`.
pub async fn run(out: &mut dyn Write) -> Result<TodoReport> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::generate("todo-app")?;
    let grants: Vec<Grant> = vec!["todo=rw".parse()?];
    let mut hub_cfg = NodeConfig::new(ca.issue(&NodeId::new("sync-hub")?, Role::Hub, &[])?);
    hub_cfg.listen = Some(([127, 0, 0, 1], 0).into());
    let hub = Replica::start(dir.path().join("hub.redb"), hub_cfg)?;
    let hub_addr = hub.node.local_addr()?;
    let replica = |name: &str| -> Result<Replica> {
        let mut cfg = NodeConfig::new(ca.issue(&NodeId::new(name)?, Role::Edge, &grants)?);
        cfg.dial = vec![hub_addr];
        cfg.failover = true;
        cfg.min_backoff = Duration::from_millis(20);
        Replica::start(dir.path().join(format!("{name}.redb")), cfg)
    };
    let mut phone = replica("phone")?;
    let mut laptop = replica("laptop")?;
    let list = DocId::new("weekend")?;
    let ns = todo_ns()?;

    phone.add(&list, "bike", "Fix the bike").await?;
    phone.add(&list, "plants", "Water the plants").await?;
    wait_for("the list on the laptop", Duration::from_secs(10), || {
        Ok(laptop
            .store
            .get(&ns, &list)?
            .is_some_and(|d| d.content.contains_key("items")))
    })
    .await?;
    writeln!(
        out,
        "online:  the phone adds two items; the laptop sees them"
    )?;
    writeln!(out, "         {}", Value::Object(laptop.items(&list)?))?;

    phone.go_offline().await;
    laptop.go_offline().await;
    writeln!(
        out,
        "offline: both replicas lose the network and keep working"
    )?;
    phone.add(&list, "cake", "Bake a cake").await?;
    phone
        .set(&list, "bike", "title", json!("Fix the bike's brakes"))
        .await?;
    laptop
        .set(&list, "bike", "title", json!("Take the bike to the shop"))
        .await?;
    laptop.set(&list, "plants", "done", json!(true)).await?;
    laptop.add(&list, "mail", "Post the letters").await?;
    writeln!(
        out,
        "  phone:  adds 'cake', renames 'bike' to \"Fix the bike's brakes\""
    )?;
    writeln!(
        out,
        "  laptop: adds 'mail', ticks 'plants', renames 'bike' to \"Take the bike to the shop\""
    )?;

    phone.go_online()?;
    laptop.go_online()?;
    let took = wait_for("the replicas merged", Duration::from_secs(20), || {
        let (p, l) = (phone.store.get(&ns, &list)?, laptop.store.get(&ns, &list)?);
        Ok(matches!((p, l), (Some(p), Some(l)) if p.heads == l.heads && p.heads.len() == 2))
    })
    .await?;
    writeln!(
        out,
        "online:  reconnected; merged in {:.1} ms",
        took.as_secs_f64() * 1e3
    )?;
    let (p_items, l_items) = (phone.items(&list)?, laptop.items(&list)?);
    for (key, item) in &p_items {
        writeln!(
            out,
            "         [{}] {key}: {}",
            if item["done"] == true { "x" } else { " " },
            item["title"]
        )?;
    }
    let rename_conflict = phone
        .store
        .conflicts(&ns, &list)?
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.path == "/items/bike/title")
        .map(|c| c.values)
        .unwrap_or_default();
    writeln!(
        out,
        "         both renames are kept for the app to show: {}",
        Value::from(rename_conflict.clone())
    )?;

    for r in [phone, laptop, hub] {
        r.node.shutdown().await;
    }
    Ok(TodoReport {
        phone: p_items,
        laptop: l_items,
        rename_conflict,
    })
}
