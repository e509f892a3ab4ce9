//! Instance addresses as a node sees them: each NIC's MAC and the IP addresses found for it
//! (libvirt's DHCP leases, the host's ARP table, or the guest agent).

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::codec::Message;
use crate::ids::InstanceId;
use crate::limits::{MAX_INSTANCES_PER_NODE, MAX_IPS_PER_NIC, MAX_NICS};

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A MAC address that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address (six hex bytes separated by ':')")]
pub struct BadMac;

impl FromStr for Mac {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or(BadMac)?;
            if p.len() != 2 {
                return Err(BadMac);
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| BadMac)?;
        }
        if parts.next().is_some() {
            return Err(BadMac);
        }
        Ok(Self(out))
    }
}

/// An IP address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpNet {
    /// IPv4.
    V4([u8; 4], u8),
    /// IPv6.
    V6([u8; 16], u8),
}

impl IpNet {
    /// The address without its prefix.
    pub fn addr(&self) -> core::net::IpAddr {
        match *self {
            Self::V4(a, _) => core::net::Ipv4Addr::from(a).into(),
            Self::V6(a, _) => core::net::Ipv6Addr::from(a).into(),
        }
    }

    /// The prefix length.
    pub const fn prefix(&self) -> u8 {
        match *self {
            Self::V4(_, p) | Self::V6(_, p) => p,
        }
    }

    /// From an address and a prefix length (clamped to the address's width).
    pub fn new(addr: core::net::IpAddr, prefix: u8) -> Self {
        match addr {
            core::net::IpAddr::V4(a) => Self::V4(a.octets(), prefix.min(32)),
            core::net::IpAddr::V6(a) => Self::V6(a.octets(), prefix.min(128)),
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.prefix())
    }
}

/// One network interface of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Its MAC address.
    pub mac: Mac,
    /// The addresses found for it, IPv4 first, at most [`MAX_IPS_PER_NIC`].
    pub ips: heapless::Vec<IpNet, MAX_IPS_PER_NIC>,
}

/// One instance's interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceNics {
    /// Which instance.
    pub id: InstanceId,
    /// Its interfaces, at most [`MAX_NICS`].
    pub nics: heapless::Vec<Nic, MAX_NICS>,
}

/// Every running instance's interfaces on a node: published retained whenever it changes, so
/// that a controller that (re)subscribes has the latest at once.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Addresses {
    /// Instances with at least one interface.
    pub instances: heapless::Vec<InstanceNics, MAX_INSTANCES_PER_NODE>,
}

impl Message for Addresses {
    const NAME: &'static str = "addresses";
    const MAX_SIZE: usize = 6 * 1024;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn mac_round_trips_and_rejects_junk() {
        let m: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert_eq!(bad.parse::<Mac>(), Err(BadMac), "{bad}");
        }
    }

    #[test]
    fn ip_displays_with_its_prefix() {
        let v4 = IpNet::new("192.168.177.12".parse().unwrap(), 24);
        assert_eq!(std::format!("{v4}"), "192.168.177.12/24");
        let v6 = IpNet::new("fe80::1".parse().unwrap(), 200);
        assert_eq!(std::format!("{v6}"), "fe80::1/128");
    }

    #[test]
    fn the_largest_addresses_message_fits() {
        let nic = Nic {
            mac: Mac([0xff; 6]),
            ips: core::iter::repeat_n(IpNet::V6([0xff; 16], 128), MAX_IPS_PER_NIC).collect(),
        };
        let one = InstanceNics {
            id: InstanceId([0xff; 8]),
            nics: core::iter::repeat_n(nic, MAX_NICS).collect(),
        };
        let a = Addresses {
            instances: core::iter::repeat_n(one, MAX_INSTANCES_PER_NODE).collect(),
        };
        let mut buf = [0u8; Addresses::MAX_SIZE];
        let bytes = a.encode(&mut buf).expect("fits");
        assert_eq!(Addresses::decode(bytes).unwrap(), a);
    }
}
