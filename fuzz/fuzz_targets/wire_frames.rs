//! Any bytes fed to the frame decoder of either protocol: no panic, no unbounded allocation,
//! and whatever decodes re-encodes to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_wire::{decode_frame, encode_frame, ClientRequest, ClientResponse, ClusterMap, Decoded, Envelope, PeerRequest, PeerResponse};

/// The client protocol's frame limit with default key and value limits, roughly.
const MAX: usize = 4 << 20;

fn check<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let mut buf = data;
    // Frames back to back, as a stream delivers them.
    while let Ok(Decoded::Frame(msg, used)) = decode_frame::<T>(buf, MAX) {
        let mut again = Vec::new();
        encode_frame(&msg, MAX, &mut again).expect("a decoded message encodes");
        match decode_frame::<T>(&again, MAX) {
            Ok(Decoded::Frame(back, n)) => {
                assert_eq!(back, msg, "round trip changed the message");
                assert_eq!(n, again.len());
            }
            other => panic!("re-encoded frame does not decode: {other:?}"),
        }
        buf = &buf[used..];
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 5 {
        0 => check::<Envelope<ClientRequest>>(rest),
        1 => check::<Envelope<ClientResponse>>(rest),
        2 => check::<Envelope<PeerRequest>>(rest),
        3 => check::<Envelope<PeerResponse>>(rest),
        _ => {
            let _ = postcard::from_bytes::<ClusterMap>(rest);
        }
    }
});
