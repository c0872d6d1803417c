//! Closes backing descriptors off the request path.
//!
//! Closing the last descriptor of an unlinked backing file is when ext4
//! frees its blocks and inode: about 55 µs for a small sidecar on the
//! benchmark machine, against 6 µs for the unlink itself while a descriptor
//! is held. `unlink` therefore holds an O_PATH descriptor across the unlink
//! of a sidecar and hands it here; `forget` hands over a pinned file's. The
//! names are gone synchronously, so nothing a later request does can see
//! the difference; only the freeing of space happens a little later.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{sync_channel, SyncSender};

/// At most this many descriptors wait; past it callers close their own, so
/// a slow disk cannot make the daemon hoard descriptors.
const QUEUE_LEN: usize = 1024;

pub struct Reaper {
    /// None when the thread could not be started (descriptors then close on
    /// the caller's thread, as they would without a reaper).
    queue: Option<SyncSender<OwnedFd>>,
}

impl Reaper {
    pub fn start() -> Reaper {
        let (tx, rx) = sync_channel::<OwnedFd>(QUEUE_LEN);
        let spawned = std::thread::Builder::new()
            .name("kmsfs-reaper".into())
            .spawn(move || rx.into_iter().for_each(drop));
        match spawned {
            Ok(_) => Reaper { queue: Some(tx) },
            Err(e) => {
                tracing::warn!("no descriptor-closing thread ({e}); closing on request threads");
                Reaper { queue: None }
            }
        }
    }

    /// Closes `fd` soon, on the reaper thread (or now, if its queue is full).
    pub fn close_later(&self, fd: OwnedFd) {
        if let Some(queue) = &self.queue {
            // Full or gone: the error hands `fd` back and it closes here.
            let _ = queue.try_send(fd);
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
        Reaper::start().close_later(write_end);
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
