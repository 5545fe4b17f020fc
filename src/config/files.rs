//! The files configuration comes from (the config file, secret files, systemd credentials, the
//! realm file): each is looked at (`stat`, which opens nothing) before it is read, and must be
//! a regular file of bounded size. Opening a FIFO blocks until a writer comes, a device such as
//! `/dev/zero` never ends, and a directory cannot be read: each would hang the process before
//! its first log line or exhaust its memory, so each is refused at once, naming what it is.

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// The most a secret file (or systemd credential) may hold: passwords, URLs and client secrets
/// are far below it.
pub const SECRET_LIMIT: u64 = 64 * 1024;

/// The most a configuration file may hold: the example with every key is a few KiB.
pub(crate) const CONFIG_LIMIT: u64 = 1024 * 1024;

/// A size limit in words: `64 KiB`, `1 MiB`.
fn size_words(bytes: u64) -> String {
    if bytes >= 1024 * 1024 && bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// What a file that is not a regular file is, in words an operator recognises.
fn kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Why `path` cannot be read as a file, before anything opens it: missing, unreadable, not a
/// regular file (a FIFO, a device, a directory, a socket), or larger than `limit` bytes. The
/// reason starts with "is" or "does", to follow the file's name. Symbolic links are followed
/// (systemd credentials and Kubernetes secrets are links).
pub(crate) fn check_regular(path: &Path, limit: Option<u64>) -> Result<std::fs::Metadata, String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        std::io::ErrorKind::PermissionDenied => "is not readable (permission denied)".to_string(),
        _ => format!("cannot be read ({})", e.kind()),
    })?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(format!("is {}, not a regular file", kind(&ft)));
    }
    if let Some(limit) = limit.filter(|l| meta.len() > *l) {
        return Err(format!(
            "is {} bytes, more than the {} allowed",
            meta.len(),
            size_words(limit)
        ));
    }
    Ok(meta)
}

/// Reads a regular file of at most `limit` bytes as UTF-8, checked by `check_regular` first;
/// the read itself is bounded too, should the file grow or be replaced meanwhile.
pub(crate) fn read_regular(path: &Path, limit: u64) -> Result<String, String> {
    check_regular(path, Some(limit))?;
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => "is not readable (permission denied)".to_string(),
        _ => format!("cannot be read ({})", e.kind()),
    })?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read ({})", e.kind()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("is more than the {} allowed", size_words(limit)));
    }
    String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string())
}

/// Why a path given as a realm export cannot be one: it must be a regular file or a directory
/// (`kc.sh export --dir`); a FIFO or a device is refused. No size cap: a large realm is read as
/// a stream.
pub(super) fn check_file_or_dir(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("does not exist".to_string()),
        Err(e) => Err(format!("cannot be read ({})", e.kind())),
        Ok(m) if m.is_file() || m.is_dir() => Ok(()),
        Ok(m) => Err(format!(
            "is {}, not a regular file or a directory",
            kind(&m.file_type())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_a_directory_and_a_missing_file_are_named() {
        let e = check_regular(Path::new("/dev/zero"), Some(SECRET_LIMIT)).unwrap_err();
        assert_eq!(e, "is a character device, not a regular file");
        let e = read_regular(Path::new("/"), SECRET_LIMIT).unwrap_err();
        assert_eq!(e, "is a directory, not a regular file");
        let e = read_regular(Path::new("/nonexistent/x"), SECRET_LIMIT).unwrap_err();
        assert_eq!(e, "does not exist");
        assert!(check_file_or_dir(Path::new("/dev/null")).is_err());
        assert!(check_file_or_dir(Path::new("/")).is_ok());
    }
}
