//! The PostgreSQL index (the `postgres` crate, synchronous: the index runs on the writer thread
//! and in blocking tasks of the control API). Several recorders (hosts, sites) share one
//! database; each refreshes and refills only the rows of its own host.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use postgres::{Client, NoTls, Row};
use tracing::info;

use super::{
    aor_key, from_millis, millis, search_sql, spool_metadata, IndexError, IndexStore,
    IndexedParticipant, IndexedRecording, Search, SearchParam,
};
use crate::writer::metadata::{parse_rfc3339, RecordingMetadata};

/// Schema migrations, applied in order inside one transaction each; `index_schema` records the
/// versions applied. An advisory lock serialises recorders starting at the same time.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE recordings (
    id            TEXT PRIMARY KEY,
    sip_call_id   TEXT NOT NULL,
    call_uuid     TEXT,
    connection_id TEXT,
    started_ms    BIGINT NOT NULL,
    ended_ms      BIGINT,
    started_at    TEXT NOT NULL,
    ended_at      TEXT,
    state         TEXT NOT NULL,
    end_reason    TEXT,
    end_detail    TEXT,
    path          TEXT NOT NULL,
    host          TEXT NOT NULL,
    interaction   TEXT,
    previous      TEXT
);
CREATE INDEX recordings_call_uuid ON recordings(call_uuid, started_ms);
CREATE INDEX recordings_started ON recordings(started_ms);
CREATE INDEX recordings_host_state ON recordings(host, state);
CREATE TABLE participants (
    recording_id TEXT NOT NULL REFERENCES recordings(id) ON DELETE CASCADE,
    pos          INTEGER NOT NULL,
    name         TEXT,
    aor          TEXT,
    aor_key      TEXT,
    joined_at    TEXT,
    left_at      TEXT
);
CREATE INDEX participants_aor ON participants(aor_key);
CREATE INDEX participants_recording ON participants(recording_id);
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

/// Arbitrary key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x7265_636f_7264;

const SELECT: &str = "SELECT id, sip_call_id, call_uuid, connection_id, started_ms, ended_ms, \
     state, end_reason, end_detail, path, host, interaction, previous FROM recordings";

pub struct PgIndex {
    client: Client,
    url: String,
    spool: PathBuf,
    host: String,
}

impl PgIndex {
    /// Connects and migrates.
    pub fn connect(url: &str, spool: &Path, host: &str) -> Result<Self, IndexError> {
        let client = Client::connect(url, NoTls)?;
        let mut index = Self {
            client,
            url: url.to_string(),
            spool: spool.to_path_buf(),
            host: host.to_string(),
        };
        index.migrate()?;
        Ok(index)
    }

    /// Reconnects when the server closed the connection (restart, failover); the request that
    /// found it closed failed, the next ones work again. Rows are whole-recording upserts, so
    /// the next update of a recording repairs what an outage missed.
    fn reconnect_if_closed(&mut self) -> Result<(), IndexError> {
        if self.client.is_closed() {
            info!("index connection closed; reconnecting");
            self.client = Client::connect(&self.url, NoTls)?;
        }
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), IndexError> {
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS index_schema (version INTEGER PRIMARY KEY)")?;
        let done: i64 = tx
            .query_one("SELECT count(*) FROM index_schema", &[])?
            .get(0);
        if done as usize > MIGRATIONS.len() {
            return Err(IndexError::TooNew {
                path: PathBuf::from("postgres"),
                found: done,
                known: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO index_schema (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn query(
        &mut self,
        filter: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<IndexedRecording>, IndexError> {
        self.reconnect_if_closed()?;
        let sql = format!("{SELECT} {filter}");
        let mut rows: Vec<IndexedRecording> = self
            .client
            .query(&sql, params)?
            .iter()
            .map(row_to)
            .collect();
        self.add_participants(&mut rows)?;
        Ok(rows)
    }

    /// Fills in the participants of `rows` with one query (a round trip per row would cost a
    /// page of 50 rows some 10 ms).
    fn add_participants(&mut self, rows: &mut [IndexedRecording]) -> Result<(), IndexError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let found = self.client.query(
            "SELECT recording_id, name, aor, joined_at, left_at FROM participants \
             WHERE recording_id = ANY($1) ORDER BY recording_id, pos",
            &[&ids],
        )?;
        let mut by_id: std::collections::HashMap<String, Vec<IndexedParticipant>> =
            std::collections::HashMap::new();
        for row in &found {
            by_id
                .entry(row.get(0))
                .or_default()
                .push(IndexedParticipant {
                    name: row.get(1),
                    aor: row.get(2),
                    joined_at: row.get(3),
                    left_at: row.get(4),
                });
        }
        for r in rows {
            r.participants = by_id.remove(&r.id).unwrap_or_default();
        }
        Ok(())
    }
}

fn upsert(
    tx: &mut postgres::Transaction<'_>,
    m: &RecordingMetadata,
    path: &Path,
) -> Result<(), IndexError> {
    let started = parse_rfc3339(&m.started_at).map(millis).unwrap_or(0);
    let ended = m.ended_at.as_deref().and_then(parse_rfc3339).map(millis);
    let path = path.to_string_lossy().into_owned();
    tx.execute(
        "INSERT INTO recordings (id, sip_call_id, call_uuid, connection_id, started_ms, ended_ms, \
         started_at, ended_at, state, end_reason, end_detail, path, host, interaction, previous) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (id) DO UPDATE SET sip_call_id = EXCLUDED.sip_call_id, \
         call_uuid = EXCLUDED.call_uuid, connection_id = EXCLUDED.connection_id, \
         started_ms = EXCLUDED.started_ms, ended_ms = EXCLUDED.ended_ms, \
         started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at, state = EXCLUDED.state, \
         end_reason = EXCLUDED.end_reason, end_detail = EXCLUDED.end_detail, \
         path = EXCLUDED.path, host = EXCLUDED.host, interaction = EXCLUDED.interaction, \
         previous = EXCLUDED.previous",
        &[
            &m.id,
            &m.sip_call_id,
            &m.call_uuid,
            &m.connection_id,
            &started,
            &ended,
            &m.started_at,
            &m.ended_at,
            &m.state.as_str(),
            &m.end_reason,
            &m.end_detail,
            &path,
            &m.host,
            &m.interaction,
            &m.previous,
        ],
    )?;
    tx.execute("DELETE FROM participants WHERE recording_id = $1", &[&m.id])?;
    for (pos, p) in m.participants.iter().enumerate() {
        tx.execute(
            "INSERT INTO participants (recording_id, pos, name, aor, aor_key, joined_at, left_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &m.id,
                &(pos as i32),
                &p.name,
                &p.aor,
                &p.aor.as_deref().map(aor_key),
                &p.joined_at,
                &p.left_at,
            ],
        )?;
    }
    Ok(())
}

fn row_to(r: &Row) -> IndexedRecording {
    IndexedRecording {
        id: r.get("id"),
        sip_call_id: r.get("sip_call_id"),
        call_uuid: r.get("call_uuid"),
        connection_id: r.get("connection_id"),
        participants: Vec::new(),
        started_at: from_millis(r.get("started_ms")),
        ended_at: r.get::<_, Option<i64>>("ended_ms").map(from_millis),
        state: r.get("state"),
        end_reason: r.get("end_reason"),
        end_detail: r.get("end_detail"),
        path: PathBuf::from(r.get::<_, String>("path")),
        host: r.get("host"),
        interaction: r.get("interaction"),
        previous: r.get("previous"),
    }
}

impl IndexStore for PgIndex {
    fn upsert_from_metadata(&mut self, m: &RecordingMetadata) -> Result<(), IndexError> {
        self.reconnect_if_closed()?;
        let path = self.spool.join(&m.id);
        let mut tx = self.client.transaction()?;
        upsert(&mut tx, m, &path)?;
        tx.commit()?;
        Ok(())
    }

    fn upsert_many(&mut self, metas: &[&RecordingMetadata]) -> Result<(), IndexError> {
        self.reconnect_if_closed()?;
        let mut tx = self.client.transaction()?;
        for m in metas {
            upsert(&mut tx, m, &self.spool.join(&m.id))?;
        }
        tx.commit()?;
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<(), IndexError> {
        self.reconnect_if_closed()?;
        self.client
            .execute("DELETE FROM recordings WHERE id = $1", &[&id])?;
        Ok(())
    }

    /// A shared index is never emptied: this host's recordings are upserted, other hosts' rows
    /// are left alone.
    fn rebuild(&mut self) -> Result<usize, IndexError> {
        self.reconnect_if_closed()?;
        let metas = spool_metadata(&self.spool)?;
        let mut tx = self.client.transaction()?;
        for (dir, m) in &metas {
            upsert(&mut tx, m, dir)?;
        }
        tx.commit()?;
        info!(recordings = metas.len(), host = %self.host, "index refilled from the spool");
        Ok(metas.len())
    }

    fn refill_if_empty(&mut self) -> Result<(), IndexError> {
        self.reconnect_if_closed()?;
        let mine: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM recordings WHERE host = $1",
                &[&self.host],
            )?
            .get(0);
        if mine == 0 {
            self.rebuild()?;
        }
        Ok(())
    }

    fn refresh_active(&mut self) -> Result<usize, IndexError> {
        self.reconnect_if_closed()?;
        let ids: Vec<String> = self
            .client
            .query(
                "SELECT id FROM recordings WHERE state = 'active' AND host = $1",
                &[&self.host],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut tx = self.client.transaction()?;
        for id in &ids {
            let dir = self.spool.join(id);
            match RecordingMetadata::read(&dir) {
                Ok(m) => upsert(&mut tx, &m, &dir)?,
                Err(_) => {
                    tx.execute("DELETE FROM recordings WHERE id = $1", &[id])?;
                }
            }
        }
        tx.commit()?;
        Ok(ids.len())
    }

    fn by_call_uuid(&mut self, call_uuid: &str) -> Result<Vec<IndexedRecording>, IndexError> {
        self.query(
            "WHERE call_uuid = $1 ORDER BY started_ms, id",
            &[&call_uuid],
        )
    }

    fn by_participant_aor(&mut self, aor: &str) -> Result<Vec<IndexedRecording>, IndexError> {
        self.query(
            "WHERE id IN (SELECT recording_id FROM participants WHERE aor_key = $1) \
             ORDER BY started_ms, id",
            &[&aor_key(aor)],
        )
    }

    fn by_time_range(
        &mut self,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<IndexedRecording>, IndexError> {
        self.query(
            "WHERE started_ms < $2 AND (ended_ms IS NULL OR ended_ms >= $1) \
             ORDER BY started_ms, id",
            &[&millis(from), &millis(to)],
        )
    }

    fn get(&mut self, id: &str) -> Result<Option<IndexedRecording>, IndexError> {
        let rows = self.query("WHERE id = $1", &[&id])?;
        Ok(rows.into_iter().next())
    }

    fn search(&mut self, q: &Search) -> Result<Vec<IndexedRecording>, IndexError> {
        let (filter, params) = search_sql(q, |n| format!("${n}"));
        let params: Vec<Box<dyn postgres::types::ToSql + Sync>> = params
            .into_iter()
            .map(|p| -> Box<dyn postgres::types::ToSql + Sync> {
                match p {
                    SearchParam::Text(s) => Box::new(s),
                    SearchParam::Int(i) => Box::new(i),
                }
            })
            .collect();
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref()).collect();
        self.query(&filter, &refs)
    }

    fn set_public_url(&mut self, host: &str, url: &str) -> Result<(), IndexError> {
        self.reconnect_if_closed()?;
        self.client.execute(
            "INSERT INTO hosts (host, public_url) VALUES ($1, $2) \
             ON CONFLICT (host) DO UPDATE SET public_url = excluded.public_url",
            &[&host, &url],
        )?;
        Ok(())
    }

    fn public_urls(&mut self) -> Result<std::collections::HashMap<String, String>, IndexError> {
        self.reconnect_if_closed()?;
        let rows = self
            .client
            .query("SELECT host, public_url FROM hosts", &[])?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
