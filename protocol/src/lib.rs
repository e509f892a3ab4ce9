//! Outpost's wire protocol: the messages that agents and the controller exchange over MQTT,
//! and the topic layout they use.
//!
//! This crate owns the encoding contract. It is `#![no_std]` (the `std` feature only adds
//! conveniences), so the same types build for a microcontroller, and it must never depend on
//! an MQTT client, a runtime, the agent or the controller.
//!
//! Every message is one version byte ([`WIRE_VERSION`]) followed by the message's postcard
//! body. Every string and list is bounded by a constant in [`limits`], and every message type
//! has a maximum encoded size ([`Message::MAX_SIZE`]) that decoders check before touching the
//! body.
#![no_std]

#[cfg(any(feature = "std", test))]
extern crate std;

#[cfg(feature = "std")]
extern crate alloc;

mod addresses;
pub mod backoff;
mod blob;
mod codec;
mod ids;
pub mod legacy;
pub mod limits;
mod messages;
mod node;
pub mod qcow2;
mod spec;
pub mod topics;
pub use topics::TopicError;

pub use addresses::{Addresses, BadMac, InstanceNics, IpNet, Mac, Nic};
pub use backoff::Backoff;
pub use blob::{BaseUrl, BlobRef, Digest, FetchFrom, Image, ShortDigest};
pub use codec::{DecodeError, EncodeError, Message, WIRE_VERSION};
pub use ids::{
    AgentVersion, BootId, Cmdline, FleetId, IdError, ImageName, InstanceId, InstanceName, Label,
    LabelKey, LabelValue, Labels, NetName, NodeId, Reason,
};
pub use messages::{
    AckResult, AgentEvent, ConsoleChunk, ConsoleRequest, DesiredInstance, DesiredState,
    EPOCH_SHIFT, FetchState, Holding, InstanceReport, NodeReport, NodeStatus, NoticeKind, Presence,
    Version, epoch_floor,
};
pub use node::{Arch, HypervisorKind, Inventory, Resources, Usage};
pub use spec::{
    Boot, ErrorKind, InstanceSpec, InstanceState, Network, PowerMode, PowerState, RestartPolicy,
    Seed, SpecError,
};
