//! Identifiers and bounded strings. Each one validates its bytes on construction and on
//! decode, so a value that exists is always safe to use as a topic level, a file name or an
//! XML attribute.

use core::fmt;
use core::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::{
    MAX_AGENT_VERSION_LEN, MAX_CMDLINE_LEN, MAX_IMAGE_NAME_LEN, MAX_INSTANCE_NAME_LEN,
    MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS, MAX_NET_NAME_LEN, MAX_NODE_ID_LEN,
    MAX_REASON_LEN,
};

/// Why a string is not a valid identifier or bounded string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The value is empty where one is required.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// The value is longer than its bound.
    #[error("{0} is longer than {1} bytes")]
    TooLong(&'static str, usize),
    /// The value holds a character its kind does not allow.
    #[error("{0} contains the character {1:?}")]
    BadChar(&'static str, char),
    /// The first character must be an ASCII letter or digit.
    #[error("{0} must start with a letter or digit")]
    BadStart(&'static str),
    /// An instance id is not 16 hexadecimal digits.
    #[error("instance id must be 16 hexadecimal digits")]
    BadInstanceId,
    /// A DNS-label style name must start with a letter and end with a letter or digit.
    #[error("{0} must start with a lowercase letter and end with a letter or digit")]
    BadLabelShape(&'static str),
    /// A name that reads as an instance id would shadow that id.
    #[error("{0} must not be 16 hexadecimal digits (that reads as an instance id)")]
    LooksLikeId(&'static str),
    /// A URL that is not `http://` or `https://`.
    #[error("{0} must start with http:// or https://")]
    BadScheme(&'static str),
}

/// The character rules of one kind of bounded string.
struct Rule {
    what: &'static str,
    allow_empty: bool,
    alnum_start: bool,
    /// DNS-label shape: a lowercase letter first, no `-` last, and never an instance id.
    dns_label: bool,
    allowed: fn(char) -> bool,
}

impl Rule {
    fn check(&self, s: &str, max: usize) -> Result<(), IdError> {
        if s.is_empty() {
            return if self.allow_empty {
                Ok(())
            } else {
                Err(IdError::Empty(self.what))
            };
        }
        if s.len() > max {
            return Err(IdError::TooLong(self.what, max));
        }
        if let Some(c) = s.chars().find(|&c| !(self.allowed)(c)) {
            return Err(IdError::BadChar(self.what, c));
        }
        if self.alnum_start && !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(IdError::BadStart(self.what));
        }
        if self.dns_label {
            if !s.starts_with(|c: char| c.is_ascii_lowercase()) || s.ends_with('-') {
                return Err(IdError::BadLabelShape(self.what));
            }
            if s.parse::<InstanceId>().is_ok() {
                return Err(IdError::LooksLikeId(self.what));
            }
        }
        Ok(())
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn lower_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
}

macro_rules! bounded_str {
    ($(#[$doc:meta])* $name:ident, $max:expr, $rule:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(heapless::String<{ $max }>);

        impl $name {
            /// The most bytes this value can hold.
            pub const MAX_LEN: usize = $max;
            const RULE: Rule = $rule;

            /// Validates and copies `s`.
            pub fn new(s: &str) -> Result<Self, IdError> {
                Self::RULE.check(s, $max)?;
                let mut out = heapless::String::new();
                out.push_str(s)
                    .map_err(|_| IdError::TooLong(Self::RULE.what, $max))?;
                Ok(Self(out))
            }

            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = heapless::String::<{ $max }>::deserialize(d)?;
                Self::new(raw.as_str()).map_err(D::Error::custom)
            }
        }
    };
}

bounded_str!(
    /// A node's identity: its MQTT username and its topic namespace. Lowercase ASCII letters,
    /// digits, `-`, `_` and `.`, starting with a letter or digit, at most 32 bytes.
    NodeId,
    MAX_NODE_ID_LEN,
    Rule { what: "node id", allow_empty: false, alnum_start: true, dns_label: false, allowed: lower_name_char }
);

bounded_str!(
    /// An instance's name, unique in the fleet: DNS-label style (lowercase ASCII letters, digits
    /// and `-`, a letter first, no `-` last, at most 63 bytes), so that it is safe in a URL
    /// path, a host name and a table, and never 16 hex digits (which would read as an id).
    InstanceName,
    MAX_INSTANCE_NAME_LEN,
    Rule {
        what: "instance name",
        allow_empty: false,
        alnum_start: true,
        dns_label: true,
        allowed: |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
    }
);

bounded_str!(
    /// A file name in an agent's image directory (a disk image, a kernel or an initrd).
    /// ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit: never a path.
    ImageName,
    MAX_IMAGE_NAME_LEN,
    Rule { what: "image name", allow_empty: false, alnum_start: true, dns_label: false, allowed: name_char }
);

bounded_str!(
    /// A label key such as `zone` or `site`.
    LabelKey,
    MAX_LABEL_KEY_LEN,
    Rule {
        what: "label key",
        allow_empty: false,
        alnum_start: true,
        dns_label: false,
        allowed: |c| lower_name_char(c) || c == '/',
    }
);

bounded_str!(
    /// A label value; may be empty.
    LabelValue,
    MAX_LABEL_VALUE_LEN,
    Rule { what: "label value", allow_empty: true, alnum_start: true, dns_label: false, allowed: name_char }
);

bounded_str!(
    /// A libvirt network name or a host bridge name.
    NetName,
    MAX_NET_NAME_LEN,
    Rule { what: "network name", allow_empty: false, alnum_start: true, dns_label: false, allowed: name_char }
);

bounded_str!(
    /// A kernel command line for direct kernel boot: printable ASCII.
    Cmdline,
    MAX_CMDLINE_LEN,
    Rule {
        what: "kernel command line",
        allow_empty: true,
        alnum_start: false,
        dns_label: false,
        allowed: |c| c.is_ascii_graphic() || c == ' ',
    }
);

bounded_str!(
    /// An agent's version (`0.1.0`, `0.2.0-rc.1+g1a2b3c`): printable ASCII, at most 32 bytes.
    AgentVersion,
    MAX_AGENT_VERSION_LEN,
    Rule {
        what: "agent version",
        allow_empty: true,
        alnum_start: false,
        dns_label: false,
        allowed: |c| c.is_ascii_graphic(),
    }
);

bounded_str!(
    /// A short human-readable reason (why an instance failed, why a request was refused).
    Reason,
    MAX_REASON_LEN,
    Rule {
        what: "reason",
        allow_empty: true,
        alnum_start: false,
        dns_label: false,
        allowed: |c| !c.is_control(),
    }
);

impl Reason {
    /// Builds a reason from any text: control characters become spaces and the text is cut
    /// at the bound (on a character boundary). Never fails.
    pub fn lossy(text: &str) -> Self {
        let mut out = heapless::String::new();
        for c in text.chars() {
            let c = if c.is_control() { ' ' } else { c };
            if out.push(c).is_err() {
                break;
            }
        }
        Self(out)
    }
}

/// A key/value label on a node or an instance (`zone=north`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Label {
    /// The key.
    pub key: LabelKey,
    /// The value.
    pub value: LabelValue,
}

impl Label {
    /// Parses `key=value` (or a bare `key`, with an empty value).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let (key, value) = s.split_once('=').unwrap_or((s, ""));
        Ok(Self {
            key: LabelKey::new(key)?,
            value: LabelValue::new(value)?,
        })
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// At most [`MAX_LABELS`] labels.
pub type Labels = heapless::Vec<Label, MAX_LABELS>;

/// An instance's identity: 64 random bits chosen by the controller, shown as 16 hex digits.
/// Fixed-size on the wire (8 bytes) so that reports stay small.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceId(pub [u8; 8]);

impl InstanceId {
    /// The id whose big-endian bytes are `v`.
    pub const fn from_u64(v: u64) -> Self {
        Self(v.to_be_bytes())
    }

    /// The id as a number.
    pub const fn as_u64(&self) -> u64 {
        u64::from_be_bytes(self.0)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.as_u64())
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({self})")
    }
}

impl FromStr for InstanceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdError::BadInstanceId);
        }
        u64::from_str_radix(s, 16)
            .map(Self::from_u64)
            .map_err(|_| IdError::BadInstanceId)
    }
}

/// A fleet's identity: 64 random bits created with the controller's store and carried in
/// every desired state. An agent binds to the first fleet it hears from and refuses desired
/// states of any other, so a controller started on an empty or foreign store cannot make it
/// delete anything.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct FleetId(pub u64);

impl fmt::Display for FleetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for FleetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FleetId({self})")
    }
}

impl FromStr for FleetId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        s.parse::<InstanceId>()
            .map(|i| Self(i.as_u64()))
            .map_err(|_| IdError::BadInstanceId)
    }
}

/// One agent install's identity: 64 random bits the agent makes on its first start and keeps
/// in its state directory, carried in every status. Two of them for one node mean its identity
/// (its flashed config) runs on two boxes: the controller puts the node in conflict, and a
/// desired state names the install it is for, so a copy that holds none of the node's state
/// builds nothing. 0 is never made: it means "unknown" (an agent of an earlier release).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct BootId(pub u64);

impl fmt::Display for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootId({self})")
    }
}

impl FromStr for BootId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        s.parse::<InstanceId>()
            .map(|i| Self(i.as_u64()))
            .map_err(|_| IdError::BadInstanceId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn node_ids_are_topic_safe() {
        assert!(NodeId::new("edge-01.site_a").is_ok());
        assert_eq!(NodeId::new(""), Err(IdError::Empty("node id")));
        assert_eq!(NodeId::new("a/b"), Err(IdError::BadChar("node id", '/')));
        assert_eq!(NodeId::new("a+"), Err(IdError::BadChar("node id", '+')));
        assert_eq!(NodeId::new("a#"), Err(IdError::BadChar("node id", '#')));
        assert_eq!(NodeId::new("Edge"), Err(IdError::BadChar("node id", 'E')));
        assert_eq!(NodeId::new("-x"), Err(IdError::BadStart("node id")));
        assert_eq!(
            NodeId::new(&"a".repeat(33)),
            Err(IdError::TooLong("node id", 32))
        );
    }

    #[test]
    fn instance_names_are_dns_labels() {
        assert!(InstanceName::new("web-1").is_ok());
        for bad in [
            "x#y",
            "x?y",
            "a/b",
            "a b",
            "Web",
            "-a",
            "a-",
            "1a",
            "a\u{202e}b",
            "",
        ] {
            assert!(InstanceName::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            InstanceName::new("deadbeefdeadbeef"),
            Err(IdError::LooksLikeId("instance name"))
        );
        assert!(InstanceName::new(&"a".repeat(63)).is_ok());
        assert!(InstanceName::new(&"a".repeat(64)).is_err());
    }

    #[test]
    fn image_names_are_never_paths() {
        assert!(ImageName::new("debian-12.qcow2").is_ok());
        assert_eq!(
            ImageName::new(".hidden"),
            Err(IdError::BadStart("image name"))
        );
        assert_eq!(
            ImageName::new("a/../../b"),
            Err(IdError::BadChar("image name", '/'))
        );
    }

    #[test]
    fn instance_ids_print_and_parse_as_hex() {
        let id = InstanceId::from_u64(0x0123_4567_89ab_cdef);
        assert_eq!(id.to_string(), "0123456789abcdef");
        assert_eq!("0123456789abcdef".parse::<InstanceId>(), Ok(id));
        assert_eq!("xyz".parse::<InstanceId>(), Err(IdError::BadInstanceId));
        assert_eq!(
            "+123456789abcdef".parse::<InstanceId>(),
            Err(IdError::BadInstanceId)
        );
    }

    #[test]
    fn labels_parse_key_value() {
        let l = Label::parse("zone=north-1").expect("valid label");
        assert_eq!(l.key.as_str(), "zone");
        assert_eq!(l.value.as_str(), "north-1");
        assert!(Label::parse("Zone=x").is_err());
    }

    #[test]
    fn reasons_are_cut_and_cleaned() {
        let long = "é".repeat(200);
        let r = Reason::lossy(&long);
        assert!(r.as_str().len() <= MAX_REASON_LEN);
        assert_eq!(Reason::lossy("a\nb").as_str(), "a b");
    }
}
