//! Every bound on the wire, in one place. Changing one of these changes the protocol:
//! bump [`crate::WIRE_VERSION`] when a bound shrinks.

/// Longest node id, in bytes. A node id is also the node's MQTT username and a topic level.
pub const MAX_NODE_ID_LEN: usize = 32;
/// Longest instance name (a DNS label).
pub const MAX_INSTANCE_NAME_LEN: usize = 63;
/// Longest image (or kernel/initrd) file name in an agent's image directory.
pub const MAX_IMAGE_NAME_LEN: usize = 64;
/// Longest label key (`zone`, `site`, `outpost.dev/gpu`...).
pub const MAX_LABEL_KEY_LEN: usize = 32;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 64;
/// Most labels on a node or an instance.
pub const MAX_LABELS: usize = 8;
/// Most images an inventory lists.
pub const MAX_IMAGES: usize = 32;
/// Longest kernel command line for direct kernel boot.
pub const MAX_CMDLINE_LEN: usize = 256;
/// Longest base URL (the controller's image endpoint).
pub const MAX_URL_LEN: usize = 192;
/// Most console bytes in one chunk.
pub const MAX_CONSOLE_CHUNK: usize = 16 * 1024;
/// Most blobs a desired state asks to prefetch.
pub const MAX_PREFETCH: usize = 8;
/// Most cached blobs an inventory lists.
pub const MAX_CACHED: usize = 32;
/// Longest agent version string.
pub const MAX_AGENT_VERSION_LEN: usize = 32;
/// Longest libvirt network or host bridge name (Linux caps interface names at 15).
pub const MAX_NET_NAME_LEN: usize = 15;
/// Longest human-readable reason carried by an event.
pub const MAX_REASON_LEN: usize = 160;
/// Most instances one node can be asked to run.
pub const MAX_INSTANCES_PER_NODE: usize = 32;
/// Most network interfaces reported per instance.
pub const MAX_NICS: usize = 2;
/// Most IP addresses reported per network interface.
pub const MAX_IPS_PER_NIC: usize = 4;
/// Longest topic this crate produces.
pub const MAX_TOPIC_LEN: usize = 64;
