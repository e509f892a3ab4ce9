//! `outpost-firmware-config`: the device configuration flashed with each agent.
//!
//! It owns the device config schema ([`DeviceConfig`]), its human form (TOML, with the `human`
//! feature), the provisioning registry (`provision`), and its flashed form ([`flash`]: magic, version, length, postcard body, CRC-32),
//! whose decoder is `no_std` so that it builds for bare-metal targets like the protocol. It must
//! never depend on the agent or the controller.
#![no_std]

#[cfg(any(feature = "std", test))]
extern crate std;

#[cfg(feature = "human")]
pub mod enrolled;
pub mod flash;
#[cfg(feature = "human")]
pub mod human;
#[cfg(feature = "provision")]
pub mod provision;
mod schema;

pub use schema::*;
