//! `tidesync-hub`: the Tidesync hub for data-center regions.

fn main() {
    println!("tidesync-hub {}", env!("CARGO_PKG_VERSION"));
}
