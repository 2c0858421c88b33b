//! The one way airlock writes an output: every command that writes a file (`convert`,
//! `quantize`, `bench --synthetic --save`) or a directory (`export`) goes through here, so they
//! all refuse the same outputs and clean up the same way.
//!
//! - Refused before any work, and again just before the output appears: an OUT that exists and
//!   is not a regular file (or a symlink): a device such as `/dev/null`, a FIFO, a socket, a
//!   directory; an OUT that *is* one of the inputs (same device and inode, so another path, a
//!   hard link or a symlink to it counts); an existing file unless the caller passes
//!   `overwrite` (the CLI's `--overwrite`).
//! - An OUT that is a symlink is replaced, never followed (the link goes, its target stays).
//! - The data goes to a temporary file next to OUT (`.NAME.tmp.PID.N`, created exclusively),
//!   which is flushed, fsynced and renamed over OUT only when complete. Without `overwrite` the
//!   rename is a hard link, which fails if OUT appeared meanwhile, so nothing is ever clobbered.
//! - On any error, panic or signal ([`crate::signals`]) the temporary file is removed and OUT
//!   is left as it was.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::signals::{remove_on_exit, RemoveOnExit};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// OUT may not be written (exists, is an input, is a device...).
    #[error("{}: {msg}", path.display())]
    Refused { path: PathBuf, msg: String },
    /// Creating, writing, syncing or renaming failed (disk full, permissions...).
    #[error("writing {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl OutputError {
    fn refused(path: &Path, msg: impl Into<String>) -> Self {
        OutputError::Refused {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// A file's identity: (device, inode) where the platform has them, else its canonical path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FileId {
    #[cfg(unix)]
    Inode(u64, u64),
    #[cfg(not(unix))]
    Path(PathBuf),
}

fn file_id(path: &Path) -> Option<FileId> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileId::Inode(m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        std::fs::canonicalize(path).ok().map(FileId::Path)
    }
}

/// What a command reads: OUT must not be any of them.
#[derive(Clone, Debug, Default)]
pub struct Inputs(Vec<(PathBuf, FileId)>);

impl Inputs {
    /// The inputs among `paths` that exist (one that does not cannot be overwritten).
    pub fn new<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Self {
        Inputs(
            paths
                .into_iter()
                .filter_map(|p| {
                    let p = p.as_ref();
                    file_id(p).map(|id| (p.to_path_buf(), id))
                })
                .collect(),
        )
    }

    fn containing(&self, out: &Path) -> Option<&Path> {
        let id = file_id(out)?;
        self.0
            .iter()
            .find(|(_, i)| *i == id)
            .map(|(p, _)| p.as_path())
    }
}

fn kind_of(m: &std::fs::Metadata) -> &'static str {
    let ft = m.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_block_device() {
            return "block device";
        }
        if ft.is_char_device() {
            return "character device";
        }
        if ft.is_fifo() {
            return "FIFO";
        }
        if ft.is_socket() {
            return "socket";
        }
    }
    if ft.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// The directory OUT will be created in ("." for a bare file name).
fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that `out` may be written as a file: see the module docs. Commands call it before any
/// work; [`OutputFile`] calls it again before the output appears.
pub fn check_output_file(out: &Path, inputs: &Inputs, overwrite: bool) -> Result<(), OutputError> {
    if out.file_name().is_none() {
        return Err(OutputError::refused(out, "is not a file path"));
    }
    let parent = parent_dir(out);
    if !parent.is_dir() {
        return Err(OutputError::refused(
            out,
            format!("directory {} does not exist", parent.display()),
        ));
    }
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(OutputError::Io {
                path: out.to_path_buf(),
                error,
            })
        }
    };
    if let Some(input) = inputs.containing(out) {
        return Err(OutputError::refused(
            out,
            format!(
                "is the input {} (the same file); write the output somewhere else",
                input.display()
            ),
        ));
    }
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(OutputError::refused(
            out,
            "is a directory; give a file name",
        ));
    }
    if !(ft.is_file() || ft.is_symlink()) {
        return Err(OutputError::refused(
            out,
            format!(
                "exists and is a {}, not a regular file; airlock only writes regular files",
                kind_of(&meta)
            ),
        ));
    }
    if !overwrite {
        let what = if ft.is_symlink() {
            "exists (a symbolic link, which would be replaced, not followed)"
        } else {
            "already exists"
        };
        return Err(OutputError::refused(
            out,
            format!("{what}; pass --overwrite to replace it"),
        ));
    }
    Ok(())
}

/// A temporary path, removed when dropped (after a successful rename there is nothing left to
/// remove) and on a signal exit.
struct TempPath {
    path: PathBuf,
    _cleanup: RemoveOnExit,
}

impl Drop for TempPath {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&self.path);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Err(_) => {}
        }
    }
}

/// A file being written: data goes to the temporary file until [`OutputFile::commit`].
pub struct OutputFile {
    out: PathBuf,
    dir: PathBuf,
    inputs: Inputs,
    overwrite: bool,
    writer: BufWriter<File>,
    // Declared last: dropped after the writer has closed the file.
    tmp: TempPath,
}

impl OutputFile {
    /// Checks `out` ([`check_output_file`]) and creates the temporary file next to it.
    pub fn create(out: &Path, inputs: Inputs, overwrite: bool) -> Result<Self, OutputError> {
        check_output_file(out, &inputs, overwrite)?;
        let dir = parent_dir(out);
        let name = out
            .file_name()
            .ok_or_else(|| OutputError::refused(out, "is not a file path"))?;
        let io = |error| OutputError::Io {
            path: out.to_path_buf(),
            error,
        };
        let (file, tmp) = create_temp(&dir, name, |p| {
            OpenOptions::new().write(true).create_new(true).open(p)
        })
        .map_err(io)?;
        let tmp = guard(tmp).map_err(io)?;
        Ok(OutputFile {
            out: out.to_path_buf(),
            dir,
            inputs,
            overwrite,
            writer: BufWriter::with_capacity(1 << 20, file),
            tmp,
        })
    }

    /// Where the data goes now (the temporary file).
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        &mut self.writer
    }

    pub fn path(&self) -> &Path {
        &self.out
    }

    /// The temporary file, complete once the writer is flushed (for checking it before commit).
    pub fn temp_path(&self) -> &Path {
        &self.tmp.path
    }

    /// Flushes and fsyncs the data, checks OUT again, and moves the file into place.
    pub fn commit(self) -> Result<(), OutputError> {
        let io = |error| OutputError::Io {
            path: self.out.clone(),
            error,
        };
        let file = self.writer.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        check_output_file(&self.out, &self.inputs, self.overwrite)?;
        place(&self.tmp.path, &self.out, self.overwrite)?;
        sync_dir(&self.dir);
        Ok(())
    }
}

/// Registers `path` for removal on a signal exit and on drop.
fn guard(path: PathBuf) -> std::io::Result<TempPath> {
    match remove_on_exit(path.clone()) {
        Ok(c) => Ok(TempPath { path, _cleanup: c }),
        Err(msg) => {
            // Nothing would remove it on a signal: do not start.
            drop(TempPath {
                path,
                _cleanup: crate::signals::unregistered(),
            });
            Err(std::io::Error::other(msg))
        }
    }
}

/// Moves the finished temporary file to `out`. Without `overwrite` a hard link, which fails if
/// `out` exists by now; the rename fallback (file systems without hard links) re-checks first.
fn place(tmp: &Path, out: &Path, overwrite: bool) -> Result<(), OutputError> {
    let io = |error| OutputError::Io {
        path: out.to_path_buf(),
        error,
    };
    if !overwrite {
        match std::fs::hard_link(tmp, out) {
            Ok(()) => {
                let _ = std::fs::remove_file(tmp);
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(OutputError::refused(
                    out,
                    "appeared while the output was written; pass --overwrite to replace it",
                ));
            }
            Err(_) => {}
        }
    }
    std::fs::rename(tmp, out).map_err(io)
}

/// Makes a rename durable; not every platform can open a directory, so best effort.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Creates `.NAME.tmp.PID.N` in `dir` with `make`, which must fail if the path exists.
fn create_temp<T>(
    dir: &Path,
    name: &std::ffi::OsStr,
    make: impl Fn(&Path) -> std::io::Result<T>,
) -> std::io::Result<(T, PathBuf)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}.{n}", std::process::id()));
        let tmp = dir.join(tmp_name);
        match make(&tmp) {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes `out` through an [`OutputFile`]: `write` fills the temporary file, which is committed
/// only if it succeeds (and nothing is left otherwise).
pub fn write_file<T, E>(
    out: &Path,
    inputs: Inputs,
    overwrite: bool,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<OutputError>,
{
    let mut f = OutputFile::create(out, inputs, overwrite)?;
    let value = write(f.writer())?;
    f.commit()?;
    Ok(value)
}

/// Checks that `out` may be written as a directory: absent, or an empty directory (which is
/// replaced). A directory with anything in it is never replaced: removing a tree is not
/// something a converter should do.
pub fn check_output_dir(out: &Path) -> Result<(), OutputError> {
    if out.file_name().is_none() {
        return Err(OutputError::refused(out, "is not a directory path"));
    }
    let parent = parent_dir(out);
    if !parent.is_dir() {
        return Err(OutputError::refused(
            out,
            format!("directory {} does not exist", parent.display()),
        ));
    }
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(OutputError::Io {
            path: out.to_path_buf(),
            error,
        }),
        Ok(m) if m.is_dir() => {
            let empty = std::fs::read_dir(out)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if empty {
                Ok(())
            } else {
                Err(OutputError::refused(
                    out,
                    "already exists and is not an empty directory",
                ))
            }
        }
        Ok(m) => Err(OutputError::refused(
            out,
            format!(
                "already exists and is not an empty directory (it is a {})",
                if m.file_type().is_symlink() {
                    "symbolic link"
                } else if m.is_file() {
                    "regular file"
                } else {
                    kind_of(&m)
                }
            ),
        )),
    }
}

/// A directory being written: files go into a temporary sibling directory until
/// [`OutputDir::commit`] renames it into place.
pub struct OutputDir {
    out: PathBuf,
    parent: PathBuf,
    tmp: TempPath,
}

impl OutputDir {
    pub fn create(out: &Path) -> Result<Self, OutputError> {
        check_output_dir(out)?;
        let parent = parent_dir(out);
        let name = out
            .file_name()
            .ok_or_else(|| OutputError::refused(out, "is not a directory path"))?;
        let io = |error| OutputError::Io {
            path: out.to_path_buf(),
            error,
        };
        let ((), tmp) = create_temp(&parent, name, |p| std::fs::create_dir(p)).map_err(io)?;
        let tmp = guard(tmp).map_err(io)?;
        Ok(OutputDir {
            out: out.to_path_buf(),
            parent,
            tmp,
        })
    }

    /// Where the files go now (the temporary directory).
    pub fn temp_path(&self) -> &Path {
        &self.tmp.path
    }

    pub fn path(&self) -> &Path {
        &self.out
    }

    /// Writes one file of the output, fsynced.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), OutputError> {
        let path = self.tmp.path.join(name);
        let io = |error| OutputError::Io {
            path: self.out.join(name),
            error,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// Checks OUT again (still absent or empty) and renames the directory into place.
    pub fn commit(self) -> Result<(), OutputError> {
        check_output_dir(&self.out)?;
        let io = |error| OutputError::Io {
            path: self.out.clone(),
            error,
        };
        if std::fs::symlink_metadata(&self.out).is_ok() {
            // An empty directory: rename(2) cannot replace it on every platform.
            std::fs::remove_dir(&self.out).map_err(io)?;
        }
        std::fs::rename(&self.tmp.path, &self.out).map_err(io)?;
        sync_dir(&self.parent);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn a_new_file_appears_only_on_commit() {
        let d = tmpdir();
        let out = d.path().join("o.bin");
        let mut f = OutputFile::create(&out, Inputs::default(), false).unwrap();
        f.writer().write_all(b"data").unwrap();
        assert!(!out.exists());
        assert!(f.temp_path().exists());
        f.commit().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"data");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_dropped_file_leaves_nothing() {
        let d = tmpdir();
        let out = d.path().join("o.bin");
        let mut f = OutputFile::create(&out, Inputs::default(), false).unwrap();
        f.writer().write_all(b"data").unwrap();
        drop(f);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn existing_files_need_overwrite_and_inputs_are_never_outputs() {
        let d = tmpdir();
        let input = d.path().join("in.bin");
        std::fs::write(&input, b"input").unwrap();
        let other = d.path().join("other.bin");
        std::fs::write(&other, b"other").unwrap();
        let inputs = || Inputs::new([&input]);
        // An existing file: only with overwrite.
        let e = check_output_file(&other, &inputs(), false).unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e}");
        write_file(&other, inputs(), true, |w| {
            w.write_all(b"new")?;
            Ok::<_, Box<dyn std::error::Error>>(())
        })
        .map_err(|e| e.to_string())
        .unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"new");
        // The input, by its own name, a hard link or a symlink: never, even with overwrite.
        let hard = d.path().join("hard.bin");
        std::fs::hard_link(&input, &hard).unwrap();
        let soft = d.path().join("soft.bin");
        std::os::unix::fs::symlink(&input, &soft).unwrap();
        for p in [&input, &hard, &soft] {
            let e = check_output_file(p, &inputs(), true).unwrap_err();
            assert!(e.to_string().contains("is the input"), "{e}");
        }
        assert_eq!(std::fs::read(&input).unwrap(), b"input");
    }

    #[test]
    fn devices_fifos_and_directories_are_refused() {
        let d = tmpdir();
        let fifo = d.path().join("fifo");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(ok.success());
        for p in [Path::new("/dev/null"), fifo.as_path(), d.path()] {
            let e = check_output_file(p, &Inputs::default(), true).unwrap_err();
            assert!(
                e.to_string().contains("not a regular file") || e.to_string().contains("directory"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_symlink_is_replaced_not_followed() {
        let d = tmpdir();
        let target = d.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(check_output_file(&link, &Inputs::default(), false).is_err());
        let mut f = OutputFile::create(&link, Inputs::default(), true).unwrap();
        f.writer().write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
    }

    #[test]
    fn a_file_that_appears_while_writing_is_not_clobbered() {
        let d = tmpdir();
        let out = d.path().join("o.bin");
        let mut f = OutputFile::create(&out, Inputs::default(), false).unwrap();
        f.writer().write_all(b"new").unwrap();
        std::fs::write(&out, b"someone else's").unwrap();
        assert!(f.commit().is_err());
        assert_eq!(std::fs::read(&out).unwrap(), b"someone else's");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn directories_are_written_whole_or_not_at_all() {
        let d = tmpdir();
        let out = d.path().join("dir");
        let o = OutputDir::create(&out).unwrap();
        o.write("a.txt", b"a").unwrap();
        drop(o);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let o = OutputDir::create(&out).unwrap();
        o.write("a.txt", b"a").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"a");
        assert!(OutputDir::create(&out).is_err());
        let file = d.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_output_dir(&file).is_err());
    }

    /// The I/O errors of this crate's files say the OS error in their message and do not also
    /// return it as `source()`: a chain printer (anyhow's `{:#}`, the CLI's) would print it
    /// twice. The message of each, then its chain, must hold the OS error's text exactly once.
    #[test]
    fn io_errors_print_their_cause_once_in_a_chain() {
        use crate::gguf::{GgufError, WriteError};
        fn chain(e: &dyn std::error::Error) -> String {
            let mut s = e.to_string();
            let mut next = e.source();
            while let Some(inner) = next {
                s = format!("{s}: {inner}");
                next = inner.source();
            }
            s
        }
        let io = || std::io::Error::from_raw_os_error(2);
        let cause = io().to_string();
        let path = PathBuf::from("/x/y.gguf");
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(OutputError::Io {
                path: path.clone(),
                error: io(),
            }),
            Box::new(GgufError::Io {
                path: path.clone(),
                error: io(),
            }),
            Box::new(WriteError::from(io())),
            Box::new(WriteError::Path { path, error: io() }),
        ];
        for e in &errors {
            let text = chain(e.as_ref());
            assert_eq!(text.matches(&cause).count(), 1, "{text}");
        }
    }
}
