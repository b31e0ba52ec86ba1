//! The Redis-protocol gateway (RESP2 and RESP3, standalone mode): the string commands over
//! ringkv's keys, and the connection commands Redis clients send on connect.
//!
//! Pipelined requests run concurrently and are answered in order. Commands of one connection on
//! the same key take effect in the order they were sent (a `GET` after a `SET` of that key sees
//! it); commands on different keys may take effect in any order, as a Redis Cluster pipeline
//! across slots does. Connection state (protocol, authentication, name) changes in request
//! order, so a command sees the state the commands before it left. Before authentication only `HELLO`, `AUTH`, `PING` and `QUIT` are served.
//! What differs from Redis: no expiry (`EX`/`PX` are refused), one database, `MSET` is not
//! atomic across shards, and `SET ... XX`/`SET ... GET`/`GETSET` are compare-and-swap loops
//! (each attempt linearizable; a write in between makes it try again).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use ringkv_wire::resp::{parse_request, Args, Reply, RespLimits};
use ringkv_wire::{KeyOp, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Accepted, Api, ApiError, Principal};

/// Requests one connection may have in flight; past it, reading pauses.
pub const PIPELINE_MAX: usize = 1024;
/// Arguments of one request (MSET of 50,000 pairs).
pub const ARGS_MAX: usize = 100_001;
/// Attempts of a compare-and-swap loop (`SET XX`, `SET GET`) before it gives up.
const CAS_ATTEMPTS_MAX: usize = 64;
/// The Redis version the gateway answers as (the command set it follows).
pub const REDIS_COMPAT_VERSION: &str = "7.0.0";

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Serves the Redis gateway on the connections `rx` hands over.
pub async fn serve(api: Arc<Api>, mut rx: mpsc::Receiver<Accepted>) {
    while let Some(a) = rx.recv().await {
        tokio::spawn(connection(api.clone(), a));
    }
}

struct Conn {
    proto: u8,
    who: Option<Principal>,
    name: Option<Vec<u8>>,
    id: u64,
    quit: bool,
    /// For each key a command in flight touches, the end of the last such command: a later
    /// command on that key waits for it.
    last: std::collections::HashMap<Vec<u8>, Arc<Ended>>,
}

/// The end of a command: set when it finishes (or is dropped), and awaited by the next command
/// on one of its keys.
#[derive(Default)]
struct Ended {
    flag: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Ended {
    fn is_done(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_done() {
                return;
            }
            n.await;
        }
    }
}

/// Marks its command ended when dropped (finished, or abandoned with its connection).
struct EndGuard(Arc<Ended>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.flag.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }
}

impl Conn {
    /// What a new command on `keys` waits for, and the guard that marks its own end.
    fn order(&mut self, keys: &[Vec<u8>]) -> (Vec<Arc<Ended>>, EndGuard) {
        if self.last.len() > 4 * PIPELINE_MAX {
            self.last.retain(|_, e| !e.is_done());
        }
        let end = Arc::new(Ended::default());
        let mut wait = Vec::new();
        // A key named twice in one command (MSET k a k b) must not wait for itself.
        let unique: std::collections::HashSet<&Vec<u8>> = keys.iter().collect();
        for k in unique {
            if let Some(prev) = self.last.insert(k.clone(), end.clone()) {
                if !prev.is_done() {
                    wait.push(prev);
                }
            }
        }
        (wait, EndGuard(end))
    }
}

/// The keys a data command touches (all arguments after the name, but values).
fn keys_of(name: &str, args: &Args) -> Vec<Vec<u8>> {
    match name {
        "mset" => args.iter().skip(1).step_by(2).cloned().collect(),
        "del" | "exists" | "mget" => args.iter().skip(1).cloned().collect(),
        _ => args.get(1).cloned().into_iter().collect(),
    }
}

async fn connection(api: Arc<Api>, a: Accepted) {
    let l = &api.node.config.limits;
    let limits =
        RespLimits { args_max: ARGS_MAX, bulk_bytes_max: l.key_bytes_max.max(l.value_bytes_max) + 1024, inline_bytes_max: 64 * 1024 };
    // A whole request (an MSET of many values) may not be larger than what one node accepts in
    // one request frame: the buffer of a request still arriving is bounded by it.
    let request_bytes_max = 2 * (l.key_bytes_max + l.value_bytes_max) + crate::CLIENT_FRAME_SLACK_BYTES;
    let (mut rd, mut wr) = tokio::io::split(a.stream);
    let mut c = Conn {
        proto: 2,
        who: a.certificate,
        name: None,
        id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
        quit: false,
        last: Default::default(),
    };
    let mut inbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut pending: FuturesOrdered<BoxFuture<'static, Reply>> = FuturesOrdered::new();
    // Protocols of the replies in `pending`, in order (a HELLO changes it for what follows).
    let mut protos: std::collections::VecDeque<u8> = Default::default();
    let mut eof = false;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if (eof || c.quit) && pending.is_empty() {
            break;
        }
        tokio::select! {
            Some(reply) = pending.next(), if !pending.is_empty() => {
                reply.encode(protos.pop_front().unwrap_or(2), &mut out);
                // Every reply that is ready now goes out in the same write.
                while let Some(Some(r)) = pending.next().now_or_never() {
                    r.encode(protos.pop_front().unwrap_or(2), &mut out);
                }
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
            n = rd.read(&mut chunk), if !eof && !c.quit && pending.len() < PIPELINE_MAX => {
                match n {
                    Ok(0) | Err(_) => eof = true,
                    Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
                }
                let mut used = 0;
                while !c.quit && pending.len() < PIPELINE_MAX {
                    match parse_request(&inbuf[used..], &limits) {
                        Ok(Some((args, n))) => {
                            used += n;
                            if args.is_empty() {
                                continue;
                            }
                            let f = command(&api, &mut c, args);
                            protos.push_back(c.proto);
                            pending.push_back(f);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            // The stream cannot be framed past this: answer and close.
                            metrics::counter!("ringkv_resp_commands_total", "cmd" => "protocol_error", "result" => "error").increment(1);
                            protos.push_back(c.proto);
                            pending.push_back(futures::future::ready(Reply::err(format!("ERR {e}"))).boxed());
                            c.quit = true;
                        }
                    }
                }
                inbuf.drain(..used);
                if !c.quit && inbuf.len() > request_bytes_max {
                    metrics::counter!("ringkv_resp_commands_total", "cmd" => "protocol_error", "result" => "error").increment(1);
                    let why = format!("ERR Protocol error: a request over {request_bytes_max} bytes");
                    protos.push_back(c.proto);
                    pending.push_back(ready(Reply::err(why)));
                    c.quit = true;
                }
            }
        }
    }
    let _ = wr.shutdown().await;
}

fn ready(r: Reply) -> BoxFuture<'static, Reply> {
    futures::future::ready(r).boxed()
}

/// The metric label of a command: its name if it is one the gateway knows.
fn label(name: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "hello", "auth", "ping", "echo", "select", "quit", "client", "info", "config", "command", "get", "set", "setnx", "getset", "del",
        "exists", "mget", "mset", "incr", "incrby", "decr", "decrby", "append", "strlen",
    ];
    KNOWN.iter().find(|k| **k == name).copied().unwrap_or("other")
}

fn count(cmd: &'static str, r: &Reply) {
    let result = if matches!(r, Reply::Error(_)) { "error" } else { "ok" };
    metrics::counter!("ringkv_resp_commands_total", "cmd" => cmd, "result" => result).increment(1);
}

fn arity_error(name: &str) -> Reply {
    Reply::err(format!("ERR wrong number of arguments for '{name}' command"))
}

/// A gateway error as a Redis error reply: `-NOPERM` for a role that may not, `-NOAUTH` for a
/// revoked token, `-TRYAGAIN` for what a retry may fix, else `-ERR`.
fn api_error(e: ApiError, cmd: &str) -> Reply {
    match e.code {
        "forbidden" => Reply::err(format!("NOPERM this user has no permissions to run the '{cmd}' command ({})", e.message)),
        "unauthorized" => Reply::err(format!("NOAUTH {}", e.message)),
        "invalid" if e.message.contains("not an integer") => Reply::err("ERR value is not an integer or out of range"),
        "invalid" if e.message.contains("overflow") => Reply::err("ERR increment or decrement would overflow"),
        _ if e.retryable => Reply::err(format!("TRYAGAIN {}", e.message)),
        _ => Reply::err(format!("ERR {}", e.message)),
    }
}

fn int_arg(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Runs one request: connection commands at once (they change `c`), data commands as a future.
fn command(api: &Arc<Api>, c: &mut Conn, args: Args) -> BoxFuture<'static, Reply> {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    let cmd = label(&name);
    let r = match connection_command(api, c, &name, &args) {
        Some(r) => r,
        None => {
            let Some(who) = c.who.clone() else {
                let r = Reply::err("NOAUTH Authentication required.");
                count(cmd, &r);
                return ready(r);
            };
            let api = api.clone();
            let (wait, end) = c.order(&keys_of(&name, &args));
            return async move {
                for w in wait {
                    w.wait().await;
                }
                let r = data_command(&api, &who, &name, args).await;
                drop(end);
                count(cmd, &r);
                r
            }
            .boxed();
        }
    };
    count(cmd, &r);
    ready(r)
}

/// The commands about the connection itself, answered at once; `None` for a data command.
fn connection_command(api: &Api, c: &mut Conn, name: &str, args: &[Vec<u8>]) -> Option<Reply> {
    let arg = |i: usize| args.get(i).map(|a| String::from_utf8_lossy(a).into_owned());
    let r = match name {
        "ping" => match args.len() {
            1 => Reply::Simple("PONG".into()),
            2 => Reply::Bulk(args[1].clone()),
            _ => arity_error(name),
        },
        "quit" => {
            c.quit = true;
            Reply::ok()
        }
        "auth" => match args.len() {
            2 | 3 => auth(api, c, args.last().map(|a| a.as_slice()).unwrap_or_default()),
            _ => arity_error(name),
        },
        "hello" => hello(api, c, args),
        _ if c.who.is_none() => return None,
        "echo" if args.len() == 2 => Reply::Bulk(args[1].clone()),
        "echo" => arity_error(name),
        "select" => match arg(1).as_deref() {
            Some("0") if args.len() == 2 => Reply::ok(),
            Some(_) if args.len() == 2 => Reply::err("ERR DB index is out of range (ringkv has one database, 0)"),
            _ => arity_error(name),
        },
        "client" => match arg(1).map(|s| s.to_ascii_lowercase()).as_deref() {
            Some("setinfo") if args.len() == 4 => Reply::ok(),
            Some("setname") if args.len() == 3 => {
                c.name = Some(args[2].clone()).filter(|n| !n.is_empty());
                Reply::ok()
            }
            Some("getname") => c.name.clone().map(Reply::Bulk).unwrap_or(Reply::Null),
            Some("id") => Reply::Int(c.id as i64),
            Some(sub) => Reply::err(format!("ERR unknown subcommand '{sub}'. ringkv serves CLIENT SETINFO, SETNAME, GETNAME and ID")),
            None => arity_error(name),
        },
        "info" => Reply::Bulk(info(api).into_bytes()),
        "config" => match arg(1).map(|s| s.to_ascii_lowercase()).as_deref() {
            Some("get") if args.len() >= 3 => config_get(&args[2..]),
            _ => Reply::err("ERR ringkv serves only CONFIG GET"),
        },
        "command" => match arg(1).map(|s| s.to_ascii_lowercase()).as_deref() {
            None | Some("docs") | Some("info") => Reply::Array(vec![]),
            Some("count") => Reply::Int(0),
            Some(sub) => Reply::err(format!("ERR unknown subcommand '{sub}'")),
        },
        _ => return None,
    };
    Some(r)
}

fn auth(api: &Api, c: &mut Conn, token: &[u8]) -> Reply {
    match std::str::from_utf8(token).ok().and_then(|t| api.authenticate_token(t)) {
        Some(p) => {
            c.who = Some(p);
            Reply::ok()
        }
        None => Reply::err("WRONGPASS invalid username-password pair or user is disabled."),
    }
}

/// `HELLO [protover [AUTH username password] [SETNAME clientname]]`.
fn hello(api: &Api, c: &mut Conn, args: &[Vec<u8>]) -> Reply {
    let mut proto = c.proto;
    if let Some(v) = args.get(1) {
        match int_arg(v) {
            Some(p @ (2 | 3)) => proto = p as u8,
            _ => return Reply::err("NOPROTO unsupported protocol version"),
        }
    }
    let mut i = 2;
    let mut name = None;
    while i < args.len() {
        match String::from_utf8_lossy(&args[i]).to_ascii_lowercase().as_str() {
            "auth" if i + 2 < args.len() => {
                if let Reply::Error(e) = auth(api, c, &args[i + 2]) {
                    return Reply::Error(e);
                }
                i += 3;
            }
            "setname" if i + 1 < args.len() => {
                name = Some(args[i + 1].clone());
                i += 2;
            }
            other => return Reply::err(format!("ERR syntax error in HELLO option '{other}'")),
        }
    }
    if c.who.is_none() {
        return Reply::err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
    }
    if name.is_some() {
        c.name = name;
    }
    c.proto = proto;
    Reply::Map(vec![
        (Reply::bulk("server"), Reply::bulk("redis")),
        (Reply::bulk("version"), Reply::bulk(REDIS_COMPAT_VERSION)),
        (Reply::bulk("proto"), Reply::Int(proto as i64)),
        (Reply::bulk("id"), Reply::Int(c.id as i64)),
        (Reply::bulk("mode"), Reply::bulk("standalone")),
        (Reply::bulk("role"), Reply::bulk("master")),
        (Reply::bulk("modules"), Reply::Array(vec![])),
    ])
}

fn info(api: &Api) -> String {
    let map = api.node.map();
    format!(
        "# Server\r\nredis_version:{REDIS_COMPAT_VERSION}\r\nringkv_version:{}\r\nredis_mode:standalone\r\nprocess_id:{}\r\n\r\n# Cluster\r\ncluster_enabled:0\r\nringkv_node:{}\r\nringkv_nodes:{}\r\nringkv_shards:{}\r\n\r\n# Keyspace\r\n",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        api.node.id(),
        map.nodes.len(),
        map.shards.len()
    )
}

/// `CONFIG GET`: the answers redis-benchmark and clients ask for; anything else matches nothing.
fn config_get(patterns: &[Vec<u8>]) -> Reply {
    const KNOWN: &[(&str, &str)] = &[("save", ""), ("appendonly", "no"), ("databases", "1")];
    let mut pairs = Vec::new();
    for p in patterns {
        let p = String::from_utf8_lossy(p).to_ascii_lowercase();
        for (k, v) in KNOWN {
            if p == *k || p == "*" {
                pairs.push((Reply::bulk(*k), Reply::bulk(*v)));
            }
        }
    }
    Reply::Map(pairs)
}

/// The data commands.
async fn data_command(api: &Api, who: &Principal, name: &str, args: Args) -> Reply {
    match data(api, who, name, args).await {
        Ok(r) => r,
        Err(e) => api_error(e, name),
    }
}

async fn data(api: &Api, who: &Principal, name: &str, mut args: Args) -> Result<Reply, ApiError> {
    let n = args.len();
    let bulk_or_null = |v: Option<Vec<u8>>| v.map(Reply::Bulk).unwrap_or(Reply::Null);
    Ok(match (name, n) {
        ("get", 2) => bulk_or_null(api.get(who, &args[1], false).await?),
        ("set", 3..) => return set(api, who, args).await,
        ("setnx", 3) => Reply::Int(api.cas(who, &args[1], None, &args[2]).await?.swapped as i64),
        ("getset", 3) => {
            let v = args.pop().unwrap_or_default();
            bulk_or_null(swap(api, who, &args[1], &v, |_| true).await?.1)
        }
        ("del", 2..) => {
            let ops = args[1..].iter().map(|k| api.key_op(who, k, KeyOp::DeleteCount));
            Reply::Int(futures::future::try_join_all(ops).await?.iter().sum())
        }
        ("exists", 2..) => {
            api.check(who, Role::Read, "exists")?;
            let values = api.batch_get(who, &args[1..], false).await?;
            Reply::Int(values.iter().filter(|v| v.is_some()).count() as i64)
        }
        ("mget", 2..) => Reply::Array(api.batch_get(who, &args[1..], false).await?.into_iter().map(bulk_or_null).collect()),
        ("mset", 3..) if n % 2 == 1 => {
            let mut it = args.into_iter().skip(1);
            let mut pairs = Vec::with_capacity(n / 2);
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            api.batch_put(who, &pairs).await?;
            Reply::ok()
        }
        ("incr", 2) => Reply::Int(api.key_op(who, &args[1], KeyOp::Incr(1)).await?),
        ("decr", 2) => Reply::Int(api.key_op(who, &args[1], KeyOp::Incr(-1)).await?),
        ("incrby" | "decrby", 3) => {
            let Some(d) = int_arg(&args[2]) else { return Ok(Reply::err("ERR value is not an integer or out of range")) };
            let d = if name == "decrby" {
                match d.checked_neg() {
                    Some(d) => d,
                    None => return Ok(Reply::err("ERR decrement would overflow")),
                }
            } else {
                d
            };
            Reply::Int(api.key_op(who, &args[1], KeyOp::Incr(d)).await?)
        }
        ("append", 3) => {
            let v = args.pop().unwrap_or_default();
            Reply::Int(api.key_op(who, &args[1], KeyOp::Append(v)).await?)
        }
        ("strlen", 2) => Reply::Int(api.get(who, &args[1], false).await?.map_or(0, |v| v.len() as i64)),
        (
            "get" | "setnx" | "getset" | "del" | "exists" | "mget" | "mset" | "incr" | "decr" | "incrby" | "decrby" | "append" | "strlen"
            | "set",
            _,
        ) => arity_error(name),
        _ => {
            let start: Vec<String> = args.iter().skip(1).take(3).map(|a| format!("'{}'", String::from_utf8_lossy(a))).collect();
            Reply::err(format!(
                "ERR unknown command '{}', with args beginning with: {} (ringkv serves the string commands; see its README)",
                String::from_utf8_lossy(&args[0]),
                start.join(" ")
            ))
        }
    })
}

/// `SET key value [NX | XX] [GET]`; expiry options are refused.
async fn set(api: &Api, who: &Principal, args: Args) -> Result<Reply, ApiError> {
    let (key, value) = (&args[1], &args[2]);
    let (mut nx, mut xx, mut get) = (false, false, false);
    for o in &args[3..] {
        match String::from_utf8_lossy(o).to_ascii_uppercase().as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GET" => get = true,
            "EX" | "PX" | "EXAT" | "PXAT" | "KEEPTTL" => {
                return Ok(Reply::err("ERR ringkv keys do not expire: SET with EX, PX, EXAT, PXAT or KEEPTTL is not supported"))
            }
            _ => return Ok(Reply::err("ERR syntax error")),
        }
    }
    if nx && xx {
        return Ok(Reply::err("ERR syntax error"));
    }
    let null_or = |v: Option<Vec<u8>>| v.map(Reply::Bulk).unwrap_or(Reply::Null);
    Ok(match (nx, xx, get) {
        (false, false, false) => {
            api.put(who, key, value).await?;
            Reply::ok()
        }
        (true, _, _) => {
            let out = api.cas(who, key, None, value).await?;
            match (out.swapped, get) {
                (true, false) => Reply::ok(),
                (false, false) => Reply::Null,
                // With GET: the old value (none when it was set).
                (_, true) => null_or(out.current),
            }
        }
        (false, xx, get) => {
            let (done, old) = swap(api, who, key, value, |cur| !xx || cur.is_some()).await?;
            match (done, get) {
                (_, true) => null_or(old),
                (true, false) => Reply::ok(),
                (false, false) => Reply::Null,
            }
        }
    })
}

/// Sets `key` to `value` if `allowed(current)`, by compare-and-swap from the value read:
/// whether it was set, and the value it replaced (or that stopped it).
async fn swap(
    api: &Api,
    who: &Principal,
    key: &[u8],
    value: &[u8],
    allowed: impl Fn(&Option<Vec<u8>>) -> bool,
) -> Result<(bool, Option<Vec<u8>>), ApiError> {
    api.check(who, Role::Write, "set")?;
    let mut current = api.get(who, key, false).await?;
    for _ in 0..CAS_ATTEMPTS_MAX {
        if !allowed(&current) {
            return Ok((false, current));
        }
        let out = api.cas(who, key, current.as_deref(), value).await?;
        if out.swapped {
            return Ok((true, current));
        }
        current = out.current;
    }
    Err(ApiError {
        code: "unavailable",
        message: format!("the key changed {CAS_ATTEMPTS_MAX} times while being set; try again"),
        retryable: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        Conn { proto: 2, who: None, name: None, id: 1, quit: false, last: Default::default() }
    }

    /// Commands on a key wait for the earlier ones on it, never for themselves or other keys.
    #[test]
    fn commands_wait_only_for_earlier_ones_on_their_keys() {
        let mut c = conn();
        let (a, b) = (b"a".to_vec(), b"b".to_vec());
        let (w1, end1) = c.order(&[a.clone(), a.clone()]);
        assert!(w1.is_empty(), "a key named twice does not wait for itself");
        let (w2, _done2) = c.order(std::slice::from_ref(&b));
        assert!(w2.is_empty(), "another key does not wait");
        let (w3, _done3) = c.order(&[b.clone(), a.clone()]);
        assert_eq!(w3.len(), 2, "waits for the last command on each of its keys");
        drop(end1);
        assert!(w3.iter().filter(|w| w.is_done()).count() == 1, "the first command's end is seen");
        // Ended commands are forgotten once many keys are tracked.
        for i in 0..5000u32 {
            let (_, end) = c.order(&[i.to_be_bytes().to_vec()]);
            drop(end);
        }
        assert!(c.last.len() <= 4 * PIPELINE_MAX + 1, "{} keys tracked", c.last.len());
        assert_eq!(
            keys_of("mset", &vec![b"mset".to_vec(), a.clone(), b"1".to_vec(), b.clone(), b"2".to_vec()]),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(keys_of("get", &vec![b"get".to_vec(), a.clone()]), vec![a]);
    }
}
