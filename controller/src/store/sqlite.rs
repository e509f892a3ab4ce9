//! The SQLite store (WAL, synchronous=FULL): the default, one controller per store. A new
//! store creates the fleet's identity (64 random bits, from the caller): agents bind to it, so
//! a controller started on an empty or wrong data directory is a different fleet that no agent
//! obeys until an operator adopts its nodes. The data directory is 0700 and the database files
//! 0600: they hold every instance's spec.

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use outpost_protocol::FleetId;
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{
    Cols, EVENT_COLS, IMAGE_COLS, INSTANCE_COLS, NODE_COLS, Reader, Val, corrupt, event_row,
    image_row, instance_row, node_row, snapshot,
};
use super::{SCHEMA_VERSION, Snapshot, Store, StoreError};
use crate::fleet::Changes;
use crate::fleet::events::MAX_EVENTS;

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    /// Dropping it stops the checkpointer thread (file databases only).
    _checkpointer: Option<std::sync::mpsc::Sender<()>>,
}

/// How often the background checkpointer folds the write-ahead log into the database.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

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
                failures TEXT NOT NULL, labels TEXT NOT NULL DEFAULT '',
                ceiling TEXT NOT NULL DEFAULT '', boot TEXT NOT NULL DEFAULT '');
             CREATE TABLE IF NOT EXISTS instances (
                id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec BLOB NOT NULL,
                selector TEXT NOT NULL, grp TEXT, power INTEGER NOT NULL,
                reboot_count INTEGER NOT NULL, phase TEXT NOT NULL, node TEXT,
                failures TEXT NOT NULL, reason TEXT NOT NULL, created_ms INTEGER NOT NULL,
                power_force INTEGER NOT NULL DEFAULT 0, power_grace INTEGER NOT NULL DEFAULT 0,
                placement TEXT NOT NULL DEFAULT '', adopted INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS removed_nodes (id TEXT PRIMARY KEY);
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
        // Schema 1-4 stores: adopted instances came with schema 5.
        if conn
            .prepare("SELECT adopted FROM instances LIMIT 0")
            .is_err()
        {
            conn.execute_batch(
                "ALTER TABLE instances ADD COLUMN adopted INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        // Schema 1-4 stores: capacity ceilings came with schema 5.
        if conn.prepare("SELECT ceiling FROM nodes LIMIT 0").is_err() {
            conn.execute_batch("ALTER TABLE nodes ADD COLUMN ceiling TEXT NOT NULL DEFAULT ''")?;
        }
        // Schema 1-5 stores: agent installs came with schema 6.
        if conn.prepare("SELECT boot FROM nodes LIMIT 0").is_err() {
            conn.execute_batch("ALTER TABLE nodes ADD COLUMN boot TEXT NOT NULL DEFAULT ''")?;
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

pub(super) struct SqlRow<'a, 'b>(&'a rusqlite::Row<'b>);

impl Cols for SqlRow<'_, '_> {
    type Error = rusqlite::Error;
    fn int(&self, i: usize) -> Result<i64, rusqlite::Error> {
        self.0.get(i)
    }
    fn flag(&self, i: usize) -> Result<bool, rusqlite::Error> {
        self.0.get(i)
    }
    fn text(&self, i: usize) -> Result<String, rusqlite::Error> {
        self.0.get(i)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, rusqlite::Error> {
        self.0.get(i)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, rusqlite::Error> {
        self.0.get(i)
    }
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, rusqlite::Error> {
        self.0.get(i)
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Val::Int(v) => v.to_sql(),
            Val::Flag(v) => v.to_sql(),
            Val::Text(v) => v.to_sql(),
            Val::OptText(v) => v.to_sql(),
            Val::Bytes(v) => v.to_sql(),
            Val::OptBytes(v) => v.to_sql(),
        }
    }
}

impl Reader for Connection {
    type Row<'r> = SqlRow<'r, 'r>;
    fn each<T>(
        &mut self,
        sql: &str,
        bound: Option<i64>,
        f: impl Fn(&Self::Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut st = self.prepare(sql)?;
        let mut q = match bound {
            Some(b) => st.query(params![b])?,
            None => st.query([])?,
        };
        let mut out = Vec::new();
        while let Some(r) = q.next()? {
            out.push(f(&SqlRow(r))?);
        }
        Ok(out)
    }
}

/// The upserts of each kind of row, made once.
static UPSERTS: std::sync::LazyLock<[String; 4]> = std::sync::LazyLock::new(|| {
    [
        upsert("nodes", NODE_COLS, "id"),
        upsert("instances", INSTANCE_COLS, "id"),
        upsert("images", IMAGE_COLS, "name, version"),
        upsert("events", EVENT_COLS, "seq"),
    ]
});

/// `INSERT INTO table (cols) VALUES (?1, …) ON CONFLICT (key) DO UPDATE SET …`: a row
/// changed in place (its indexes untouched unless an indexed column changed), not deleted
/// and inserted again as `INSERT OR REPLACE` does; fewer pages written per commit.
fn upsert(table: &str, cols: &str, key: &str) -> String {
    let names: Vec<&str> = cols.split(',').map(str::trim).collect();
    let marks: Vec<String> = (1..=names.len()).map(|k| format!("?{k}")).collect();
    let keys: Vec<&str> = key.split(',').map(str::trim).collect();
    let set: Vec<String> = names
        .iter()
        .filter(|c| !keys.contains(c))
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({cols}) VALUES ({}) ON CONFLICT ({key}) DO UPDATE SET {}",
        marks.join(", "),
        set.join(", ")
    )
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
        let fleet = self.fleet()?;
        snapshot(&mut self.conn, fleet, key)
    }

    fn apply(&mut self, c: &Changes) -> Result<(), StoreError> {
        if !c.stores_anything() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            // One statement per kind of row, prepared once for the connection's life (its
            // cache) and run for each row of the batch; kinds the batch lacks are skipped.
            let run =
                |sql: &str, rows: &mut dyn Iterator<Item = Vec<Val>>| -> Result<(), StoreError> {
                    let mut rows = rows.peekable();
                    if rows.peek().is_some() {
                        let mut st = tx.prepare_cached(sql)?;
                        for r in rows {
                            st.execute(rusqlite::params_from_iter(r))?;
                        }
                    }
                    Ok(())
                };
            let text = |s: String| vec![Val::Text(s)];
            let nodes = c
                .nodes
                .iter()
                .map(node_row)
                .collect::<Result<Vec<_>, _>>()?;
            // Removals first (as in PostgreSQL): a new instance may take a removed one's name.
            run(
                "DELETE FROM instances WHERE id = ?1",
                &mut c.removed.iter().map(|id| text(id.to_string())),
            )?;
            run(
                "DELETE FROM nodes WHERE id = ?1",
                &mut c.removed_nodes.iter().map(|n| text(n.as_str().into())),
            )?;
            run(
                "INSERT OR IGNORE INTO removed_nodes (id) VALUES (?1)",
                &mut c.removed_nodes.iter().map(|n| text(n.as_str().into())),
            )?;
            run(
                "DELETE FROM removed_nodes WHERE id = ?1",
                &mut c.readmitted.iter().map(|n| text(n.as_str().into())),
            )?;
            run(
                "DELETE FROM images WHERE name = ?1 AND version = ?2",
                &mut c
                    .removed_images
                    .iter()
                    .map(|(n, v)| vec![Val::Text(n.clone()), Val::Text(v.clone())]),
            )?;
            let [put_node, put_instance, put_image, put_event] = &*UPSERTS;
            run(put_node, &mut nodes.into_iter())?;
            let instances = c
                .instances
                .iter()
                .map(instance_row)
                .collect::<Result<Vec<_>, _>>()?;
            run(put_instance, &mut instances.into_iter())?;
            run(
                "INSERT OR REPLACE INTO groups (name, policy) VALUES (?1, ?2)",
                &mut c
                    .groups
                    .iter()
                    .map(|(name, p)| vec![Val::Text(name.clone()), Val::Text(p.as_str().into())]),
            )?;
            run(
                "INSERT OR IGNORE INTO tombstones (id) VALUES (?1)",
                &mut c.tombstones.iter().map(|id| text(id.to_string())),
            )?;
            run(put_image, &mut c.images.iter().map(image_row))?;
            run(put_event, &mut c.events.iter().map(event_row))?;
            // Bounded: the oldest go.
            run(
                "DELETE FROM events WHERE seq <= ?1",
                &mut c
                    .events
                    .last()
                    .map(|last| vec![Val::Int(last.seq as i64 - MAX_EVENTS as i64)])
                    .into_iter(),
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}
