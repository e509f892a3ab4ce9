//! The durable store behind a trait: SQLite (WAL, synchronous=FULL) by default. The fleet's
//! changes are written in one transaction per batch, before anything is published.
//!
//! A new store creates the fleet's identity (64 random bits, from the caller): agents bind to
//! it, so a controller started on an empty or wrong data directory is a different fleet that
//! no agent obeys until an operator adopts its nodes. The data directory is 0700 and the
//! database files 0600: they hold every instance's spec.

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use outpost_protocol::legacy;
use outpost_protocol::{Arch, BlobRef, Digest};

use crate::fleet::events::{EventRecord, MAX_EVENTS};
use crate::fleet::images::{ImageFormat, ImageRecord};
use outpost_protocol::{
    FleetId, InstanceId, InstanceSpec, Inventory, Label, Message, NodeId, PowerMode, PowerState,
};
use rusqlite::{Connection, OptionalExtension, params};

pub use crate::fleet::Snapshot;
use crate::fleet::records::{format_label_override, parse_label_override};
use crate::fleet::{Changes, InstanceRecord, NodeRecord, Phase};
use crate::scheduler::GroupPolicy;

/// The schema version this build writes (2: the fleet's identity and tombstones; 3: node
/// labels set on the controller).
pub const SCHEMA_VERSION: i64 = 4;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory or database file cannot be created or secured.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored row does not decode.
    #[error("corrupt row in {table}: {what}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// What is wrong.
        what: String,
    },
    /// The database was written by a newer Outpost.
    #[error("store schema {0} is newer than this build ({SCHEMA_VERSION})")]
    Schema(i64),
}

/// A durable store of the fleet.
pub trait Store: Send {
    /// Everything stored.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Stores a batch of changes atomically.
    fn apply(&mut self, changes: &Changes) -> Result<(), StoreError>;
    /// Checks that the store can be written (after a failure, before taking changes again).
    fn check_writable(&mut self) -> Result<(), StoreError>;
}

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    /// Dropping it stops the checkpointer thread (file databases only).
    _checkpointer: Option<std::sync::mpsc::Sender<()>>,
}

/// How often the background checkpointer folds the write-ahead log into the database.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn corrupt(table: &'static str, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table,
        what: what.into(),
    }
}

fn join_lines<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join("\n")
}

/// The database file inside the data directory.
pub const DB_FILE: &str = "outpost.db";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io { path, source }
}

impl SqliteStore {
    /// Opens (or creates) `DIR/outpost.db`; a new store gets `new_fleet` as its identity.
    /// The directory is made 0700 and the database files 0600.
    pub fn open(dir: &Path, new_fleet: FleetId) -> Result<Self, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir))?;
        let path = dir.join(DB_FILE);
        // Create it 0600 before SQLite does (its write-ahead log takes the same mode).
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        for f in [DB_FILE, "outpost.db-wal", "outpost.db-shm"] {
            let p = dir.join(f);
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(io_err(&p))?;
            }
        }
        let mut store = Self::with_connection(Connection::open(&path)?, new_fleet)?;
        store._checkpointer = Some(checkpointer(Connection::open(&path)?)?);
        Ok(store)
    }

    /// This store's fleet identity.
    pub fn fleet(&self) -> Result<FleetId, StoreError> {
        let v: i64 =
            self.conn
                .query_row("SELECT value FROM meta WHERE key = 'fleet'", [], |r| {
                    r.get(0)
                })?;
        Ok(FleetId(v as u64))
    }

    fn with_connection(conn: Connection, new_fleet: FleetId) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Checkpoints run on their own thread (see `checkpointer`), never inside a commit: an
        // automatic one stalls the commit that triggers it, and every answer waiting on it.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS nodes (
                id TEXT PRIMARY KEY, inventory BLOB, session INTEGER NOT NULL,
                cordoned INTEGER NOT NULL, draining INTEGER NOT NULL, generation INTEGER NOT NULL,
                reported_generation INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
                failures TEXT NOT NULL, labels TEXT NOT NULL DEFAULT '');
             CREATE TABLE IF NOT EXISTS instances (
                id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec BLOB NOT NULL,
                selector TEXT NOT NULL, grp TEXT, power INTEGER NOT NULL,
                reboot_count INTEGER NOT NULL, phase TEXT NOT NULL, node TEXT,
                failures TEXT NOT NULL, reason TEXT NOT NULL, created_ms INTEGER NOT NULL,
                power_force INTEGER NOT NULL DEFAULT 0, power_grace INTEGER NOT NULL DEFAULT 0,
                placement TEXT NOT NULL DEFAULT '');
             CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, policy TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS tombstones (id TEXT PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS images (
                name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
                size INTEGER NOT NULL, arch TEXT, format TEXT NOT NULL, url TEXT,
                created_ms INTEGER NOT NULL, PRIMARY KEY (name, version));
             CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, instance TEXT, name TEXT,
                node TEXT, kind TEXT NOT NULL, detail TEXT NOT NULL, actor TEXT NOT NULL);",
        )?;
        // Schema 1-2 stores: the labels column came with schema 3.
        if conn.prepare("SELECT labels FROM nodes LIMIT 0").is_err() {
            conn.execute_batch("ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT ''")?;
        }
        // Schema 1-3 stores: how a power change is carried out came with schema 4.
        if conn
            .prepare("SELECT power_force FROM instances LIMIT 0")
            .is_err()
        {
            conn.execute_batch(
                "ALTER TABLE instances ADD COLUMN power_force INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE instances ADD COLUMN power_grace INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE instances ADD COLUMN placement TEXT NOT NULL DEFAULT '';",
            )?;
        }
        let v: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match v {
            Some(v) if v > SCHEMA_VERSION => return Err(StoreError::Schema(v)),
            _ => {
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?1)",
                    params![SCHEMA_VERSION],
                )?;
            }
        }
        // A store without an identity gets one now (a new store, or one from schema 1, whose
        // agents then see another fleet and are held for an operator: never wiped).
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('fleet', ?1)",
            params![new_fleet.0 as i64],
        )?;
        // The key node blob tokens derive from, made once with the store.
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| corrupt("secrets", format!("no randomness: {e}")))?;
        conn.execute(
            "INSERT OR IGNORE INTO secrets (name, value) VALUES ('blob_key', ?1)",
            params![key.to_vec()],
        )?;
        Ok(Self {
            conn,
            _checkpointer: None,
        })
    }
}

/// A thread that checkpoints the write-ahead log every [`CHECKPOINT_EVERY`] on its own
/// connection (PASSIVE: it never blocks the writer), until the returned sender is dropped.
fn checkpointer(conn: Connection) -> Result<std::sync::mpsc::Sender<()>, StoreError> {
    use std::sync::mpsc::RecvTimeoutError;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("store-checkpoint".into())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(CHECKPOINT_EVERY) {
                let r =
                    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
                if let Err(e) = r {
                    tracing::warn!(error = %e, "store checkpoint failed; will retry");
                }
            }
        })
        .map_err(|e| corrupt("(checkpoint thread)", e.to_string()))?;
    Ok(tx)
}

fn encode_spec(spec: &InstanceSpec) -> Result<Vec<u8>, StoreError> {
    // A version byte, as on the wire, then postcard. Never an empty blob in its place.
    postcard::to_extend(spec, vec![outpost_protocol::WIRE_VERSION])
        .map_err(|e| corrupt("instances", format!("spec does not encode: {e}")))
}

/// A stored spec, of this wire version or of versions 2 and 3 (the same spec layout, read
/// after an upgrade and converted).
fn decode_spec(b: &[u8]) -> Result<InstanceSpec, StoreError> {
    let bad = |e: postcard::Error| corrupt("instances", e.to_string());
    match b.split_first() {
        Some((&outpost_protocol::WIRE_VERSION, body)) => postcard::from_bytes(body).map_err(bad),
        Some((2 | 3, body)) => postcard::from_bytes::<legacy::SpecV2>(body)
            .map(Into::into)
            .map_err(bad),
        Some((v, _)) => Err(corrupt("instances", format!("unknown spec encoding {v}"))),
        None => Err(corrupt("instances", "empty spec")),
    }
}

/// A stored inventory, of this wire version or version 2 (read after an upgrade). An inventory
/// is a cache of what the node sends after every connect: one that does not decode is dropped
/// (logged), not a reason to refuse the store.
fn decode_inventory(node: &NodeId, b: &[u8]) -> Option<Inventory> {
    let r = match b.split_first() {
        Some((2, body)) => postcard::from_bytes::<legacy::InventoryV2>(body)
            .map(Into::into)
            .map_err(|e| e.to_string()),
        _ => Inventory::decode(b).map_err(|e| e.to_string()),
    };
    r.map_err(|e| {
        tracing::warn!(%node, error = %e, "stored inventory unreadable: waiting for the node to send it again");
    })
    .ok()
}

impl Store for SqliteStore {
    fn check_writable(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?1)",
            params![fastrand::i64(..)],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let key: Vec<u8> = self.conn.query_row(
            "SELECT value FROM secrets WHERE name = 'blob_key'",
            [],
            |r| r.get(0),
        )?;
        let mut snap = Snapshot {
            fleet: self.fleet()?,
            blob_key: key
                .try_into()
                .map_err(|_| corrupt("secrets", "blob_key is not 32 bytes"))?,
            ..Snapshot::default()
        };
        let mut st = self.conn.prepare(
            "SELECT id, inventory, session, cordoned, draining, generation, reported_generation,
                    last_seen_ms, failures, labels FROM nodes ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, String>(9)?,
            ))
        })?;
        for row in rows {
            let (
                id,
                inv,
                session,
                cordoned,
                draining,
                generation,
                reported,
                seen,
                failures,
                labels,
            ) = row?;
            let id = NodeId::new(&id).map_err(|e| corrupt("nodes", e.to_string()))?;
            snap.nodes.push(NodeRecord {
                inventory: inv.and_then(|b| decode_inventory(&id, &b)),
                session: session as u64,
                cordoned,
                draining,
                generation: generation as u64,
                reported_generation: reported as u64,
                last_seen_ms: seen as u64,
                failures_ms: failures.split(',').filter_map(|t| t.parse().ok()).collect(),
                label_overrides: labels
                    .lines()
                    .map(parse_label_override)
                    .collect::<Result<_, _>>()
                    .map_err(|e| corrupt("nodes", e))?,
                ..NodeRecord::new(id)
            });
        }
        let mut st = self.conn.prepare(
            "SELECT id, name, spec, selector, grp, power, reboot_count, phase, node, failures,
                    reason, created_ms, power_force, power_grace, placement
               FROM instances ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, String>(9)?,
                r.get::<_, String>(10)?,
                r.get::<_, i64>(11)?,
                r.get::<_, bool>(12)?,
                r.get::<_, i64>(13)?,
                r.get::<_, String>(14)?,
            ))
        })?;
        for row in rows {
            let (
                id,
                name,
                spec,
                selector,
                group,
                stopped,
                reboots,
                phase,
                node,
                failures,
                reason,
                created,
                force,
                grace,
                placement,
            ) = row?;
            let bad = |what: String| corrupt("instances", what);
            snap.instances.push(InstanceRecord {
                id: id.parse::<InstanceId>().map_err(|e| bad(e.to_string()))?,
                name,
                spec: decode_spec(&spec)?,
                selector: selector
                    .lines()
                    .map(Label::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(e.to_string()))?,
                group,
                power: if stopped {
                    PowerState::Stopped
                } else {
                    PowerState::Running
                },
                reboot_count: reboots as u32,
                power_mode: PowerMode {
                    force,
                    stop_timeout_secs: u16::try_from(grace).unwrap_or(u16::MAX),
                },
                placement,
                phase: Phase::parse(&phase).ok_or_else(|| bad(format!("phase {phase}")))?,
                node: node
                    .map(|n| NodeId::new(&n))
                    .transpose()
                    .map_err(|e| bad(e.to_string()))?,
                failures: failures
                    .lines()
                    .filter_map(|l| l.split_once('\t'))
                    .filter_map(|(n, r)| Some((NodeId::new(n).ok()?, r.to_owned())))
                    .collect(),
                reason,
                created_ms: created as u64,
            });
        }
        let mut st = self
            .conn
            .prepare("SELECT name, policy FROM groups ORDER BY name")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (name, policy) = row?;
            let p = GroupPolicy::parse(&policy)
                .ok_or_else(|| corrupt("groups", format!("policy {policy}")))?;
            snap.groups.push((name, p));
        }
        let mut st = self.conn.prepare(
            "SELECT name, version, sha256, size, arch, format, url, created_ms FROM images
             ORDER BY name, version",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        for row in rows {
            let (name, version, sha, size, arch, format, url, created) = row?;
            let bad = |what: String| corrupt("images", what);
            snap.images.push(ImageRecord {
                blob: BlobRef {
                    digest: Digest::parse(&sha).ok_or_else(|| bad(format!("sha256 {sha}")))?,
                    size: size as u64,
                },
                arch: arch
                    .map(|a| Arch::parse(&a).ok_or_else(|| bad(format!("arch {a}"))))
                    .transpose()?,
                format: ImageFormat::parse(&format)
                    .ok_or_else(|| bad(format!("format {format}")))?,
                url,
                created_ms: created as u64,
                name,
                version,
            });
        }
        let mut st = self.conn.prepare(
            "SELECT seq, at_ms, instance, name, node, kind, detail, actor FROM
               (SELECT * FROM events ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
        )?;
        let rows = st.query_map(params![MAX_EVENTS as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        for row in rows {
            let (seq, at, instance, name, node, kind, detail, actor) = row?;
            snap.events.push(EventRecord {
                seq: seq as u64,
                at_ms: at as u64,
                instance: instance
                    .and_then(|i| i.parse::<InstanceId>().ok())
                    .map(|i| (i, name.unwrap_or_default())),
                node: node.and_then(|n| NodeId::new(&n).ok()),
                kind,
                detail,
                actor,
            });
        }
        let mut st = self.conn.prepare("SELECT id FROM tombstones")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        for row in rows {
            let id = row?;
            snap.tombstones
                .push(id.parse().map_err(|e: outpost_protocol::IdError| {
                    corrupt("tombstones", e.to_string())
                })?);
        }
        Ok(snap)
    }

    fn apply(&mut self, c: &Changes) -> Result<(), StoreError> {
        if c.nodes.is_empty()
            && c.instances.is_empty()
            && c.removed.is_empty()
            && c.groups.is_empty()
            && c.tombstones.is_empty()
            && c.removed_nodes.is_empty()
            && c.images.is_empty()
            && c.removed_images.is_empty()
            && c.events.is_empty()
        {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        // One prepared statement per kind of row, for the whole batch.
        let mut put_node = tx.prepare(
            "INSERT OR REPLACE INTO nodes (id, inventory, session, cordoned, draining, generation,
                    reported_generation, last_seen_ms, failures, labels)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut put_instance = tx.prepare(
            "INSERT OR REPLACE INTO instances (id, name, spec, selector, grp, power, reboot_count,
                phase, node, failures, reason, created_ms, power_force, power_grace, placement)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        let mut remove = tx.prepare("DELETE FROM instances WHERE id = ?1")?;
        let mut put_group =
            tx.prepare("INSERT OR REPLACE INTO groups (name, policy) VALUES (?1, ?2)")?;
        let mut put_tombstone = tx.prepare("INSERT OR IGNORE INTO tombstones (id) VALUES (?1)")?;
        let mut remove_node = tx.prepare("DELETE FROM nodes WHERE id = ?1")?;
        for n in &c.nodes {
            put_node.execute(params![
                n.id.as_str(),
                n.inventory
                    .as_ref()
                    .map(|i| i.to_vec())
                    .transpose()
                    .map_err(|e| corrupt("nodes", format!("inventory does not encode: {e}")))?,
                n.session as i64,
                n.cordoned,
                n.draining,
                n.generation as i64,
                n.reported_generation as i64,
                n.last_seen_ms as i64,
                join_lines(&n.failures_ms, |t| t.to_string()).replace('\n', ","),
                join_lines(&n.label_overrides, |(k, v)| format_label_override(
                    k,
                    v.as_ref()
                )),
            ])?;
        }
        for i in &c.instances {
            put_instance.execute(params![
                i.id.to_string(),
                i.name,
                encode_spec(&i.spec)?,
                join_lines(&i.selector, |l| l.to_string()),
                i.group,
                i.power == PowerState::Stopped,
                i64::from(i.reboot_count),
                i.phase.as_str(),
                i.node.as_ref().map(|n| n.as_str()),
                join_lines(&i.failures, |(n, r)| format!(
                    "{n}\t{}",
                    r.replace(['\n', '\t'], " ")
                )),
                i.reason,
                i.created_ms as i64,
                i.power_mode.force,
                i64::from(i.power_mode.stop_timeout_secs),
                i.placement,
            ])?;
        }
        for id in &c.removed {
            remove.execute(params![id.to_string()])?;
        }
        for (name, p) in &c.groups {
            put_group.execute(params![name, p.as_str()])?;
        }
        for id in &c.tombstones {
            put_tombstone.execute(params![id.to_string()])?;
        }
        for n in &c.removed_nodes {
            remove_node.execute(params![n.as_str()])?;
        }
        for i in &c.images {
            tx.execute(
                "INSERT OR REPLACE INTO images (name, version, sha256, size, arch, format, url,
                    created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    i.name,
                    i.version,
                    i.blob.digest.to_string(),
                    i.blob.size as i64,
                    i.arch.map(|a| a.to_string()),
                    i.format.as_str(),
                    i.url,
                    i.created_ms as i64,
                ],
            )?;
        }
        for e in &c.events {
            tx.execute(
                "INSERT OR REPLACE INTO events (seq, at_ms, instance, name, node, kind, detail,
                    actor) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    e.seq as i64,
                    e.at_ms as i64,
                    e.instance.as_ref().map(|(i, _)| i.to_string()),
                    e.instance.as_ref().map(|(_, n)| n.as_str()),
                    e.node.as_ref().map(|n| n.as_str()),
                    e.kind,
                    e.detail,
                    e.actor,
                ],
            )?;
        }
        if let Some(last) = c.events.last() {
            // Bounded: the oldest go.
            tx.execute(
                "DELETE FROM events WHERE seq <= ?1",
                params![last.seq as i64 - MAX_EVENTS as i64],
            )?;
        }
        for (name, version) in &c.removed_images {
            tx.execute(
                "DELETE FROM images WHERE name = ?1 AND version = ?2",
                params![name, version],
            )?;
        }
        drop((
            put_node,
            put_instance,
            remove,
            put_group,
            put_tombstone,
            remove_node,
        ));
        tx.commit()?;
        Ok(())
    }
}
