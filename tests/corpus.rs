//! The multi-domain text corpus in data/ (made by data/make_corpus.py): every split present,
//! valid UTF-8 and of the documented size, no source file in both splits of a domain, every
//! file with a licence from the list data/README.md allows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

const DOMAINS: [&str; 6] = ["prose", "rust", "toml", "python", "c", "man"];
const LICENCES: [&str; 9] = [
    "MIT",
    "Apache-2.0",
    "MIT OR Apache-2.0",
    "Apache-2.0 OR MIT",
    "MIT/Apache-2.0",
    "Apache-2.0/MIT",
    "PSF-2.0",
    "0BSD OR public domain (xz)",
    "BSD-3-Clause (zstd)",
];

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

#[test]
fn every_domain_has_disjoint_licensed_splits_of_the_documented_size() {
    for domain in DOMAINS {
        for (split, size) in [("train", 160 * 1024), ("test", 24 * 1024)] {
            let path = data().join(domain).join(format!("{split}.txt"));
            let bytes = std::fs::read(&path).unwrap();
            let text = String::from_utf8(bytes).expect("UTF-8");
            // Cut at the size, backing off to a character boundary.
            assert!(
                text.len() <= size && text.len() + 4 > size,
                "{}: {} bytes",
                path.display(),
                text.len()
            );
        }
    }
    let sources = std::fs::read_to_string(data().join("SOURCES.tsv")).unwrap();
    let mut files: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for line in sources.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 4, "{line}");
        let (domain, split, file, licence) = (cols[0], cols[1], cols[2], cols[3]);
        assert!(DOMAINS.contains(&domain), "{line}");
        assert!(
            LICENCES.contains(&licence) || licence == "MIT (mimalloc)",
            "unlisted licence: {line}"
        );
        files
            .entry((domain.to_string(), file.to_string()))
            .or_default()
            .insert(split.to_string());
    }
    for ((domain, file), splits) in &files {
        assert_eq!(splits.len(), 1, "{domain}: {file} is in {splits:?}");
    }
    for domain in DOMAINS {
        for split in ["train", "test"] {
            assert!(
                files
                    .iter()
                    .any(|((d, _), s)| d == domain && s.contains(split)),
                "{domain}/{split} lists no source file"
            );
        }
    }
}
