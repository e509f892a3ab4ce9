//! The stores (SQLite, and PostgreSQL started by the test): what the fleet changes survives a
//! reopen exactly; PostgreSQL's lease fences a stale leader.
#![allow(clippy::unwrap_used)]

use outpost_controller::fleet::*;
use outpost_controller::scheduler::{GroupPolicy, Scheduler};
use outpost_controller::store::{
    Candidate, Lead, PgConfig, PgStore, SqliteStore, Store, StoreError,
};
use outpost_protocol::*;

fn empty_fleet() -> Fleet {
    Fleet::new(
        Scheduler::default(),
        FleetConfig::default(),
        Snapshot {
            fleet: FleetId(7),
            ..Snapshot::default()
        },
        0,
    )
}

#[test]
fn fleet_changes_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    survives_a_reopen(&|| Box::new(SqliteStore::open(dir.path(), FleetId(7)).unwrap()));
}

fn pg_config(pg: &outpost_tests::Postgres) -> PgConfig {
    PgConfig {
        url: pg.url(),
        password: Some(outpost_tests::PG_PASSWORD.into()),
        ca_pem: None,
    }
}

fn me(name: &str) -> Candidate {
    Candidate {
        name: name.into(),
        api: format!("http://{name}:8080"),
        broker: true,
    }
}

/// The same suite on PostgreSQL: the schema is created by the first open, every record comes
/// back exactly, and a second open finds the same fleet.
#[test]
fn fleet_changes_survive_a_reopen_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let pg = outpost_tests::Postgres::start(dir.path());
    survives_a_reopen(&|| {
        let mut s = PgStore::open(pg_config(&pg), "a", FleetId(7)).unwrap();
        assert!(matches!(s.lead(&me("a")).unwrap(), Lead::Leader { .. }));
        Box::new(s)
    });
    assert_eq!(
        pg.sql("SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"),
        "1,2,3,4,5,6",
        "migrations are numbered and recorded"
    );
}

/// Leadership on PostgreSQL: one leader at a time; a standby sees who leads; the epoch grows
/// with each takeover; a stale leader's writes are refused (fenced); a clean resignation hands
/// over at once; a leader whose session is gone is replaced without waiting for the lease.
#[test]
fn the_postgres_lease_fences_a_stale_leader() {
    let dir = tempfile::tempdir().unwrap();
    let pg = outpost_tests::Postgres::start(dir.path());
    let mut a = PgStore::open(pg_config(&pg), "a", FleetId(7)).unwrap();
    let mut b = PgStore::open(pg_config(&pg), "b", FleetId(8)).unwrap();
    let Lead::Leader { epoch: e1 } = a.lead(&me("a")).unwrap() else {
        panic!("the first candidate leads")
    };
    assert_eq!(
        b.lead(&me("b")).unwrap(),
        Lead::Standby {
            leader: Some(("a".into(), "http://a:8080".into()))
        }
    );
    assert_eq!(
        a.lead(&me("a")).unwrap(),
        Lead::Leader { epoch: e1 },
        "renewed"
    );
    assert!(b.apply(&some_change()).is_err(), "a standby cannot write");
    a.apply(&some_change()).unwrap();
    // The lease taken over behind a's back (as if it had run out while a was frozen).
    pg.sql("UPDATE lease SET expires = now() - interval '1 second'");
    let Lead::Leader { epoch: e2 } = b.lead(&me("b")).unwrap() else {
        panic!("b takes the expired lease")
    };
    assert!(e2 > e1);
    match a.apply(&some_change()) {
        Err(StoreError::Fenced { ours, current }) => assert_eq!((ours, current), (e1, e2)),
        other => panic!("a stale leader's write must be fenced: {other:?}"),
    }
    // A batch with a removal goes through a transaction: fenced the same way.
    let removal = Changes {
        removed: vec![InstanceId::from_u64(1)],
        ..Changes::default()
    };
    match a.apply(&removal) {
        Err(StoreError::Fenced { ours, current }) => assert_eq!((ours, current), (e1, e2)),
        other => panic!("a stale leader's removal must be fenced: {other:?}"),
    }
    assert!(matches!(a.check_writable(), Err(StoreError::Fenced { .. })));
    assert!(matches!(a.lead(&me("a")).unwrap(), Lead::Standby { .. }));
    // Same fleet for both (the first open made it).
    assert_eq!(a.fleet().unwrap(), b.fleet().unwrap());
    // A clean resignation: a takes over at once.
    b.resign().unwrap();
    let Lead::Leader { epoch: e3 } = a.lead(&me("a")).unwrap() else {
        panic!("a takes the resigned lease")
    };
    assert!(e3 > e2);
    // A leader whose session is gone (killed): replaced without waiting for the lease.
    drop(a);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(matches!(b.lead(&me("b")).unwrap(), Lead::Leader { epoch } if epoch > e3));
}

/// A leader that says it has lost its broker hands the lease to a standby that has it, and
/// to no standby that has lost it too.
#[test]
fn a_leader_without_its_broker_gives_the_lease_to_a_standby_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pg = outpost_tests::Postgres::start(dir.path());
    let mut a = PgStore::open(pg_config(&pg), "a", FleetId(7)).unwrap();
    let mut b = PgStore::open(pg_config(&pg), "b", FleetId(7)).unwrap();
    let blind = |n: &str| Candidate {
        broker: false,
        ..me(n)
    };
    let Lead::Leader { epoch: e1 } = a.lead(&me("a")).unwrap() else {
        panic!("a leads")
    };
    // b without its broker does not take over from a leader that has one, nor from one that
    // has none: neither could reach the nodes.
    assert!(matches!(b.lead(&blind("b")).unwrap(), Lead::Standby { .. }));
    assert_eq!(a.lead(&blind("a")).unwrap(), Lead::Leader { epoch: e1 });
    assert!(matches!(b.lead(&blind("b")).unwrap(), Lead::Standby { .. }));
    // b with its broker takes the lease from a blind leader at once, and a is fenced.
    let Lead::Leader { epoch: e2 } = b.lead(&me("b")).unwrap() else {
        panic!("b, which has the broker, takes over from a leader that has lost it")
    };
    assert!(e2 > e1);
    assert!(matches!(a.lead(&me("a")).unwrap(), Lead::Standby { .. }));
    assert!(matches!(
        a.apply(&some_change()),
        Err(StoreError::Fenced { .. })
    ));
    // b keeps it while it has its broker.
    assert!(matches!(a.lead(&me("a")).unwrap(), Lead::Standby { .. }));
    assert_eq!(b.lead(&me("b")).unwrap(), Lead::Leader { epoch: e2 });
}

fn some_change() -> Changes {
    let mut f = empty_fleet();
    f.on_status(
        1,
        &NodeId::new("edge-1").unwrap(),
        NodeStatus {
            presence: Presence::Online,
            session: 5,
            boot: Default::default(),
        },
    );
    f.take_changes()
}

fn survives_a_reopen(open: &dyn Fn() -> Box<dyn Store>) {
    let mut store = open();
    let mut f = empty_fleet();
    let n = NodeId::new("edge-1").unwrap();
    f.on_status(
        1,
        &n,
        NodeStatus {
            presence: Presence::Online,
            session: 5,
            // The agent install bound to the node is stored with it.
            boot: BootId(0xb007),
        },
    );
    f.on_inventory(
        1,
        &n,
        Inventory {
            arch: Arch::X86_64,
            hypervisor: HypervisorKind::Emulated,
            total: Resources {
                vcpus: 2,
                memory_mib: 2048,
                disk_gib: 10,
            },
            reserved: Resources::default(),
            labels: [Label::parse("zone=north").unwrap()].into_iter().collect(),
            images: [ImageName::new("vmlinuz").unwrap()].into_iter().collect(),
            agent_version: Default::default(),
            cached: Default::default(),
        },
    );
    let spec = InstanceSpec {
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 0,
        arch: Arch::X86_64,
        require_kvm: false,
        boot: Boot::Kernel {
            kernel: ImageName::new("vmlinuz").unwrap().into(),
            initrd: None,
            cmdline: Cmdline::new("console=ttyS0").unwrap(),
        },
        network: Network::None,
        restart: RestartPolicy::Always,
        labels: Labels::new(),
        seed: None,
    };
    f.create(
        2,
        CreateRequest {
            any_arch: false,
            id: InstanceId::from_u64(42),
            name: "web-1".into(),
            spec,
            selector: vec![Label::parse("zone=north").unwrap()],
            group: Some(("web".into(), GroupPolicy::AntiAffinity)),
        },
    )
    .unwrap();
    f.reboot(
        "web-1",
        PowerMode {
            force: true,
            stop_timeout_secs: 45,
        },
    )
    .unwrap();
    store.apply(&f.take_changes()).unwrap();
    drop(store);

    let mut store = open();
    let snap = store.load().unwrap();
    assert_eq!(
        snap.groups,
        vec![("web".to_string(), GroupPolicy::AntiAffinity)]
    );
    assert_eq!(snap.instances, f.instances().cloned().collect::<Vec<_>>());
    let mut expect: Vec<NodeRecord> = f.nodes().cloned().collect();
    expect[0].online = false; // liveness is not stored
    assert_eq!(snap.nodes, expect);
    let restored = Fleet::new(Scheduler::default(), FleetConfig::default(), snap, 0);
    assert_eq!(restored.desired_for(&n), f.desired_for(&n));

    // Deletion is stored too.
    let web1 = restored.instances().next().cloned().unwrap();
    let mut f = restored;
    f.take_changes();
    f.delete("web-1", false).unwrap();
    f.on_report(
        9,
        &n,
        &NodeReport {
            generation: f.node(&n).unwrap().generation,
            ..Default::default()
        },
    );
    store.apply(&f.take_changes()).unwrap();
    assert!(store.load().unwrap().instances.is_empty());

    // One batch that removes an instance and stores another of the same name.
    store
        .apply(&Changes {
            instances: vec![web1.clone()],
            ..Default::default()
        })
        .unwrap();
    let again = InstanceRecord {
        id: InstanceId::from_u64(43),
        ..web1.clone()
    };
    store
        .apply(&Changes {
            removed: vec![web1.id],
            instances: vec![again.clone()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(store.load().unwrap().instances, vec![again]);
}

/// Commits never checkpoint (that would stall them); the background checkpointer folds the
/// write-ahead log into the database file within a few seconds, and the data stays whole.
#[test]
fn the_write_ahead_log_is_checkpointed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    let mut store = SqliteStore::open(dir.path(), FleetId(7)).unwrap();
    let mut f = empty_fleet();
    for k in 0..2000u32 {
        let n = NodeId::new(&format!("edge-{k:05}")).unwrap();
        f.on_status(
            1,
            &n,
            NodeStatus {
                presence: Presence::Online,
                session: 1,
                boot: Default::default(),
            },
        );
        if k % 100 == 99 {
            store.apply(&f.take_changes()).unwrap();
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(&db).unwrap().len() < 64 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file never received the log's pages"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(store);
    let snap = SqliteStore::open(dir.path(), FleetId(7))
        .unwrap()
        .load()
        .unwrap();
    assert_eq!(snap.nodes.len(), 2000);
}

#[test]
fn a_schema_2_store_gains_node_labels() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("outpost.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('schema', 2), ('fleet', 9);
             CREATE TABLE nodes (
                id TEXT PRIMARY KEY, inventory BLOB, session INTEGER NOT NULL,
                cordoned INTEGER NOT NULL, draining INTEGER NOT NULL, generation INTEGER NOT NULL,
                reported_generation INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
                failures TEXT NOT NULL);
             INSERT INTO nodes VALUES ('edge-1', NULL, 1, 0, 0, 4, 4, 0, '');",
        )
        .unwrap();
    }
    let mut store = SqliteStore::open(dir.path(), FleetId(7)).unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.fleet, FleetId(9), "the store keeps its identity");
    assert_eq!(snap.nodes[0].generation, 4);
    assert!(snap.nodes[0].label_overrides.is_empty());
}

/// A store written by the previous release (schema 3, wire version 2 blobs) loads after an
/// upgrade: its specs and inventories read, its instances gain the default power mode.
#[test]
fn a_schema_3_store_from_wire_version_2_loads() {
    let dir = tempfile::tempdir().unwrap();
    let spec = InstanceSpec {
        vcpus: 1,
        memory_mib: 64,
        disk_gib: 0,
        arch: Arch::X86_64,
        require_kvm: false,
        boot: Boot::Kernel {
            kernel: ImageName::new("vmlinuz").unwrap().into(),
            initrd: None,
            cmdline: Cmdline::new("console=ttyS0").unwrap(),
        },
        network: Network::None,
        restart: RestartPolicy::OnFailure,
        labels: Labels::new(),
        seed: None,
    };
    // Version 2 named boot files only.
    let old = outpost_protocol::legacy::SpecV2 {
        vcpus: 1,
        memory_mib: 64,
        disk_gib: 0,
        arch: Arch::X86_64,
        require_kvm: false,
        boot: outpost_protocol::legacy::BootV2::Kernel {
            kernel: ImageName::new("vmlinuz").unwrap(),
            initrd: None,
            cmdline: Cmdline::new("console=ttyS0").unwrap(),
        },
        network: Network::None,
        restart: RestartPolicy::OnFailure,
        labels: Labels::new(),
    };
    let mut spec_v2 = vec![2u8];
    spec_v2.extend(postcard::to_allocvec(&old).unwrap());
    let inv = Inventory {
        arch: Arch::X86_64,
        hypervisor: HypervisorKind::Kvm,
        total: Resources {
            vcpus: 4,
            memory_mib: 4096,
            disk_gib: 40,
        },
        reserved: Resources::default(),
        labels: [Label::parse("zone=north").unwrap()].into_iter().collect(),
        images: [ImageName::new("vmlinuz").unwrap()].into_iter().collect(),
        agent_version: AgentVersion::default(),
        cached: Default::default(),
    };
    let mut inv_v2 = vec![2u8];
    inv_v2.extend(
        postcard::to_allocvec(&outpost_protocol::legacy::InventoryV2 {
            arch: inv.arch,
            hypervisor: inv.hypervisor,
            total: inv.total,
            reserved: inv.reserved,
            labels: inv.labels.clone(),
            images: inv.images.clone(),
        })
        .unwrap(),
    );
    {
        let conn = rusqlite::Connection::open(dir.path().join("outpost.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('schema', 3), ('fleet', 9);
             CREATE TABLE nodes (
                id TEXT PRIMARY KEY, inventory BLOB, session INTEGER NOT NULL,
                cordoned INTEGER NOT NULL, draining INTEGER NOT NULL, generation INTEGER NOT NULL,
                reported_generation INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
                failures TEXT NOT NULL, labels TEXT NOT NULL DEFAULT '');
             CREATE TABLE instances (
                id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec BLOB NOT NULL,
                selector TEXT NOT NULL, grp TEXT, power INTEGER NOT NULL,
                reboot_count INTEGER NOT NULL, phase TEXT NOT NULL, node TEXT,
                failures TEXT NOT NULL, reason TEXT NOT NULL, created_ms INTEGER NOT NULL);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO nodes VALUES ('edge-1', ?1, 1, 0, 0, 4, 4, 0, '', '')",
            rusqlite::params![inv_v2],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO instances VALUES ('00000000000000aa', 'web-1', ?1, '', NULL, 0, 2,
                 'running', 'edge-1', '', '', 0)",
            rusqlite::params![spec_v2],
        )
        .unwrap();
    }
    let mut store = SqliteStore::open(dir.path(), FleetId(7)).unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.fleet, FleetId(9));
    let n = &snap.nodes[0];
    assert_eq!(n.inventory.as_ref().unwrap().labels, inv.labels);
    assert_eq!(n.inventory.as_ref().unwrap().total.memory_mib, 4096);
    let i = &snap.instances[0];
    assert_eq!(i.spec, spec);
    assert_eq!(i.reboot_count, 2);
    assert_eq!(i.power_mode, PowerMode::default());
    assert_eq!(i.placement, "");
}

/// PostgreSQL over TLS: with `sslmode=require` the server's certificate must chain to the CA
/// given; a server that requires TLS refuses a plain connection.
#[test]
fn the_postgres_store_speaks_tls_and_checks_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    outpost_tests::make_pki(&pki, "outpost-test-ca");
    let mut pg = outpost_tests::Postgres::start(dir.path());
    pg.require_tls(&pki);
    let cfg = |query: &str, ca: bool| PgConfig {
        url: format!("{}?{query}", pg.url()),
        password: Some(outpost_tests::PG_PASSWORD.into()),
        ca_pem: ca.then(|| std::fs::read(pki.join("ca.pem")).unwrap()),
    };
    let mut s = PgStore::open(cfg("sslmode=require", true), "a", FleetId(7)).unwrap();
    assert!(matches!(s.lead(&me("a")).unwrap(), Lead::Leader { .. }));
    s.apply(&some_change()).unwrap();
    let err = PgStore::open(cfg("sslmode=require", false), "a", FleetId(7))
        .err()
        .unwrap()
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let err = PgStore::open(cfg("sslmode=disable", true), "a", FleetId(7))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no encryption") || err.contains("rejects"),
        "{err}"
    );
}
