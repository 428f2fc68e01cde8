//! Threads for the notified calls that may wait (a gateway's verdict, a nameserver, a
//! blocking connect): kept when idle for the next call, made when none is idle, so a
//! burst of connects is never queued behind a slow one, and a steady flow pays no
//! thread start per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

type Job = Box<dyn FnOnce() + Send>;

/// How long an idle thread waits for work before it ends.
const IDLE_FOR: Duration = Duration::from_secs(30);

pub struct Workers {
    jobs: Sender<Job>,
    queue: Receiver<Job>,
    /// Threads waiting for a job, not yet claimed by a sender.
    idle: AtomicUsize,
}

impl Workers {
    pub fn new() -> Arc<Workers> {
        let (jobs, queue) = crossbeam_channel::unbounded();
        Arc::new(Workers {
            jobs,
            queue,
            idle: AtomicUsize::new(0),
        })
    }

    /// Runs `job` on an idle thread, or on a new one. `Err` when no thread could be
    /// started.
    pub fn run(self: &Arc<Self>, job: Job) -> Result<(), Job> {
        if claim(&self.idle) {
            return self.jobs.send(job).map_err(|e| e.0);
        }
        let workers = self.clone();
        let (first, back) = crossbeam_channel::bounded::<Job>(1);
        let started = std::thread::Builder::new()
            .name("notified".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Ok(job) = back.recv() {
                    workers.serve(job);
                }
            });
        match started {
            Ok(_) => first.send(job).map_err(|e| e.0),
            Err(_) => Err(job),
        }
    }

    fn serve(&self, mut job: Job) {
        loop {
            job();
            self.idle.fetch_add(1, Ordering::AcqRel);
            job = loop {
                match self.queue.recv_timeout(IDLE_FOR) {
                    Ok(next) => break next,
                    // Still unclaimed: this thread ends; claimed meanwhile: the job
                    // meant for an idle thread is on its way.
                    Err(RecvTimeoutError::Timeout) if claim(&self.idle) => return,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
        }
    }
}

/// Takes one idle thread, if there is one.
fn claim(idle: &AtomicUsize) -> bool {
    idle.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}
