//! The recorder: writes finished attempts to the store in groups, on a thread of its own.
//!
//! sled writes its log buffer out (a disk write and a range sync) at every batch, so a batch
//! per attempt costs a disk write per attempt, and every batch also stops all other sled
//! calls while it applies. The recorder gathers the attempts that finish while it writes the
//! previous group and writes them as one batch: each attempt's own writes still land
//! together, atomically. A worker waits until its attempt is written before it reports back,
//! so the dispatcher never takes a finished entry for one still to do. The recorder never
//! decides anything: it writes what it is given, in order.

use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::store::{Completion, PipelineStore, StoreError};

/// Most attempts written in one batch: enough to share the log write, few enough that the
/// batch's process-wide lock (see `fanout::CHUNK`) stays short.
const MAX_GROUP: usize = 32;

struct Job {
    completion: Completion,
    written: oneshot::Sender<Result<(), StoreError>>,
}

/// Hands finished attempts to the recorder thread. The thread ends when every handle is gone.
pub(crate) struct Recorder {
    jobs: mpsc::Sender<Job>,
}

impl Recorder {
    /// Starts the recorder thread, which runs with the pipeline's (lower) CPU priority.
    pub fn start(queue: Arc<dyn PipelineStore>) -> std::io::Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("hookd-recorder".into()).spawn(move || {
            crate::priority::background();
            while let Ok(first) = inbox.recv() {
                let mut group = vec![first];
                while group.len() < MAX_GROUP
                    && let Ok(job) = inbox.try_recv()
                {
                    group.push(job);
                }
                let (completions, waiting): (Vec<Completion>, Vec<_>) =
                    group.into_iter().map(|job| (job.completion, job.written)).unzip();
                let result = queue.complete_attempts(&completions);
                for written in waiting {
                    // A worker that is gone (shutdown) needs no answer.
                    let _ = written.send(result.clone());
                }
            }
        })?;
        Ok(Self { jobs })
    }

    /// Writes one finished attempt (with others finishing now); resolves once it is written.
    pub async fn record(&self, completion: Completion) -> Result<(), StoreError> {
        let (written, answer) = oneshot::channel();
        self.jobs.send(Job { completion, written }).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}
