//! Server side: the parameters of calls that do not fit in their first message, gathered
//! before a call is handed on, and the limits on them. A call complete in its first message
//! (nearly all, see [`complete_inline`]) is handed on at once; any other is gathered in a
//! future of its own ([`Gathering`]), so a caller that stops half-way holds up no other call.
//! A call over [`MAX_CALL_BYTES`] or [`MAX_GATHERING_BYTES`], or whose parameters do not end
//! within [`PARAMS_PATIENCE`], is dropped and answered with an error result.

use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;

use async_nats::Subject;
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, Stream, StreamExt as _};
use futures::FutureExt as _;
use tracing::warn;

use super::client::headers_len;
use super::server::{Accepted, Call, PARAMS_PATIENCE};
use super::{Deadline, Incoming, Writer};

/// The most parameter bytes one call may send (in its first message and after its accept,
/// together). A call that sends more is dropped, answered with an error (see [`Gathering`]).
pub const MAX_CALL_BYTES: usize = 64 * 1024 * 1024;
/// Bytes all calls being gathered may hold at once; a call that would go over it is dropped
/// and answered with an error, like one over [`MAX_CALL_BYTES`].
pub const MAX_GATHERING_BYTES: usize = 256 * 1024 * 1024;
/// The gathering budget counts in units of this many bytes.
const GATHER_UNIT: usize = 64 * 1024;
static GATHER_ROOM: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_GATHERING_BYTES / GATHER_UNIT);

/// How far below the caller's budget for its first message (see [`complete_inline`]) a call's
/// payload must be to count as complete: room for a caller that counts its headers a little
/// differently. A complete call within it is only gathered (one message later), never lost.
const INLINE_SLACK: usize = 1024;

/// Whether a call whose first message holds `payload` bytes holds all its parameters.
///
/// A caller (wrpc-transport-nats 0.29, as the host uses it, and [`super::client`]) puts as
/// much of its parameters into the call's message as NATS allows: the server's `max_payload`
/// less the reply subject and the headers. Only parameters that do not fit follow the accept.
/// So a payload clearly below that budget is the whole of them.
pub(super) fn complete_inline(
    nats: &async_nats::Client,
    reply: &Subject,
    headers: Option<&async_nats::HeaderMap>,
    payload: usize,
) -> bool {
    let budget = nats
        .server_info()
        .max_payload
        .saturating_sub(reply.len())
        .saturating_sub(headers.map_or(0, headers_len));
    payload.saturating_add(INLINE_SLACK) < budget
}

/// The calls of one function, each independent of the others: a call complete in its first
/// message (see [`complete_inline`]) is yielded at once, in arrival order, with no extra wait;
/// any other call's parameters are gathered in a future of their own, up to the end of their
/// stream, and the call is yielded once they are all there. So the decoder that reads calls
/// one after another (`ServeExt::serve_values`) never waits on a caller: calls are yielded in
/// the order they became complete, and a call whose caller stops half-way (a lost accept, a
/// host that died) holds nothing but itself. A call whose parameters exceed
/// [`MAX_CALL_BYTES`], or do not end within [`PARAMS_PATIENCE`] of its accept, is dropped with
/// a warning and answered with an error result (`result::err(string)`, the error type of
/// every function the provider serves).
pub(super) struct Gathering {
    /// Calls as they are accepted; `None` once the subscription has ended.
    accepted: Option<BoxStream<'static, anyhow::Result<Accepted>>>,
    /// Calls whose parameters are being gathered; each ends with the call, or `None` when it
    /// was dropped.
    gathering: FuturesUnordered<BoxFuture<'static, Option<Call>>>,
    nats: async_nats::Client,
    /// `<instance>.<function>`, for the log.
    function: Arc<str>,
}

impl Gathering {
    /// The calls of `function` (`<instance>.<function>`), as `accepted` yields them.
    pub(super) fn new(
        accepted: BoxStream<'static, anyhow::Result<Accepted>>,
        nats: async_nats::Client,
        function: Arc<str>,
    ) -> Self {
        Self {
            accepted: Some(accepted),
            gathering: FuturesUnordered::new(),
            nats,
            function,
        }
    }
}

/// How many calls [`Gathering`] takes in one poll before it lets other tasks run.
const CALLS_PER_POLL: usize = 64;

impl Stream for Gathering {
    type Item = anyhow::Result<Call>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..CALLS_PER_POLL {
            if let Poll::Ready(Some(gathered)) = this.gathering.poll_next_unpin(cx) {
                match gathered {
                    Some(call) => return Poll::Ready(Some(Ok(call))),
                    None => continue,
                }
            }
            let Some(accepted) = &mut this.accepted else {
                return if this.gathering.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            };
            match accepted.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(Accepted {
                    call,
                    complete: true,
                }))) => return Poll::Ready(Some(Ok(call))),
                Poll::Ready(Some(Ok(Accepted { call, .. }))) => {
                    let gather = gather(this.nats.clone(), Arc::clone(&this.function), call);
                    this.gathering.push(gather.boxed());
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => this.accepted = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Reads the rest of `call`'s parameters, up to their end, into its [`Incoming`]; `None`
/// (after answering the caller with an error) when they exceed [`MAX_CALL_BYTES`] or do not
/// end before the call's deadline.
async fn gather(nats: async_nats::Client, function: Arc<str>, call: Call) -> Option<Call> {
    let (cx, results, mut params) = call;
    match read_rest(&mut params, &function).await {
        Ok(()) => Some((cx, results, params)),
        Err(error) => {
            refuse(&nats, results, params, &error).await;
            None
        }
    }
}

/// Reads parameter messages into `params`'s parts up to the end of the stream (or of the
/// call's route), which it marks; the error to answer with when a limit is hit first.
async fn read_rest(params: &mut Incoming, function: &str) -> Result<(), String> {
    let deadline = params.deadline.as_ref().map_or_else(
        || tokio::time::Instant::now() + PARAMS_PATIENCE,
        Deadline::instant,
    );
    let timer = tokio::time::sleep_until(deadline);
    let mut timer = pin!(timer);
    let mut total = params.buffer.len();
    loop {
        tokio::select! {
            biased;
            message = params.stream.next() => match message {
                Some(message) if !message.payload.is_empty() => {
                    hold(params, &mut total, message.payload, function)?;
                }
                // The end of the parameters (or of the call's route).
                _ => {
                    params.ended = true;
                    return Ok(());
                }
            },
            () = &mut timer => {
                warn!(function = %function, bytes = total, patience = ?PARAMS_PATIENCE,
                    "a call's parameters did not end in time; call dropped");
                return Err(format!(
                    "the call's parameters did not end within {} s; call dropped",
                    PARAMS_PATIENCE.as_secs()
                ));
            }
        }
    }
}

/// Keeps one part of a call's parameters in `params`, within [`MAX_CALL_BYTES`] for the call
/// (`total` counts its bytes; the part's are added here) and [`MAX_GATHERING_BYTES`] for all
/// calls; the error to answer with when either is exceeded.
fn hold(
    params: &mut Incoming,
    total: &mut usize,
    part: Bytes,
    function: &str,
) -> Result<(), String> {
    *total = total.saturating_add(part.len());
    if *total > MAX_CALL_BYTES {
        warn!(function = %function, bytes = *total, limit = MAX_CALL_BYTES,
            "a call's parameters exceed MAX_CALL_BYTES; call dropped");
        return Err(format!(
            "the call's parameters exceed {MAX_CALL_BYTES} bytes (MAX_CALL_BYTES); call dropped"
        ));
    }
    let units = part.len().div_ceil(GATHER_UNIT).max(1);
    let Some(room) = u32::try_from(units)
        .ok()
        .and_then(|units| GATHER_ROOM.try_acquire_many(units).ok())
    else {
        warn!(function = %function, bytes = *total, limit = MAX_GATHERING_BYTES,
            "calls being gathered hold MAX_GATHERING_BYTES; call dropped");
        return Err(format!(
            "the provider is gathering {MAX_GATHERING_BYTES} bytes of call parameters already (MAX_GATHERING_BYTES); call dropped"
        ));
    };
    match &mut params.room {
        Some(held) => held.merge(room),
        None => params.room = Some(room),
    }
    params.parts.push_back(part);
    Ok(())
}

/// Answers a dropped call with `error` as its result, after unrouting it: the rest of its
/// parameters is dropped as it comes.
async fn refuse(nats: &async_nats::Client, results: Writer, params: Incoming, error: &str) {
    let subject = results.subject.clone();
    drop((params, results));
    let answer = error_result(error);
    if nats.publish(subject.clone(), answer).await.is_ok() {
        let _ = nats.publish(subject, Bytes::new()).await;
    }
}

/// `result::err(message)` as wRPC encodes it: the case (1), then the string's length (LEB128)
/// and bytes.
fn error_result(message: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(message.len() + 6);
    out.extend_from_slice(&[1]);
    let mut len = message.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.extend_from_slice(&[byte]);
            break;
        }
        out.extend_from_slice(&[byte | 0x80]);
    }
    out.extend_from_slice(message.as_bytes());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_result_is_the_err_case_with_a_leb128_length() {
        assert_eq!(&error_result("no")[..], b"\x01\x02no");
        let long = "x".repeat(200);
        let encoded = error_result(&long);
        assert_eq!(&encoded[..3], &[1, 0xc8, 0x01]);
        assert_eq!(&encoded[3..], long.as_bytes());
        assert_eq!(&error_result("")[..], &[1, 0]);
    }
}
