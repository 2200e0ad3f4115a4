//! `tidesync-edge`: the Tidesync agent for devices.

fn main() {
    println!("tidesync-edge {}", env!("CARGO_PKG_VERSION"));
}
