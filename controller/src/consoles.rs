//! Console requests waiting for their node's answer: the API asks (over MQTT), the service
//! loop hands each answer to whoever waits for it.
//!
//! A node answers only for itself: each request has a random number (from the OS), bound to
//! the node asked and the instance, and an answer counts only if it arrives on that node's
//! own topic for that instance. Another node cannot guess a number it never saw (it reads only
//! its own console requests), and a number it did see answers nothing elsewhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use outpost_protocol::{ConsoleChunk, InstanceId, Message as _, NodeId};
use tokio::sync::oneshot;

/// The most console requests waiting at once: past it the oldest is given up.
const MAX_WAITING: usize = 1024;

/// One request waiting: who was asked, for what, and where the answer goes.
struct Waiting {
    node: NodeId,
    id: InstanceId,
    tx: oneshot::Sender<ConsoleChunk>,
}

/// Console requests waiting for their node's answer, by request number.
#[derive(Clone, Default)]
pub struct Consoles {
    waiting: Arc<Mutex<HashMap<u32, Waiting>>>,
}

/// Why a console answer was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// Handed to the caller waiting for it.
    Delivered,
    /// Nobody waits for that number (late, or a guess).
    Unasked,
    /// Sent by another node than the one asked, or for another instance: not delivered.
    Forged,
    /// It did not decode.
    Malformed,
}

impl Consoles {
    /// A new request to `node` about instance `id`: its number and where its answer arrives.
    pub fn ask(&self, node: &NodeId, id: InstanceId) -> (u32, oneshot::Receiver<ConsoleChunk>) {
        let (tx, rx) = oneshot::channel();
        let mut w = self.lock();
        if w.len() >= MAX_WAITING {
            // Callers give up after a few seconds; this bound is only ever reached by a flood.
            if let Some(k) = w.keys().next().copied() {
                w.remove(&k);
            }
        }
        let n = loop {
            let n = random_u32();
            if !w.contains_key(&n) {
                break n;
            }
        };
        w.insert(
            n,
            Waiting {
                node: node.clone(),
                id,
                tx,
            },
        );
        (n, rx)
    }

    /// Forgets a request (answered, or given up).
    pub fn forget(&self, n: u32) {
        self.lock().remove(&n);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An answer from `node`: to whoever waits for it, if that node was asked about that
    /// instance under that number.
    pub fn answer(&self, node: &NodeId, payload: &[u8]) -> Answered {
        let Ok(c) = ConsoleChunk::decode(payload) else {
            return Answered::Malformed;
        };
        let mut w = self.lock();
        match w.get(&c.request) {
            None => {
                tracing::debug!(%node, request = c.request, "a console answer nobody waits for");
                Answered::Unasked
            }
            Some(x) if x.node != *node || x.id != c.id => {
                tracing::warn!(%node, request = c.request, asked = %x.node, "a console answer from a node that was not asked: dropped");
                Answered::Forged
            }
            Some(_) => {
                if let Some(x) = w.remove(&c.request) {
                    let _ = x.tx.send(c);
                }
                Answered::Delivered
            }
        }
    }
}

/// A random request number from the OS (a time-seeded one if the OS has none to give).
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    match getrandom::fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b),
        Err(_) => fastrand::u32(..),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chunk(request: u32, id: InstanceId) -> Vec<u8> {
        ConsoleChunk {
            request,
            id,
            start: 0,
            next: 0,
            data: heapless::Vec::new(),
            error: None,
        }
        .to_vec()
        .unwrap()
    }

    #[test]
    fn only_the_node_asked_answers_for_that_instance() {
        let c = Consoles::default();
        let (a, b) = (
            NodeId::new("edge-a").unwrap(),
            NodeId::new("edge-b").unwrap(),
        );
        let (i, j) = (InstanceId::from_u64(1), InstanceId::from_u64(2));
        let (n, mut rx) = c.ask(&a, i);
        assert_eq!(c.answer(&b, &chunk(n, i)), Answered::Forged);
        assert_eq!(c.answer(&a, &chunk(n, j)), Answered::Forged);
        assert_eq!(
            c.answer(&a, &chunk(n.wrapping_add(1), i)),
            Answered::Unasked
        );
        assert!(rx.try_recv().is_err(), "nothing delivered yet");
        assert_eq!(c.answer(&a, &chunk(n, i)), Answered::Delivered);
        assert_eq!(rx.try_recv().unwrap().id, i);
        assert_eq!(
            c.answer(&a, &chunk(n, i)),
            Answered::Unasked,
            "answered once"
        );
        assert_eq!(c.answer(&a, b"garbage"), Answered::Malformed);
    }

    #[test]
    fn numbers_are_not_sequential_and_waiting_is_bounded() {
        let c = Consoles::default();
        let a = NodeId::new("edge-a").unwrap();
        let ns: Vec<u32> = (0..MAX_WAITING + 10)
            .map(|k| c.ask(&a, InstanceId::from_u64(k as u64 + 1)).0)
            .collect();
        assert!(ns.windows(2).any(|w| w[1] != w[0].wrapping_add(1)));
        assert!(c.lock().len() <= MAX_WAITING);
    }
}
