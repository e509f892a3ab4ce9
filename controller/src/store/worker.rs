//! The store on a thread of its own: the service loop hands it jobs and awaits their answers,
//! so a slow disk or database never blocks the async runtime, and a store that hangs (a
//! database behind a dead link) can be given up on with a timeout and replaced.

use std::sync::mpsc;

use super::{Store, StoreError};

type Job = Box<dyn FnOnce(&mut dyn Store) + Send>;

/// A handle to the store's thread; the thread ends when the handle is dropped and the job
/// under way (if any) has finished.
pub struct StoreWorker {
    jobs: mpsc::Sender<Job>,
}

impl StoreWorker {
    /// Opens the store on a new thread with `open`.
    pub async fn spawn(
        open: impl FnOnce() -> Result<Box<dyn Store>, StoreError> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                let mut store = match open() {
                    Ok(s) => {
                        let _ = opened_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(store.as_mut());
                }
            })
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        opened
            .await
            .map_err(|_| StoreError::Thread("stopped".into()))??;
        Ok(Self { jobs })
    }

    /// Runs `f` on the store's thread and returns its answer.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |s| {
                let _ = tx.send(f(s));
            }))
            .map_err(|_| StoreError::Thread("stopped".into()))?;
        rx.await.map_err(|_| StoreError::Thread("stopped".into()))
    }
}
