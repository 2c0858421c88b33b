//! Reading a whole file without trusting its reported size: `/dev/zero`, a FIFO or a file that
//! grows while it is read report a length (often 0) that says nothing about how much they hold.

use std::io::Read;
use std::path::Path;

/// The bytes of `path`, at most `max` of them: a file holding more (or an endless one such as
/// `/dev/zero`) is an `InvalidData` error after reading `max + 1` bytes, never an allocation
/// sized by the file.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let hint = file.metadata().map_or(0, |m| m.len()).min(max);
    let mut bytes = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(max));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_bounded_string(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Standard input as UTF-8 text, at most `max` bytes.
pub fn read_stdin_bounded(max: u64) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(max));
    }
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

fn too_large(max: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("holds more than the limit of {max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_file_stops_at_the_limit() {
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("1048576"), "{e}");
    }

    #[test]
    fn a_file_within_the_limit_is_read_whole() {
        let dir = std::env::temp_dir().join(format!("airlock-bounded-{}", std::process::id()));
        std::fs::write(&dir, b"12345").unwrap();
        assert_eq!(read_bounded(&dir, 5).unwrap(), b"12345");
        assert!(read_bounded(&dir, 4).is_err());
        std::fs::remove_file(&dir).unwrap();
    }
}
