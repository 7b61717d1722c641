//! The tar restore path: whatever the archive holds (`..`, absolute paths, symlinks out and
//! through, hard links, huge headers), nothing is written outside the target directory.
//! The target sits five levels below a scratch directory that must hold nothing else after.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scratch = tempfile::tempdir().unwrap();
    let fence = scratch.path().join("a/b/c/d/e");
    let root = fence.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let _ = lifeboat::commands::restore::extract_tar(&mut &data[..], &root);
    let mut level = scratch.path().to_path_buf();
    for expected in ["a", "b", "c", "d", "e", "root"] {
        let entries: Vec<_> = std::fs::read_dir(&level)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            entries,
            [expected],
            "something was written beside {}",
            level.display()
        );
        level.push(expected);
    }
});
