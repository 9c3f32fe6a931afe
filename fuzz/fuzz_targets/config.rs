//! Fuzzes link-config parsing (`src/config/`): any keys and values a manifest may hold must
//! give settings or an error that names a key, never a panic; accepted settings must also
//! build the link's runtime objects (queues, semaphores, deadlines) without a panic.
#![no_main]

#[path = "../../src/config/mod.rs"]
#[allow(dead_code, unused_imports)]
mod config;

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Lines of `KEY=VALUE`; lines before a `---` line are provider config, after it link config.
    let text = String::from_utf8_lossy(data);
    let (mut provider, mut link) = (HashMap::new(), HashMap::new());
    let mut target = &mut provider;
    for line in text.lines() {
        if line == "---" {
            target = &mut link;
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        target.insert(k.to_string(), v.to_string());
    }
    let secrets: HashMap<String, String> = link
        .iter()
        .filter(|(k, _)| k.starts_with("secret."))
        .map(|(k, v)| (k["secret.".len()..].to_string(), v.clone()))
        .collect();
    let defaults = config::ProviderDefaults::new(&provider, &HashMap::new());
    match defaults.link_settings(&link, &secrets) {
        Ok(settings) => settings.build_runtime_objects(),
        Err(e) => assert!(!e.key.is_empty()),
    }
});
