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
//!   so nothing a later request does can see the difference; only the
//!   freeing of space happens a little later.
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

    #[test]
    fn handed_descriptors_get_closed() {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Worker::start("test-reaper", 4).close_later(write_end);
        // The read end hangs up once the last write end is closed.
        let mut pfd = libc::pollfd {
            fd: read_end.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "write end still open after 10 s");
        assert_ne!(pfd.revents & libc::POLLHUP, 0);
    }
}
