//! Echo correctness against the real binary.
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);

#[test]
fn binary_and_ten_mebibytes_come_back_unchanged() {
    let f = Forkd::start(&[]);
    let data = pattern(10 << 20, 1);
    assert!(roundtrip(f.addr(), &data) == data, "10 MiB echo differs");
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(roundtrip(f.addr(), &all), all);
}

#[test]
fn thread_mode_and_a_tiny_buffer_echo_unchanged_too() {
    let data = pattern(10 << 20, 2);
    for args in [
        &["--mode", "thread"][..],
        &["--buffer", "7"][..],
        &["--mode", "event"][..],
        &["--mode", "event", "--buffer", "7"][..],
    ] {
        let f = Forkd::start(args);
        let back = roundtrip(f.addr(), &data);
        f.check(back == data, &format!("10 MiB echo differs with {args:?}"));
        f.check(
            f.wait_log("10485760 bytes echoed", LONG),
            "the end line should count every byte",
        );
    }
}

#[test]
fn a_half_closed_client_gets_everything_then_the_end() {
    for mode in ["fork", "thread", "event"] {
        let f = Forkd::start(&["--mode", mode]);
        let mut s = connect(f.addr());
        ping(&mut s, b"first, interactively\n");
        // Everything sent before the half-close comes back after it.
        s.write_all(b"then some more").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"then some more", "mode {mode}");
        f.check(
            f.wait_log("35 bytes echoed", LONG),
            "end line with the byte count",
        );
        f.check(
            f.log().contains("closed by client"),
            "the end should be the client's close",
        );
    }
}
