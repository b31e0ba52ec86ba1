//! The Redis protocol (RESP2 and RESP3) as a server reads and writes it: a request parser with
//! size caps and a reply encoder. Pure: no I/O, so it is fuzzed on its own
//! (`fuzz/fuzz_targets/resp_requests.rs`).
//!
//! A request is a multibulk array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or an inline
//! line (`PING\r\n`, as `redis-benchmark` and telnet send). Every length is checked against
//! [`RespLimits`] before anything is allocated for it, so a peer cannot make the server reserve
//! more than the caps allow.

/// Caps on what one request may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RespLimits {
    /// Arguments of one multibulk request (the command name included).
    pub args_max: usize,
    /// Bytes of one bulk argument.
    pub bulk_bytes_max: usize,
    /// Bytes of one inline request line (Redis: 64 KiB).
    pub inline_bytes_max: usize,
}

impl Default for RespLimits {
    fn default() -> Self {
        RespLimits { args_max: 1024 * 1024, bulk_bytes_max: 512 << 20, inline_bytes_max: 64 * 1024 }
    }
}

/// Why a request cannot be read; the server answers with it as an error and closes the
/// connection (as Redis does), because the rest of the stream cannot be framed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("Protocol error: invalid multibulk length")]
    MultibulkLength,
    #[error("Protocol error: invalid bulk length")]
    BulkLength,
    #[error("Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("Protocol error: too big inline request")]
    InlineTooLong,
    #[error("Protocol error: too many arguments ({0})")]
    TooManyArgs(u64),
    #[error("Protocol error: bulk of {len} bytes is over the limit of {max}")]
    BulkTooLarge { len: u64, max: usize },
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("Protocol error: missing CRLF after a bulk")]
    MissingCrlf,
}

/// One request: its arguments (the command name first).
pub type Args = Vec<Vec<u8>>;

/// Reads one request from the front of `buf`: `Ok(Some((args, consumed)))`, or `Ok(None)` when
/// `buf` holds only part of one (read more and call again). An empty inline line yields an
/// empty `args` (skip it).
pub fn parse_request(buf: &[u8], limits: &RespLimits) -> Result<Option<(Args, usize)>, RespError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

/// The line starting at `from`, without its `\r\n`, and the index after it.
fn line(buf: &[u8], from: usize, max: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = buf.get(from..).unwrap_or_default();
    match rest.iter().position(|b| *b == b'\n') {
        Some(nl) => {
            let l = &rest[..nl];
            Ok(Some((l.strip_suffix(b"\r").unwrap_or(l), from + nl + 1)))
        }
        // A header line is a sign and at most 20 digits: longer without a newline is garbage.
        None if rest.len() > max => Err(RespError::InlineTooLong),
        None => Ok(None),
    }
}

fn number(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The longest header line (`*` or `$`, a sign and 20 digits) a parser waits for.
const HEADER_BYTES_MAX: usize = 32;

fn parse_multibulk(buf: &[u8], limits: &RespLimits) -> Result<Option<(Args, usize)>, RespError> {
    let Some((head, mut at)) = line(buf, 0, HEADER_BYTES_MAX)? else { return Ok(None) };
    let n = number(&head[1..]).ok_or(RespError::MultibulkLength)?;
    if n <= 0 {
        return Ok(Some((Vec::new(), at)));
    }
    if n as u64 > limits.args_max as u64 {
        return Err(RespError::TooManyArgs(n as u64));
    }
    // Reserve for what has arrived, not what the header claims.
    let mut args = Vec::with_capacity((n as usize).min(buf.len() / 4 + 1));
    for _ in 0..n {
        let Some((h, next)) = line(buf, at, HEADER_BYTES_MAX)? else { return Ok(None) };
        match h.first() {
            Some(b'$') => {}
            Some(c) => return Err(RespError::ExpectedBulk(*c as char)),
            None => return Err(RespError::ExpectedBulk(' ')),
        }
        let len = number(&h[1..]).ok_or(RespError::BulkLength)?;
        if len < 0 {
            return Err(RespError::BulkLength);
        }
        if len as u64 > limits.bulk_bytes_max as u64 {
            return Err(RespError::BulkTooLarge { len: len as u64, max: limits.bulk_bytes_max });
        }
        let len = len as usize;
        let end = next + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(RespError::MissingCrlf);
        }
        args.push(buf[next..end].to_vec());
        at = end + 2;
    }
    Ok(Some((args, at)))
}

fn parse_inline(buf: &[u8], limits: &RespLimits) -> Result<Option<(Args, usize)>, RespError> {
    let Some((l, at)) = line(buf, 0, limits.inline_bytes_max)? else { return Ok(None) };
    if l.len() > limits.inline_bytes_max {
        return Err(RespError::InlineTooLong);
    }
    Ok(Some((split_inline(l)?, at)))
}

/// Splits an inline request into arguments: blanks separate, double quotes (with `\` escapes)
/// and single quotes group, as Redis's `sdssplitargs` does for the common cases.
fn split_inline(l: &[u8]) -> Result<Args, RespError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < l.len() {
        while i < l.len() && l[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= l.len() {
            break;
        }
        let mut arg = Vec::new();
        match l[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    match l.get(i) {
                        None => return Err(RespError::UnbalancedQuotes),
                        Some(c) if *c == q => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') if q == b'"' && i + 1 < l.len() => {
                            arg.push(match l[i + 1] {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                c => c,
                            });
                            i += 2;
                        }
                        Some(c) => {
                            arg.push(*c);
                            i += 1;
                        }
                    }
                }
                if l.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                    return Err(RespError::UnbalancedQuotes);
                }
            }
            _ => {
                while i < l.len() && !l[i].is_ascii_whitespace() {
                    arg.push(l[i]);
                    i += 1;
                }
            }
        }
        args.push(arg);
    }
    Ok(args)
}

/// A reply. Maps, doubles and booleans are RESP3 types; under RESP2 they are sent as arrays,
/// bulk strings and integers.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Reply>),
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    pub fn err(msg: impl Into<String>) -> Reply {
        Reply::Error(msg.into())
    }

    pub fn bulk(b: impl Into<Vec<u8>>) -> Reply {
        Reply::Bulk(b.into())
    }

    /// Appends this reply in protocol version `proto` (2 or 3) to `out`.
    pub fn encode(&self, proto: u8, out: &mut Vec<u8>) {
        use std::io::Write;
        match self {
            Reply::Simple(s) => {
                out.push(b'+');
                out.extend(s.bytes().filter(|b| *b != b'\r' && *b != b'\n'));
                out.extend_from_slice(b"\r\n");
            }
            Reply::Error(s) => {
                out.push(b'-');
                out.extend(s.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
                out.extend_from_slice(b"\r\n");
            }
            Reply::Int(i) => {
                let _ = write!(out, ":{i}\r\n");
            }
            Reply::Bulk(b) => {
                let _ = write!(out, "${}\r\n", b.len());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Null if proto >= 3 => out.extend_from_slice(b"_\r\n"),
            Reply::Null => out.extend_from_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                let _ = write!(out, "*{}\r\n", items.len());
                for i in items {
                    i.encode(proto, out);
                }
            }
            Reply::Map(pairs) => {
                if proto >= 3 {
                    let _ = write!(out, "%{}\r\n", pairs.len());
                } else {
                    let _ = write!(out, "*{}\r\n", pairs.len() * 2);
                }
                for (k, v) in pairs {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
        }
    }
}

/// Encodes a request as a client sends it (tests and the fuzz target's round trip).
pub fn encode_request(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Result<Option<(Args, usize)>, RespError> {
        parse_request(b, &RespLimits::default())
    }

    #[test]
    fn multibulk_requests_parse_and_wait_for_the_rest() {
        let req = encode_request(&[b"SET", b"k", b"v\r\nx"]);
        let (args, n) = parse(&req).expect("ok").expect("whole");
        assert_eq!(args, vec![b"SET".to_vec(), b"k".to_vec(), b"v\r\nx".to_vec()]);
        assert_eq!(n, req.len());
        // Every strict prefix is incomplete, never an error.
        for cut in 0..req.len() {
            assert_eq!(parse(&req[..cut]), Ok(None), "cut at {cut}");
        }
        // Two pipelined requests: the first is taken, the second left.
        let mut two = req.clone();
        two.extend_from_slice(&encode_request(&[b"GET", b"k"]));
        assert_eq!(parse(&two).expect("ok").expect("whole").1, req.len());
    }

    #[test]
    fn inline_requests_split_on_blanks_and_quotes() {
        assert_eq!(parse(b"PING\r\n"), Ok(Some((vec![b"PING".to_vec()], 6))));
        assert_eq!(parse(b"PING\n"), Ok(Some((vec![b"PING".to_vec()], 5))));
        let (args, _) = parse(b"set  \"a b\\n\" 'c d'\r\n").expect("ok").expect("whole");
        assert_eq!(args, vec![b"set".to_vec(), b"a b\n".to_vec(), b"c d".to_vec()]);
        assert_eq!(parse(b"\r\n"), Ok(Some((vec![], 2))));
        assert_eq!(parse(b"get \"open\r\n"), Err(RespError::UnbalancedQuotes));
        assert_eq!(parse(b"PIN"), Ok(None));
    }

    #[test]
    fn caps_refuse_before_allocating() {
        let small = RespLimits { args_max: 3, bulk_bytes_max: 10, inline_bytes_max: 16 };
        assert_eq!(parse_request(b"*4\r\n", &small), Err(RespError::TooManyArgs(4)));
        assert_eq!(parse_request(b"*1\r\n$11\r\n", &small), Err(RespError::BulkTooLarge { len: 11, max: 10 }));
        assert_eq!(parse_request(&[b'x'; 17], &small), Err(RespError::InlineTooLong));
        assert_eq!(parse_request(b"*1\r\n$-1\r\n", &small), Err(RespError::BulkLength));
        assert_eq!(parse_request(b"*x\r\n", &small), Err(RespError::MultibulkLength));
        assert_eq!(parse_request(b"*1\r\n:1\r\n", &small), Err(RespError::ExpectedBulk(':')));
        assert_eq!(parse_request(b"*1\r\n$1\r\nab\r\n", &small), Err(RespError::MissingCrlf));
        // A header that never ends is refused once it is longer than any valid one.
        assert_eq!(parse_request(&[b"*1".as_slice(), &[b'1'; 40]].concat(), &small), Err(RespError::InlineTooLong));
        // A huge claimed count with little data reserves only for what arrived.
        let big = RespLimits::default();
        assert_eq!(parse_request(b"*1000000\r\n$1\r\na\r\n", &big), Ok(None));
    }

    proptest::proptest! {
        /// Any request a client encodes parses back whole, also split at any point.
        #[test]
        fn encoded_requests_parse_back(args in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 1..8), cut in 0usize..400) {
            let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            let req = encode_request(&refs);
            proptest::prop_assert_eq!(parse(&req), Ok(Some((args.clone(), req.len()))));
            let cut = cut.min(req.len() - 1);
            proptest::prop_assert_eq!(parse(&req[..cut]), Ok(None));
        }

        /// Any bytes: no panic, and a request consumes at least one byte and no more than given.
        #[test]
        fn any_bytes_parse_or_fail_cleanly(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let small = RespLimits { args_max: 8, bulk_bytes_max: 64, inline_bytes_max: 128 };
            if let Ok(Some((args, used))) = parse_request(&data, &small) {
                proptest::prop_assert!(used > 0 && used <= data.len());
                proptest::prop_assert!(args.len() <= 64);
            }
        }
    }

    #[test]
    fn replies_encode_in_both_protocols() {
        let map = Reply::Map(vec![(Reply::bulk("proto"), Reply::Int(3))]);
        let mut o = Vec::new();
        map.encode(3, &mut o);
        assert_eq!(o, b"%1\r\n$5\r\nproto\r\n:3\r\n");
        o.clear();
        map.encode(2, &mut o);
        assert_eq!(o, b"*2\r\n$5\r\nproto\r\n:3\r\n");
        o.clear();
        Reply::Null.encode(2, &mut o);
        Reply::Null.encode(3, &mut o);
        Reply::err("ERR bad\r\nline").encode(2, &mut o);
        assert_eq!(o, b"$-1\r\n_\r\n-ERR bad  line\r\n");
    }
}
