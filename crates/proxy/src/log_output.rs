//! Where request log lines go: standard output, a batch of lines per system call on the data
//! plane's worker threads.
//!
//! Writing each line at once costs a `write` per request, one of the five system calls a
//! proxied request makes, and more when stdout is a pipe (Docker's log driver, journald),
//! whose reader is woken for every line. A worker instead keeps its finished lines and writes
//! them together when it runs out of work (just before its runtime parks, see
//! [`flush_this_thread`]), when the next line would not fit in one batch, and at least every
//! [`LONGEST_WAIT`] while it is too busy to park. When the worker is idle, a line is written
//! as soon as its request ends, as before; under load, lines share writes (0.55-0.62 writes
//! a request under `benches/run.sh`'s plain load, where the worker parks often).
//!
//! A batch is at most [`BATCH_BYTES`] (the size Linux writes to a pipe in one piece), so
//! lines from two processes sharing a pipe (the old and the new one during an upgrade) never
//! interleave within a line. Threads that have not asked for batching write each line at once.

use std::cell::RefCell;
use std::io::Write;
use std::time::Duration;

/// The most a batch holds: `PIPE_BUF` on Linux, the largest write to a pipe that is never
/// split or interleaved with another writer's.
pub const BATCH_BYTES: usize = 4096;

/// The longest a line waits on a worker that is never idle.
pub const LONGEST_WAIT: Duration = Duration::from_secs(1);

thread_local! {
    static PENDING: RefCell<Pending> = const {
        RefCell::new(Pending { lines: Vec::new(), batching: false, sink: write_to_stdout })
    };
}

/// This thread's lines not yet written.
struct Pending {
    lines: Vec<u8>,
    batching: bool,
    /// Standard output, but for the tests.
    sink: fn(&[u8]),
}

impl Pending {
    fn write_out(&mut self) {
        if !self.lines.is_empty() {
            (self.sink)(&self.lines);
            self.lines.clear();
        }
    }
}

impl Drop for Pending {
    /// A worker thread that ends writes what it still holds.
    fn drop(&mut self) {
        self.write_out();
    }
}

/// Makes this thread keep its lines until [`flush_this_thread`] (or a full batch). Call it on
/// a thread that calls [`flush_this_thread`] whenever it is about to wait, and at least every
/// [`LONGEST_WAIT`].
pub fn batch_on_this_thread() {
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        pending.batching = true;
        pending.lines.reserve(BATCH_BYTES);
    });
}

/// Writes the lines this thread holds.
pub fn flush_this_thread() {
    // `try_with`: a runtime may park while this thread's locals are being destroyed.
    let _ = PENDING.try_with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut() {
            pending.write_out();
        }
    });
}

/// Formats one whole line (ending in a newline) with `format`, straight into this thread's
/// batch, and writes it now or with the batch.
pub(crate) fn write_line(format: impl FnOnce(&mut Vec<u8>)) {
    let mut format = Some(format);
    // `try_with`: a line may end while this thread's locals are being destroyed.
    let _ = PENDING.try_with(|pending| {
        let (Ok(mut pending), Some(format)) = (pending.try_borrow_mut(), format.take()) else {
            return;
        };
        let start = pending.lines.len();
        format(&mut pending.lines);
        if !pending.batching {
            pending.write_out();
        } else if pending.lines.len() > BATCH_BYTES {
            // The new line does not fit with the ones before it: they go first, and it waits
            // for the next batch, unless it fills one by itself.
            if start > 0 {
                (pending.sink)(&pending.lines[..start]);
                pending.lines.drain(..start);
            }
            if pending.lines.len() > BATCH_BYTES {
                pending.write_out();
            }
        }
    });
    if let Some(format) = format {
        let mut line = Vec::new();
        format(&mut line);
        write_to_stdout(&line);
    }
}

fn write_to_stdout(bytes: &[u8]) {
    // A failed write to stdout (closed pipe, full disk) must not disturb the requests.
    let _ = std::io::stdout().lock().write_all(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// The size of each write this thread's sink was given.
        static WRITES: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    }

    fn record(bytes: &[u8]) {
        WRITES.with(|writes| writes.borrow_mut().push(bytes.len()));
    }

    /// The writes made since the last call.
    fn writes() -> Vec<usize> {
        WRITES.with(|writes| std::mem::take(&mut *writes.borrow_mut()))
    }

    fn write_into_record() {
        PENDING.with(|pending| pending.borrow_mut().sink = record);
    }

    #[test]
    fn a_thread_that_does_not_batch_writes_each_line_at_once() {
        std::thread::spawn(|| {
            write_into_record();
            write_line(|out| out.extend_from_slice(b"{}\n"));
            write_line(|out| out.extend_from_slice(b"{}\n"));
            assert_eq!(writes(), [3, 3]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_batching_thread_writes_its_lines_together_when_flushed_or_a_batch_is_full() {
        std::thread::spawn(|| {
            write_into_record();
            batch_on_this_thread();
            let line = [b' '; 1000];
            write_line(|out| out.extend_from_slice(&line));
            write_line(|out| out.extend_from_slice(&line));
            assert_eq!(writes(), [0; 0]);
            flush_this_thread();
            assert_eq!(writes(), [2000]);
            flush_this_thread();
            assert_eq!(writes(), [0; 0], "nothing held, nothing written");
            for _ in 0..5 {
                write_line(|out| out.extend_from_slice(&line));
            }
            // The fifth would pass BATCH_BYTES: the four went out first.
            assert_eq!(writes(), [4000]);
            // A line longer than a batch is written alone, after what was held.
            write_line(|out| out.extend_from_slice(&[b' '; BATCH_BYTES + 1]));
            assert_eq!(writes(), [1000, BATCH_BYTES + 1]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_batching_thread_that_ends_writes_what_it_held() {
        static WRITTEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn count(bytes: &[u8]) {
            WRITTEN.fetch_add(bytes.len(), std::sync::atomic::Ordering::SeqCst);
        }
        std::thread::spawn(|| {
            PENDING.with(|pending| pending.borrow_mut().sink = count);
            batch_on_this_thread();
            write_line(|out| out.extend_from_slice(b"{\"msg\":\"Request\"}\n"));
        })
        .join()
        .unwrap();
        assert_eq!(WRITTEN.load(std::sync::atomic::Ordering::SeqCst), 18);
    }
}
