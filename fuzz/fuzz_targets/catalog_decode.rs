//! Catalog parsers of untrusted bytes: stored records and events, names, durations, and the
//! store's config file. None may panic; whatever parses must survive a round trip, and a record that
//! parses has names that pass the naming rules (so it can never point outside the layout).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sloth_engine::{ArtifactRecord, Event, Name, StoreConfigFile};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = ArtifactRecord::decode(data) {
        for (what, value) in [
            ("stack", &record.stack),
            ("task", &record.task),
            ("artifact name", &record.name),
        ] {
            assert!(
                Name::parse(what, value).is_ok(),
                "decoded record has a bad {what}: {value:?}"
            );
        }
        assert_eq!(
            ArtifactRecord::decode(&record.encode()).expect("re-decodes"),
            record
        );
    }
    if let Ok(event) = Event::decode(data) {
        assert_eq!(Event::decode(&event.encode()).expect("re-decodes"), event);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        // Durations (`--older-than`, `every`, `artifact_retention`): a number and one unit.
        if let Some(secs) = sloth_policies::parse_duration(text) {
            assert!(secs >= 0, "{text:?} parsed to {secs}");
            let digits = &text[..text.len() - 1];
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
        }
        if let Ok(name) = Name::parse("artifact name", text) {
            let s = name.as_str();
            assert!(
                !s.is_empty()
                    && s.len() <= 255
                    && !s.contains('/')
                    && !s.contains("..")
                    && !s.contains('\0')
            );
        }
        let _ = StoreConfigFile::parse(text);
    }
});
