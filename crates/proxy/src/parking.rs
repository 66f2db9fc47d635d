//! The parking thread: where a parked connection's long-lived state is allocated.
//!
//! A connection parks when it has been quiet a while (see `connection`). What it keeps from
//! then on is small (about 1 KB: its task, its socket's registration with the event loop),
//! but where those bytes sit decides how much memory the process holds. Allocated by the
//! worker that served the connection, they would land in the holes just freed by hyper's
//! buffers, one or two in every 20 KB the connection had used, and keep a page or two of each
//! resident: about 4 KB per idle connection for 1 KB of live data.
//!
//! glibc's allocator gives each thread its own heap (arena), so allocations made on one
//! thread sit beside each other and not among another thread's. This thread does nothing but
//! make parked connections' allocations: their tasks are created here, and spawned onto the
//! worker that owns the connection, which goes on running them. Parked connections then pack
//! together in this thread's heap, and the workers' heaps, emptied of them, go back to the
//! system in whole pages.
//!
//! A connection is handed here once per park (after a quiet second at least), never per
//! request. If the thread cannot be started, parking happens on the worker, as it would
//! without this module.

use std::sync::mpsc;
use std::sync::OnceLock;

/// Work to run on the parking thread: allocate a parked connection's state and spawn its task.
pub(crate) type ParkJob = Box<dyn FnOnce() + Send>;

static PARKING: OnceLock<Option<mpsc::Sender<ParkJob>>> = OnceLock::new();

/// Runs `job` on the parking thread, or here if there is none.
pub(crate) fn run(job: ParkJob) {
    let unsent = match parking_thread() {
        Some(sender) => match sender.send(job) {
            Ok(()) => return,
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    unsent();
}

fn parking_thread() -> Option<&'static mpsc::Sender<ParkJob>> {
    PARKING
        .get_or_init(|| {
            let (sender, receiver) = mpsc::channel::<ParkJob>();
            let started = std::thread::Builder::new()
                .name("berth-parking".into())
                .spawn(move || {
                    for job in receiver {
                        job();
                    }
                });
            match started {
                Ok(_) => Some(sender),
                Err(error) => {
                    tracing::warn!(%error, "No parking thread; idle connections park on their worker");
                    None
                }
            }
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_parking_thread() {
        let (done, ran) = mpsc::channel();
        run(Box::new(move || {
            let name = std::thread::current().name().map(str::to_owned);
            let _ = done.send(name);
        }));
        let name = ran
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the job ran");
        assert_eq!(name.as_deref(), Some("berth-parking"));
    }
}
