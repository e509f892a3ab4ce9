//! Named API tokens with roles. Each token is a name, a role (`read`, `operator`, `admin`), an
//! optional expiry and the SHA-256 of its secret (the secret itself is printed once and never
//! stored). They live in `DATA_DIR/tokens.db` (SQLite, 0600), or, for controllers sharing a
//! PostgreSQL store, in its `tokens` table (so that every controller of the fleet knows them).
//! `outpost-controller tokens create|revoke` writes them; the running controller looks a token
//! up again after [`RECHECK`], so that a revocation or an expiry takes effect without a
//! restart.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension as _};
use sha2::{Digest as _, Sha256};

/// The token database's file in the data directory.
pub const TOKENS_FILE: &str = "tokens.db";
/// How long a looked-up token is trusted before it is looked up again.
pub const RECHECK: Duration = Duration::from_secs(1);
/// The prefix of every secret (so that a leaked one is recognisable, as GitHub's are).
pub const SECRET_PREFIX: &str = "outpost_";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Sees everything, changes nothing.
    Read,
    /// Manages instances; cordons, drains and labels nodes.
    Operator,
    /// Also removes and adopts nodes, and manages images and tokens.
    Admin,
}

impl Role {
    /// Lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One token as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenRecord {
    /// Its name (who it is in the history and the log).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
    /// When it stops working, if ever.
    pub expires_ms: Option<u64>,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
}

impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why token management failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The database.
    #[error("token database: {0}")]
    Db(#[from] rusqlite::Error),
    /// Its file.
    #[error("token database {0}: {1}")]
    Io(String, std::io::Error),
    /// A bad name.
    #[error("token name {0:?}: 1 to 64 of a-z, 0-9, '-' and '_'")]
    BadName(String),
    /// The name is taken.
    #[error("a token named {0} exists (revoke it first, or choose another name)")]
    Exists(String),
    /// No such token.
    #[error("no token named {0}")]
    NoToken(String),
    /// No randomness.
    #[error("no randomness for a secret: {0}")]
    Random(String),
    /// The PostgreSQL store.
    #[error("token table: {0}")]
    Store(String),
}

impl From<crate::store::StoreError> for TokenError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<crate::store::Gone> for TokenError {
    fn from(_: crate::store::Gone) -> Self {
        Self::Store("the token table did not answer".into())
    }
}

impl From<postgres::Error> for TokenError {
    fn from(e: postgres::Error) -> Self {
        Self::Store(crate::store::StoreError::from(e).to_string())
    }
}

pub use crate::secret::same_secret;

/// The SHA-256 of a secret.
pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The token database.
pub struct TokenDb {
    backend: Backend,
}

enum Backend {
    Sqlite(Connection),
    Postgres(crate::store::Worker<PgTokens>),
}

/// The token table's PostgreSQL connection (made again when it breaks), kept on a worker
/// thread: the API checks tokens from async tasks, where the blocking client may not run.
struct PgTokens {
    cfg: crate::store::PgConfig,
    client: postgres::Client,
}

impl PgTokens {
    /// Connects (bringing the schema up to date) on a new worker thread.
    fn start(cfg: &crate::store::PgConfig) -> Result<crate::store::Worker<Self>, TokenError> {
        let cfg = cfg.clone();
        crate::store::Worker::spawn_blocking("tokens", move || {
            let mut fleet = [0u8; 8];
            getrandom::fill(&mut fleet).map_err(|e| TokenError::Random(e.to_string()))?;
            let mut client = cfg.connect("tokens")?;
            crate::store::migrate(
                &mut client,
                outpost_protocol::FleetId(u64::from_le_bytes(fleet).max(1)),
            )?;
            Ok(Box::new(Self { cfg, client }))
        })
    }

    /// The connection, made again if it broke.
    fn client(&mut self) -> &mut postgres::Client {
        if self.client.is_closed() {
            match self.cfg.connect("tokens") {
                Ok(c) => self.client = c,
                Err(e) => tracing::warn!(error = %e, "cannot reach the token table"),
            }
        }
        &mut self.client
    }
}

/// Runs `f` on the token table's connection, waiting at most [`PG_WAIT`] for the answer
/// (a request waits on it: a database behind a hung link must not hold the API).
fn on_pg<T: Send + 'static>(
    pg: &crate::store::Worker<PgTokens>,
    f: impl FnOnce(&mut postgres::Client) -> Result<T, TokenError> + Send + 'static,
) -> Result<T, TokenError> {
    pg.run_blocking(PG_WAIT, move |t| f(t.client()))?
}

/// The longest a request waits for the token table.
const PG_WAIT: Duration = Duration::from_secs(1);

fn pg_record(r: &postgres::Row) -> Result<TokenRecord, TokenError> {
    let role: String = r.try_get(1)?;
    Ok(TokenRecord {
        name: r.try_get(0)?,
        role: Role::parse(&role).unwrap_or(Role::Read),
        created_ms: r.try_get::<_, i64>(2)? as u64,
        expires_ms: r.try_get::<_, Option<i64>>(3)?.map(|v| v as u64),
        revoked_ms: r.try_get::<_, Option<i64>>(4)?.map(|v| v as u64),
    })
}

impl TokenDb {
    /// The token table of `store`: `DIR/tokens.db` with SQLite, the shared store's own table
    /// with PostgreSQL.
    pub fn open_for(store: &crate::store::StoreChoice, dir: &Path) -> Result<Self, TokenError> {
        match store {
            crate::store::StoreChoice::Sqlite => Self::open(dir),
            crate::store::StoreChoice::Postgres(pg) => Ok(Self {
                backend: Backend::Postgres(PgTokens::start(pg)?),
            }),
        }
    }

    /// Whether any token was ever made.
    fn any(&self) -> Result<bool, TokenError> {
        match &self.backend {
            Backend::Sqlite(c) => {
                Ok(c.query_row("SELECT count(*) FROM tokens", [], |r| r.get::<_, i64>(0))? > 0)
            }
            Backend::Postgres(pg) => on_pg(pg, |c| {
                Ok(c.query_one("SELECT count(*) FROM tokens", &[])?
                    .try_get::<_, i64>(0)?
                    > 0)
            }),
        }
    }

    /// Opens (or creates, 0600) `DIR/tokens.db`.
    pub fn open(dir: &Path) -> Result<Self, TokenError> {
        let path = dir.join(TOKENS_FILE);
        std::fs::create_dir_all(dir).map_err(|e| TokenError::Io(dir.display().to_string(), e))?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| TokenError::Io(path.display().to_string(), e))?;
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tokens (
                name TEXT PRIMARY KEY, role TEXT NOT NULL, hash BLOB NOT NULL UNIQUE,
                created_ms INTEGER NOT NULL, expires_ms INTEGER, revoked_ms INTEGER);",
        )?;
        Ok(Self {
            backend: Backend::Sqlite(conn),
        })
    }

    /// Makes a token; returns its secret (shown once) and its record.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        valid_for: Option<Duration>,
    ) -> Result<(String, TokenRecord), TokenError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(TokenError::BadName(name.to_owned()));
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
        let secret = format!(
            "{SECRET_PREFIX}{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let created_ms = now_ms();
        let expires_ms = valid_for
            .map(|d| created_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
        let h = hash(&secret).to_vec();
        let expires = expires_ms.map(|v| v as i64);
        let taken = match &self.backend {
            Backend::Sqlite(c) => {
                let r = c.execute(
                    "INSERT INTO tokens (name, role, hash, created_ms, expires_ms, revoked_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                    rusqlite::params![name, role.as_str(), h, created_ms as i64, expires],
                );
                match r {
                    Ok(_) => false,
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        true
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Backend::Postgres(pg) => {
                let name = name.to_owned();
                on_pg(pg, move |c| {
                    let n = c.execute(
                        "INSERT INTO tokens (name, role, hash, created_ms, expires_ms, revoked_ms)
                         VALUES ($1, $2, $3, $4, $5, NULL) ON CONFLICT DO NOTHING",
                        &[&name, &role.as_str(), &h, &(created_ms as i64), &expires],
                    )?;
                    Ok(n == 0)
                })?
            }
        };
        if taken {
            return Err(TokenError::Exists(name.to_owned()));
        }
        Ok((
            secret,
            TokenRecord {
                name: name.to_owned(),
                role,
                created_ms,
                expires_ms,
                revoked_ms: None,
            },
        ))
    }

    /// Every token, by name.
    pub fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        const SQL: &str =
            "SELECT name, role, created_ms, expires_ms, revoked_ms FROM tokens ORDER BY name";
        match &self.backend {
            Backend::Sqlite(c) => {
                let mut st = c.prepare(SQL)?;
                let rows = st.query_map([], row)?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            Backend::Postgres(pg) => {
                on_pg(pg, |c| c.query(SQL, &[])?.iter().map(pg_record).collect())
            }
        }
    }

    /// Revokes a token (kept, so that the history still names it).
    pub fn revoke(&self, name: &str) -> Result<(), TokenError> {
        let now = now_ms() as i64;
        let n = match &self.backend {
            Backend::Sqlite(c) => c.execute(
                "UPDATE tokens SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
                rusqlite::params![name, now],
            )? as u64,
            Backend::Postgres(pg) => {
                let name = name.to_owned();
                on_pg(pg, move |c| {
                    Ok(c.execute(
                        "UPDATE tokens SET revoked_ms = $2 WHERE name = $1 AND revoked_ms IS NULL",
                        &[&name, &now],
                    )?)
                })?
            }
        };
        if n == 0 {
            return Err(TokenError::NoToken(name.to_owned()));
        }
        Ok(())
    }

    /// The token whose secret hashes to `h`.
    pub fn find(&self, h: &[u8; 32]) -> Result<Option<TokenRecord>, TokenError> {
        match &self.backend {
            Backend::Sqlite(c) => Ok(c
                .query_row(
                    "SELECT name, role, created_ms, expires_ms, revoked_ms FROM tokens WHERE hash = ?1",
                    [h.to_vec()],
                    row,
                )
                .optional()?),
            Backend::Postgres(pg) => {
                let h = h.to_vec();
                on_pg(pg, move |c| {
                    c.query_opt(
                        "SELECT name, role, created_ms, expires_ms, revoked_ms FROM tokens WHERE hash = $1",
                        &[&h],
                    )?
                    .as_ref()
                    .map(pg_record)
                    .transpose()
                })
            }
        }
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let role: String = r.get(1)?;
    Ok(TokenRecord {
        name: r.get(0)?,
        role: Role::parse(&role).unwrap_or(Role::Read),
        created_ms: r.get::<_, i64>(2)? as u64,
        expires_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
        revoked_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
    })
}

/// Who a request's bearer token says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A valid token.
    Valid {
        /// Its name.
        name: String,
        /// Its role.
        role: Role,
    },
    /// It expired.
    Expired(String),
    /// It was revoked.
    Revoked(String),
    /// No such token.
    Unknown,
}

/// What the API checks tokens with: the single `--api-token` (an admin named `api-token`), and
/// the named tokens, looked up again after [`RECHECK`].
pub struct Tokens {
    single: Option<[u8; 32]>,
    /// The named tokens' table, once there is one.
    db: Mutex<Option<TokenDb>>,
    /// Where the table may appear while there is none yet (`outpost-controller tokens
    /// create` on a running controller that started without tokens).
    pending: Option<Pending>,
    /// Whether any named token exists: once true, the API needs a token until it stops.
    named: std::sync::atomic::AtomicBool,
    seen: Mutex<HashMap<[u8; 32], Looked>>,
}

/// A token table that may appear: the store's, and when it was last looked for.
struct Pending {
    store: crate::store::StoreChoice,
    dir: std::path::PathBuf,
    looked: Mutex<Option<Instant>>,
}

/// How often a controller without tokens looks whether one was made.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// A token looked up: when, and what was found.
type Looked = (Instant, Option<TokenRecord>);

impl Tokens {
    /// The API's tokens: `single` (from `--api-token`), and those of `DIR/tokens.db` if it exists
    /// or `named` is set.
    pub fn new(single: Option<&str>, dir: &Path, named: bool) -> Result<Self, TokenError> {
        Self::for_store(single, &crate::store::StoreChoice::Sqlite, dir, named)
    }

    /// The API's tokens: `single`, and the named tokens of `store` (the data directory's
    /// `tokens.db` if it exists, the shared store's table if it holds any) or if `named` is set.
    pub fn for_store(
        single: Option<&str>,
        store: &crate::store::StoreChoice,
        dir: &Path,
        named: bool,
    ) -> Result<Self, TokenError> {
        let (db, any) = match store {
            crate::store::StoreChoice::Sqlite if !named && !dir.join(TOKENS_FILE).exists() => {
                (None, false)
            }
            _ => {
                let db = TokenDb::open_for(store, dir)?;
                let any = named || db.any()?;
                (Some(db), any)
            }
        };
        Ok(Self {
            single: single.map(hash),
            db: Mutex::new(db),
            pending: (!any).then(|| Pending {
                store: store.clone(),
                dir: dir.to_path_buf(),
                looked: Mutex::new(None),
            }),
            named: std::sync::atomic::AtomicBool::new(any),
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Whether any token is configured (else the API is open on loopback). A token made while
    /// the controller runs locks the API within [`LOOK_EVERY`], without a restart.
    pub fn required(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.single.is_some() || self.named.load(Ordering::Relaxed) {
            return true;
        }
        let Some(p) = &self.pending else {
            return false;
        };
        {
            let mut looked = p.looked.lock().unwrap_or_else(|e| e.into_inner());
            if looked.is_some_and(|t| t.elapsed() < LOOK_EVERY) {
                return false;
            }
            *looked = Some(Instant::now());
        }
        // One request looks at a time; the others go on (open) meanwhile.
        let Ok(mut db) = self.db.try_lock() else {
            return false;
        };
        if db.is_none()
            && (!matches!(p.store, crate::store::StoreChoice::Sqlite)
                || p.dir.join(TOKENS_FILE).exists())
        {
            match TokenDb::open_for(&p.store, &p.dir) {
                Ok(d) => *db = Some(d),
                Err(e) => tracing::warn!(error = %e, "cannot open the token table"),
            }
        }
        let any = db.as_ref().is_some_and(|d| {
            d.any().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the token table");
                false
            })
        });
        if any {
            tracing::warn!("a named token exists now: the API needs a token from here on");
            self.named.store(true, Ordering::Relaxed);
        }
        any
    }

    /// Who `secret` is, now.
    pub fn check(&self, secret: &str) -> Verdict {
        let h = hash(secret);
        if self.single.is_some_and(|s| same_secret(&s, &h)) {
            return Verdict::Valid {
                name: "api-token".into(),
                role: Role::Admin,
            };
        }
        let record = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            match seen.get(&h) {
                Some((at, r)) if at.elapsed() < RECHECK => r.clone(),
                _ => {
                    let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(db) = db.as_ref() else {
                        return Verdict::Unknown;
                    };
                    let r = match db.find(&h) {
                        Ok(r) => r,
                        // The table cannot be read now (a hung link): what was known of this
                        // token stands, so that a valid one is not refused for it.
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the token database");
                            match seen.get(&h) {
                                Some((_, r)) => return verdict(r.clone()),
                                None => None,
                            }
                        }
                    };
                    if seen.len() > 10_000 {
                        seen.clear(); // bounded: guesses cannot grow it without limit
                    }
                    seen.insert(h, (Instant::now(), r.clone()));
                    r
                }
            }
        };
        verdict(record)
    }
}

/// What a looked-up token record says.
fn verdict(record: Option<TokenRecord>) -> Verdict {
    match record {
        None => Verdict::Unknown,
        Some(r) if r.revoked_ms.is_some() => Verdict::Revoked(r.name),
        Some(r) if r.expires_ms.is_some_and(|e| e <= now_ms()) => Verdict::Expired(r.name),
        Some(r) => Verdict::Valid {
            name: r.name,
            role: r.role,
        },
    }
}

/// Parses a duration like `30d`, `12h`, `90m` or `45s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_revoked_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let db = TokenDb::open(dir.path()).unwrap();
        let (ops, rec) = db.create("ops", Role::Operator, None).unwrap();
        assert!(ops.starts_with(SECRET_PREFIX));
        assert_eq!(rec.role, Role::Operator);
        assert!(matches!(
            db.create("ops", Role::Read, None),
            Err(TokenError::Exists(_))
        ));
        assert!(matches!(
            db.create("Bad Name", Role::Read, None),
            Err(TokenError::BadName(_))
        ));
        let (short, _) = db
            .create("short", Role::Read, Some(Duration::from_millis(1)))
            .unwrap();
        let t = Tokens::new(Some("legacy"), dir.path(), false).unwrap();
        assert_eq!(
            t.check("legacy"),
            Verdict::Valid {
                name: "api-token".into(),
                role: Role::Admin
            }
        );
        assert_eq!(
            t.check(&ops),
            Verdict::Valid {
                name: "ops".into(),
                role: Role::Operator
            }
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.check(&short), Verdict::Expired("short".into()));
        assert_eq!(t.check("guess"), Verdict::Unknown);
        db.revoke("ops").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(t.check(&ops), Verdict::Revoked("ops".into()));
        assert!(matches!(db.revoke("ops"), Err(TokenError::NoToken(_))));
        // Only hashes are stored.
        let raw = std::fs::read(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!raw.windows(ops.len()).any(|w| w == ops.as_bytes()));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_duration("30d"),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("3w"), None);
    }
}
