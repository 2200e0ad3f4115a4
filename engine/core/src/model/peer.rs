//! Who a node is: its role and identity, as its certificate states them.

use serde::{Deserialize, Serialize};

use super::{Grants, NodeId};

/// What a node is; written in its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A device. Reads and writes only what its certificate grants.
    Edge,
    /// A data-center node. Reads and writes everything; relays between edges and hubs.
    Hub,
}

impl Role {
    /// `edge` or `hub`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Hub => "hub",
        }
    }
}

/// Who a certificate says its holder is: a node's own identity, or a peer's once the TLS
/// layer has verified its chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The node id.
    pub node_id: NodeId,
    /// Edge or hub.
    pub role: Role,
    /// For edges, what they may read and write. Hubs hold everything.
    pub grants: Grants,
}

/// The peer a sync state belongs to: its node id and the feed epoch it announced. A state
/// kept for another epoch of the peer's database is not used.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SyncPeer {
    /// The peer's node id.
    pub id: NodeId,
    /// The peer's feed epoch (0 before its hello).
    pub epoch: u128,
}
