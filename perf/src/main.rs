//! apex-load (being written).
fn main() {}
