//! The MQTT topic layout: one namespace per node, `outpost/node/{node_id}/{channel}`, so that a
//! broker ACL with one pattern per channel (`outpost/node/%u/...`) confines each node to its own
//! topics. See `protocol/README.md` for the table of channels.

use core::fmt::Write as _;

use crate::ids::NodeId;
use crate::limits::MAX_TOPIC_LEN;

/// The prefix of every node namespace.
pub const NODE_PREFIX: &str = "outpost/node/";

/// Which side publishes on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The node's agent.
    Agent,
    /// The controller.
    Controller,
}

/// One channel of a node's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// [`crate::NodeStatus`]: online on connect, offline as Last Will.
    Status,
    /// [`crate::Inventory`]: the node's resources, labels and images.
    Inventory,
    /// [`crate::NodeReport`]: periodic usage and instance states.
    Report,
    /// [`crate::AgentEvent`]: acknowledgements and instance state changes.
    Event,
    /// [`crate::DesiredState`]: what the controller wants on the node.
    Desired,
    /// [`crate::Holding`]: what the agent holds (after connecting, and when it refuses a
    /// desired state), so that a controller behind the node can adopt it.
    Holding,
    /// [`crate::ConsoleRequest`]: the controller asks for an instance's console.
    ConsoleRequest,
    /// [`crate::ConsoleChunk`]: the node's answer.
    Console,
    /// [`crate::Addresses`]: the MAC and IP addresses of the node's instances.
    Addresses,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Self; 9] = [
        Self::Status,
        Self::Inventory,
        Self::Report,
        Self::Event,
        Self::Desired,
        Self::Holding,
        Self::ConsoleRequest,
        Self::Console,
        Self::Addresses,
    ];

    /// The last topic level.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Inventory => "inventory",
            Self::Report => "report",
            Self::Event => "event",
            Self::Desired => "desired",
            Self::Holding => "holding",
            Self::ConsoleRequest => "console-req",
            Self::Console => "console",
            Self::Addresses => "addresses",
        }
    }

    /// Who publishes on it.
    pub const fn publisher(self) -> Side {
        match self {
            Self::Desired | Self::ConsoleRequest => Side::Controller,
            _ => Side::Agent,
        }
    }

    /// The MQTT QoS to publish with.
    pub const fn qos(self) -> u8 {
        match self {
            Self::Report => 0,
            _ => 1,
        }
    }

    /// Whether messages are published retained (the latest one is what a newcomer needs).
    pub const fn retained(self) -> bool {
        matches!(
            self,
            Self::Status | Self::Inventory | Self::Desired | Self::Addresses
        )
    }

    /// The subscription filter that matches this channel on every node (`outpost/node/+/report`).
    pub const fn all_nodes(self) -> &'static str {
        match self {
            Self::Status => "outpost/node/+/status",
            Self::Inventory => "outpost/node/+/inventory",
            Self::Report => "outpost/node/+/report",
            Self::Event => "outpost/node/+/event",
            Self::Desired => "outpost/node/+/desired",
            Self::Holding => "outpost/node/+/holding",
            Self::ConsoleRequest => "outpost/node/+/console-req",
            Self::Console => "outpost/node/+/console",
            Self::Addresses => "outpost/node/+/addresses",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// A topic string.
pub type Topic = heapless::String<MAX_TOPIC_LEN>;

/// The topic of `channel` in `node`'s namespace.
pub fn topic(node: &NodeId, channel: Channel) -> Topic {
    let mut t = Topic::new();
    // Cannot fail: prefix (13) + node id (<= 32) + '/' + channel name (<= 11) <= 64.
    let _ = write!(t, "{NODE_PREFIX}{node}/{}", channel.name());
    t
}

/// Why a topic is not an Outpost node topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic is outside `outpost/node/`.
    #[error("not an Outpost node topic")]
    Foreign,
    /// The node level is not a valid node id.
    #[error("invalid node id in topic")]
    BadNode,
    /// The channel level is unknown.
    #[error("unknown channel in topic")]
    UnknownChannel,
}

/// Splits a node topic into its node id and channel.
pub fn parse(topic: &str) -> Result<(NodeId, Channel), TopicError> {
    let rest = topic.strip_prefix(NODE_PREFIX).ok_or(TopicError::Foreign)?;
    let (node, channel) = rest.split_once('/').ok_or(TopicError::Foreign)?;
    let node = NodeId::new(node).map_err(|_| TopicError::BadNode)?;
    let channel = Channel::from_name(channel).ok_or(TopicError::UnknownChannel)?;
    Ok((node, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let node = NodeId::new("edge-7").expect("valid id");
        for ch in Channel::ALL {
            let t = topic(&node, ch);
            assert_eq!(parse(&t), Ok((node.clone(), ch)));
            assert_eq!(ch.all_nodes().replace('+', "edge-7"), t.as_str());
        }
    }

    #[test]
    fn longest_topic_fits() {
        let node = NodeId::new(&"n".repeat(32)).expect("valid id");
        for ch in Channel::ALL {
            assert!(topic(&node, ch).len() > NODE_PREFIX.len() + 32);
        }
    }

    #[test]
    fn foreign_and_bad_topics_are_refused() {
        assert_eq!(parse("other/x/status"), Err(TopicError::Foreign));
        assert_eq!(parse("outpost/node/A/status"), Err(TopicError::BadNode));
        assert_eq!(
            parse("outpost/node/a/status/x"),
            Err(TopicError::UnknownChannel)
        );
        assert_eq!(
            parse("outpost/node/a/nope"),
            Err(TopicError::UnknownChannel)
        );
    }

    #[test]
    fn only_desired_states_and_console_requests_come_from_the_controller() {
        for ch in Channel::ALL {
            assert_eq!(
                ch.publisher() == Side::Controller,
                matches!(ch, Channel::Desired | Channel::ConsoleRequest),
                "{ch:?}"
            );
        }
    }
}
