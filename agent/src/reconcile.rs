//! The agent's pure core: it converges the host (as listed by the hypervisor) to the node's
//! desired state. No I/O and no clock reads: the shell passes `now` in, runs the returned
//! [`Effect`]s, and feeds results back.
//!
//! Level-triggered: every [`Reconciler::observe`] pass compares the whole desired state with the
//! whole list of domains, so a missed event, a restart or a replayed message converges the same
//! way. At most one operation per instance is in flight.
//!
//! Never destroy what cannot be accounted for: a domain is deleted only when the desired state
//! of the fleet this agent is bound to lists it as `gone`. A domain that is merely absent from
//! the desired state (a controller whose store is older than the node, or lost) is kept as it
//! is, with its spec, and handed back to the controller in a [`Holding`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use outpost_protocol::limits::MAX_INSTANCES_PER_NODE;
use outpost_protocol::{
    AckResult, AgentEvent, Backoff, BlobRef, BootId, DesiredInstance, DesiredState, Digest,
    ErrorKind, FetchFrom, Holding, InstanceId, InstanceReport, InstanceState, NodeReport,
    PowerState, Reason, Resources, RestartPolicy, Usage, Version,
};
use serde::{Deserialize, Serialize};

pub use crate::admission::HostFacts;
use crate::admission::admit;
use crate::hypervisor::{Domain, DomainState, Note, Op};

/// First delay before retrying a failed operation or restarting a crashed instance.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest delay between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// An instance running this long after its last restart has its restart count reset.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Most instances an agent keeps without a controller's account of them (see [`Held::kept`]).
pub const MAX_KEPT: usize = 64;

/// What the agent holds and stores durably: the desired state it converges to, and the
/// instances it keeps because no desired state of its fleet accounted for them (they were
/// omitted without being listed as gone). Kept instances are left exactly as they are and
/// handed back to the controller for adoption.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Held {
    /// The desired state (boxed: tens of KiB at its largest).
    pub desired: Box<DesiredState>,
    /// Instances kept with their last spec, at most [`MAX_KEPT`].
    pub kept: Vec<DesiredInstance>,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish this event.
    Publish(AgentEvent),
    /// Run this operation on the hypervisor, then call [`Reconciler::completed`].
    Run(InstanceId, Op),
    /// Fetch this blob into the cache (from where the desired state says, if it says), then
    /// call [`Reconciler::fetched`].
    Fetch(BlobRef, Option<FetchFrom>),
}

/// What a pass knows when it converges an instance that has no domain yet.
struct Absent<'a> {
    now: Instant,
    generation: u64,
    host: &'a HostFacts,
    from: Option<&'a FetchFrom>,
}

/// Blobs being fetched, and those that could not be (until the next desired state).
#[derive(Debug, Default)]
struct Fetches {
    running: BTreeSet<Digest>,
    failed: BTreeMap<Digest, String>,
}

impl Fetches {
    /// Asks for every blob of `blobs` not cached, not under way and not failed; returns the
    /// failure of one that failed, if any.
    fn want<'a>(
        &mut self,
        out: &mut Vec<Effect>,
        blobs: impl Iterator<Item = &'a BlobRef>,
        host: &HostFacts,
        from: Option<&FetchFrom>,
    ) -> Result<bool, String> {
        let mut missing = false;
        for b in blobs.filter(|b| !host.cached.contains(&b.digest)) {
            if let Some(why) = self.failed.get(&b.digest) {
                return Err(why.clone());
            }
            missing = true;
            if self.running.insert(b.digest) {
                out.push(Effect::Fetch(*b, from.cloned()));
            }
        }
        Ok(missing)
    }
}

/// How a received desired state compares with the one held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Newer: store it durably, then [`Reconciler::accept`] it.
    Newer,
    /// The same generation again (a replay): answer with [`Reconciler::ack_current`].
    Same,
    /// Older than the one held, or from another fleet: ignored, answered with this ack and
    /// with what the agent holds ([`Reconciler::holding`]).
    Refused(Box<AgentEvent>),
}

/// What the reconciler remembers about one instance between passes.
#[derive(Debug)]
struct Track {
    state: Option<InstanceState>,
    /// Its domain was listed by the last pass.
    present: bool,
    reason: Reason,
    busy: bool,
    power_applied: Option<PowerState>,
    reboot_applied: Option<u32>,
    create_failed: bool,
    /// Back-off for retries and restarts (the one policy: [`Backoff`]).
    backoff: Backoff,
    not_before: Option<Instant>,
}

impl Default for Track {
    fn default() -> Self {
        Self {
            state: None,
            present: false,
            reason: Reason::default(),
            busy: false,
            power_applied: None,
            reboot_applied: None,
            create_failed: false,
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
            not_before: None,
        }
    }
}

impl Track {
    fn ready(&self, now: Instant) -> bool {
        !self.busy && self.not_before.is_none_or(|t| now >= t)
    }

    fn back_off(&mut self, now: Instant) {
        self.not_before = Some(now + self.backoff.next_delay());
    }
}

/// The agent's decision logic.
#[derive(Debug)]
pub struct Reconciler {
    held: Option<Box<Held>>,
    tracks: BTreeMap<InstanceId, Track>,
    host: HostFacts,
    /// When the agent last heard from its controller (a desired state, or a live link).
    heard: Option<Instant>,
    fetches: Fetches,
    /// This agent install's identity (0: not set).
    boot: BootId,
    /// The version of the last desired state taken (kept on disk apart from the held
    /// state): with nothing held, a state of that fleet older than it is still refused.
    floor: Option<Version>,
}

/// The instance state a domain's state reads as, for an instance the agent does not converge.
fn as_found(state: DomainState) -> InstanceState {
    match state {
        DomainState::Running => InstanceState::Running,
        DomainState::Off { crashed: true } => InstanceState::Crashed,
        _ => InstanceState::Stopped,
    }
}

fn event(generation: u64, id: InstanceId, state: InstanceState, reason: &Reason) -> Effect {
    Effect::Publish(AgentEvent::Instance {
        id,
        generation,
        state,
        reason: reason.clone(),
    })
}

/// Marks the instance busy and asks the shell to run `op`.
fn run(out: &mut Vec<Effect>, t: &mut Track, id: InstanceId, op: Op) {
    t.busy = true;
    out.push(Effect::Run(id, op));
}

/// Records a state; returns the event to publish if it changed.
fn set_state(
    out: &mut Vec<Effect>,
    generation: u64,
    id: InstanceId,
    t: &mut Track,
    state: InstanceState,
    reason: &str,
) {
    let reason = Reason::lossy(reason);
    if t.state != Some(state) || t.reason != reason {
        t.state = Some(state);
        t.reason = reason;
        out.push(event(generation, id, state, &t.reason));
    }
}

/// Sets a state with no reason, unless the instance is already in it: its reason (a guest
/// that ignored the power button) stays until the state changes.
fn enter_state(
    out: &mut Vec<Effect>,
    generation: u64,
    id: InstanceId,
    t: &mut Track,
    state: InstanceState,
) {
    if t.state != Some(state) {
        set_state(out, generation, id, t, state, "");
    }
}

impl Reconciler {
    /// A reconciler for this host, holding what was restored from disk (`None` when there is
    /// nothing yet or it could not be read: then nothing is created or deleted until the
    /// controller sends a desired state).
    pub fn new(host: HostFacts, held: Option<Held>) -> Self {
        Self {
            held: held.map(Box::new),
            tracks: BTreeMap::new(),
            host,
            heard: None,
            fetches: Fetches::default(),
            boot: BootId::default(),
            floor: None,
        }
    }

    /// This agent install's identity.
    pub const fn boot(&self) -> BootId {
        self.boot
    }

    /// The same, for the agent install `boot` (see [`DesiredState::boot`]).
    #[must_use]
    pub const fn with_boot(mut self, boot: BootId) -> Self {
        self.boot = boot;
        self
    }

    /// The same, with the version of the last desired state taken (see `floor`).
    #[must_use]
    pub const fn with_floor(mut self, floor: Option<Version>) -> Self {
        self.floor = floor;
        self
    }

    /// The result of an [`Effect::Fetch`]: the blob is cached, or why it could not be (the
    /// instances that need it fail with that reason until the next desired state).
    pub fn fetched(&mut self, digest: Digest, result: Result<(), String>) {
        self.fetches.running.remove(&digest);
        match result {
            Ok(()) => {
                self.host.cached.insert(digest);
            }
            Err(why) => {
                self.fetches.failed.insert(digest, why);
            }
        }
    }

    /// A download was cancelled (nothing needed its blob): it is neither running nor failed,
    /// and is started again if something needs it later.
    pub fn fetch_cancelled(&mut self, digest: Digest) {
        self.fetches.running.remove(&digest);
    }

    /// The blobs the held state needs (its instances, kept ones, and prefetches): never
    /// evicted from the cache.
    pub fn blobs_in_use(&self) -> BTreeSet<Digest> {
        self.held
            .iter()
            .flat_map(|h| {
                h.desired
                    .instances
                    .iter()
                    .chain(&h.kept)
                    .flat_map(|i| i.spec.blobs().map(|b| b.digest))
                    .chain(h.desired.prefetch.iter().map(|b| b.digest))
            })
            .collect()
    }

    /// The generation held (0 when none).
    pub fn generation(&self) -> u64 {
        self.held.as_ref().map_or(0, |h| h.desired.generation)
    }

    /// What is held (the shell stores it).
    pub fn held(&self) -> Option<&Held> {
        self.held.as_deref()
    }

    /// The agent heard from its controller at `at` (a desired state arrived, or the link to
    /// the broker is up).
    pub fn heard(&mut self, at: Instant) {
        if self.heard.is_none_or(|h| at > h) {
            self.heard = Some(at);
        }
    }

    /// Whether the agent may start instances on its own at `now`: always when the held desired
    /// state sets no lease, otherwise only within the lease since it last heard from the
    /// controller (after that, the controller may have rebuilt them elsewhere).
    pub fn may_start(&self, now: Instant) -> bool {
        let lease = self.held.as_ref().map_or(0, |h| h.desired.lease_secs);
        lease == 0
            || self.heard.is_some_and(|h| {
                now.saturating_duration_since(h) <= Duration::from_secs(u64::from(lease))
            })
    }

    /// When the next pass is needed for a retry or a restart waiting out its back-off (the
    /// shell wakes then, as well as on its regular tick and on every input), like kube's
    /// requeue-after.
    pub fn next_pass(&self, now: Instant) -> Option<Instant> {
        self.tracks
            .values()
            .filter(|t| !t.busy)
            .filter_map(|t| t.not_before)
            .filter(|&nb| nb > now)
            .min()
    }

    /// What the agent holds, for the controller: the held version, then the specs of the
    /// kept instances and of the wanted ones (kept first: they are the ones a controller may
    /// not know).
    pub fn holding(&self) -> Holding {
        let Some(h) = &self.held else {
            return Holding::default();
        };
        Holding {
            held: Some(h.desired.version()),
            instances: h
                .kept
                .iter()
                .chain(h.desired.instances.iter())
                .take(MAX_INSTANCES_PER_NODE)
                .cloned()
                .collect(),
        }
    }

    /// Updates what the host offers (after a new fingerprint).
    pub fn set_host(&mut self, mut host: HostFacts) {
        // Blobs fetched since the fingerprint's scan are cached too.
        host.cached.extend(self.host.cached.iter().copied());
        self.host = host;
    }

    /// Compares a received desired state with the held one. The first one binds the agent to
    /// its fleet; after that only the same fleet's newer generations are taken, or a state
    /// that names exactly the held one in `replaces` (an adoption, or a reset of the
    /// generation after a forged or rolled-back one). A state for another agent install is
    /// refused unless what is held named none (it was taken before installs had identities):
    /// a copy of the node's identity on a second box builds nothing.
    pub fn offer(&self, d: &DesiredState) -> Offer {
        let refuse = |result| {
            Offer::Refused(Box::new(AgentEvent::Ack {
                generation: d.generation,
                result,
            }))
        };
        let held_unnamed = self.held.as_ref().is_some_and(|h| h.desired.boot.is_none());
        if d.boot.is_some_and(|b| b != self.boot) && !held_unnamed {
            return refuse(AckResult::OtherInstall { mine: self.boot });
        }
        let Some(h) = &self.held else {
            // Nothing held (a first start, or the held state was lost): the floor still says
            // what this node took last, and nothing of that fleet older than it is taken
            // (a controller that no longer leads, publishing late).
            return match self.floor {
                Some(f)
                    if f.fleet == d.fleet
                        && d.generation < f.generation
                        && d.replaces != Some(f) =>
                {
                    refuse(AckResult::Stale {
                        current: f.generation,
                    })
                }
                _ => Offer::Newer,
            };
        };
        let cur = h.desired.version();
        if d.version() == cur {
            return Offer::Same;
        }
        if d.replaces == Some(cur) {
            return Offer::Newer;
        }
        if d.fleet != cur.fleet {
            return refuse(AckResult::OtherFleet { held: cur });
        }
        if d.generation > cur.generation {
            Offer::Newer
        } else {
            refuse(AckResult::Stale {
                current: cur.generation,
            })
        }
    }

    /// What the agent will hold once it takes `d` (offered [`Offer::Newer`]): `d`, and every
    /// instance held now that `d` neither wants nor lists as gone and whose domain exists.
    /// The shell stores it durably, then calls [`accept`](Self::accept).
    pub fn next_held(&self, d: Box<DesiredState>) -> Held {
        let mut kept: Vec<DesiredInstance> = Vec::new();
        if let Some(h) = &self.held {
            for di in h.kept.iter().chain(h.desired.instances.iter()) {
                let accounted = d.instances.iter().any(|i| i.id == di.id)
                    || d.gone.contains(&di.id)
                    || kept.iter().any(|k| k.id == di.id);
                let present = self.tracks.get(&di.id).is_some_and(|t| t.present);
                if !accounted && present && kept.len() < MAX_KEPT {
                    kept.push(di.clone());
                }
            }
        }
        Held { desired: d, kept }
    }

    /// The ack for the generation held.
    pub fn ack_current(&self) -> AgentEvent {
        AgentEvent::Ack {
            generation: self.generation(),
            result: AckResult::Accepted,
        }
    }

    /// Takes what [`next_held`](Self::next_held) returned, already stored durably by the
    /// shell. The next [`observe`](Self::observe) converges to it.
    pub fn accept(&mut self, held: Held) -> Vec<Effect> {
        self.floor = Some(held.desired.version());
        self.held = Some(Box::new(held));
        // A new generation means the controller looked again: failed builds and fetches get
        // another try.
        for t in self.tracks.values_mut() {
            t.create_failed = false;
        }
        self.fetches.failed.clear();
        vec![Effect::Publish(self.ack_current())]
    }

    /// One reconciliation pass over the domains the hypervisor listed.
    pub fn observe(&mut self, now: Instant, domains: &[Domain]) -> Vec<Effect> {
        let observed: BTreeMap<InstanceId, DomainState> =
            domains.iter().map(|d| (d.id, d.state)).collect();
        for (id, t) in &mut self.tracks {
            t.present = observed.contains_key(id);
        }
        let mut out = Vec::new();
        let may_start = self.may_start(now);
        let Self {
            held,
            tracks,
            host,
            fetches,
            ..
        } = self;
        let Some(held) = held else {
            // Desired state unknown: report what is there, change nothing.
            for (&id, &state) in &observed {
                let t = tracks.entry(id).or_default();
                t.present = true;
                set_state(
                    &mut out,
                    0,
                    id,
                    t,
                    as_found(state),
                    "waiting for the controller's desired state",
                );
            }
            return out;
        };
        let desired = &held.desired;
        let generation = desired.generation;
        let mut used = Resources::default();
        for di in &desired.instances {
            let t = tracks.entry(di.id).or_default();
            match observed.get(&di.id) {
                None if may_start => {
                    let ctx = Absent {
                        now,
                        generation,
                        host,
                        from: desired.fetch.as_ref(),
                    };
                    Self::converge_absent(&mut out, &ctx, di, t, &mut used, fetches);
                }
                None => set_state(
                    &mut out,
                    generation,
                    di.id,
                    t,
                    InstanceState::Stopped,
                    "not started: no word from the controller for longer than the lease",
                ),
                Some(&state) => {
                    t.present = true;
                    used = used.saturating_add(di.spec.resources());
                    Self::converge_present(&mut out, now, generation, di, t, state, may_start);
                }
            }
        }
        // Blobs to cache ahead of any instance.
        let _ = fetches.want(
            &mut out,
            desired.prefetch.iter(),
            host,
            desired.fetch.as_ref(),
        );
        let wanted: BTreeSet<InstanceId> = desired.instances.iter().map(|d| d.id).collect();
        for (&id, &state) in observed.iter().filter(|(id, _)| !wanted.contains(id)) {
            let t = tracks.entry(id).or_default();
            t.present = true;
            if desired.gone.contains(&id) {
                if t.ready(now) {
                    t.busy = true;
                    out.push(Effect::Run(id, Op::Delete));
                }
            } else if !t.busy {
                // Not accounted for by the controller: kept exactly as it is, and reported.
                set_state(
                    &mut out,
                    generation,
                    id,
                    t,
                    as_found(state),
                    "kept: not in the controller's desired state, and not deleted by it",
                );
            }
        }
        // Instances neither wanted nor present (never built, or deleted): say so once, forget.
        tracks.retain(|id, t| {
            let keep = t.busy || wanted.contains(id) || observed.contains_key(id);
            if !keep && t.state.is_some_and(|s| s != InstanceState::Deleted) {
                out.push(event(
                    generation,
                    *id,
                    InstanceState::Deleted,
                    &Reason::default(),
                ));
            }
            keep
        });
        out
    }

    fn converge_absent(
        out: &mut Vec<Effect>,
        ctx: &Absent<'_>,
        di: &DesiredInstance,
        t: &mut Track,
        used: &mut Resources,
        fetches: &mut Fetches,
    ) {
        let Absent {
            now,
            generation,
            host,
            from,
        } = *ctx;
        if t.busy || t.create_failed {
            return;
        }
        if let Err((kind, reason)) = admit(&di.spec, *used, host) {
            set_state(
                out,
                generation,
                di.id,
                t,
                InstanceState::Error(kind),
                &reason,
            );
            return;
        }
        *used = used.saturating_add(di.spec.resources());
        // Its images first: fetched and verified into the cache.
        match fetches.want(out, di.spec.blobs(), host, from) {
            Err(why) => {
                let reason = format!("fetching its image failed: {why}");
                let kind = InstanceState::Error(ErrorKind::Fetch);
                set_state(out, generation, di.id, t, kind, &reason);
                return;
            }
            Ok(true) => {
                set_state(out, generation, di.id, t, InstanceState::Downloading, "");
                return;
            }
            Ok(false) => {}
        }
        if !t.ready(now) {
            return;
        }
        t.busy = true;
        t.power_applied = Some(di.power);
        t.reboot_applied = Some(di.reboot_count);
        set_state(out, generation, di.id, t, InstanceState::Building, "");
        out.push(Effect::Run(
            di.id,
            Op::Create {
                spec: Box::new(di.spec.clone()),
                start: di.power == PowerState::Running,
            },
        ));
    }

    fn converge_present(
        out: &mut Vec<Effect>,
        now: Instant,
        generation: u64,
        di: &DesiredInstance,
        t: &mut Track,
        state: DomainState,
        may_start: bool,
    ) {
        let id = di.id;
        let applied_reboot = *t.reboot_applied.get_or_insert(di.reboot_count);
        if t.busy {
            return;
        }
        match (di.power, state) {
            (_, DomainState::Paused | DomainState::Transient) => {}
            (PowerState::Running, DomainState::Running) => {
                t.power_applied = Some(PowerState::Running);
                if t.backoff.failures() > 0
                    && t.not_before.is_none_or(|nb| now >= nb + STABLE_AFTER)
                {
                    t.backoff.reset();
                    t.not_before = None;
                }
                if di.reboot_count > applied_reboot {
                    t.reboot_applied = Some(di.reboot_count);
                    run(out, t, id, Op::Reboot(di.power_mode));
                }
                enter_state(out, generation, id, t, InstanceState::Running);
            }
            (PowerState::Running, DomainState::Off { crashed }) => {
                let (s, why) = if crashed {
                    (InstanceState::Crashed, "the instance crashed")
                } else {
                    (InstanceState::Stopped, "the guest shut down")
                };
                let restart = match t.power_applied {
                    // Asked to run and never started by us (new desired power, agent restart,
                    // host reboot): start it.
                    None | Some(PowerState::Stopped) => true,
                    // A (re)boot asked since (an operator's start or reboot of an instance that
                    // stopped by itself): start it, whatever its restart policy.
                    Some(PowerState::Running) if di.reboot_count > applied_reboot => {
                        t.not_before = None;
                        true
                    }
                    Some(PowerState::Running) => {
                        if t.state != Some(s) && t.state != Some(InstanceState::Building) {
                            set_state(out, generation, id, t, s, why);
                        }
                        match di.spec.restart {
                            RestartPolicy::Always => true,
                            RestartPolicy::OnFailure => crashed,
                            RestartPolicy::Never => false,
                        }
                    }
                };
                if restart && may_start && t.ready(now) {
                    if t.power_applied == Some(PowerState::Running) {
                        t.back_off(now);
                    }
                    t.power_applied = Some(PowerState::Running);
                    t.reboot_applied = Some(di.reboot_count);
                    run(out, t, id, Op::Start);
                }
            }
            (PowerState::Stopped, DomainState::Running) => {
                if t.ready(now) {
                    t.power_applied = Some(PowerState::Stopped);
                    run(out, t, id, Op::Stop(di.power_mode));
                }
            }
            (PowerState::Stopped, DomainState::Off { .. }) => {
                t.power_applied = Some(PowerState::Stopped);
                t.reboot_applied = Some(di.reboot_count);
                enter_state(out, generation, id, t, InstanceState::Stopped);
            }
        }
    }

    /// The result of an [`Effect::Run`]: on success, what it leaves to say (a guest that
    /// ignored the power button); on failure, the error's kind and text.
    pub fn completed(
        &mut self,
        now: Instant,
        id: InstanceId,
        op: &Op,
        result: Result<Note, (ErrorKind, String)>,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        let generation = self.generation();
        let wanted = self
            .held
            .as_ref()
            .is_some_and(|h| h.desired.instances.iter().any(|i| i.id == id));
        let Some(t) = self.tracks.get_mut(&id) else {
            return out;
        };
        t.busy = false;
        match (op, result) {
            (Op::Create { start, .. }, Ok(_)) => {
                let s = if *start {
                    InstanceState::Running
                } else {
                    InstanceState::Stopped
                };
                set_state(&mut out, generation, id, t, s, "");
            }
            (Op::Start | Op::Reboot(_), Ok(note)) => {
                let why = note.unwrap_or_default();
                set_state(&mut out, generation, id, t, InstanceState::Running, &why);
            }
            (Op::Stop(_), Ok(note)) => {
                let why = note.unwrap_or_default();
                set_state(&mut out, generation, id, t, InstanceState::Stopped, &why);
            }
            (Op::Delete, Ok(_)) => {
                if !wanted {
                    set_state(&mut out, generation, id, t, InstanceState::Deleted, "");
                    self.tracks.remove(&id);
                }
            }
            (op, Err((kind, why))) => {
                if matches!(op, Op::Create { .. }) {
                    t.create_failed = true;
                }
                // Retry power operations after a back-off, from a clean slate.
                t.power_applied = None;
                t.back_off(now);
                let reason = format!("{} failed: {why}", op.name());
                set_state(
                    &mut out,
                    generation,
                    id,
                    t,
                    InstanceState::Error(kind),
                    &reason,
                );
            }
        }
        out
    }

    /// The periodic report: generation, usage and every instance's state.
    pub fn report(&self) -> NodeReport {
        let mut used = Resources::default();
        let mut count: u16 = 0;
        if let Some(h) = &self.held {
            // Kept instances hold the host's resources as much as wanted ones.
            for di in h.desired.instances.iter().chain(h.kept.iter()) {
                let holds = self
                    .tracks
                    .get(&di.id)
                    .and_then(|t| t.state)
                    .is_some_and(|s| {
                        !matches!(s, InstanceState::Error(_) | InstanceState::Deleted)
                    });
                if holds {
                    used = used.saturating_add(di.spec.resources());
                    count += 1;
                }
            }
        }
        NodeReport {
            generation: self.generation(),
            usage: Usage {
                used,
                instances: count,
            },
            instances: self
                .tracks
                .iter()
                .filter_map(|(&id, t)| t.state.map(|state| InstanceReport { id, state }))
                .take(MAX_INSTANCES_PER_NODE)
                .collect(),
        }
    }

    /// One event per known instance with its current state and reason: what the agent publishes
    /// after (re)connecting so that the controller can reconcile.
    pub fn resync(&self) -> Vec<AgentEvent> {
        let generation = self.generation();
        self.tracks
            .iter()
            .filter_map(|(&id, t)| {
                t.state.map(|state| AgentEvent::Instance {
                    id,
                    generation,
                    state,
                    reason: t.reason.clone(),
                })
            })
            .collect()
    }
}
