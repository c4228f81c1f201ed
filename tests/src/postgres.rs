//! A throwaway PostgreSQL server from the Debian packages (`cargo xtask setup` installs
//! `postgresql`): a fresh cluster in a temp dir, owned by the `postgres` user, listening only on a
//! Unix socket in that dir (reachable from every network namespace, since it is a file). Stopped
//! and deleted on drop, panics included.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
};

use crate::daemon::scratch_dir;

pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

/// `/usr/lib/postgresql/<version>/bin` of the newest installed server.
fn server_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server installed (cargo xtask setup)")
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("no /usr/lib/postgresql/<version>/bin/initdb")
}

fn as_postgres(program: &Path, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .output()
        .expect("run runuser");
    assert!(
        out.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    /// initdb + pg_ctl start; returns once the server accepts connections (`pg_ctl -w`).
    pub fn start() -> Self {
        let bin = server_bin();
        let dir = scratch_dir("pg");
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success());
        // A port nobody uses now; it only names the socket file (no TCP listener).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self { dir, port, bin };
        let data = pg.data();
        as_postgres(
            &pg.bin.join("initdb"),
            &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"],
        );
        pg.pg_ctl("start");
        pg
    }

    /// `pg_ctl start` or `restart` (fast shutdown: open connections are closed) with our options.
    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses='' -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-m",
                "fast",
                "-w",
                action,
            ],
        );
    }

    /// Restarts the server: every client connection is closed.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Connection string for the `postgres` database over the Unix socket.
    pub fn url(&self) -> String {
        format!(
            "postgresql://postgres@localhost:{}/postgres?host={}",
            self.port,
            self.dir.display()
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
        if std::thread::panicking() {
            eprintln!("--- postgres log ---\n{}", self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
