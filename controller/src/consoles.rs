//! Console requests waiting for their node's answer: the API asks (over MQTT), the service
//! loop hands each answer to whoever waits for it.

use outpost_protocol::{ConsoleChunk, Message as _, NodeId};

/// Console requests waiting for their node's answer, by request number.
#[derive(Clone, Default)]
pub struct Consoles {
    waiting: std::sync::Arc<
        std::sync::Mutex<
            std::collections::HashMap<u32, tokio::sync::oneshot::Sender<ConsoleChunk>>,
        >,
    >,
    next: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Consoles {
    /// A new request: its number and where its answer arrives.
    pub fn ask(&self) -> (u32, tokio::sync::oneshot::Receiver<ConsoleChunk>) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lock().insert(n, tx);
        (n, rx)
    }

    /// Forgets a request (answered, or given up).
    pub fn forget(&self, n: u32) {
        self.lock().remove(&n);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<u32, tokio::sync::oneshot::Sender<ConsoleChunk>>,
    > {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An answer from a node: to whoever waits for it (an answer nobody waits for is dropped).
    pub fn answer(&self, node: &NodeId, payload: &[u8]) -> bool {
        let Ok(c) = ConsoleChunk::decode(payload) else {
            return false;
        };
        if let Some(tx) = self.lock().remove(&c.request) {
            let _ = tx.send(c);
        } else {
            tracing::debug!(%node, request = c.request, "a console answer nobody waits for");
        }
        true
    }
}
