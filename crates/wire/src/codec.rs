//! A pure codec: a frame is a 4-byte big-endian length followed by that many bytes of postcard.

use serde::{de::DeserializeOwned, Serialize};

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
}

/// The result of looking at a buffer that may hold a frame.
#[derive(Debug)]
pub enum Decoded<T> {
    /// A whole frame: the message and how many bytes of the buffer it used.
    Frame(T, usize),
    /// More bytes are needed; at least this many in all.
    Incomplete(usize),
}

/// Appends to a buffer (postcard's `to_extend` takes its writer by value).
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// Appends `msg` as one frame to `out`, encoded in place (no buffer of its own, no copy). On an
/// error `out` is left as it was.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    if let Err(e) = postcard::to_extend(msg, Append(out)) {
        out.truncate(start);
        return Err(e.into());
    }
    let len = out.len() - start - FRAME_HEADER_BYTES;
    if len > max {
        out.truncate(start);
        return Err(CodecError::TooLarge { len, max });
    }
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Reads the length prefix, refusing a frame larger than `max` before any of it is buffered.
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one frame from the front of `buf`.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8], max: usize) -> Result<Decoded<T>, CodecError> {
    let Some(header) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(Decoded::Incomplete(FRAME_HEADER_BYTES));
    };
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h.copy_from_slice(header);
    let len = frame_len(h, max)?;
    let total = FRAME_HEADER_BYTES + len;
    let Some(body) = buf.get(FRAME_HEADER_BYTES..total) else {
        return Ok(Decoded::Incomplete(total));
    };
    Ok(Decoded::Frame(postcard::from_bytes(body)?, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientRequest, Envelope, Epoch};

    #[test]
    fn round_trip_and_incomplete() {
        let msg = Envelope {
            id: 7,
            body: ClientRequest::Put { shard: 3, epoch: Epoch::default(), key: b"k".to_vec(), value: vec![1; 100], session: None },
        };
        let mut buf = Vec::new();
        encode_frame(&msg, 1 << 20, &mut buf).expect("encode");
        encode_frame(&msg, 1 << 20, &mut buf).expect("encode");
        for cut in 0..buf.len() / 2 {
            assert!(matches!(decode_frame::<Envelope<ClientRequest>>(&buf[..cut], 1 << 20), Ok(Decoded::Incomplete(_))));
        }
        let Ok(Decoded::Frame(got, used)) = decode_frame::<Envelope<ClientRequest>>(&buf, 1 << 20) else { panic!("expected a frame") };
        assert_eq!(got, msg);
        assert_eq!(used, buf.len() / 2);
    }

    /// The limit is inclusive: a frame of exactly `max` bytes passes, one byte more does not.
    #[test]
    fn a_frame_of_exactly_the_limit_passes() {
        let msg = vec![7u8; 100];
        let len = postcard::to_allocvec(&msg).expect("encode").len();
        let mut buf = Vec::new();
        encode_frame(&msg, len, &mut buf).expect("exactly the limit");
        assert!(matches!(encode_frame(&msg, len - 1, &mut Vec::new()), Err(CodecError::TooLarge { .. })));
        let header = (len as u32).to_be_bytes();
        assert_eq!(frame_len(header, len).expect("exactly the limit"), len);
        assert!(matches!(frame_len(header, len - 1), Err(CodecError::TooLarge { .. })));
        assert!(matches!(decode_frame::<Vec<u8>>(&buf, len), Ok(Decoded::Frame(_, _))));
    }

    #[test]
    fn oversize_and_garbage_are_errors() {
        let mut buf = Vec::new();
        assert!(matches!(encode_frame(&vec![0u8; 100], 10, &mut buf), Err(CodecError::TooLarge { .. })));
        assert!(buf.is_empty());
        // A frame refused after others leaves them as they were.
        encode_frame(&vec![1u8; 3], 10, &mut buf).expect("small frame");
        let before = buf.clone();
        assert!(matches!(encode_frame(&vec![0u8; 100], 10, &mut buf), Err(CodecError::TooLarge { .. })));
        assert_eq!(buf, before);
        let big = [0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(decode_frame::<Envelope<ClientRequest>>(&big, 1024), Err(CodecError::TooLarge { .. })));
        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(decode_frame::<Envelope<ClientRequest>>(&garbage, 1024), Err(CodecError::Malformed(_))));
    }
}
