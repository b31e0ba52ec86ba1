//! Any bytes fed to the Redis gateway's request parser, as a connection delivers them: no panic,
//! no allocation past the caps, every request consumes bytes, and a parsed multibulk request
//! re-encoded parses back to the same arguments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_wire::resp::{encode_request, parse_request, RespLimits};

fuzz_target!(|data: &[u8]| {
    let limits = RespLimits { args_max: 1000, bulk_bytes_max: 64 * 1024, inline_bytes_max: 4096 };
    let mut at = 0;
    while at < data.len() {
        match parse_request(&data[at..], &limits) {
            Ok(Some((args, used))) => {
                assert!(used > 0 && at + used <= data.len(), "a request consumes bytes within the input");
                assert!(args.len() <= limits.args_max);
                assert!(args.iter().all(|a| a.len() <= limits.bulk_bytes_max.max(limits.inline_bytes_max)));
                if data[at] == b'*' {
                    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                    let again = encode_request(&refs);
                    let back = parse_request(&again, &limits).expect("re-encoded parses").expect("whole");
                    assert_eq!(back, (args, again.len()));
                }
                at += used;
            }
            // Incomplete: the server reads more (here the input ends); an error closes the
            // connection.
            Ok(None) | Err(_) => break,
        }
    }
});
