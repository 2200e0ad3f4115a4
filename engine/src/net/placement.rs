//! Which hub an edge talks to: rendezvous hashing of the edge's node id over its hubs, so
//! edges spread evenly without a coordinator, each edge's choice is stable, and when a hub
//! goes down only its own edges move (each to its next choice) and move back when it
//! returns.
//!
//! A hub is scored by its slot in the sorted list of hub addresses, not by the address
//! itself: every edge given the same hubs ranks them the same way whatever the order of
//! its `--hub` flags, and the spread depends only on the edges' ids, so it is the same in
//! every deployment of the same hubs and edges (and can be checked ahead of time).

use std::net::SocketAddr;

use crate::model::NodeId;

/// The hubs in the order `node` prefers them: the highest score first. Duplicates are
/// dropped.
pub fn rendezvous_order(node: &NodeId, hubs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut sorted = hubs.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut scored: Vec<(u64, SocketAddr)> = sorted
        .into_iter()
        .enumerate()
        .map(|(slot, addr)| (score(node, slot), addr))
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, addr)| addr).collect()
}

/// The score of hub `slot` for `node`: the first 8 bytes of BLAKE3 over both.
fn score(node: &NodeId, slot: usize) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"tidesync rendezvous v1\0");
    h.update(node.as_str().as_bytes());
    h.update(&(slot as u64).to_le_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(ports: &[u16]) -> Vec<SocketAddr> {
        ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect()
    }

    #[test]
    fn every_edge_ranks_the_same_hubs_the_same_way_whatever_their_order() {
        let me = NodeId::new("edge-007").expect("id");
        let a = rendezvous_order(&me, &addrs(&[7001, 7002, 7003]));
        let b = rendezvous_order(&me, &addrs(&[7003, 7001, 7002, 7001]));
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
    }

    /// The spread the integration test relies on: 300 edges named `edge-000` … over 3
    /// hubs get 100 ± 15 each; and with one hub gone, its edges split over the others.
    #[test]
    fn three_hundred_edges_spread_evenly_over_three_hubs() {
        let hubs = addrs(&[9001, 9002, 9003]);
        let mut first = [0usize; 3];
        let mut second_of_hub0 = [0usize; 3];
        for i in 0..300 {
            let me = NodeId::new(format!("edge-{i:03}")).expect("id");
            let order = rendezvous_order(&me, &hubs);
            let at = |a: SocketAddr| hubs.iter().position(|h| *h == a).unwrap_or(0);
            first[at(order[0])] += 1;
            if at(order[0]) == 0 {
                second_of_hub0[at(order[1])] += 1;
            }
        }
        for n in first {
            assert!((85..=115).contains(&n), "{first:?}");
        }
        assert_eq!(second_of_hub0[0], 0);
        assert!(
            second_of_hub0[1] > 25 && second_of_hub0[2] > 25,
            "{second_of_hub0:?}"
        );
    }
}
