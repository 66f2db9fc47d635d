//! Upgraded connections (WebSocket and other `Upgrade` protocols): once both sides have
//! switched, bytes are copied both ways until either side closes or the target drains.
//!
//! The client's side comes one of two ways. On HTTP/1 connections the listener serves, hyper
//! hands the whole connection back once the 101 is written (see `connection`), and the
//! listener relays it in the connection's own task: the pipeline leaves the target's side in
//! an [`UpgradeHandOff`] the listener put on the request. Anywhere else, hyper's own
//! `OnUpgrade` gives the client's side and the relay gets a task of its own.

use std::sync::{Arc, Mutex};

use hyper::upgrade::OnUpgrade;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::drain::Drain;

/// Where the target's side of an upgrade is left for the listener to relay, per connection.
#[derive(Clone, Default)]
pub(crate) struct UpgradeHandOff(Arc<Mutex<Option<PendingRelay>>>);

/// A target that answered 101, waiting for the client's side.
pub(crate) struct PendingRelay {
    upstream: OnUpgrade,
    close: CancellationToken,
}

impl UpgradeHandOff {
    /// The relay waiting since the last 101 on this connection, if any.
    pub(crate) fn take(&self) -> Option<PendingRelay> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }

    fn put(&self, relay: PendingRelay) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(relay);
        }
    }
}

/// The client's side of an upgrade, taken from the request before it is forwarded.
pub(crate) enum ClientUpgrade {
    HandOff(UpgradeHandOff),
    Hyper(OnUpgrade),
}

impl ClientUpgrade {
    pub(crate) fn of<B>(request: &mut Request<B>) -> Self {
        match request.extensions_mut().remove::<UpgradeHandOff>() {
            Some(hand_off) => Self::HandOff(hand_off),
            None => Self::Hyper(hyper::upgrade::on(request)),
        }
    }

    /// Joins the client to the target once the target has switched protocols. `close` ends
    /// the relay when the target drains.
    pub(crate) fn join(self, drain: &Drain, upstream: OnUpgrade, close: CancellationToken) {
        match self {
            Self::HandOff(hand_off) => hand_off.put(PendingRelay { upstream, close }),
            Self::Hyper(client) => {
                let deadline = drain.deadline().clone();
                drain.track(async move {
                    let (client, upstream) = match tokio::try_join!(client, upstream) {
                        Ok(pair) => pair,
                        Err(error) => {
                            tracing::debug!(%error, "Upgrade did not complete");
                            return;
                        }
                    };
                    copy_both_ways(
                        TokioIo::new(client),
                        TokioIo::new(upstream),
                        close,
                        deadline,
                    )
                    .await;
                });
            }
        }
    }
}

/// Relays a connection hyper handed back after writing the 101 (see [`UpgradeHandOff`]).
pub(crate) async fn relay<C>(client: C, pending: PendingRelay, deadline: CancellationToken)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    match pending.upstream.await {
        Ok(upstream) => {
            copy_both_ways(client, TokioIo::new(upstream), pending.close, deadline).await
        }
        Err(error) => tracing::debug!(%error, "Upgrade did not complete"),
    }
}

async fn copy_both_ways<C, U>(
    mut client: C,
    mut upstream: U,
    close: CancellationToken,
    deadline: CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(error) = result {
                tracing::debug!(%error, "Upgraded connection ended with an error");
            }
        }
        _ = close.cancelled() => {
            tracing::debug!("Closing upgraded connection: target is draining");
        }
        _ = deadline.cancelled() => {
            tracing::debug!("Closing upgraded connection: process drain time is up");
        }
    }
}
