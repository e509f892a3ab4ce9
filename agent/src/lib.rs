//! `outpost-agent`: the edge compute agent (Outpost's nova-compute).
//!
//! It owns the host side: fingerprinting, the hypervisor backends and the reconciler that
//! converges libvirt to the node's desired state. It must never depend on the controller.
