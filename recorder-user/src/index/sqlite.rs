//! The SQLite index (rusqlite, bundled SQLite): one host's recordings in one file.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use rusqlite::{params, Connection, OptionalExtension, Row};
use tracing::{info, warn};

use super::{
    aor_key, from_millis, millis, search_sql, spool_metadata, IndexError, IndexStore,
    IndexedParticipant, IndexedRecording, Search, SearchParam,
};
use crate::writer::metadata::{parse_rfc3339, RecordingMetadata};

/// Schema migrations, applied in order; `PRAGMA user_version` = number applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE recordings (
    id            TEXT PRIMARY KEY,
    sip_call_id   TEXT NOT NULL,
    call_uuid     TEXT,
    connection_id TEXT,
    started_ms    INTEGER NOT NULL,
    ended_ms      INTEGER,
    started_at    TEXT NOT NULL,
    ended_at      TEXT,
    state         TEXT NOT NULL,
    end_reason    TEXT,
    path          TEXT NOT NULL,
    host          TEXT NOT NULL
);
CREATE INDEX recordings_call_uuid ON recordings(call_uuid, started_ms);
CREATE INDEX recordings_started ON recordings(started_ms);
CREATE TABLE participants (
    recording_id TEXT NOT NULL REFERENCES recordings(id) ON DELETE CASCADE,
    name         TEXT,
    aor          TEXT,
    aor_key      TEXT
);
CREATE INDEX participants_aor ON participants(aor_key);
CREATE INDEX participants_recording ON participants(recording_id);
"#,
    r#"
ALTER TABLE recordings ADD COLUMN end_detail TEXT;
ALTER TABLE recordings ADD COLUMN interaction TEXT;
ALTER TABLE recordings ADD COLUMN previous TEXT;
ALTER TABLE participants ADD COLUMN joined_at TEXT;
ALTER TABLE participants ADD COLUMN left_at TEXT;
"#,
    r#"
CREATE TABLE hosts (
    host       TEXT PRIMARY KEY,
    public_url TEXT NOT NULL
);
-- Newest-first pages (ORDER BY started_ms DESC, id DESC) read this index backwards: no sort.
CREATE INDEX recordings_started_id ON recordings(started_ms, id);
"#,
];

pub struct SqliteIndex {
    conn: Connection,
    db: PathBuf,
    spool: PathBuf,
}

impl SqliteIndex {
    /// Opens (creating or migrating) the index at `db` for the recordings in `spool`. A missing
    /// database is created and filled from the spool; a corrupt one (not a database, failing
    /// `PRAGMA quick_check`) is moved aside to `<db>.corrupt` and rebuilt.
    pub fn open(db: &Path, spool: &Path) -> Result<Self, IndexError> {
        let existed = db.exists();
        match Self::open_checked(db, spool) {
            Ok(mut index) => {
                if !existed {
                    index.rebuild()?;
                }
                Ok(index)
            }
            Err(IndexError::Sqlite(e)) if is_corruption(&e) => {
                warn!(db = %db.display(), error = %e, "index unusable; rebuilding from the spool");
                let aside = db.with_extension("corrupt");
                fs::rename(db, &aside).map_err(|source| IndexError::Io {
                    op: "move aside corrupt index",
                    path: db.to_path_buf(),
                    source,
                })?;
                for ext in ["-wal", "-shm", "-journal"] {
                    let mut p = db.as_os_str().to_owned();
                    p.push(ext);
                    let _ = fs::remove_file(PathBuf::from(p));
                }
                let mut index = Self::open_checked(db, spool)?;
                index.rebuild()?;
                Ok(index)
            }
            Err(e) => Err(e),
        }
    }

    fn open_checked(db: &Path, spool: &Path) -> Result<Self, IndexError> {
        let conn = Connection::open(db)?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(IndexError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(check),
            )));
        }
        // WAL + synchronous=NORMAL: no corruption on power loss, at worst the last updates are
        // lost, and the index is a cache of the spool's metadata anyway.
        conn.execute_batch(
            "PRAGMA foreign_keys = ON; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
        )?;
        let mut index = Self {
            conn,
            db: db.to_path_buf(),
            spool: spool.to_path_buf(),
        };
        index.migrate()?;
        Ok(index)
    }

    fn migrate(&mut self) -> Result<(), IndexError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            return Err(IndexError::TooNew {
                path: self.db.clone(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Inserts or replaces the row (and participants) of one recording.
    pub fn upsert_from_metadata(&mut self, m: &RecordingMetadata) -> Result<(), IndexError> {
        let path = self.spool.join(&m.id);
        let tx = self.conn.transaction()?;
        upsert(&tx, m, &path)?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a recording (deleted by retention).
    pub fn remove(&mut self, id: &str) -> Result<(), IndexError> {
        self.conn
            .execute("DELETE FROM recordings WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Empties the index and fills it from every `<spool>/*/metadata.json`. Returns how many
    /// recordings were indexed (unreadable metadata is logged and skipped).
    pub fn rebuild(&mut self) -> Result<usize, IndexError> {
        let metas = spool_metadata(&self.spool)?;
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM participants", [])?;
        tx.execute("DELETE FROM recordings", [])?;
        for (dir, m) in &metas {
            upsert(&tx, m, dir)?;
        }
        tx.commit()?;
        info!(recordings = metas.len(), "index rebuilt from the spool");
        Ok(metas.len())
    }

    /// Re-reads the metadata of every row still `active` (after a restart they were either
    /// repaired to `interrupted` by `writer::repair_spool` or deleted). Returns the rows updated.
    pub fn refresh_active(&mut self) -> Result<usize, IndexError> {
        let ids: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id FROM recordings WHERE state = 'active'")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let tx = self.conn.transaction()?;
        for id in &ids {
            let dir = self.spool.join(id);
            match RecordingMetadata::read(&dir) {
                Ok(m) => upsert(&tx, &m, &dir)?,
                Err(_) => {
                    tx.execute("DELETE FROM recordings WHERE id = ?1", params![id])?;
                }
            }
        }
        tx.commit()?;
        Ok(ids.len())
    }

    /// Every recording of one interaction (CallUUID), in start order.
    pub fn by_call_uuid(&self, call_uuid: &str) -> Result<Vec<IndexedRecording>, IndexError> {
        self.query(
            "SELECT * FROM recordings WHERE call_uuid = ?1 ORDER BY started_ms, id",
            params![call_uuid],
        )
    }

    /// Recordings with a participant of this address of record (compared without the URI
    /// scheme, case-insensitively), in start order.
    pub fn by_participant_aor(&self, aor: &str) -> Result<Vec<IndexedRecording>, IndexError> {
        self.query(
            "SELECT * FROM recordings WHERE id IN \
             (SELECT recording_id FROM participants WHERE aor_key = ?1) ORDER BY started_ms, id",
            params![aor_key(aor)],
        )
    }

    /// Recordings that overlap `[from, to)` (still active ones count as running), in start order.
    pub fn by_time_range(
        &self,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<IndexedRecording>, IndexError> {
        self.query(
            "SELECT * FROM recordings WHERE started_ms < ?2 AND (ended_ms IS NULL OR ended_ms >= ?1) \
             ORDER BY started_ms, id",
            params![millis(from), millis(to)],
        )
    }

    /// One recording by id.
    pub fn get(&self, id: &str) -> Result<Option<IndexedRecording>, IndexError> {
        let row = self
            .conn
            .query_row(
                "SELECT * FROM recordings WHERE id = ?1",
                params![id],
                row_to,
            )
            .optional()?;
        row.map(|r| self.with_participants(r)).transpose()
    }

    /// Recordings matching every filter of `q`, newest first.
    pub fn search(&self, q: &Search) -> Result<Vec<IndexedRecording>, IndexError> {
        let (filter, params) = search_sql(q, |n| format!("?{n}"));
        let params: Vec<rusqlite::types::Value> = params
            .into_iter()
            .map(|p| match p {
                SearchParam::Text(s) => rusqlite::types::Value::Text(s),
                SearchParam::Int(i) => rusqlite::types::Value::Integer(i),
            })
            .collect();
        self.query(
            &format!("SELECT * FROM recordings {filter}"),
            rusqlite::params_from_iter(params),
        )
    }

    fn query(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<IndexedRecording>, IndexError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt
            .query_map(params, row_to)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|r| self.with_participants(r))
            .collect()
    }

    fn with_participants(&self, mut r: IndexedRecording) -> Result<IndexedRecording, IndexError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, aor, joined_at, left_at FROM participants WHERE recording_id = ?1 \
             ORDER BY rowid",
        )?;
        r.participants = stmt
            .query_map(params![r.id], |row| {
                Ok(IndexedParticipant {
                    name: row.get(0)?,
                    aor: row.get(1)?,
                    joined_at: row.get(2)?,
                    left_at: row.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(r)
    }
}

fn upsert(
    tx: &rusqlite::Transaction<'_>,
    m: &RecordingMetadata,
    path: &Path,
) -> Result<(), IndexError> {
    let started = parse_rfc3339(&m.started_at).map(millis).unwrap_or(0);
    let ended = m.ended_at.as_deref().and_then(parse_rfc3339).map(millis);
    tx.execute(
        "INSERT INTO recordings (id, sip_call_id, call_uuid, connection_id, started_ms, ended_ms, \
         started_at, ended_at, state, end_reason, path, host, end_detail, interaction, previous) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
         ON CONFLICT(id) DO UPDATE SET sip_call_id = excluded.sip_call_id, \
         call_uuid = excluded.call_uuid, connection_id = excluded.connection_id, \
         started_ms = excluded.started_ms, ended_ms = excluded.ended_ms, \
         started_at = excluded.started_at, ended_at = excluded.ended_at, state = excluded.state, \
         end_reason = excluded.end_reason, path = excluded.path, host = excluded.host, \
         end_detail = excluded.end_detail, interaction = excluded.interaction, \
         previous = excluded.previous",
        params![
            m.id,
            m.sip_call_id,
            m.call_uuid,
            m.connection_id,
            started,
            ended,
            m.started_at,
            m.ended_at,
            m.state.as_str(),
            m.end_reason,
            path.to_string_lossy(),
            m.host,
            m.end_detail,
            m.interaction,
            m.previous,
        ],
    )?;
    tx.execute(
        "DELETE FROM participants WHERE recording_id = ?1",
        params![m.id],
    )?;
    for p in &m.participants {
        tx.execute(
            "INSERT INTO participants (recording_id, name, aor, aor_key, joined_at, left_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                m.id,
                p.name,
                p.aor,
                p.aor.as_deref().map(aor_key),
                p.joined_at,
                p.left_at
            ],
        )?;
    }
    Ok(())
}

/// The file is not a usable database (as opposed to busy, read-only, ...).
fn is_corruption(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if matches!(f.code, DatabaseCorrupt | NotADatabase))
}

fn row_to(r: &Row<'_>) -> rusqlite::Result<IndexedRecording> {
    Ok(IndexedRecording {
        id: r.get("id")?,
        sip_call_id: r.get("sip_call_id")?,
        call_uuid: r.get("call_uuid")?,
        connection_id: r.get("connection_id")?,
        participants: Vec::new(),
        started_at: from_millis(r.get("started_ms")?),
        ended_at: r.get::<_, Option<i64>>("ended_ms")?.map(from_millis),
        state: r.get("state")?,
        end_reason: r.get("end_reason")?,
        end_detail: r.get("end_detail")?,
        path: PathBuf::from(r.get::<_, String>("path")?),
        host: r.get("host")?,
        interaction: r.get("interaction")?,
        previous: r.get("previous")?,
    })
}

impl IndexStore for SqliteIndex {
    fn upsert_from_metadata(&mut self, m: &RecordingMetadata) -> Result<(), IndexError> {
        SqliteIndex::upsert_from_metadata(self, m)
    }
    fn upsert_many(&mut self, metas: &[&RecordingMetadata]) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        for m in metas {
            upsert(&tx, m, &self.spool.join(&m.id))?;
        }
        tx.commit()?;
        Ok(())
    }
    fn remove(&mut self, id: &str) -> Result<(), IndexError> {
        SqliteIndex::remove(self, id)
    }
    fn rebuild(&mut self) -> Result<usize, IndexError> {
        SqliteIndex::rebuild(self)
    }
    fn refresh_active(&mut self) -> Result<usize, IndexError> {
        SqliteIndex::refresh_active(self)
    }
    fn by_call_uuid(&mut self, call_uuid: &str) -> Result<Vec<IndexedRecording>, IndexError> {
        SqliteIndex::by_call_uuid(self, call_uuid)
    }
    fn by_participant_aor(&mut self, aor: &str) -> Result<Vec<IndexedRecording>, IndexError> {
        SqliteIndex::by_participant_aor(self, aor)
    }
    fn by_time_range(
        &mut self,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<IndexedRecording>, IndexError> {
        SqliteIndex::by_time_range(self, from, to)
    }
    fn get(&mut self, id: &str) -> Result<Option<IndexedRecording>, IndexError> {
        SqliteIndex::get(self, id)
    }
    fn search(&mut self, q: &Search) -> Result<Vec<IndexedRecording>, IndexError> {
        SqliteIndex::search(self, q)
    }
    fn set_public_url(&mut self, host: &str, url: &str) -> Result<(), IndexError> {
        self.conn.execute(
            "INSERT INTO hosts (host, public_url) VALUES (?1, ?2) \
             ON CONFLICT(host) DO UPDATE SET public_url = excluded.public_url",
            params![host, url],
        )?;
        Ok(())
    }
    fn public_urls(&mut self) -> Result<std::collections::HashMap<String, String>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT host, public_url FROM hosts")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
