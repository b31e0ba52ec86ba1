//! Request/response multiplexed over a few long-lived QUIC bidirectional streams ("lanes").
//!
//! A frame is `u32 length ++ postcard(Envelope { id, body })`. The caller tags each request with
//! an id and waits for the response with the same id, so many requests share one stream and no
//! stream is opened per request (a new stream per small request costs a QUIC ACK delay, ~26 ms
//! here). Each lane has one writer task that drains everything queued and writes it in one go, so
//! messages to one destination are batched.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use dashmap::DashMap;
use ringkv_wire::codec::{encode_frame, frame_len, CodecError, FRAME_HEADER_BYTES};
use ringkv_wire::Envelope;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::tls::Caller;

/// The room a frame's buffer starts with (most requests and answers fit; larger ones grow it).
const FRAME_START_BYTES: usize = 512;
/// Frames queued per lane before senders wait.
pub const LANE_QUEUE_MAX: usize = 4096;
/// Largest batch one writer hands to QUIC at once.
pub const WRITE_BATCH_BYTES_MAX: usize = 1 << 20;
/// Most bytes of answers a stream's reader gathers before handing them to its writer.
const ANSWERS_BATCH_BYTES: usize = 64 * 1024;
/// Requests one stream may have in flight on the serving side; past it, reading pauses.
pub const SERVER_IN_FLIGHT_PER_STREAM_MAX: usize = 1024;
/// Requests one connection may have in flight on the calling side; past it, callers wait.
pub const CLIENT_IN_FLIGHT_PER_CONNECTION_MAX: usize = 4096;
/// The id of the error frame a server sends before it closes a stream whose framing is broken.
pub const BROKEN_STREAM_ID: u64 = u64::MAX;
/// A frame over the size limit but under this is read past (and answered with the service's
/// "too large" error for its id), so the stream and the connection other requests share stay
/// up; a longer one is taken for broken framing and closes the stream.
pub const OVERSIZE_SKIP_BYTES_MAX: usize = 256 << 20;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot encode request: {0}")]
    Encode(String),
    #[error("peer sent a malformed frame: {0}")]
    Decode(String),
    #[error("peer unreachable: {0}")]
    Unreachable(String),
}

/// Resolves `addr` (`host:port`) to the first socket address it names.
pub async fn resolve(addr: &str) -> Result<SocketAddr, RpcError> {
    let err = |msg: String| RpcError::Connect { addr: addr.into(), msg };
    tokio::net::lookup_host(addr).await.map_err(|e| err(e.to_string()))?.next().ok_or_else(|| err("names no address".into()))
}

/// The serving side of a protocol. Every request comes with the identity of the connection's
/// certificate, so a service decides what each caller may do.
pub trait Service<Req, Resp>: Send + Sync + 'static {
    fn call(self: Arc<Self>, caller: Caller, req: Req) -> BoxFuture<Resp>;
    /// Answers `req` on the spot if that needs no waiting (a read a leader's lease covers, say),
    /// sparing it a task of its own; else gives it back for [`Service::call`].
    fn call_now(&self, _caller: Caller, req: Req) -> Result<Resp, Req> {
        Err(req)
    }
    /// The response sent for a request that could not be decoded or answered.
    fn error(&self, why: String) -> Resp;
    /// The response sent for a request over the frame size limit.
    fn too_large(&self, why: String) -> Resp {
        self.error(why)
    }
    /// The response sent to every request of a connection over the server's connection limit.
    fn busy(&self, why: String) -> Resp {
        self.error(why)
    }
}

/// Calls awaiting their answer, by request id (our own counter: no need for a keyed hash).
type Pending<Resp> = DashMap<u64, oneshot::Sender<Result<Resp, RpcError>>, rustc_hash::FxBuildHasher>;

/// The calling side of one QUIC connection.
pub struct RpcClient<Req, Resp> {
    conn: quinn::Connection,
    lanes: Vec<mpsc::Sender<Vec<u8>>>,
    pending: Arc<Pending<Resp>>,
    next_id: AtomicU64,
    next_lane: AtomicUsize,
    frame_bytes_max: usize,
    dead: Arc<AtomicBool>,
    in_flight: Arc<Semaphore>,
    _req: PhantomData<fn(Req)>,
}

impl<Req, Resp> RpcClient<Req, Resp>
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
        lanes: usize,
        frame_bytes_max: usize,
    ) -> Result<Self, RpcError> {
        let err = |msg: String| RpcError::Connect { addr: addr.to_string(), msg };
        let conn =
            endpoint.connect_with(config, addr, server_name).map_err(|e| err(e.to_string()))?.await.map_err(|e| err(e.to_string()))?;
        Self::over(conn, lanes, frame_bytes_max).await
    }

    /// Opens `lanes` streams on an established connection.
    pub async fn over(conn: quinn::Connection, lanes: usize, frame_bytes_max: usize) -> Result<Self, RpcError> {
        Self::over_prioritized(conn, lanes, frame_bytes_max, &[]).await
    }

    /// As [`RpcClient::over`], with a QUIC send priority per lane (`priorities[i]` for lane `i`,
    /// 0 past its end): of the bytes the connection holds to send, a lane of higher priority
    /// goes first (strictly; equal priorities take turns). Every lane has its own queue and
    /// writer either way, so a frame never waits in another lane's queue in this process; all
    /// lanes still share the connection's congestion and flow-control windows.
    pub async fn over_prioritized(
        conn: quinn::Connection,
        lanes: usize,
        frame_bytes_max: usize,
        priorities: &[i32],
    ) -> Result<Self, RpcError> {
        let pending: Arc<Pending<Resp>> = Arc::new(DashMap::with_hasher(rustc_hash::FxBuildHasher));
        let dead = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(Semaphore::new(CLIENT_IN_FLIGHT_PER_CONNECTION_MAX));
        let mut txs = Vec::with_capacity(lanes);
        for lane in 0..lanes.max(1) {
            let (send, recv) = conn.open_bi().await.map_err(|e| RpcError::ConnectionLost(e.to_string()))?;
            let _ = send.set_priority(priorities.get(lane).copied().unwrap_or(0));
            let (tx, rx) = mpsc::channel(LANE_QUEUE_MAX);
            // Other calls in flight on the connection: their requests may be on their way.
            let calls = in_flight.clone();
            tokio::spawn(write_loop(send, rx, move || others_in_flight(&calls, CLIENT_IN_FLIGHT_PER_CONNECTION_MAX)));
            tokio::spawn(read_responses(recv, pending.clone(), dead.clone(), frame_bytes_max));
            txs.push(tx);
        }
        Ok(RpcClient {
            conn,
            lanes: txs,
            pending,
            next_id: AtomicU64::new(1),
            next_lane: AtomicUsize::new(0),
            frame_bytes_max,
            dead,
            in_flight,
            _req: PhantomData,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.dead.load(Ordering::Relaxed) || self.conn.close_reason().is_some()
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Sends `req` on the next lane and waits up to `timeout` for its response.
    pub async fn call(&self, req: &Req, timeout: Duration) -> Result<Resp, RpcError> {
        let lane = self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        self.call_on_lane(lane, req, timeout).await
    }

    /// Sends `req` on a chosen lane (e.g. a lane kept for bulk transfers).
    pub async fn call_on_lane(&self, lane: usize, req: &Req, timeout: Duration) -> Result<Resp, RpcError> {
        self.call_on_lane_sized(lane, req, |_| timeout).await
    }

    /// As [`RpcClient::call_on_lane`], with the deadline chosen once the request is encoded,
    /// from its frame's size (a large message gets time for its bytes).
    pub async fn call_on_lane_sized(&self, lane: usize, req: &Req, timeout: impl FnOnce(usize) -> Duration) -> Result<Resp, RpcError> {
        if self.is_closed() {
            return Err(RpcError::ConnectionLost("connection closed".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::with_capacity(FRAME_START_BYTES);
        encode_frame(&Envelope { id, body: req }, self.frame_bytes_max, &mut frame).map_err(|e| RpcError::Encode(e.to_string()))?;
        let timeout = timeout(frame.len());
        let (tx, rx) = oneshot::channel();
        self.pending.insert(id, tx);
        let guard = PendingGuard { pending: &self.pending, id };
        let tx = &self.lanes[lane % self.lanes.len()];
        let sent = tokio::time::timeout(timeout, async {
            let _permit = self.in_flight.acquire().await.map_err(|_| RpcError::ConnectionLost("closed".into()))?;
            tx.send(frame).await.map_err(|_| RpcError::ConnectionLost("lane closed".into()))?;
            rx.await.map_err(|_| RpcError::ConnectionLost("connection closed while waiting".into()))?
        })
        .await;
        drop(guard);
        sent.map_err(|_| RpcError::Timeout(timeout))?
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }
}

struct PendingGuard<'a, Resp> {
    pending: &'a Pending<Resp>,
    id: u64,
}

impl<Resp> Drop for PendingGuard<'_, Resp> {
    fn drop(&mut self) {
        self.pending.remove(&self.id);
    }
}

/// Whether more than one request holds a permit of `limit` (a semaphore of `max` permits):
/// then another answer or request is likely due soon, and a writer may wait a moment for it.
fn others_in_flight(limit: &Semaphore, max: usize) -> bool {
    max - limit.available_permits() > 1
}

/// Writes what is queued for one stream, each burst in one write. While `busy` says more frames
/// are likely on their way (other requests in flight), it first lets the tasks already woken
/// run, so frames queued by them go in the same write and, most often, the same datagram (at
/// 256 reads in flight, 14 % fewer `sendmsg` calls per read in the load generator, 10 % fewer
/// in the nodes). With one request in flight it writes at once.
async fn write_loop(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Vec<u8>>, busy: impl Fn() -> bool) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        if busy() {
            tokio::task::yield_now().await;
        }
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < WRITE_BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        metrics::counter!("ringkv_transport_sent_bytes_total").increment(buf.len() as u64);
        metrics::counter!("ringkv_transport_write_batches_total").increment(1);
        if send.write_all(&buf).await.is_err() {
            break;
        }
    }
    let _ = send.finish();
}

/// Reads frames off one stream through a buffer: each read takes whatever the stream holds
/// (often several frames), so a burst costs one read of the stream, and one lock of the QUIC
/// connection, instead of two per frame.
struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    frame_bytes_max: usize,
}

/// Bytes a frame reader asks the stream for at least, when its buffer runs dry.
const READ_CHUNK_BYTES: usize = 16 * 1024;

impl FrameReader {
    fn new(recv: quinn::RecvStream, frame_bytes_max: usize) -> Self {
        FrameReader { recv, buf: BytesMut::new(), frame_bytes_max }
    }

    /// Reads until the buffer holds at least `n` bytes; `false` if the stream ended first.
    async fn fill(&mut self, n: usize) -> Result<bool, FrameError> {
        while self.buf.len() < n {
            self.buf.reserve((n - self.buf.len()).max(READ_CHUNK_BYTES));
            match self.recv.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e) => return Err(FrameError::Stream(e.to_string())),
            }
        }
        Ok(true)
    }

    /// Whether a whole frame is buffered, so [`FrameReader::next`] needs no read of the stream.
    fn has_frame(&self) -> bool {
        let Some(header) = self.buf.get(..FRAME_HEADER_BYTES) else { return false };
        let header = header.try_into().expect("header bytes");
        // An oversize length is not a whole frame: `next` reads on and reports it.
        frame_len(header, usize::MAX).is_ok_and(|len| self.buf.len() - FRAME_HEADER_BYTES >= len)
    }

    /// The next frame's body; `Ok(None)` at a clean end of stream (between frames).
    async fn next(&mut self) -> Result<Option<Bytes>, FrameError> {
        if !self.fill(FRAME_HEADER_BYTES).await? {
            return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Stream("stream ended inside a frame header".into())) };
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header.copy_from_slice(&self.buf[..FRAME_HEADER_BYTES]);
        let len = match frame_len(header, self.frame_bytes_max) {
            Ok(len) => len,
            Err(CodecError::TooLarge { len, .. }) if len <= OVERSIZE_SKIP_BYTES_MAX => {
                self.buf.advance(FRAME_HEADER_BYTES);
                return Err(FrameError::Skipped { id: self.skip(len).await?, len });
            }
            Err(e) => return Err(FrameError::Codec(e)),
        };
        if !self.fill(FRAME_HEADER_BYTES + len).await? {
            return Err(FrameError::Stream("stream ended inside a frame".into()));
        }
        self.buf.advance(FRAME_HEADER_BYTES);
        metrics::counter!("ringkv_transport_received_bytes_total").increment((len + FRAME_HEADER_BYTES) as u64);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Reads past the body of an oversize frame of `len` bytes without holding it, keeping
    /// only the request id at its start (postcard varint).
    async fn skip(&mut self, len: usize) -> Result<Option<u64>, FrameError> {
        let head = len.min(10);
        if !self.fill(head).await? {
            return Err(FrameError::Stream("stream ended inside an oversize frame".into()));
        }
        let id = postcard::take_from_bytes::<u64>(&self.buf[..head]).ok().map(|(id, _)| id);
        let mut left = len;
        loop {
            let n = left.min(self.buf.len());
            self.buf.advance(n);
            left -= n;
            if left == 0 {
                return Ok(id);
            }
            if !self.fill(left.min(READ_CHUNK_BYTES)).await? {
                return Err(FrameError::Stream("stream ended inside an oversize frame".into()));
            }
        }
    }
}

#[derive(Debug)]
enum FrameError {
    Stream(String),
    Codec(CodecError),
    /// A frame over the limit was read past; its id, if the start of its body named one.
    Skipped {
        id: Option<u64>,
        len: usize,
    },
}

async fn read_responses<Resp: DeserializeOwned>(
    recv: quinn::RecvStream,
    pending: Arc<Pending<Resp>>,
    dead: Arc<AtomicBool>,
    frame_bytes_max: usize,
) {
    let mut frames = FrameReader::new(recv, frame_bytes_max);
    let why = loop {
        let body = match frames.next().await {
            Ok(Some(b)) => b,
            Ok(None) => break "stream finished".to_string(),
            Err(FrameError::Skipped { id, len }) => {
                // Only the request whose answer is too large fails; the lane stays usable.
                if let Some((_, tx)) = id.and_then(|id| pending.remove(&id)) {
                    let _ = tx.send(Err(RpcError::Decode(format!("a response of {len} bytes is over the limit of {frame_bytes_max}"))));
                }
                continue;
            }
            Err(e) => break format!("{e:?}"),
        };
        match postcard::from_bytes::<Envelope<Resp>>(&body) {
            Ok(env) => {
                if let Some((_, tx)) = pending.remove(&env.id) {
                    let _ = tx.send(Ok(env.body));
                }
            }
            Err(e) => {
                // The framing is intact, so only the request with this id (if it can be read)
                // fails; the lane stays usable.
                if let Ok((id, _)) = postcard::take_from_bytes::<u64>(&body) {
                    if let Some((_, tx)) = pending.remove(&id) {
                        let _ = tx.send(Err(RpcError::Decode(e.to_string())));
                    }
                }
            }
        }
    };
    dead.store(true, Ordering::Relaxed);
    let ids: Vec<u64> = pending.iter().map(|e| *e.key()).collect();
    for id in ids {
        if let Some((_, tx)) = pending.remove(&id) {
            let _ = tx.send(Err(RpcError::ConnectionLost(why.clone())));
        }
    }
}

/// Serves every stream the peer opens on `conn` until the connection ends. The answers on the
/// `i`-th stream the peer opens (its lane `i`) get the QUIC send priority `priorities[i]` (0 past
/// its end), as the caller's requests on that lane do ([`RpcClient::over_prioritized`]).
pub async fn serve_connection<Req, Resp, S>(conn: quinn::Connection, svc: Arc<S>, frame_bytes_max: usize, priorities: &'static [i32])
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    S: Service<Req, Resp>,
{
    let Some(caller) = crate::tls::caller(&conn) else {
        metrics::counter!("ringkv_transport_handshake_failures_total").increment(1);
        conn.close(3u32.into(), b"no readable certificate");
        return;
    };
    while let Ok((send, recv)) = conn.accept_bi().await {
        let lane = send.id().index() as usize;
        let _ = send.set_priority(priorities.get(lane).copied().unwrap_or(0));
        tokio::spawn(serve_stream::<Req, Resp, S>(send, recv, svc.clone(), caller, frame_bytes_max));
    }
}

async fn serve_stream<Req, Resp, S>(send: quinn::SendStream, recv: quinn::RecvStream, svc: Arc<S>, caller: Caller, frame_bytes_max: usize)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    S: Service<Req, Resp>,
{
    let (tx, rx) = mpsc::channel::<Vec<u8>>(LANE_QUEUE_MAX);
    let in_flight = Arc::new(Semaphore::new(SERVER_IN_FLIGHT_PER_STREAM_MAX));
    // Other requests being served on the stream: their answers may be on their way.
    let serving = in_flight.clone();
    tokio::spawn(write_loop(send, rx, move || others_in_flight(&serving, SERVER_IN_FLIGHT_PER_STREAM_MAX)));
    let mut frames = FrameReader::new(recv, frame_bytes_max);
    // Answers given on the spot, sent to the writer together once the frames read in one go
    // are done (so a burst of reads gets one write, not one per answer).
    let mut answered = Vec::new();
    loop {
        let flush = !answered.is_empty() && (!frames.has_frame() || answered.len() >= ANSWERS_BATCH_BYTES);
        if flush && tx.send(std::mem::take(&mut answered)).await.is_err() {
            break;
        }
        let body = match frames.next().await {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(FrameError::Stream(e)) => {
                tracing::debug!("peer stream ended: {e}");
                break;
            }
            Err(FrameError::Skipped { id, len }) => {
                metrics::counter!("ringkv_transport_oversize_frames_total").increment(1);
                let why = format!("a request of {len} bytes is over the limit of {frame_bytes_max}");
                if let Some(f) = encode_reply(&*svc, id.unwrap_or(BROKEN_STREAM_ID), svc.too_large(why), frame_bytes_max) {
                    let _ = tx.send(f).await;
                }
                continue;
            }
            Err(FrameError::Codec(e)) => {
                // The length prefix is bad, so the rest of the stream cannot be framed: say why
                // and close this stream. Other streams and the connection are unaffected.
                metrics::counter!("ringkv_transport_malformed_frames_total").increment(1);
                if let Some(f) = encode_reply(&*svc, BROKEN_STREAM_ID, svc.error(e.to_string()), frame_bytes_max) {
                    let _ = tx.send(f).await;
                }
                let _ = frames.recv.stop(1u32.into());
                break;
            }
        };
        let (id, req) = match postcard::from_bytes::<Envelope<Req>>(&body) {
            Ok(env) => (env.id, env.body),
            Err(e) => {
                metrics::counter!("ringkv_transport_malformed_frames_total").increment(1);
                let id = postcard::take_from_bytes::<u64>(&body).map(|(id, _)| id).unwrap_or(BROKEN_STREAM_ID);
                if let Some(f) = encode_reply(&*svc, id, svc.error(format!("cannot decode request: {e}")), frame_bytes_max) {
                    let _ = tx.send(f).await;
                }
                continue;
            }
        };
        let req = match svc.call_now(caller, req) {
            Ok(resp) => {
                encode_reply_into(&*svc, id, resp, frame_bytes_max, &mut answered);
                continue;
            }
            Err(req) => req,
        };
        if !answered.is_empty() && tx.send(std::mem::take(&mut answered)).await.is_err() {
            break;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let svc = svc.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let resp = svc.clone().call(caller, req).await;
            if let Some(f) = encode_reply(&*svc, id, resp, frame_bytes_max) {
                let _ = tx.send(f).await;
            }
            drop(permit);
        });
    }
}

/// Encodes a response; one too large to send becomes the service's error response.
fn encode_reply<Req, Resp: Serialize, S: Service<Req, Resp>>(svc: &S, id: u64, resp: Resp, frame_bytes_max: usize) -> Option<Vec<u8>> {
    let mut frame = Vec::with_capacity(FRAME_START_BYTES);
    encode_reply_into(svc, id, resp, frame_bytes_max, &mut frame).then_some(frame)
}

/// As [`encode_reply`], appended to `out`; `false` if not even the error fits.
fn encode_reply_into<Req, Resp: Serialize, S: Service<Req, Resp>>(
    svc: &S,
    id: u64,
    resp: Resp,
    frame_bytes_max: usize,
    out: &mut Vec<u8>,
) -> bool {
    if let Err(e) = encode_frame(&Envelope { id, body: &resp }, frame_bytes_max, out) {
        let err = svc.error(format!("cannot encode response: {e}"));
        return encode_frame(&Envelope { id, body: &err }, frame_bytes_max, out).is_ok();
    }
    true
}

/// How long a connection over the limit is kept to answer `busy` before it is closed.
pub const BUSY_CONNECTION_LINGER: Duration = Duration::from_millis(500);

/// Answers every request on a connection over the limit with the service's `busy` error, then
/// closes it (the caller dials again later).
async fn refuse_connection<Req, Resp, S>(conn: quinn::Connection, svc: Arc<S>, frame_bytes_max: usize, connections_max: usize)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    S: Service<Req, Resp>,
{
    metrics::counter!("ringkv_transport_connections_refused_total").increment(1);
    let answer = async {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
            tokio::spawn(write_loop(send, rx, || false));
            let svc = svc.clone();
            tokio::spawn(async move {
                let mut frames = FrameReader::new(recv, frame_bytes_max);
                while let Ok(Some(body)) = frames.next().await {
                    let id = postcard::take_from_bytes::<u64>(&body).map(|(id, _)| id).unwrap_or(BROKEN_STREAM_ID);
                    let why = format!("the node serves at most {connections_max} client connections; try again later");
                    if let Some(f) = encode_reply(&*svc, id, svc.busy(why), frame_bytes_max) {
                        if tx.send(f).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    };
    let _ = tokio::time::timeout(BUSY_CONNECTION_LINGER, answer).await;
    conn.close(4u32.into(), b"busy");
}

/// Accepts connections on `endpoint` and serves each with `svc` until `shutdown` resolves; past
/// `connections_max` connections at once, a new one gets only `busy` answers and is closed.
pub async fn serve<Req, Resp, S>(
    endpoint: quinn::Endpoint,
    svc: Arc<S>,
    frame_bytes_max: usize,
    connections_max: usize,
    shutdown: impl Future<Output = ()>,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    S: Service<Req, Resp>,
{
    let slots = Arc::new(Semaphore::new(connections_max));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let svc = svc.clone();
                let permit = slots.clone().try_acquire_owned();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => match permit {
                            Ok(_permit) => serve_connection::<Req, Resp, S>(conn, svc, frame_bytes_max, &[]).await,
                            Err(_) => refuse_connection::<Req, Resp, S>(conn, svc, frame_bytes_max, connections_max).await,
                        },
                        Err(e) => {
                            metrics::counter!("ringkv_transport_handshake_failures_total").increment(1);
                            tracing::debug!("incoming connection refused: {e}");
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;
    use std::sync::atomic::AtomicUsize;

    /// Answers each request with its length.
    struct Len;

    impl Service<ByteBuf, u64> for Len {
        fn call(self: Arc<Self>, _caller: Caller, req: ByteBuf) -> BoxFuture<u64> {
            Box::pin(async move { req.len() as u64 })
        }
        fn error(&self, _why: String) -> u64 {
            u64::MAX
        }
    }

    const FRAME_MAX: usize = 4 << 20;

    /// Answers a request starting with 0 on the spot with its length plus [`NOW`]; any other
    /// after 300 ms, with its length.
    struct Quick;

    const NOW: u64 = 1_000_000;

    impl Service<ByteBuf, u64> for Quick {
        fn call(self: Arc<Self>, _caller: Caller, req: ByteBuf) -> BoxFuture<u64> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                req.len() as u64
            })
        }
        fn call_now(&self, _caller: Caller, req: ByteBuf) -> Result<u64, ByteBuf> {
            if req.first() == Some(&0) {
                Ok(NOW + req.len() as u64)
            } else {
                Err(req)
            }
        }
        fn error(&self, _why: String) -> u64 {
            u64::MAX
        }
    }

    /// A server endpoint serving [`Len`] on loopback and a client of it with `lanes` lanes.
    async fn connected(dir: &std::path::Path, lanes: usize) -> (RpcClient<ByteBuf, u64>, quinn::Endpoint, quinn::Endpoint) {
        connected_to(dir, lanes, Arc::new(Len)).await
    }

    async fn connected_to<S: Service<ByteBuf, u64>>(
        dir: &std::path::Path,
        lanes: usize,
        svc: Arc<S>,
    ) -> (RpcClient<ByteBuf, u64>, quinn::Endpoint, quinn::Endpoint) {
        let ca = dir.join("ca");
        crate::certs::init_ca(&ca).expect("ca");
        let out = crate::certs::issue_node(&ca, &dir.join("node"), 1, &[]).expect("node cert");
        let paths = crate::tls::CertPaths { ca: ca.join("ca.pem"), cert: out.cert, key: out.key };
        let server_cfg = crate::tls::server_config(&paths, b"test").expect("server config");
        let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = server.local_addr().expect("addr");
        let accepting = server.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                if let Ok(conn) = incoming.await {
                    tokio::spawn(serve_connection::<ByteBuf, u64, _>(conn, svc.clone(), FRAME_MAX, &[0, 1]));
                }
            }
        });
        let client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        let cfg = crate::tls::client_config(&paths, b"test").expect("client config");
        let conn = client_ep.connect_with(cfg, addr, crate::NODE_SERVER_NAME).expect("connect").await.expect("handshake");
        let client = RpcClient::over_prioritized(conn, lanes, FRAME_MAX, &[0, 1]).await.expect("lanes");
        (client, server, client_ep)
    }

    /// How many of `large` 1 MiB requests, all queued on lane 0 first, were answered when a
    /// small request on `small_lane` was.
    async fn answered_before_small(small_lane: usize) -> usize {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, _server, _ep) = connected(dir.path(), 2).await;
        let client = Arc::new(client);
        let large = 48usize;
        let answered = Arc::new(AtomicUsize::new(0));
        let mut calls = Vec::new();
        for _ in 0..large {
            let (client, answered) = (client.clone(), answered.clone());
            calls.push(tokio::spawn(async move {
                let n = client.call_on_lane(0, &ByteBuf::from(vec![7u8; 1 << 20]), Duration::from_secs(60)).await.expect("large call");
                assert_eq!(n, 1 << 20);
                answered.fetch_add(1, Ordering::SeqCst);
            }));
        }
        // Every large request is encoded and registered as pending (then, without waiting on
        // anything but a permit of which there are plenty, queued on its lane), or already
        // answered, before the small one is sent.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while client.pending.len() + answered.load(Ordering::SeqCst) < large {
            assert!(std::time::Instant::now() < deadline, "the large requests were not all sent");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let n = client.call_on_lane(small_lane, &ByteBuf::from(vec![1u8; 16]), Duration::from_secs(60)).await.expect("small call");
        assert_eq!(n, 16);
        let before = answered.load(Ordering::SeqCst);
        for c in calls {
            c.await.expect("large call task");
        }
        before
    }

    /// A small request on a lane of its own is answered while a backlog of large requests on
    /// another lane is still going out; on the same lane it waits behind them (which shows the
    /// check can fail).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_request_on_its_own_lane_does_not_wait_behind_another_lanes_backlog() {
        let own = answered_before_small(1).await;
        assert!(own < 24, "{own} of 48 large requests on another lane were answered before the small one");
        let shared = answered_before_small(0).await;
        assert!(shared >= 32, "only {shared} of 48 large requests ahead on the same lane were answered before the small one");
    }

    /// A request the service answers on the spot is answered while slower requests read
    /// before it on the same lane still wait; and a burst of frames read together from one
    /// stream (large ones spanning many reads among them) each get their own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_on_the_spot_do_not_wait_for_slower_requests_read_before_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, _server, _ep) = connected_to(dir.path(), 1, Arc::new(Quick)).await;
        let client = Arc::new(client);
        let slow = {
            let client = client.clone();
            tokio::spawn(async move { client.call_on_lane(0, &ByteBuf::from(vec![1u8; 10]), Duration::from_secs(10)).await })
        };
        while client.pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let started = std::time::Instant::now();
        let quick = client.call_on_lane(0, &ByteBuf::from(vec![0u8; 5]), Duration::from_secs(10)).await.expect("quick call");
        assert_eq!(quick, NOW + 5, "answered on the spot");
        assert!(started.elapsed() < Duration::from_millis(250), "the quick answer waited {:?}", started.elapsed());
        assert!(!slow.is_finished(), "the slow request was answered before the quick one");
        assert_eq!(slow.await.expect("slow task").expect("slow call"), 10);

        let mut calls = Vec::new();
        for i in 0..200usize {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                let len = if i % 50 == 7 { 300_000 + i } else { 1 + i };
                let first = if i % 2 == 0 { 0 } else { 1 };
                let mut body = vec![9u8; len];
                body[0] = first;
                let n = client.call_on_lane(0, &ByteBuf::from(body), Duration::from_secs(30)).await.expect("burst call");
                assert_eq!(n, len as u64 + if first == 0 { NOW } else { 0 }, "answer to request {i}");
            }));
        }
        for c in calls {
            c.await.expect("burst task");
        }
    }
}
