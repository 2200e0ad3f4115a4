//! A fault harness with the real binaries: hubs and edges as processes, every link behind
//! a UDP impairment proxy ([`proxy::Link`]), writers on every node, and a seeded schedule
//! of faults (delay, loss, reordering, one- and two-way partitions, SIGSTOP, kill -9 and
//! restart of edges and hubs). After each fault heals, the writers pause and the harness
//! measures how long the nodes take to converge; at the end it checks the two promises:
//! every acknowledged write is on every node, and every node holds the same heads.
//!
//! [`wire::Wire`] is the same impairment at the IP level, for a node in a network
//! namespace of its own, shaped in this process or by the kernel's netem in a small guest
//! ([`netem::Guest`]).
//!
//! `cargo test` runs a short seeded run (`binaries_chaos`); `tidesync-bench soak
//! --minutes N` runs a long one.

pub mod netem;
pub mod proxy;
pub mod soak;
pub mod wire;
