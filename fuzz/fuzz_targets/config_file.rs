//! The config file (`--config`, TOML): parsed and validated as `recorder run` and SIGHUP do.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recorder::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    if config.validate().is_ok() {
        let _ = config.index_location();
        let _ = config.handover_path();
        let _ = config.site_name();
        let _ = config.idle_timeout();
    }
});
