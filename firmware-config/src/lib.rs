//! `outpost-firmware-config`: the device configuration flashed with each agent.
//!
//! It owns the flashed format (magic, version, CRC-32). It must never depend on the agent or
//! the controller.
