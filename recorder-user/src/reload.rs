//! Configuration reload on SIGHUP.
//!
//! The file is read again and compared with the file as it was at start (or at the last reload):
//! only keys the operator changed in the file are considered, so values given as command-line
//! flags stay in force unless the file's value for that key changes. Changed keys that can be
//! applied to a running daemon are; the others are logged as needing a restart.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::{Map, Value};
use thiserror::Error;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{Config, ConfigError},
    daemon::{self, DaemonRecorder, DriverCommand},
    writer::WriterHandle,
};

/// Keys applied without a restart.
pub const RELOADABLE: [&str; 8] = [
    "log_level",
    "detach_on_exit",
    "drain",
    "acl",
    "max_sessions",
    "idle_timeout_secs",
    "retention_max_age_hours",
    "retention_max_bytes",
];

/// Errors of a reload (the running configuration stays as it was).
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("no configuration file was given with --config: nothing to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot merge the reloaded configuration: {0}")]
    Merge(String),
}

/// What a reload does.
#[derive(Clone, Debug, PartialEq)]
pub struct ReloadPlan {
    /// The running configuration with the reloadable changes applied.
    pub config: Config,
    /// Reloadable keys whose value changed (applied).
    pub applied: Vec<String>,
    /// Keys whose value changed in the file but that only a restart applies.
    pub needs_restart: Vec<String>,
}

impl ReloadPlan {
    pub fn changed(&self, key: &str) -> bool {
        self.applied.iter().any(|k| k == key)
    }
}

fn as_map(config: &Config) -> Result<Map<String, Value>, ReloadError> {
    match serde_json::to_value(config).map_err(|e| ReloadError::Merge(e.to_string()))? {
        Value::Object(map) => Ok(map),
        other => Err(ReloadError::Merge(format!("config serialized as {other}"))),
    }
}

/// Plans a reload from the file as it was (`file_before`) and as it is now (`file_now`).
/// Validated: a reload never installs a configuration the daemon would refuse at start.
pub fn plan(
    running: &Config,
    file_before: &Config,
    file_now: &Config,
) -> Result<ReloadPlan, ReloadError> {
    let before = as_map(file_before)?;
    let now = as_map(file_now)?;
    let mut merged = as_map(running)?;
    // What a restart would run (every change applied): refused if invalid, so a bad value is
    // reported now rather than at the next start. The file alone need not be valid: flags may
    // supply required keys.
    let mut restarted = merged.clone();
    let mut applied = Vec::new();
    let mut needs_restart = Vec::new();
    for (key, value) in &now {
        if before.get(key) == Some(value) {
            continue;
        }
        restarted.insert(key.clone(), value.clone());
        if RELOADABLE.contains(&key.as_str()) {
            if merged.get(key) != Some(value) {
                applied.push(key.clone());
            }
            merged.insert(key.clone(), value.clone());
        } else {
            needs_restart.push(key.clone());
        }
    }
    let parse = |map| {
        serde_json::from_value::<Config>(Value::Object(map))
            .map_err(|e| ReloadError::Merge(e.to_string()))
    };
    parse(restarted)?.validate()?;
    let mut config = parse(merged)?;
    config.config_file = running.config_file.clone();
    config.validate()?;
    Ok(ReloadPlan {
        config,
        applied,
        needs_restart,
    })
}

/// Reads the file the daemon was started with and plans the reload.
pub fn plan_from_file(
    running: &Config,
    file_before: &Config,
) -> Result<(ReloadPlan, Config), ReloadError> {
    let path = running.config_file.as_deref().ok_or(ReloadError::NoFile)?;
    let file_now = Config::from_file(path)?;
    Ok((plan(running, file_before, &file_now)?, file_now))
}

/// Reloads on every SIGHUP (`hangup`, installed early by the daemon) until `shutdown`.
pub fn spawn(
    mut hangup: tokio::signal::unix::Signal,
    config: Config,
    commands: mpsc::Sender<DriverCommand>,
    writer: Arc<WriterHandle>,
    detach_on_exit: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut running = config;
        // The file as it was at start; a failed read leaves "unknown", so the first reload
        // applies whatever differs from the running values.
        let mut file_before = match &running.config_file {
            Some(path) => Config::from_file(path).unwrap_or_else(|_| running.clone()),
            None => running.clone(),
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                got = hangup.recv() => if got.is_none() { break },
            }
            info!("SIGHUP: reloading the configuration");
            match plan_from_file(&running, &file_before) {
                Ok((plan, file_now)) => {
                    apply(&plan, &commands, &writer).await;
                    if plan.changed("detach_on_exit") {
                        detach_on_exit.store(plan.config.detach_on_exit, Ordering::Relaxed);
                    }
                    running = plan.config;
                    file_before = file_now;
                }
                Err(e) => warn!(error = %e, "configuration not reloaded; the running one stays"),
            }
        }
    })
}

/// Applies `plan` to the running daemon and logs what changed and what needs a restart.
async fn apply(plan: &ReloadPlan, commands: &mpsc::Sender<DriverCommand>, writer: &WriterHandle) {
    let c = &plan.config;
    if plan.changed("log_level") {
        if let Err(e) = daemon::set_log_filter(&c.log_level) {
            warn!(error = %e, "log level not changed");
        }
    }
    if plan.changed("acl") || plan.changed("max_sessions") || plan.changed("idle_timeout_secs") {
        let acl = c.acl.iter().map(|n| (n.addr, n.prefix)).collect();
        let (max_sessions, idle) = (c.max_sessions, c.idle_timeout());
        let cmd: DriverCommand =
            Box::new(move |app: &mut DaemonRecorder, _, _| app.set_limits(acl, max_sessions, idle));
        if commands.send(cmd).await.is_err() {
            warn!("SIP driver gone: limits not changed");
        }
    }
    if plan.changed("drain") {
        let drain = c.drain;
        let cmd: DriverCommand =
            Box::new(move |app: &mut DaemonRecorder, _, _| app.set_draining(drain));
        if commands.send(cmd).await.is_err() {
            warn!("SIP driver gone: drain not changed");
        }
    }
    if plan.changed("retention_max_age_hours") || plan.changed("retention_max_bytes") {
        writer.set_retention(
            c.retention_max_age_hours
                .map(|h| Duration::from_secs(h * 3600)),
            c.retention_max_bytes,
        );
    }
    if !plan.needs_restart.is_empty() {
        warn!(keys = ?plan.needs_restart, "changed keys that need a restart were not applied");
    }
    info!(
        applied = ?plan.applied,
        log_level = %c.log_level,
        acl = c.acl.len(),
        max_sessions = c.max_sessions,
        idle_timeout_secs = c.idle_timeout_secs,
        detach_on_exit = c.detach_on_exit,
        drain = c.drain,
        "configuration reloaded"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(extra: &str) -> Config {
        Config::from_toml(&format!(
            "interfaces = [\"eth0\"]\nmedia_address = \"10.0.0.2\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn applies_reloadable_changes_and_lists_the_rest() {
        let before = file("max_sessions = 10\nsnaplen = 1500\n");
        let running = before.clone();
        let now = file(
            "max_sessions = 2\nsnaplen = 1000\nacl = [\"10.0.0.0/8\"]\nlog_level = \"debug\"\n\
             retention_max_age_hours = 24\n",
        );
        let plan = plan(&running, &before, &now).unwrap();
        assert_eq!(plan.config.max_sessions, 2);
        assert_eq!(plan.config.acl.len(), 1);
        assert_eq!(plan.config.log_level, "debug");
        assert_eq!(plan.config.retention_max_age_hours, Some(24));
        assert_eq!(plan.config.snaplen, 1500, "snaplen needs a restart");
        let mut applied = plan.applied.clone();
        applied.sort();
        assert_eq!(
            applied,
            [
                "acl",
                "log_level",
                "max_sessions",
                "retention_max_age_hours"
            ]
        );
        assert_eq!(plan.needs_restart, ["snaplen"]);
    }

    #[test]
    fn drain_is_applied_when_the_file_changes_it() {
        let before = file("");
        let now = file("drain = true\n");
        let plan = plan(&before, &before, &now).unwrap();
        assert!(plan.config.drain);
        assert_eq!(plan.applied, ["drain"]);
        assert!(plan.needs_restart.is_empty());
        // Back to false: applied again (ends a drain the file started).
        let plan = plan_back(&plan.config, &now);
        assert!(!plan.config.drain);
        assert_eq!(plan.applied, ["drain"]);
    }

    fn plan_back(running: &Config, before: &Config) -> ReloadPlan {
        plan(running, before, &file("drain = false\n")).unwrap()
    }

    #[test]
    fn flag_values_survive_a_reload_that_does_not_touch_their_key() {
        let before = file("max_sessions = 10\n");
        // Started with --max-sessions 3 and --log-level debug.
        let running = Config {
            max_sessions: 3,
            log_level: "debug".into(),
            ..before.clone()
        };
        let now = file("max_sessions = 10\nidle_timeout_secs = 30\n");
        let plan = plan(&running, &before, &now).unwrap();
        assert_eq!(plan.config.max_sessions, 3);
        assert_eq!(plan.config.log_level, "debug");
        assert_eq!(plan.config.idle_timeout_secs, 30);
        assert_eq!(plan.applied, ["idle_timeout_secs"]);
        assert!(plan.needs_restart.is_empty());
        // Unchanged file: nothing to do.
        let plan = super::plan(&running, &now, &now).unwrap();
        assert!(plan.applied.is_empty() && plan.needs_restart.is_empty());
        assert_eq!(plan.config, running);
    }

    #[test]
    fn a_file_that_relies_on_flags_for_required_keys_reloads() {
        let before = Config::from_toml("max_sessions = 10\n").unwrap();
        let running = Config {
            interfaces: vec!["eth0".into()],
            media_address: Some("10.0.0.2".parse().unwrap()),
            ..before.clone()
        };
        let now = Config::from_toml("max_sessions = 4\nsnaplen = 9000\n").unwrap();
        // snaplen 9000 would stop a restart: refused now, naming the key.
        let err = plan(&running, &before, &now).unwrap_err();
        assert!(err.to_string().contains("snaplen"), "{err}");
        let now = Config::from_toml("max_sessions = 4\n").unwrap();
        let plan = plan(&running, &before, &now).unwrap();
        assert_eq!(plan.config.max_sessions, 4);
        assert_eq!(plan.config.interfaces, ["eth0"]);
    }

    #[test]
    fn an_invalid_file_is_refused_naming_the_key() {
        let before = file("");
        let now = file("max_sessions = 0\n");
        let err = plan(&before, &before, &now).unwrap_err();
        assert!(err.to_string().contains("max_sessions"), "{err}");
    }
}
