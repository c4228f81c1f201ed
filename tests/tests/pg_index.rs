//! The PostgreSQL index backend against a real PostgreSQL server (Debian's, started in a temp
//! dir): the same queries as the SQLite index, plus what sharing one database between hosts
//! means (migrations run once, each host refreshes and refills only its own rows).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use recorder::{
    index::{Index, IndexLocation, IndexedRecording, Search, SearchCursor},
    writer::metadata::{
        rfc3339, DropCounters, ParticipantMeta, RecordingMetadata, RecordingState, WavMeta,
    },
};
use tests::{daemon::scratch_dir, postgres::Postgres};

fn at(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
}

fn meta(
    id: &str,
    uuid: &str,
    host: &str,
    start: u64,
    end: Option<u64>,
    aor: &str,
) -> RecordingMetadata {
    RecordingMetadata {
        id: id.into(),
        sip_call_id: format!("{id}@sbc"),
        call_uuid: Some(uuid.into()),
        call_uuid_source: Some("extensiondata".into()),
        connection_id: Some(format!("conn-{id}")),
        extra_ids: vec![],
        host: host.into(),
        state: if end.is_some() {
            RecordingState::Complete
        } else {
            RecordingState::Active
        },
        end_reason: end.map(|_| "bye".into()),
        end_detail: end.map(|_| "SIP;cause=200".into()),
        interaction: None,
        previous: None,
        started_at: rfc3339(at(start)),
        ended_at: end.map(|e| rfc3339(at(e))),
        updated_at: rfc3339(at(start)),
        media_received: true,
        participants: vec![ParticipantMeta {
            id: "p".into(),
            name: Some("Agent".into()),
            aor: Some(aor.into()),
            joined_at: Some(rfc3339(at(start))),
            left_at: end.map(|e| rfc3339(at(e))),
            ..Default::default()
        }],
        streams: vec![],
        metadata_versions: vec![],
        wav: WavMeta::default(),
        dropped: DropCounters::default(),
        notes: vec![],
    }
}

fn ids(v: &[IndexedRecording]) -> Vec<&str> {
    v.iter().map(|r| r.id.as_str()).collect()
}

/// A spool in a scratch directory, deleted on drop.
struct Spool(PathBuf);

impl std::ops::Deref for Spool {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

fn spool(tag: &str) -> Spool {
    let dir = scratch_dir(tag).join("spool");
    std::fs::create_dir_all(&dir).unwrap();
    Spool(dir)
}

fn write(spool: &Path, m: &RecordingMetadata) {
    let d = spool.join(&m.id);
    std::fs::create_dir_all(&d).unwrap();
    m.write(&d).unwrap();
}

#[test]
fn postgres_index_queries_like_the_sqlite_one() {
    let pg = Postgres::start();
    let location = IndexLocation::Postgres(pg.url());
    let spool = spool("pgq");
    let mut index = Index::open_location(&location, &spool, "blue").unwrap();
    index
        .upsert_from_metadata(&meta("r2", "U", "blue", 100, Some(200), "sip:b@x"))
        .unwrap();
    index
        .upsert_from_metadata(&meta("r3", "U", "blue", 300, None, "sip:Carol@X"))
        .unwrap();
    index
        .upsert_from_metadata(&meta("r1", "U", "blue", 0, Some(100), "sip:a@x"))
        .unwrap();
    index
        .upsert_from_metadata(&meta("other", "V", "blue", 50, Some(60), "sip:a@x"))
        .unwrap();
    let rows = index.by_call_uuid("U").unwrap();
    assert_eq!(ids(&rows), ["r1", "r2", "r3"]);
    assert_eq!(rows[0].started_at, at(0));
    assert_eq!(rows[0].ended_at, Some(at(100)));
    assert_eq!(rows[0].end_detail.as_deref(), Some("SIP;cause=200"));
    assert_eq!(rows[2].ended_at, None);
    assert_eq!(rows[2].state, "active");
    assert_eq!(rows[1].path, spool.join("r2"));
    assert_eq!(rows[1].host, "blue");
    let p = &rows[1].participants[0];
    assert_eq!(p.aor.as_deref(), Some("sip:b@x"));
    assert_eq!(p.joined_at, Some(rfc3339(at(100))));
    assert_eq!(p.left_at, Some(rfc3339(at(200))));
    // An update replaces, it does not duplicate.
    index
        .upsert_from_metadata(&meta("r3", "U", "blue", 300, Some(400), "sip:Carol@X"))
        .unwrap();
    let rows = index.by_call_uuid("U").unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].state, "complete");
    assert_eq!(rows[2].participants.len(), 1);
    // By participant (scheme and case ignored) and by time.
    assert_eq!(
        ids(&index.by_participant_aor("a@X").unwrap()),
        ["r1", "other"]
    );
    assert_eq!(
        ids(&index.by_participant_aor("sip:carol@x").unwrap()),
        ["r3"]
    );
    assert_eq!(
        ids(&index.by_time_range(at(55), at(160)).unwrap()),
        ["r1", "other", "r2"]
    );
    assert!(index.by_time_range(at(201), at(299)).unwrap().is_empty());
    index.remove("r1").unwrap();
    assert!(index.get("r1").unwrap().is_none());
    assert_eq!(index.get("r2").unwrap().unwrap().sip_call_id, "r2@sbc");
    // Links are found by CallUUID only.
    let mut next = meta("r4", "U", "blue", 500, None, "sip:d@x");
    assert_eq!(
        index.link_for(&next).unwrap(),
        Some(("r2".to_string(), "r3".to_string()))
    );
    next.call_uuid = Some("W".into());
    assert_eq!(index.link_for(&next).unwrap(), None);
    // The API's search: filters combined, newest first, pages by cursor.
    let search = |index: &mut Index, q: Search| {
        ids(&index.search(&Search { limit: 10, ..q }).unwrap()).join(",")
    };
    assert_eq!(search(&mut index, Search::default()), "r3,r2,other");
    assert_eq!(
        search(
            &mut index,
            Search {
                call_uuid: Some("U".into()),
                since: Some(at(250)),
                ..Default::default()
            }
        ),
        "r3"
    );
    assert_eq!(
        search(
            &mut index,
            Search {
                aor: Some("A@x".into()),
                state: Some("complete".into()),
                until: Some(at(60)),
                ..Default::default()
            }
        ),
        "other"
    );
    let first = index
        .search(&Search {
            limit: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(ids(&first), ["r3", "r2"]);
    let rest = index
        .search(&Search {
            limit: 2,
            after: first.last().map(SearchCursor::after),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(ids(&rest), ["other"]);
}

#[test]
fn hosts_share_one_postgres_index() {
    let pg = Postgres::start();
    let location = IndexLocation::Postgres(pg.url());
    let (blue_spool, purple_spool) = (spool("pgb"), spool("pgp"));
    // Blue has two recordings on disk before it ever saw this database: refilled at start.
    write(
        &blue_spool,
        &meta("b1", "U", "blue", 0, Some(10), "sip:a@x"),
    );
    write(&blue_spool, &meta("b2", "U", "blue", 20, None, "sip:a@x"));
    let mut blue = Index::open_location(&location, &blue_spool, "blue").unwrap();
    blue.refill_if_empty().unwrap();
    // Purple connects at the same database (migrations are not applied twice).
    let mut purple = Index::open_location(&location, &purple_spool, "purple").unwrap();
    purple.refill_if_empty().unwrap();
    purple
        .upsert_from_metadata(&meta("p1", "U", "purple", 30, Some(40), "sip:c@x"))
        .unwrap();
    // Either host sees the whole interaction, in order, with each row's site.
    for index in [&mut blue, &mut purple] {
        let rows = index.by_call_uuid("U").unwrap();
        assert_eq!(ids(&rows), ["b1", "b2", "p1"]);
        let hosts: Vec<&str> = rows.iter().map(|r| r.host.as_str()).collect();
        assert_eq!(hosts, ["blue", "blue", "purple"]);
    }
    // Blue's b2 was left active by a crash; repair finished it on disk. Blue's refresh updates
    // it; purple's refresh does not touch blue's rows.
    write(
        &blue_spool,
        &meta("b2", "U", "blue", 20, Some(25), "sip:a@x"),
    );
    assert_eq!(purple.refresh_active().unwrap(), 0);
    assert_eq!(purple.get("b2").unwrap().unwrap().state, "active");
    assert_eq!(blue.refresh_active().unwrap(), 1);
    assert_eq!(purple.get("b2").unwrap().unwrap().state, "complete");
    // A refill never deletes another host's rows.
    assert_eq!(blue.rebuild().unwrap(), 2);
    assert_eq!(ids(&blue.by_call_uuid("U").unwrap()), ["b1", "b2", "p1"]);
}

/// A server restart closes the connection; the index reconnects (the request that finds the
/// connection closed may fail, the next ones work), and a later upsert of a recording repairs
/// what was missed.
#[test]
fn index_reconnects_after_a_server_restart() {
    let pg = Postgres::start();
    let location = IndexLocation::Postgres(pg.url());
    let spool = spool("pgr");
    let mut index = Index::open_location(&location, &spool, "blue").unwrap();
    index
        .upsert_from_metadata(&meta("r1", "U", "blue", 0, None, "sip:a@x"))
        .unwrap();
    pg.restart();
    let finished = meta("r1", "U", "blue", 0, Some(10), "sip:a@x");
    let first = index.upsert_from_metadata(&finished);
    if first.is_err() {
        index.upsert_from_metadata(&finished).unwrap();
    }
    let rows = index.by_call_uuid("U").unwrap();
    assert_eq!(ids(&rows), ["r1"]);
    assert_eq!(rows[0].state, "complete");
}
