//! Echo correctness against the real binary.
mod util;
use util::*;

#[test]
fn binary_and_ten_mebibytes_come_back_unchanged() {
    let f = Forkd::start(&[]);
    let data = pattern(10 << 20, 1);
    assert!(roundtrip(f.addr(), &data) == data, "10 MiB echo differs");
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(roundtrip(f.addr(), &all), all);
}
