//! Long-lived background threads for work the request path should not
//! wait for, each fed through a bounded queue.
//!
//! Two uses:
//! - the reaper closes descriptors of unlinked backing files. Closing the
//!   last one is when ext4 frees the file's blocks and inode: about 55 µs
//!   for a small sidecar on the benchmark machine, against 6 µs for the
//!   unlink itself while a descriptor is held. `unlink` therefore holds an
//!   O_PATH descriptor across the unlink of a sidecar and hands it here;
//!   `forget` hands over a pinned file's. The names are gone synchronously,
//!   so no later lookup, create or rename can tell; only the freed space
//!   shows up in `statfs` a little later.
//! - sidecar readahead for the local keyring (see `Core::prefetch_siblings`),
//!   which used to start a thread per directory on the open path.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

type Job = Box<dyn FnOnce() + Send>;

pub struct Worker {
    /// None when the thread could not be started (jobs then run on the
    /// caller's thread).
    queue: Option<SyncSender<Job>>,
}

impl Worker {
    /// Starts thread `name`, which runs queued jobs in order; at most
    /// `queue_len` wait.
    pub fn start(name: &str, queue_len: usize) -> Worker {
        let (tx, rx) = sync_channel::<Job>(queue_len);
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || rx.into_iter().for_each(|job| job()));
        match spawned {
            Ok(_) => Worker { queue: Some(tx) },
            Err(e) => {
                tracing::warn!("no {name} thread ({e}); its work runs on request threads");
                Worker { queue: None }
            }
        }
    }

    /// Queues `job`, or hands it back when the queue is full (or the thread
    /// is gone): the caller decides whether to run it now or skip it.
    pub fn try_queue(&self, job: Job) -> Result<(), Job> {
        match &self.queue {
            Some(queue) => queue.try_send(job).map_err(|e| match e {
                TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
            }),
            None => Err(job),
        }
    }

    /// Closes `fd` on this thread soon, or now if the queue is full: a slow
    /// disk must not make the daemon hoard descriptors.
    pub fn close_later(&self, fd: OwnedFd) {
        if let Err(job) = self.try_queue(Box::new(move || drop(fd))) {
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Whether the write end of the pipe whose read end is `read_end` has
    /// been closed, waiting at most `ms`.
    fn hung_up(read_end: &OwnedFd, ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: read_end.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n == 1 && pfd.revents & libc::POLLHUP != 0
    }

    #[test]
    fn descriptors_close_on_the_worker_or_at_once_when_it_is_behind() {
        let w = Worker::start("test-reaper", 1);
        // Keep the worker busy until told otherwise.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        w.try_queue(Box::new(move || {
            started_tx.send(()).unwrap();
            let _ = release_rx.recv();
        }))
        .ok()
        .unwrap();
        started_rx.recv().unwrap();
        // Queued behind the busy job: still open.
        let (queued_r, queued_w) = pipe();
        w.close_later(queued_w);
        assert!(!hung_up(&queued_r, 0), "closed before the worker got to it");
        // The queue (one slot) is full now: closed on this thread, at once.
        let (inline_r, inline_w) = pipe();
        w.close_later(inline_w);
        assert!(hung_up(&inline_r, 0), "a full queue kept the descriptor");
        // Once the worker is free it closes the queued one.
        release_tx.send(()).unwrap();
        assert!(hung_up(&queued_r, 10_000), "still open after 10 s");
    }
}
