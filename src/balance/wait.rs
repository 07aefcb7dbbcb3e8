//! The bounded wait for endpoints: `poll_ready` with no usable endpoint waits, up to the
//! configured time, for the discovery task to publish a table, then fails with
//! [`Error::NoEndpoints`](crate::Error::NoEndpoints).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::Notify;

pin_project! {
    /// A bounded wait for discovery to produce endpoints.
    pub(super) struct Waiting {
        #[pin]
        deadline: tokio::time::Sleep,
        #[pin]
        published: tokio::sync::futures::OwnedNotified,
        notify: Arc<Notify>,
    }
}

/// What ended a wait.
pub(super) enum Woken {
    /// A table was published: look again.
    Published,
    /// The wait is over.
    TimedOut,
}

impl Waiting {
    pub(super) fn new(wait: Duration, notify: &Arc<Notify>) -> Self {
        Self {
            deadline: tokio::time::sleep(wait),
            published: Arc::clone(notify).notified_owned(),
            notify: Arc::clone(notify),
        }
    }

    pub(super) fn poll_woken(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Woken> {
        let mut this = self.project();
        if this.published.as_mut().poll(cx).is_ready() {
            // Re-arm for the next publish; the deadline stays.
            this.published.set(Arc::clone(this.notify).notified_owned());
            return Poll::Ready(Woken::Published);
        }
        if this.deadline.poll(cx).is_ready() {
            return Poll::Ready(Woken::TimedOut);
        }
        Poll::Pending
    }
}
