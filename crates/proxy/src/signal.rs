//! A one-shot signal (the drain has started, a target's requests are cut) that the request
//! path can test and wait on without taking a lock.
//!
//! tokio-util's `CancellationToken` answers `is_cancelled` under a mutex, and a future
//! waiting on it takes the mutex again each time it is polled. The tokens here are shared by
//! every worker, and the request path tested or polled them several times per request, each
//! time a lock on a cache line the other cores were taking too. A [`Signal`] keeps a flag
//! beside its token, set before the token is cancelled: testing it is one atomic load, and a
//! future waiting on it registers with the token once and afterwards only loads the flag.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Fires once, and stays fired. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Signal {
    token: CancellationToken,
    fired: Arc<AtomicBool>,
}

impl Signal {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn fire(&self) {
        // The flag first: a waiter woken by the token finds it set.
        self.fired.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Completes once the signal fires, for a waiter that must own what it waits on (boxed
    /// in a response body, say). Test [`Signal::is_cancelled`] before polling it: its polls
    /// take the token's lock.
    pub fn cancelled_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }

    /// Completes once the signal fires.
    pub fn cancelled(&self) -> Fired<'_> {
        Fired {
            fired: &self.fired,
            inner: self.token.cancelled(),
            registered: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// Waits for a [`Signal`]. Registers with the signal's token on its first poll and when
    /// polled by another task; otherwise a poll is one atomic load.
    pub struct Fired<'a> {
        fired: &'a AtomicBool,
        #[pin]
        inner: WaitForCancellationFuture<'a>,
        registered: Option<Waker>,
    }
}

impl Future for Fired<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        // Still registered with this task's waker: the token will wake it when it fires.
        if this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        if this.inner.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_signal_fires() {
        let signal = Signal::new();
        assert!(!signal.is_cancelled());
        let waiting = tokio::spawn({
            let signal = signal.clone();
            async move {
                // Polled several times before the signal fires: each poll after the first
                // only loads the flag, and the registration made by the first still wakes it.
                let fired = signal.cancelled();
                tokio::pin!(fired);
                for _ in 0..3 {
                    assert!(futures_util::poll!(fired.as_mut()).is_pending());
                    tokio::task::yield_now().await;
                }
                fired.await;
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        signal.fire();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the waiter woke")
            .unwrap();
        assert!(signal.is_cancelled());
        // Once fired, new waiters complete at once.
        signal.cancelled().await;
    }
}
