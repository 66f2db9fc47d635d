//! Upgraded connections (WebSocket and other `Upgrade` protocols): once both sides have
//! switched, bytes are copied both ways until either side closes or the target drains.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::drain::Drain;

/// Joins the client's and the target's upgraded connections in a task the process drain
/// waits for (until its deadline).
pub fn spawn(drain: &Drain, client: OnUpgrade, upstream: OnUpgrade, close: CancellationToken) {
    let deadline = drain.deadline().clone();
    drain.track(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "Upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
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
    });
}
