//! Measurements (ignored by default; `cargo test -- --ignored bench_` runs them).

use super::*;

/// The per-file cost at many live recordings: 20 000 files, each getting 32 KiB chunks round
/// robin: opened, appended and closed per chunk (the file threads before); kept open with one
/// `pwrite` per chunk (the file threads now); kept open with io_uring writes, 64 per
/// submission; and one mapping per file grown by `fallocate` (the writer before the file
/// threads: stores into the mapping, page faults and writeback instead of syscalls). Run with
/// `cargo test --release -p recorder-user --lib bench_file_io -- --ignored --nocapture`
/// (`BENCH_FILES=18000` where the hard descriptor limit is 20 000).
#[test]
#[ignore = "measurement, not a check"]
fn bench_file_io() {
    use std::{io::Write, os::fd::AsRawFd, time::Instant};
    let files: usize = std::env::var("BENCH_FILES").map_or(20_000, |v| v.parse().unwrap());
    // Two variants keep every file open (as the daemon under its unit's LimitNOFILE): the soft
    // limit goes to the hard one, and BENCH_FILES must fit under it (20 000 on the project
    // machines, so 18 000 there).
    // SAFETY: getrlimit/setrlimit on a valid struct; a failure shows up as EMFILE below.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    // Each variant writes less than the dirty limit (20 % of RAM here), after a sync: the
    // page cache, not the disk, is what the file threads see at these rates.
    let rounds = 4;
    let chunk = vec![0x5au8; 32 * 1024];
    let dir = TempDir::new("fileio");
    let paths: Vec<PathBuf> = (0..files)
        .map(|i| dir.path().join(format!("f{i}")))
        .collect();
    for p in &paths {
        std::fs::write(p, [0u8; 24]).unwrap();
    }
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let t = Instant::now();
    for _ in 0..rounds {
        for p in &paths {
            let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
            f.write_all(&chunk).unwrap();
        }
    }
    let write_s = t.elapsed().as_secs_f64();
    // What the file threads do now: descriptors kept open, one pwrite per chunk.
    let kept: Vec<(std::fs::File, u64)> = paths
        .iter()
        .map(|p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            let len = f.metadata().unwrap().len();
            (f, len)
        })
        .collect();
    let mut kept = kept;
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let t = Instant::now();
    for _ in 0..rounds {
        for (f, len) in &mut kept {
            std::os::unix::fs::FileExt::write_all_at(&*f, &chunk, *len).unwrap();
            *len += chunk.len() as u64;
        }
    }
    let pwrite_s = t.elapsed().as_secs_f64();
    // io_uring over the same kept descriptors: 64 writes per submission.
    let mut ring = io_uring::IoUring::new(256).unwrap();
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let t = Instant::now();
    for _ in 0..rounds {
        for batch in kept.chunks_mut(64) {
            for (i, (f, len)) in batch.iter().enumerate() {
                let sqe = io_uring::opcode::Write::new(
                    io_uring::types::Fd(f.as_raw_fd()),
                    chunk.as_ptr(),
                    chunk.len() as u32,
                )
                .offset(*len)
                .build()
                .user_data(i as u64);
                // SAFETY: `chunk` outlives the submission (waited for below).
                unsafe { ring.submission().push(&sqe).unwrap() };
            }
            ring.submit_and_wait(batch.len()).unwrap();
            for cqe in ring.completion() {
                assert_eq!(cqe.result(), chunk.len() as i32, "io_uring write");
            }
            for (_, len) in batch.iter_mut() {
                *len += chunk.len() as u64;
            }
        }
    }
    let uring_s = t.elapsed().as_secs_f64();
    drop(kept);
    let mmap_dir = TempDir::new("fileio-mmap");
    let mut maps: Vec<(std::fs::File, Option<memmap2::MmapMut>, u64)> = (0..files)
        .map(|i| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(mmap_dir.path().join(format!("f{i}")))
                .unwrap();
            (f, None, 0)
        })
        .collect();
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let t = Instant::now();
    for _ in 0..rounds {
        for (f, map, len) in &mut maps {
            let end = *len + chunk.len() as u64;
            if map.as_ref().is_none_or(|m| (m.len() as u64) < end) {
                // Grow in 64 KiB steps, as the previous writer's first steps did.
                let cap = end.div_ceil(65536) * 65536;
                // SAFETY: plain syscall on an open descriptor.
                unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, cap as libc::off_t) };
                *map = None;
                // SAFETY: the file is ours and not truncated while mapped.
                *map = Some(unsafe { memmap2::MmapMut::map_mut(&*f).unwrap() });
            }
            map.as_mut().unwrap()[*len as usize..end as usize].copy_from_slice(&chunk);
            *len = end;
        }
    }
    let mmap_s = t.elapsed().as_secs_f64();
    let mb = (files * rounds * chunk.len()) as f64 / 1e6;
    let per = |s: f64| s * 1e6 / (files * rounds) as f64;
    println!(
        "{files} files x {rounds} chunks of 32 KiB ({mb:.0} MB): open+write+close {write_s:.2} s \
         ({:.1} us per chunk, {:.0} MB/s); kept fd + pwrite {pwrite_s:.2} s ({:.1} us, {:.0} \
         MB/s); io_uring, kept fds, 64 per submit {uring_s:.2} s ({:.1} us, {:.0} MB/s); mmap \
         grown by fallocate {mmap_s:.2} s ({:.1} us per chunk, {:.0} MB/s)",
        per(write_s),
        mb / write_s,
        per(pwrite_s),
        mb / pwrite_s,
        per(uring_s),
        mb / uring_s,
        per(mmap_s),
        mb / mmap_s
    );
}

/// CPU seconds (user + system) of this process's threads named `name`.
/// CPU seconds of the calling thread (its own clock reads included: a few tens of ns).
fn own_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn thread_cpu(name: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(name) {
            continue;
        }
        // Fields after the comm: state is field 3; utime and stime are fields 14 and 15.
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        total += (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tick;
    }
    total
}

/// Writer-thread CPU for many live recordings at G.711 rate. Run with `cargo test --release -p
/// recorder-user --lib bench_writer_cpu -- --ignored --nocapture`. Environment: BENCH_RECORDINGS
/// and BENCH_SECONDS (default 2000 x 10 s), BENCH_SPOOL (parent of the spool, e.g. /dev/shm to
/// take the disk out), BENCH_METADATA_INTERVAL_MS (2000 = the old rewrite-on-every-flush).
#[test]
#[ignore = "measurement, not a check"]
fn bench_writer_cpu() {
    use std::time::Instant;
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("BENCH_RECORDINGS", 2000);
    let secs = env("BENCH_SECONDS", 10);
    let dir = match std::env::var("BENCH_SPOOL") {
        Ok(parent) => {
            let p = Path::new(&parent).join(format!("recorder-benchcpu-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        Err(_) => TempDir::new("benchcpu"),
    };
    let mut c = WriterConfig::new(dir.path().to_path_buf());
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    let interval_ms = env("BENCH_METADATA_INTERVAL_MS", 30_000);
    c.metadata_interval = Duration::from_millis(interval_ms);
    let (h, mut sink) = start(c).unwrap();
    let start_wall = SystemTime::now();
    for k in 0..n {
        let mut ev = started(&format!("r{k}"), mux_streams(k), "u");
        if let SessionEvent::Started { at, .. } = &mut ev {
            *at = start_wall;
        }
        h.event(ev);
    }
    h.sync();
    let cpu0 = thread_cpu("rec-shard");
    let files0 = thread_cpu("rec-files");
    let mut sink_cpu = 0.0;
    let t = Instant::now();
    let (mut frame, off) = udp_frame(40000, &rtp(0, 0, 0, 1, &[0xffu8; 160]));
    let payload = off as usize;
    let mut sent = 0u64;
    for tick in 0..secs * 50 {
        // One packet per recording (its caller stream) every 20 ms.
        let c0 = own_cpu();
        for k in 0..n {
            let seq = tick as u16;
            frame[payload + 2..payload + 4].copy_from_slice(&seq.to_be_bytes());
            frame[payload + 4..payload + 8].copy_from_slice(&((tick * 160) as u32).to_be_bytes());
            frame[payload + 8..payload + 12].copy_from_slice(&(k as u32).to_be_bytes());
            let wall = start_wall + Duration::from_millis(tick * 20);
            feed_batched(&mut sink, 2 * k + 1, wall, &frame, off);
            sent += 1;
        }
        sink.batch_end();
        sink_cpu += own_cpu() - c0;
        let due = Duration::from_millis((tick + 1) * 20);
        if let Some(wait) = due.checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    h.sync();
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = thread_cpu("rec-shard") - cpu0;
    let files_cpu = thread_cpu("rec-files") - files0;
    let st = h.stats();
    let written = sent - st.pcap_write_failed;
    let lat = &st.write_latency;
    // Buckets are cumulative: index 6 is <= 1 ms.
    let slow = lat.count - lat.buckets[6];
    println!(
        "{n} recordings, metadata interval {interval_ms} ms, spool {}: {sent} packets in \
         {elapsed:.1} s ({:.0} pps); writer thread CPU {cpu:.2} s ({:.1}% of a core, {:.2} us \
         per written packet); sink (capture side, with building the frames) CPU {sink_cpu:.2} s ({:.2} us per packet); \
         file threads CPU {files_cpu:.2} s; not written {} ({:.1}%); packet writes > 1 ms: \
         {slow}, time in packet writes {:.2} s",
        dir.path().display(),
        sent as f64 / elapsed,
        100.0 * cpu / elapsed,
        cpu * 1e6 / written.max(1) as f64,
        sink_cpu * 1e6 / sent.max(1) as f64,
        st.pcap_write_failed,
        100.0 * st.pcap_write_failed as f64 / sent as f64,
        lat.sum_ns as f64 / 1e9,
    );
    h.shutdown();
}
