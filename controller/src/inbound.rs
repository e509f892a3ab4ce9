//! What arrives from the broker, and the per-node rate limit it passes before it reaches the
//! service loop: a device may flood its own topics, but it gets only its share of the
//! controller. Each node has a token bucket of messages and one of bytes; what exceeds them is
//! dropped there (counted per node, and the node gets a notice), so that one device cannot
//! fill the loop's queue, grow the controller's memory or delay other nodes' liveness.
//!
//! Pure: time comes in as an [`Instant`]; the MQTT task calls [`Limiter::admit`] for every
//! message and the service loop takes the drop counts with [`Limiter::take_dropped`].

use std::collections::HashMap;
use std::time::Instant;

use outpost_protocol::NodeId;

/// One message from the broker.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The broker's retained copy, delivered on subscribe (not a publish made since).
    pub retained: bool,
}

/// Messages a node may send in a burst (a reconnect sends one per instance and a few more).
pub const BURST_MESSAGES: f64 = 256.0;
/// Messages per second a node may keep sending.
pub const MESSAGES_PER_SEC: f64 = 64.0;
/// Bytes a node may send in a burst (a holding of 32 instances is under 48 KiB).
pub const BURST_BYTES: f64 = 512.0 * 1024.0;
/// Bytes per second a node may keep sending.
pub const BYTES_PER_SEC: f64 = 256.0 * 1024.0;
/// The most nodes the limiter keeps buckets for: past it the fullest buckets (nodes that
/// sent nothing lately) are forgotten, which only ever gives a node more room.
const MAX_TRACKED: usize = 200_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    messages: f64,
    bytes: f64,
    at: Instant,
    dropped: u64,
}

/// Per-node token buckets.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<String, Bucket>,
}

impl Limiter {
    /// Whether a message of `len` bytes from `node` (the node id part of its topic) may pass
    /// at `now`; a refused one is counted against the node.
    pub fn admit(&mut self, node: &str, len: usize, now: Instant) -> bool {
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(node) {
            self.buckets
                .retain(|_, b| now.duration_since(b.at).as_secs_f64() < 4.0 || b.dropped > 0);
        }
        let b = self.buckets.entry(node.to_owned()).or_insert(Bucket {
            messages: BURST_MESSAGES,
            bytes: BURST_BYTES,
            at: now,
            dropped: 0,
        });
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.at = b.at.max(now);
        b.messages = (b.messages + dt * MESSAGES_PER_SEC).min(BURST_MESSAGES);
        b.bytes = (b.bytes + dt * BYTES_PER_SEC).min(BURST_BYTES);
        let len = len as f64;
        if b.messages >= 1.0 && b.bytes >= len {
            b.messages -= 1.0;
            b.bytes -= len;
            true
        } else {
            b.dropped += 1;
            false
        }
    }

    /// The messages dropped per node since the last call (nodes that dropped none left out).
    pub fn take_dropped(&mut self) -> Vec<(NodeId, u64)> {
        let mut out = Vec::new();
        for (n, b) in &mut self.buckets {
            if b.dropped > 0 {
                if let Ok(id) = NodeId::new(n) {
                    out.push((id, b.dropped));
                }
                b.dropped = 0;
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flooding_node_is_held_to_its_rate_and_others_pass() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let passed = (0..10_000).filter(|_| l.admit("flood", 100, t0)).count();
        assert_eq!(passed, BURST_MESSAGES as usize);
        // Another node is not affected.
        assert!(l.admit("honest", 100, t0));
        // One second later the flooder has a second's worth again, no more.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..10_000).filter(|_| l.admit("flood", 100, t1)).count();
        assert_eq!(passed, MESSAGES_PER_SEC as usize);
        let dropped = l.take_dropped();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].0.as_str(), "flood");
        assert_eq!(
            dropped[0].1,
            20_000 - BURST_MESSAGES as u64 - MESSAGES_PER_SEC as u64
        );
        assert!(l.take_dropped().is_empty(), "counted once");
    }

    #[test]
    fn bytes_are_limited_too() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let big = 48 * 1024;
        let passed = (0..100).filter(|_| l.admit("n", big, t0)).count();
        assert_eq!(passed, (BURST_BYTES / big as f64) as usize);
    }
}
