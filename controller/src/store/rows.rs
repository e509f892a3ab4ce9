//! The fleet's records as table rows, shared by every backend: each record becomes a list of
//! column values ([`Val`]) and is read back through [`Cols`], so SQLite and PostgreSQL store
//! exactly the same columns and decode them with the same code.

use outpost_protocol::legacy;
use outpost_protocol::{
    Arch, BlobRef, Digest, InstanceId, InstanceSpec, Inventory, Label, Message, NodeId, PowerMode,
    PowerState, Resources,
};

use super::{Snapshot, StoreError};
use crate::fleet::events::EventRecord;
use crate::fleet::events::MAX_EVENTS;
use crate::fleet::images::{ImageFormat, ImageRecord};
use crate::fleet::records::{format_label_override, parse_label_override};
use crate::fleet::{InstanceRecord, NodeRecord, Phase};
use crate::scheduler::GroupPolicy;
use outpost_protocol::FleetId;

/// One column's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// An integer.
    Int(i64),
    /// A flag.
    Flag(bool),
    /// Text.
    Text(String),
    /// Text or NULL.
    OptText(Option<String>),
    /// Bytes.
    Bytes(Vec<u8>),
    /// Bytes or NULL.
    OptBytes(Option<Vec<u8>>),
}

/// Reads a row's columns by index.
pub trait Cols {
    /// The backend's error.
    type Error: Into<StoreError>;
    /// An integer.
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    /// A flag.
    fn flag(&self, i: usize) -> Result<bool, Self::Error>;
    /// Text.
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    /// Text or NULL.
    fn opt_text(&self, i: usize) -> Result<Option<String>, Self::Error>;
    /// Bytes.
    fn bytes(&self, i: usize) -> Result<Vec<u8>, Self::Error>;
    /// Bytes or NULL.
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, Self::Error>;
}

/// A backend's reads: each row of a query, decoded by `f`. `bound` is the query's one
/// parameter (`$1`), if it has one.
pub(super) trait Reader {
    /// A row as the backend gives it.
    type Row<'r>: Cols;
    /// Every row of `sql`, decoded by `f`.
    fn each<T>(
        &mut self,
        sql: &str,
        bound: Option<i64>,
        f: impl Fn(&Self::Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError>;
}

/// Everything stored, read through `r` (the same queries for every backend), for a fleet
/// whose identity and blob key have been read.
pub(super) fn snapshot<R: Reader>(
    r: &mut R,
    fleet: FleetId,
    blob_key: Vec<u8>,
) -> Result<Snapshot, StoreError> {
    let err = |e: <R::Row<'_> as Cols>::Error| -> StoreError { e.into() };
    Ok(Snapshot {
        fleet,
        blob_key: blob_key
            .try_into()
            .map_err(|_| corrupt("secrets", "blob_key is not 32 bytes"))?,
        nodes: r.each(
            &format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"),
            None,
            |x| node_from(x),
        )?,
        instances: r.each(
            &format!("SELECT {INSTANCE_COLS} FROM instances ORDER BY id"),
            None,
            |x| instance_from(x),
        )?,
        groups: r.each("SELECT name, policy FROM groups ORDER BY name", None, |x| {
            let policy = x.text(1).map_err(err)?;
            let p = GroupPolicy::parse(&policy)
                .ok_or_else(|| corrupt("groups", format!("policy {policy}")))?;
            Ok((x.text(0).map_err(err)?, p))
        })?,
        images: r.each(
            &format!("SELECT {IMAGE_COLS} FROM images ORDER BY name, version"),
            None,
            |x| image_from(x),
        )?,
        events: r.each(
            &format!(
                "SELECT {EVENT_COLS} FROM
                   (SELECT * FROM events ORDER BY seq DESC LIMIT $1) e ORDER BY seq"
            ),
            Some(MAX_EVENTS as i64),
            |x| event_from(x),
        )?,
        tombstones: r.each("SELECT id FROM tombstones", None, |x| {
            x.text(0)
                .map_err(err)?
                .parse()
                .map_err(|e: outpost_protocol::IdError| corrupt("tombstones", e.to_string()))
        })?,
        removed_nodes: r.each("SELECT id FROM removed_nodes ORDER BY id", None, |x| {
            NodeId::new(&x.text(0).map_err(err)?)
                .map_err(|e| corrupt("removed_nodes", e.to_string()))
        })?,
    })
}

pub(super) fn corrupt(table: &'static str, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table,
        what: what.into(),
    }
}

fn join_lines<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join("\n")
}

/// The node columns, in order.
pub const NODE_COLS: &str = "id, inventory, session, cordoned, draining, generation, reported_generation, last_seen_ms, failures, labels, ceiling, boot";
/// The instance columns, in order.
pub const INSTANCE_COLS: &str = "id, name, spec, selector, grp, power, reboot_count, phase, node, failures, reason, created_ms, power_force, power_grace, placement, adopted";
/// The image columns, in order.
pub const IMAGE_COLS: &str = "name, version, sha256, size, arch, format, url, created_ms";
/// The event columns, in order.
pub const EVENT_COLS: &str = "seq, at_ms, instance, name, node, kind, detail, actor";

/// A node as a row.
pub fn node_row(n: &NodeRecord) -> Result<Vec<Val>, StoreError> {
    Ok(vec![
        Val::Text(n.id.as_str().to_owned()),
        Val::OptBytes(
            n.inventory
                .as_ref()
                .map(|i| i.to_vec())
                .transpose()
                .map_err(|e| corrupt("nodes", format!("inventory does not encode: {e}")))?,
        ),
        Val::Int(n.session as i64),
        Val::Flag(n.cordoned),
        Val::Flag(n.draining),
        Val::Int(n.generation as i64),
        Val::Int(n.reported_generation as i64),
        Val::Int(n.last_seen_ms as i64),
        Val::Text(join_lines(&n.failures_ms, |t| t.to_string()).replace('\n', ",")),
        Val::Text(join_lines(&n.label_overrides, |(k, v)| {
            format_label_override(k, v.as_ref())
        })),
        Val::Text(
            n.ceiling
                .map(|c| format!("{},{},{}", c.vcpus, c.memory_mib, c.disk_gib))
                .unwrap_or_default(),
        ),
        Val::Text(n.boot.map(|b| b.to_string()).unwrap_or_default()),
    ])
}

/// A node from a row of [`NODE_COLS`].
pub fn node_from<C: Cols>(r: &C) -> Result<NodeRecord, StoreError> {
    let e = |e: C::Error| -> StoreError { e.into() };
    let id = NodeId::new(&r.text(0).map_err(e)?).map_err(|x| corrupt("nodes", x.to_string()))?;
    Ok(NodeRecord {
        inventory: r
            .opt_bytes(1)
            .map_err(e)?
            .and_then(|b| decode_inventory(&id, &b)),
        session: r.int(2).map_err(e)? as u64,
        cordoned: r.flag(3).map_err(e)?,
        draining: r.flag(4).map_err(e)?,
        generation: r.int(5).map_err(e)? as u64,
        reported_generation: r.int(6).map_err(e)? as u64,
        last_seen_ms: r.int(7).map_err(e)? as u64,
        failures_ms: r
            .text(8)
            .map_err(e)?
            .split(',')
            .filter_map(|t| t.parse().ok())
            .collect(),
        label_overrides: r
            .text(9)
            .map_err(e)?
            .lines()
            .map(parse_label_override)
            .collect::<Result<_, _>>()
            .map_err(|x| corrupt("nodes", x))?,
        ceiling: parse_ceiling(&r.text(10).map_err(e)?),
        // Empty: no install bound yet (the next status binds one).
        boot: r.text(11).map_err(e)?.parse().ok(),
        ..NodeRecord::new(id)
    })
}

/// A node's capacity ceiling as stored: `vcpus,memory_mib,disk_gib` (empty: none yet, it is
/// set by the node's next report).
fn parse_ceiling(s: &str) -> Option<Resources> {
    let mut p = s.split(',').map(str::parse::<u32>);
    match (p.next(), p.next(), p.next()) {
        (Some(Ok(v)), Some(Ok(m)), Some(Ok(d))) => Some(Resources {
            vcpus: u16::try_from(v).unwrap_or(u16::MAX),
            memory_mib: m,
            disk_gib: d,
        }),
        _ => None,
    }
}

/// An instance as a row.
pub fn instance_row(i: &InstanceRecord) -> Result<Vec<Val>, StoreError> {
    Ok(vec![
        Val::Text(i.id.to_string()),
        Val::Text(i.name.clone()),
        Val::Bytes(encode_spec(&i.spec)?),
        Val::Text(join_lines(&i.selector, |l| l.to_string())),
        Val::OptText(i.group.clone()),
        Val::Flag(i.power == PowerState::Stopped),
        Val::Int(i64::from(i.reboot_count)),
        Val::Text(i.phase.as_str().to_owned()),
        Val::OptText(i.node.as_ref().map(|n| n.as_str().to_owned())),
        Val::Text(join_lines(&i.failures, |(n, r)| {
            format!("{n}\t{}", r.replace(['\n', '\t'], " "))
        })),
        Val::Text(i.reason.clone()),
        Val::Int(i.created_ms as i64),
        Val::Flag(i.power_mode.force),
        Val::Int(i64::from(i.power_mode.stop_timeout_secs)),
        Val::Text(i.placement.clone()),
        Val::Flag(i.adopted),
    ])
}

/// An instance from a row of [`INSTANCE_COLS`].
pub fn instance_from<C: Cols>(r: &C) -> Result<InstanceRecord, StoreError> {
    let e = |e: C::Error| -> StoreError { e.into() };
    let bad = |what: String| corrupt("instances", what);
    let phase = r.text(7).map_err(e)?;
    Ok(InstanceRecord {
        id: r
            .text(0)
            .map_err(e)?
            .parse::<InstanceId>()
            .map_err(|x| bad(x.to_string()))?,
        name: r.text(1).map_err(e)?,
        spec: decode_spec(&r.bytes(2).map_err(e)?)?,
        selector: r
            .text(3)
            .map_err(e)?
            .lines()
            .map(Label::parse)
            .collect::<Result<_, _>>()
            .map_err(|x| bad(x.to_string()))?,
        group: r.opt_text(4).map_err(e)?,
        power: if r.flag(5).map_err(e)? {
            PowerState::Stopped
        } else {
            PowerState::Running
        },
        reboot_count: r.int(6).map_err(e)? as u32,
        phase: Phase::parse(&phase).ok_or_else(|| bad(format!("phase {phase}")))?,
        node: r
            .opt_text(8)
            .map_err(e)?
            .map(|n| NodeId::new(&n))
            .transpose()
            .map_err(|x| bad(x.to_string()))?,
        failures: r
            .text(9)
            .map_err(e)?
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter_map(|(n, r)| Some((NodeId::new(n).ok()?, r.to_owned())))
            .collect(),
        reason: r.text(10).map_err(e)?,
        created_ms: r.int(11).map_err(e)? as u64,
        power_mode: PowerMode {
            force: r.flag(12).map_err(e)?,
            stop_timeout_secs: u16::try_from(r.int(13).map_err(e)?).unwrap_or(u16::MAX),
        },
        placement: r.text(14).map_err(e)?,
        adopted: r.flag(15).map_err(e)?,
    })
}

/// An image as a row.
pub fn image_row(i: &ImageRecord) -> Vec<Val> {
    vec![
        Val::Text(i.name.clone()),
        Val::Text(i.version.clone()),
        Val::Text(i.blob.digest.to_string()),
        Val::Int(i.blob.size as i64),
        Val::OptText(i.arch.map(|a| a.to_string())),
        Val::Text(i.format.as_str().to_owned()),
        Val::OptText(i.url.clone()),
        Val::Int(i.created_ms as i64),
    ]
}

/// An image from a row of [`IMAGE_COLS`].
pub fn image_from<C: Cols>(r: &C) -> Result<ImageRecord, StoreError> {
    let e = |e: C::Error| -> StoreError { e.into() };
    let bad = |what: String| corrupt("images", what);
    let sha = r.text(2).map_err(e)?;
    let format = r.text(5).map_err(e)?;
    Ok(ImageRecord {
        name: r.text(0).map_err(e)?,
        version: r.text(1).map_err(e)?,
        blob: BlobRef {
            digest: Digest::parse(&sha).ok_or_else(|| bad(format!("sha256 {sha}")))?,
            size: r.int(3).map_err(e)? as u64,
        },
        arch: r
            .opt_text(4)
            .map_err(e)?
            .map(|a| Arch::parse(&a).ok_or_else(|| bad(format!("arch {a}"))))
            .transpose()?,
        format: ImageFormat::parse(&format).ok_or_else(|| bad(format!("format {format}")))?,
        url: r.opt_text(6).map_err(e)?,
        created_ms: r.int(7).map_err(e)? as u64,
    })
}

/// An event as a row.
pub fn event_row(ev: &EventRecord) -> Vec<Val> {
    vec![
        Val::Int(ev.seq as i64),
        Val::Int(ev.at_ms as i64),
        Val::OptText(ev.instance.as_ref().map(|(i, _)| i.to_string())),
        Val::OptText(ev.instance.as_ref().map(|(_, n)| n.clone())),
        Val::OptText(ev.node.as_ref().map(|n| n.as_str().to_owned())),
        Val::Text(ev.kind.clone()),
        Val::Text(ev.detail.clone()),
        Val::Text(ev.actor.clone()),
    ]
}

/// An event from a row of [`EVENT_COLS`].
pub fn event_from<C: Cols>(r: &C) -> Result<EventRecord, StoreError> {
    let e = |e: C::Error| -> StoreError { e.into() };
    let name = r.opt_text(3).map_err(e)?;
    Ok(EventRecord {
        seq: r.int(0).map_err(e)? as u64,
        at_ms: r.int(1).map_err(e)? as u64,
        instance: r
            .opt_text(2)
            .map_err(e)?
            .and_then(|i| i.parse::<InstanceId>().ok())
            .map(|i| (i, name.unwrap_or_default())),
        node: r.opt_text(4).map_err(e)?.and_then(|n| NodeId::new(&n).ok()),
        kind: r.text(5).map_err(e)?,
        detail: r.text(6).map_err(e)?,
        actor: r.text(7).map_err(e)?,
    })
}

fn encode_spec(spec: &InstanceSpec) -> Result<Vec<u8>, StoreError> {
    // A version byte, as on the wire, then postcard. Never an empty blob in its place.
    postcard::to_extend(spec, vec![outpost_protocol::WIRE_VERSION])
        .map_err(|e| corrupt("instances", format!("spec does not encode: {e}")))
}

/// A stored spec, of this wire version or of versions 2 to 4 (read after an upgrade; 4 has
/// this layout, 2 and 3 are converted).
fn decode_spec(b: &[u8]) -> Result<InstanceSpec, StoreError> {
    let bad = |e: postcard::Error| corrupt("instances", e.to_string());
    match b.split_first() {
        Some((&outpost_protocol::WIRE_VERSION | 4, body)) => {
            postcard::from_bytes(body).map_err(bad)
        }
        Some((2 | 3, body)) => postcard::from_bytes::<legacy::SpecV2>(body)
            .map(Into::into)
            .map_err(bad),
        Some((v, _)) => Err(corrupt("instances", format!("unknown spec encoding {v}"))),
        None => Err(corrupt("instances", "empty spec")),
    }
}

/// A stored inventory, of this wire version or versions 2 and 4 (read after an upgrade; 4 has
/// this layout). An inventory
/// is a cache of what the node sends after every connect: one that does not decode is dropped
/// (logged), not a reason to refuse the store.
fn decode_inventory(node: &NodeId, b: &[u8]) -> Option<Inventory> {
    let r = match b.split_first() {
        Some((2, body)) => postcard::from_bytes::<legacy::InventoryV2>(body)
            .map(Into::into)
            .map_err(|e| e.to_string()),
        Some((4, body)) => postcard::from_bytes::<Inventory>(body).map_err(|e| e.to_string()),
        _ => Inventory::decode(b).map_err(|e| e.to_string()),
    };
    r.map_err(|e| {
        tracing::warn!(%node, error = %e, "stored inventory unreadable: waiting for the node to send it again");
    })
    .ok()
}
