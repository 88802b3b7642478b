//! Policy text through `Policy::parse` (TOML -> checked, compiled policy), error paths included.
//!
//! Properties: an error names the origin and a line and column that exist in the text (or 0:0
//! only for whole-file errors); a policy that compiles answers every query the engine and the
//! sensor ask of it.

#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use runner_monitor::policy::{JobSelector, Policy};

fuzz_target!(|data: &[u8]| {
    // Policy::load reads the file as UTF-8 and refuses anything else before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse(text, "fuzz.toml") {
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.toml:"), "{shown}");
            assert!(!e.field.is_empty(), "{e:?}");
            let lines = text.split('\n').count();
            assert!(
                e.line >= 1 && e.line <= lines,
                "line {} of {lines}: {e:?}",
                e.line
            );
            let line_len = text.split('\n').nth(e.line - 1).map_or(0, str::len);
            assert!(
                e.column >= 1 && e.column <= line_len + 1,
                "column {} of a {line_len}-byte line: {e:?}",
                e.column
            );
        }
        Ok(policy) => {
            let sensor = policy.sensor_policy();
            for name in sensor
                .credential_basenames
                .iter()
                .chain(&sensor.credential_dirnames)
                .chain(&sensor.job_root_executables)
            {
                assert!(name.len() <= runner_monitor_common::NAME_LEN, "{name:?}");
            }
            for path in ["/root/.aws/credentials", "/run/docker.sock", "", "/"] {
                let _ = policy.credential_of(path);
                let _ = policy.secret_socket_of(path);
            }
            let _ = policy.is_metadata_endpoint(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)));
            let job = JobSelector {
                repository: Some("acme/app"),
                workflow: Some("deploy"),
            };
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
            for rule in policy.rules_for(job) {
                for d in &rule.allow_egress {
                    let _ = d.allows(ip, 443, &["registry.npmjs.org.".into()]);
                }
            }
            for d in &policy.egress_allow {
                let _ = d.allows(ip, 443, &["a.example.com".into()]);
            }
            let _ = policy.has_stages(Some("gitlab"));
        }
    }
});
