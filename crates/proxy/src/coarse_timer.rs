//! Deadlines that need not be exact: the target timeout (30 s by default) fires within a
//! tenth of a second of its time.
//!
//! A tokio timer costs about 900 instructions a request: an entry made, put in the timer
//! wheel under its lock, taken out again, and the runtime's handle looked up and counted.
//! Nearly every request is answered long before its target timeout, so here a deadline is a
//! slot in a list, and one task sweeps the list every [`SWEEP_EVERY`] while any deadline is
//! waiting, waking those that have passed. Each worker has its own list (in its upstream
//! client), so the lock is never contended.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// How often waiting deadlines are checked, and so how late one may fire.
pub const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// A list of deadlines, swept while any is waiting.
#[derive(Clone, Default)]
pub struct CoarseTimer {
    shared: Arc<Mutex<Slots>>,
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots that are `Waiting`: the sweeper stops when there are none.
    waiting: usize,
    /// Slots not `Free`: the list is emptied when there are none.
    taken: usize,
    sweeping: bool,
}

enum Slot {
    Free,
    Waiting {
        deadline: Instant,
        waker: Option<Waker>,
    },
    Fired,
}

impl CoarseTimer {
    /// A future that completes once `deadline` has passed, up to [`SWEEP_EVERY`] after it;
    /// never, for `None`.
    pub fn deadline(&self, deadline: impl Into<Option<Instant>>) -> CoarseDeadline<'_> {
        let deadline = deadline.into();
        CoarseDeadline {
            timer: self,
            deadline,
            key: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // A panic while the lock was held left the slots consistent: each change is one step.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn taken(&self) -> usize {
        self.lock().taken
    }
}

impl Slots {
    fn insert(&mut self, deadline: Instant, waker: Waker) -> usize {
        let slot = Slot::Waiting {
            deadline,
            waker: Some(waker),
        };
        self.waiting += 1;
        self.taken += 1;
        match self.free.pop() {
            Some(key) => {
                self.slots[key] = slot;
                key
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, key: usize) {
        match std::mem::replace(&mut self.slots[key], Slot::Free) {
            Slot::Free => return,
            Slot::Waiting { .. } => self.waiting -= 1,
            Slot::Fired => {}
        }
        self.taken -= 1;
        if self.taken == 0 {
            // Nothing left: the list does not keep its peak length.
            self.slots.clear();
            self.free.clear();
        } else {
            self.free.push(key);
        }
    }

    /// Marks the deadlines that have passed as fired, and hands back their wakers.
    fn fire_passed(&mut self, now: Instant) -> Vec<Waker> {
        let mut wakers = Vec::new();
        for slot in &mut self.slots {
            if let Slot::Waiting { deadline, waker } = slot {
                if *deadline <= now {
                    wakers.extend(waker.take());
                    *slot = Slot::Fired;
                    self.waiting -= 1;
                }
            }
        }
        wakers
    }
}

/// Sweeps every [`SWEEP_EVERY`] until no deadline is waiting.
async fn sweep(timer: CoarseTimer) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let (wakers, done) = {
            let mut slots = timer.lock();
            let wakers = slots.fire_passed(Instant::now());
            let done = slots.waiting == 0;
            if done {
                slots.sweeping = false;
            }
            (wakers, done)
        };
        // Woken outside the lock: a waker may run its task's poll on this thread.
        for waker in wakers {
            waker.wake();
        }
        if done {
            return;
        }
    }
}

/// One deadline; see [`CoarseTimer::deadline`]. Registered on its first poll, so a future
/// dropped unpolled costs nothing.
pub struct CoarseDeadline<'a> {
    timer: &'a CoarseTimer,
    deadline: Option<Instant>,
    key: Option<usize>,
}

impl Future for CoarseDeadline<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(deadline) = this.deadline else {
            return Poll::Pending;
        };
        let mut slots = this.timer.lock();
        let Some(key) = this.key else {
            this.key = Some(slots.insert(deadline, cx.waker().clone()));
            if !slots.sweeping {
                slots.sweeping = true;
                tokio::spawn(sweep(this.timer.clone()));
            }
            return Poll::Pending;
        };
        match &mut slots.slots[key] {
            Slot::Waiting { waker, .. } => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Fired | Slot::Free => Poll::Ready(()),
        }
    }
}

impl Drop for CoarseDeadline<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.timer.lock().remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_after_its_time_and_within_a_sweep_of_it() {
        let timer = CoarseTimer::default();
        let start = Instant::now();
        timer.deadline(start + Duration::from_millis(250)).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited <= Duration::from_millis(350),
            "{waited:?}"
        );
        assert_eq!(timer.taken(), 0, "its slot is given back");
        let never = tokio::time::timeout(Duration::from_secs(3600), timer.deadline(None)).await;
        assert!(never.is_err(), "no deadline never fires");
        assert_eq!(timer.taken(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_fire_in_their_own_time_and_unpolled_ones_cost_nothing() {
        let timer = CoarseTimer::default();
        let start = Instant::now();
        let _never_polled = timer.deadline(start);
        let late = timer.deadline(start + Duration::from_secs(2));
        tokio::pin!(late);
        let early = timer.deadline(start + Duration::from_millis(500));
        tokio::select! {
            () = &mut late => panic!("the later deadline fired first"),
            () = early => {}
        }
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(timer.taken(), 1, "only the waiting one holds a slot");
        late.await;
        assert!(start.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_deadline_leaves_nothing_and_the_sweeper_stops() {
        let timer = CoarseTimer::default();
        let start = Instant::now();
        let answered = tokio::time::timeout(
            Duration::from_millis(50),
            timer.deadline(start + Duration::from_secs(30)),
        )
        .await;
        assert!(answered.is_err(), "the 30 s deadline did not fire");
        assert_eq!(timer.taken(), 0);
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert!(!timer.lock().sweeping, "nothing waits: no sweeping");
        // And a new deadline starts it again.
        timer
            .deadline(Instant::now() + Duration::from_millis(10))
            .await;
    }
}
