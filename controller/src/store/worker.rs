//! Something blocking (a store, a database connection) on a thread of its own: callers hand it
//! jobs and wait for their answers, awaiting them (the service loop: a slow disk or database
//! never blocks the async runtime, and a store that hangs, a database behind a dead link, can
//! be given up on with a timeout and replaced) or blocking with a timeout (the API's token
//! checks).

use std::sync::mpsc;
use std::time::Duration;

/// The worker's thread is gone, or did not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("its thread stopped or did not answer")]
pub struct Gone;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A handle to the thread; the thread ends when the handle is dropped and the job under way
/// (if any) has finished.
pub struct Worker<S: ?Sized> {
    jobs: mpsc::Sender<Job<S>>,
}

/// The store on its thread.
pub type StoreWorker = Worker<dyn super::Store>;

impl<S: ?Sized + 'static> Worker<S> {
    /// Starts thread `name`, which makes its state with `open` and tells `ready` how that went.
    fn start<E: Send + 'static>(
        name: &str,
        open: impl FnOnce() -> Result<Box<S>, E> + Send + 'static,
        ready: impl FnOnce(Result<(), E>) + Send + 'static,
    ) -> Result<Self, std::io::Error> {
        let (jobs, rx) = mpsc::channel::<Job<S>>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut state = match open() {
                    Ok(s) => {
                        ready(Ok(()));
                        s
                    }
                    Err(e) => return ready(Err(e)),
                };
                while let Ok(job) = rx.recv() {
                    job(state.as_mut());
                }
            })?;
        Ok(Self { jobs })
    }

    /// Starts the thread and awaits `open`'s outcome.
    pub async fn spawn<E: Send + 'static + From<Gone>>(
        name: &str,
        open: impl FnOnce() -> Result<Box<S>, E> + Send + 'static,
    ) -> Result<Self, E> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let w = Self::start(name, open, move |r| {
            let _ = tx.send(r);
        })
        .map_err(|_| Gone)?;
        rx.await.map_err(|_| Gone)??;
        Ok(w)
    }

    /// Starts the thread and returns at once: jobs queue until `open` has run (and find the
    /// thread gone if it failed, which is logged as `what`). For replacing a store behind a
    /// link that may hang: the caller never waits on the open itself.
    pub fn spawn_lazy<E: std::fmt::Display + Send + 'static>(
        name: &str,
        what: &'static str,
        open: impl FnOnce() -> Result<Box<S>, E> + Send + 'static,
    ) -> Result<Self, Gone> {
        Self::start(name, open, move |r| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "{what}");
            }
        })
        .map_err(|_| Gone)
    }

    /// Starts the thread and blocks until `open` has run.
    pub fn spawn_blocking<E: Send + 'static + From<Gone>>(
        name: &str,
        open: impl FnOnce() -> Result<Box<S>, E> + Send + 'static,
    ) -> Result<Self, E> {
        let (tx, rx) = mpsc::channel();
        let w = Self::start(name, open, move |r| {
            let _ = tx.send(r);
        })
        .map_err(|_| Gone)?;
        rx.recv().map_err(|_| Gone)??;
        Ok(w)
    }

    fn send<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> T + Send + 'static,
        answer: impl FnOnce(T) + Send + 'static,
    ) -> Result<(), Gone> {
        self.jobs
            .send(Box::new(move |s| answer(f(s))))
            .map_err(|_| Gone)
    }

    /// Runs `f` on the thread and awaits its answer.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> T + Send + 'static,
    ) -> Result<T, Gone> {
        self.submit(f)?.await.map_err(|_| Gone)
    }

    /// Queues `f` on the thread; its answer arrives on the receiver (an error there: the
    /// thread is gone). Lets the caller go on while the job runs.
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, Gone> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(f, move |t| {
            let _ = tx.send(t);
        })?;
        Ok(rx)
    }

    /// Runs `f` on the thread and blocks for its answer, at most `wait`.
    pub fn run_blocking<T: Send + 'static>(
        &self,
        wait: Duration,
        f: impl FnOnce(&mut S) -> T + Send + 'static,
    ) -> Result<T, Gone> {
        let (tx, rx) = mpsc::channel();
        self.send(f, move |t| {
            let _ = tx.send(t);
        })?;
        rx.recv_timeout(wait).map_err(|_| Gone)
    }
}
