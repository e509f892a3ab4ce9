//! The fake backend: domains in memory, with failure injection and call counters. It is a
//! declared backend for simulation and tests (`backend = "fake"`), never the only one that works.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use outpost_protocol::{
    Arch, HypervisorKind, InstanceId, InstanceSpec, IpNet, Mac, Network, Nic, PowerMode,
};

use super::{Domain, DomainState, HostInfo, Hypervisor, HypervisorError, Outcome};

/// Which call a failure is injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Call {
    /// `list`
    List,
    /// `create`
    Create,
    /// `start`
    Start,
    /// `stop`
    Stop,
    /// `reboot`
    Reboot,
    /// `delete`
    Delete,
}

#[derive(Default)]
struct State {
    domains: BTreeMap<InstanceId, DomainState>,
    /// Domains created with a network interface.
    nics: std::collections::BTreeSet<InstanceId>,
    fail_next: BTreeMap<Call, u32>,
    calls: BTreeMap<(Call, InstanceId), u32>,
    deaf: bool,
}

/// An in-memory hypervisor.
pub struct FakeHypervisor {
    host: HostInfo,
    state: Mutex<State>,
}

impl FakeHypervisor {
    /// A fake host of this architecture, kind and size.
    pub fn new(arch: Arch, kind: HypervisorKind, vcpus: u16, memory_mib: u32) -> Self {
        Self {
            host: HostInfo {
                arch,
                kind,
                vcpus,
                memory_mib,
            },
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `times` calls of `call` fail.
    pub fn fail_next(&self, call: Call, times: u32) {
        self.lock().fail_next.insert(call, times);
    }

    /// Makes every guest ignore the power button (as a guest without ACPI support does): stops
    /// and reboots that are not forced report [`Outcome::Ignored`].
    pub fn ignore_power_button(&self, deaf: bool) {
        self.lock().deaf = deaf;
    }

    /// Crashes a running domain (as if QEMU died).
    pub fn crash(&self, id: InstanceId) {
        if let Some(s) = self.lock().domains.get_mut(&id) {
            *s = DomainState::Off { crashed: true };
        }
    }

    /// Shuts a domain down as if the guest powered itself off.
    pub fn guest_shutdown(&self, id: InstanceId) {
        if let Some(s) = self.lock().domains.get_mut(&id) {
            *s = DomainState::Off { crashed: false };
        }
    }

    /// Stops every domain, as a host reboot does.
    pub fn host_reboot(&self) {
        for s in self.lock().domains.values_mut() {
            *s = DomainState::Off { crashed: false };
        }
    }

    /// Defines a domain directly, as if it had been created earlier.
    pub fn insert(&self, id: InstanceId, state: DomainState) {
        self.lock().domains.insert(id, state);
    }

    /// How many times `call` was made for `id`.
    pub fn calls(&self, call: Call, id: InstanceId) -> u32 {
        self.lock().calls.get(&(call, id)).copied().unwrap_or(0)
    }

    /// The state of one domain, if it exists.
    pub fn state_of(&self, id: InstanceId) -> Option<DomainState> {
        self.lock().domains.get(&id).copied()
    }

    fn enter(&self, call: Call, id: InstanceId) -> Result<MutexGuard<'_, State>, HypervisorError> {
        let mut st = self.lock();
        *st.calls.entry((call, id)).or_default() += 1;
        if let Some(n) = st.fail_next.get_mut(&call).filter(|n| **n > 0) {
            *n -= 1;
            return Err(HypervisorError::Injected);
        }
        Ok(st)
    }

    fn outcome(&self, mode: PowerMode) -> Outcome {
        if self.lock().deaf && !mode.force {
            Outcome::Ignored(std::time::Duration::from_secs(u64::from(
                mode.stop_timeout_secs,
            )))
        } else {
            Outcome::Done
        }
    }

    fn set(&self, call: Call, id: InstanceId, to: DomainState) -> Result<(), HypervisorError> {
        let mut st = self.enter(call, id)?;
        let s = st
            .domains
            .get_mut(&id)
            .ok_or(HypervisorError::NotFound(id))?;
        *s = to;
        Ok(())
    }
}

impl Hypervisor for FakeHypervisor {
    fn host(&self) -> Result<HostInfo, HypervisorError> {
        Ok(self.host)
    }

    fn list(&self) -> Result<Vec<Domain>, HypervisorError> {
        let st = self.enter(Call::List, InstanceId::from_u64(0))?;
        Ok(st
            .domains
            .iter()
            .map(|(&id, &state)| Domain { id, state })
            .collect())
    }

    fn create(
        &self,
        id: InstanceId,
        spec: &InstanceSpec,
        start: bool,
    ) -> Result<(), HypervisorError> {
        let mut st = self.enter(Call::Create, id)?;
        if spec.network != Network::None {
            st.nics.insert(id);
        }
        let state = if start {
            DomainState::Running
        } else {
            DomainState::Off { crashed: false }
        };
        st.domains.entry(id).or_insert(state);
        Ok(())
    }

    fn start(&self, id: InstanceId) -> Result<(), HypervisorError> {
        self.set(Call::Start, id, DomainState::Running)
    }

    fn stop(&self, id: InstanceId, mode: PowerMode) -> Result<Outcome, HypervisorError> {
        self.set(Call::Stop, id, DomainState::Off { crashed: false })?;
        Ok(self.outcome(mode))
    }

    fn reboot(&self, id: InstanceId, mode: PowerMode) -> Result<Outcome, HypervisorError> {
        self.set(Call::Reboot, id, DomainState::Running)?;
        Ok(self.outcome(mode))
    }

    fn delete(&self, id: InstanceId) -> Result<(), HypervisorError> {
        let mut st = self.enter(Call::Delete, id)?;
        st.domains.remove(&id);
        st.nics.remove(&id);
        Ok(())
    }

    /// A made-up interface for a running domain with a network: MAC `52:54:00:` and IP
    /// `10.` followed by the last three bytes of its id.
    fn addresses(&self, id: InstanceId) -> Result<Vec<Nic>, HypervisorError> {
        let st = self.lock();
        if st.domains.get(&id) != Some(&DomainState::Running) || !st.nics.contains(&id) {
            return Ok(Vec::new());
        }
        let [.., a, b, c] = id.0;
        let mut ips = heapless::Vec::new();
        let _ = ips.push(IpNet::V4([10, a, b, c], 8));
        Ok(vec![Nic {
            mac: Mac([0x52, 0x54, 0, a, b, c]),
            ips,
        }])
    }
}
