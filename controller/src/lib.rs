//! `outpost-controller`: fleet state, the scheduler and dispatch.
//!
//! It owns the fleet's durable state and placement decisions. It must never depend on the agent.
