//! Control-socket lines: requests as the daemon reads them (and the `since` time of
//! `recordings`), and responses as the CLI reads them. What parses encodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recorder::{
    control::{Request, Response},
    fuzz_api::control_time,
};

fuzz_target!(|data: &[u8]| {
    // The server reads lines of UTF-8 (`BufReader::lines`).
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(request) = serde_json::from_str::<Request>(line) {
        let text = serde_json::to_string(&request).unwrap();
        let back: Request = serde_json::from_str(&text).unwrap();
        assert_eq!(back, request);
        if let Request::Recordings {
            since: Some(since), ..
        } = &request
        {
            let _ = control_time(since);
        }
    }
    if let Ok(response) = serde_json::from_str::<Response>(line) {
        let text = serde_json::to_string(&response).unwrap();
        let back: Response = serde_json::from_str(&text).unwrap();
        assert_eq!(back.ok, response.ok);
        assert_eq!(back.error, response.error);
    }
});
