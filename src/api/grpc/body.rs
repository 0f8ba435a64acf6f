//! A request body that hands tonic its first message's 5-byte gRPC prefix on its own.
//!
//! tonic buffers a message by copying each DATA frame into a growing `BytesMut`, and once
//! it has read the prefix it reserves room for the whole message *beyond what it already
//! holds*. When the first frame carries the prefix and (most of) the message, as a large
//! tensor sent in 1 MiB frames does, that reservation reallocates the buffer to about twice
//! the message and copies it a second time, into fresh pages. Given the prefix alone first,
//! tonic reserves the message's exact size while its buffer is still empty, and the rest
//! of the frame is copied once. Only where the bytes are cut changes: tonic still reads the
//! prefix, the compression flag and the message, and the body's bytes are the same.
//!
//! Only the body's first message is helped (every unary call; a stream's later messages
//! are buffered as tonic does).
//!
//! Also [`Budgeted`]: the bytes every call's body holds, counted against one budget.

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Compression flag and big-endian message length.
const PREFIX_BYTES: usize = 5;

pub(super) struct PrefixApart<B> {
    inner: B,
    /// The rest of the first frame, after its prefix went out.
    rest: Option<Bytes>,
    /// The first DATA frame has gone by.
    past_first: bool,
}

impl<B> PrefixApart<B> {
    pub(super) fn new(inner: B) -> PrefixApart<B> {
        PrefixApart {
            inner,
            rest: None,
            past_first: false,
        }
    }
}

impl<B> Body for PrefixApart<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(rest) = this.rest.take() {
            return Poll::Ready(Some(Ok(Frame::data(rest))));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if this.past_first {
            return Poll::Ready(frame);
        }
        let Some(Ok(frame)) = frame else {
            return Poll::Ready(frame);
        };
        match frame.into_data() {
            Ok(mut data) => {
                if data.has_remaining() {
                    this.past_first = true;
                }
                if data.len() > PREFIX_BYTES {
                    this.rest = Some(data.split_off(PREFIX_BYTES));
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Err(other) => Poll::Ready(Some(Ok(other))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // What the inner body has left, plus what this one took from it and holds.
        let held = self.rest.as_ref().map_or(0, |rest| rest.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(held));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

/// A request body whose bytes count against the port's budget (`--grpc_max_bytes_in_flight`)
/// from the moment they arrive until the body is dropped (tonic drops it once it has the
/// message), as REST bodies count against theirs: however many calls upload at once, what
/// they make the server hold is bounded. A frame that does not fit ends the body with
/// RESOURCE_EXHAUSTED, which tonic answers as it is.
pub(super) struct Budgeted<B> {
    inner: B,
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

impl<B> Budgeted<B> {
    pub(super) fn new(inner: B, budget: Arc<Semaphore>) -> Budgeted<B> {
        Budgeted {
            inner,
            budget,
            held: None,
        }
    }
}

impl<B> Body for Budgeted<B>
where
    B: Body<Data = Bytes, Error = axum::Error> + Unpin,
{
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let bytes = match &frame {
            Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
            _ => 0,
        };
        if bytes > 0 {
            let permit = u32::try_from(bytes)
                .ok()
                .and_then(|n| Arc::clone(&this.budget).try_acquire_many_owned(n).ok());
            match (permit, this.held.as_mut()) {
                (Some(permit), Some(held)) => held.merge(permit),
                (Some(permit), None) => this.held = Some(permit),
                (None, _) => {
                    return Poll::Ready(Some(Err(axum::Error::new(
                        tonic::Status::resource_exhausted(
                            "the server holds as many gRPC request bytes as it may \
                             (--grpc_max_bytes_in_flight); retry later",
                        ),
                    ))))
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    async fn frames(chunks: &[&'static [u8]]) -> Vec<Bytes> {
        let frames = chunks
            .iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from_static(c))));
        let mut body = PrefixApart::new(StreamBody::new(futures_util::stream::iter(frames)));
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            out.push(frame.unwrap().into_data().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn only_the_first_frame_is_cut_after_the_prefix() {
        assert_eq!(
            frames(&[b"\0\0\0\0\x08abcdefgh", b"\0\0\0\0\x01z"]).await,
            [&b"\0\0\0\0\x08"[..], b"abcdefgh", b"\0\0\0\0\x01z"]
        );
        // A first frame no longer than a prefix goes as it is, and so does the rest.
        assert_eq!(
            frames(&[b"\0\0\0", b"\0\x02ab", b"cd"]).await,
            [&b"\0\0\0"[..], b"\0\x02ab", b"cd"]
        );
        assert_eq!(frames(&[]).await, Vec::<Bytes>::new());
    }
}
