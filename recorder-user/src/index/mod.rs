//! The index of recordings: an embedded SQLite file (one host) or a PostgreSQL database (several
//! hosts or sites share one index).
//!
//! The spool's `metadata.json` files are the source of truth; the index is a cache for queries
//! (by CallUUID across transfers and sites, by participant, by time). It is updated by the writer
//! thread from the metadata it writes (one-way: events -> writer -> files -> index) and refilled
//! from the spool when it is missing or corrupt. Both backends implement [`IndexStore`];
//! [`Index`] is what the writer and the control API hold.

mod postgres;
mod sqlite;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

pub use self::{postgres::PgIndex, sqlite::SqliteIndex};
use crate::writer::metadata::RecordingMetadata;

/// Errors of the index layer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] ::postgres::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("index {path} has schema version {found}, newer than this program's {known}")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
}

/// Which index to use, and where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexLocation {
    /// An SQLite file on this host.
    Sqlite(PathBuf),
    /// A PostgreSQL connection string (`postgres://user@host:port/db` or `host=... user=...`).
    Postgres(String),
}

/// One participant as indexed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedParticipant {
    pub name: Option<String>,
    pub aor: Option<String>,
    /// RFC 3339 times from the recording's metadata.
    pub joined_at: Option<String>,
    pub left_at: Option<String>,
}

/// One row of the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedRecording {
    pub id: String,
    pub sip_call_id: String,
    pub call_uuid: Option<String>,
    pub connection_id: Option<String>,
    pub participants: Vec<IndexedParticipant>,
    pub started_at: SystemTime,
    pub ended_at: Option<SystemTime>,
    pub state: String,
    pub end_reason: Option<String>,
    /// Free text that came with the end (BYE `Reason` header).
    pub end_detail: Option<String>,
    /// Directory of the recording (on `host`).
    pub path: PathBuf,
    pub host: String,
    /// First recording of the same CallUUID, when this one continues an interaction.
    pub interaction: Option<String>,
    /// Latest earlier recording of the same CallUUID.
    pub previous: Option<String>,
}

/// What an index backend does. Queries return rows in start order.
pub trait IndexStore: Send {
    /// Inserts or replaces the row (and participants) of one recording.
    fn upsert_from_metadata(&mut self, m: &RecordingMetadata) -> Result<(), IndexError>;
    /// Inserts or replaces many recordings in one transaction (bulk fills: the index bench).
    fn upsert_many(&mut self, metas: &[&RecordingMetadata]) -> Result<(), IndexError>;
    /// Removes a recording (deleted by retention).
    fn remove(&mut self, id: &str) -> Result<(), IndexError>;
    /// Fills the index from every `<spool>/*/metadata.json`; returns how many were indexed.
    fn rebuild(&mut self) -> Result<usize, IndexError>;
    /// Fills the index from the spool when it holds nothing of this host (a new shared
    /// database); the SQLite file does this itself when it is created.
    fn refill_if_empty(&mut self) -> Result<(), IndexError> {
        Ok(())
    }
    /// Re-reads the metadata of this host's rows still `active`; returns the rows looked at.
    fn refresh_active(&mut self) -> Result<usize, IndexError>;
    /// Every recording of one interaction (CallUUID).
    fn by_call_uuid(&mut self, call_uuid: &str) -> Result<Vec<IndexedRecording>, IndexError>;
    /// Recordings with a participant of this address of record (without scheme, any case).
    fn by_participant_aor(&mut self, aor: &str) -> Result<Vec<IndexedRecording>, IndexError>;
    /// Recordings that overlap `[from, to)` (still active ones count as running).
    fn by_time_range(
        &mut self,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<IndexedRecording>, IndexError>;
    /// One recording by id.
    fn get(&mut self, id: &str) -> Result<Option<IndexedRecording>, IndexError>;
    /// Recordings matching every filter of `q`, newest first, at most `q.limit`.
    fn search(&mut self, q: &Search) -> Result<Vec<IndexedRecording>, IndexError>;
    /// Records the HTTP base URL of a host (where its recordings' files are served).
    fn set_public_url(&mut self, host: &str, url: &str) -> Result<(), IndexError>;
    /// Every host's HTTP base URL, by host.
    fn public_urls(&mut self) -> Result<HashMap<String, String>, IndexError>;
}

/// A filtered, paginated query (the HTTP API's recording list). Unset filters match all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Search {
    pub call_uuid: Option<String>,
    /// A participant's address of record (compared as [`IndexStore::by_participant_aor`] does).
    pub aor: Option<String>,
    /// A participant by address of record or by name (whole name, any case).
    pub participant: Option<String>,
    /// Recordings still running at or after this time.
    pub since: Option<SystemTime>,
    /// Recordings started before this time.
    pub until: Option<SystemTime>,
    pub state: Option<String>,
    pub limit: usize,
    /// Only rows after this one in newest-first order (the last row of the previous page).
    pub after: Option<SearchCursor>,
}

/// A position in newest-first order: start time (ms) and id, which together are unique.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchCursor {
    pub started_ms: i64,
    pub id: String,
}

impl SearchCursor {
    /// The cursor that continues after `r`.
    pub fn after(r: &IndexedRecording) -> Self {
        Self {
            started_ms: millis(r.started_at),
            id: r.id.clone(),
        }
    }
}

/// A bound value of a [`Search`] query.
enum SearchParam {
    Text(String),
    Int(i64),
}

/// `WHERE ... ORDER BY ... LIMIT ...` of a search (after `SELECT ... FROM recordings`), with
/// its parameters; `placeholder(n)` spells the n-th (1-based) parameter for the backend.
fn search_sql(q: &Search, placeholder: fn(usize) -> String) -> (String, Vec<SearchParam>) {
    let mut clauses = Vec::new();
    let mut params = Vec::new();
    let bind = |params: &mut Vec<SearchParam>, p: SearchParam| {
        params.push(p);
        placeholder(params.len())
    };
    if let Some(uuid) = &q.call_uuid {
        clauses.push(format!(
            "call_uuid = {}",
            bind(&mut params, SearchParam::Text(uuid.clone()))
        ));
    }
    if let Some(aor) = &q.aor {
        clauses.push(format!(
            "id IN (SELECT recording_id FROM participants WHERE aor_key = {})",
            bind(&mut params, SearchParam::Text(aor_key(aor)))
        ));
    }
    if let Some(who) = &q.participant {
        let key = bind(&mut params, SearchParam::Text(aor_key(who)));
        let name = bind(&mut params, SearchParam::Text(who.trim().to_lowercase()));
        clauses.push(format!(
            "id IN (SELECT recording_id FROM participants WHERE aor_key = {key} \
             OR lower(name) = {name})"
        ));
    }
    if let Some(since) = q.since {
        clauses.push(format!(
            "(ended_ms IS NULL OR ended_ms >= {})",
            bind(&mut params, SearchParam::Int(millis(since)))
        ));
    }
    if let Some(until) = q.until {
        clauses.push(format!(
            "started_ms < {}",
            bind(&mut params, SearchParam::Int(millis(until)))
        ));
    }
    if let Some(state) = &q.state {
        clauses.push(format!(
            "state = {}",
            bind(&mut params, SearchParam::Text(state.clone()))
        ));
    }
    if let Some(after) = &q.after {
        let ms = bind(&mut params, SearchParam::Int(after.started_ms));
        let ms2 = bind(&mut params, SearchParam::Int(after.started_ms));
        let id = bind(&mut params, SearchParam::Text(after.id.clone()));
        clauses.push(format!(
            "(started_ms < {ms} OR (started_ms = {ms2} AND id < {id}))"
        ));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let limit = bind(&mut params, SearchParam::Int(q.limit as i64));
    // With a participant filter, sort its matches: walking the (started_ms, id) index newest
    // first and testing each row reads the whole table for a participant with few recordings
    // (an agent with 500 of 1 000 000: 130 ms). `+` hides the column from the planner's index
    // choice (SQLite and PostgreSQL alike).
    let order = if q.aor.is_some() || q.participant.is_some() {
        "+started_ms DESC, id DESC"
    } else {
        "started_ms DESC, id DESC"
    };
    (format!("{filter} ORDER BY {order} LIMIT {limit}"), params)
}

/// The index the writer and the control API use, whatever its backend.
pub struct Index(Box<dyn IndexStore>);

impl Index {
    /// Opens (creating or migrating) the SQLite index at `db` for the recordings in `spool`.
    pub fn open(db: &Path, spool: &Path) -> Result<Self, IndexError> {
        Ok(Self(Box::new(SqliteIndex::open(db, spool)?)))
    }

    /// Opens the index at `location` (creating or migrating its schema); `host` is this host's
    /// name (a shared index only refreshes and refills the rows of its own host).
    pub fn open_location(
        location: &IndexLocation,
        spool: &Path,
        host: &str,
    ) -> Result<Self, IndexError> {
        match location {
            IndexLocation::Sqlite(db) => Self::open(db, spool),
            IndexLocation::Postgres(url) => Ok(Self(Box::new(PgIndex::connect(url, spool, host)?))),
        }
    }

    pub fn upsert_from_metadata(&mut self, m: &RecordingMetadata) -> Result<(), IndexError> {
        self.0.upsert_from_metadata(m)
    }

    pub fn upsert_many(&mut self, metas: &[&RecordingMetadata]) -> Result<(), IndexError> {
        self.0.upsert_many(metas)
    }

    pub fn remove(&mut self, id: &str) -> Result<(), IndexError> {
        self.0.remove(id)
    }

    pub fn rebuild(&mut self) -> Result<usize, IndexError> {
        self.0.rebuild()
    }

    pub fn refresh_active(&mut self) -> Result<usize, IndexError> {
        self.0.refresh_active()
    }

    pub fn refill_if_empty(&mut self) -> Result<(), IndexError> {
        self.0.refill_if_empty()
    }

    pub fn by_call_uuid(&mut self, call_uuid: &str) -> Result<Vec<IndexedRecording>, IndexError> {
        self.0.by_call_uuid(call_uuid)
    }

    pub fn by_participant_aor(&mut self, aor: &str) -> Result<Vec<IndexedRecording>, IndexError> {
        self.0.by_participant_aor(aor)
    }

    pub fn by_time_range(
        &mut self,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<IndexedRecording>, IndexError> {
        self.0.by_time_range(from, to)
    }

    pub fn get(&mut self, id: &str) -> Result<Option<IndexedRecording>, IndexError> {
        self.0.get(id)
    }

    pub fn search(&mut self, q: &Search) -> Result<Vec<IndexedRecording>, IndexError> {
        self.0.search(q)
    }

    pub fn set_public_url(&mut self, host: &str, url: &str) -> Result<(), IndexError> {
        self.0.set_public_url(host, url)
    }

    pub fn public_urls(&mut self) -> Result<HashMap<String, String>, IndexError> {
        self.0.public_urls()
    }

    /// The interaction link of a new recording `m`: `(interaction, previous)` from the
    /// recordings of its CallUUID that started before it (None when it has no CallUUID or is
    /// the first). Linking is by CallUUID only: a reused SIP Call-ID never links recordings.
    pub fn link_for(
        &mut self,
        m: &RecordingMetadata,
    ) -> Result<Option<(String, String)>, IndexError> {
        self.link_for_with(m, std::iter::empty())
    }

    /// [`Self::link_for`], counting `unwritten` too: recordings of the same CallUUID that are
    /// on their way into the index in the same transaction (their version here wins over the
    /// row's).
    pub fn link_for_with<'a>(
        &mut self,
        m: &RecordingMetadata,
        unwritten: impl Iterator<Item = &'a RecordingMetadata>,
    ) -> Result<Option<(String, String)>, IndexError> {
        let Some(uuid) = m.call_uuid.as_deref() else {
            return Ok(None);
        };
        let start =
            |s: &str| millis(crate::writer::metadata::parse_rfc3339(s).unwrap_or(UNIX_EPOCH));
        let started = start(&m.started_at);
        // (started ms, id, interaction) of the earlier recordings, as the index orders them.
        let mut earlier: Vec<(i64, String, Option<String>)> = unwritten
            .filter(|u| u.call_uuid.as_deref() == Some(uuid) && u.id != m.id)
            .map(|u| (start(&u.started_at), u.id.clone(), u.interaction.clone()))
            .filter(|(at, ..)| *at <= started)
            .collect();
        let rows = self.by_call_uuid(uuid)?;
        for r in rows {
            let at = millis(r.started_at);
            if r.id != m.id && at <= started && !earlier.iter().any(|(_, id, _)| *id == r.id) {
                earlier.push((at, r.id, r.interaction));
            }
        }
        earlier.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let (Some(first), Some(last)) = (earlier.first(), earlier.last()) else {
            return Ok(None);
        };
        let interaction = first.2.clone().unwrap_or_else(|| first.1.clone());
        Ok(Some((interaction, last.1.clone())))
    }
}

/// An address of record without its scheme, lower-cased: `sip:Alice@Example.com` and
/// `alice@example.com` match.
fn aor_key(aor: &str) -> String {
    let a = aor.trim().trim_start_matches('<').trim_end_matches('>');
    let lower = a.to_ascii_lowercase();
    for scheme in ["sips:", "sip:", "tel:"] {
        if let Some(rest) = lower.strip_prefix(scheme) {
            return rest.to_string();
        }
    }
    lower
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Metadata of every recording directory in `spool` (unreadable ones are logged and skipped).
fn spool_metadata(spool: &Path) -> Result<Vec<(PathBuf, RecordingMetadata)>, IndexError> {
    let entries = match std::fs::read_dir(spool) {
        Ok(e) => e.flatten().map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(IndexError::Io {
                op: "read spool",
                path: spool.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for dir in entries.into_iter().filter(|d| d.is_dir()) {
        match RecordingMetadata::read(&dir) {
            Ok(m) => out.push((dir, m)),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "skipping unreadable metadata")
            }
        }
    }
    Ok(out)
}
