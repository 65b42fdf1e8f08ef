//! Fuzzes the pgoutput decoder: arbitrary input must never panic, and any
//! message it accepts must survive an encode/decode round trip unchanged.

#![no_main]

use bytes::Bytes;
use ferry_postgres::pgoutput::{decode, encode::encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    if let Ok(msg) = decode(&input) {
        let again = decode(&Bytes::from(encode(&msg)));
        assert_eq!(
            again.as_ref(),
            Ok(&msg),
            "re-encoded message decoded differently"
        );
    }
});
