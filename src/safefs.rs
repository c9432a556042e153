//! The dependency directory is written by others (CI over scp, git-sync, a ConfigMap, API token
//! holders), so every read and write in it is defensive:
//! - a read takes only a regular file, opened non-blocking (a FIFO cannot stall it), checked
//!   with fstat on the open handle, and never reads more than the size cap;
//! - a symlink is followed only when its target resolves inside the dependency root;
//! - a write goes to a random temporary name created exclusively beside the target (it never
//!   follows a planted symlink), is fsynced, and renamed into place;
//! - errors name the file and the problem and never echo its content; names are escaped so a
//!   newline in a file name cannot forge a log line.
//!
//! These functions block: async callers run them with `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Default `--max-file-size`: dependency files are a few lines.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 64 * 1024;

/// A character a terminal or browser would act on or hide rather than show: control
/// characters (newlines, escape sequences, the bell), bidirectional controls (which reorder
/// what follows) and zero-width characters (which hide in a name).
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{061c}'
                | '\u{feff}'
        )
}

/// Text from outside (a file name, a tag, a registry's or a pod's message) as it may safely
/// appear in a log line, a terminal or a page: every [`hidden`] character shown escaped
/// (`\n`, `\u{1b}`, `\u{202e}`), so a newline or escape sequence cannot forge a line, erase one or
/// set the terminal's title.
pub fn escape(s: &str) -> String {
    if !s.chars().any(hidden) {
        return s.to_string();
    }
    s.chars()
        .map(|c| match hidden(c) {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// [`escape`] for a path.
pub fn shown(path: &Path) -> String {
    escape(&path.to_string_lossy())
}

/// Why a dependency file could not be read. Never carries the file's content.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: no such file", shown(path))]
    Missing { path: PathBuf },
    #[error(
        "{}: is {kind}, not a regular file; only regular files are read",
        shown(path)
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{}: is {size} bytes, over the {max}-byte limit (--max-file-size); a dependency file is a few lines",
        shown(path)
    )]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error(
        "{}: is a symlink to a target outside the dependency directory {}; only links that stay inside it are followed",
        shown(path),
        shown(root)
    )]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("{}: is a symlink whose target does not exist", shown(path))]
    Dangling { path: PathBuf },
    #[error("{}: cannot read: {source}", shown(path))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ReadError {
    /// The file is not there (as opposed to there but unusable).
    pub fn is_missing(&self) -> bool {
        matches!(self, ReadError::Missing { .. })
    }
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a named pipe (FIFO)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_symlink() {
        "a symlink"
    } else {
        "not a regular file"
    }
}

/// Where `path` really is, provided that is inside `root` (itself possibly a symlink, as a
/// git-sync root is).
pub fn resolve_inside(root: &Path, path: &Path) -> Result<PathBuf, ReadError> {
    let root_real = std::fs::canonicalize(root).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    resolve_inside_real(root, &root_real, path)
}

/// [`resolve_inside`] with the root already resolved (`root_real`).
fn resolve_inside_real(root: &Path, root_real: &Path, path: &Path) -> Result<PathBuf, ReadError> {
    let io = |source: std::io::Error| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let link = match std::fs::symlink_metadata(path) {
        Ok(m) => m.file_type().is_symlink(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReadError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    let real = match std::fs::canonicalize(path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && link => {
            return Err(ReadError::Dangling {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReadError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    if !real.starts_with(root_real) {
        return Err(ReadError::OutsideRoot {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        });
    }
    Ok(real)
}

/// Read a dependency file under `root`: a regular file inside the root, at most `max` bytes.
pub fn read_capped(root: &Path, path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let real = resolve_inside(root, path)?;
    read_resolved(root, &real, path, max)
}

/// [`read_capped`] for many files at once, resolving the root once: one trip to the blocking
/// pool reads a whole burst.
pub fn read_many(root: &Path, paths: &[PathBuf], max: u64) -> Vec<Result<Vec<u8>, ReadError>> {
    let root_real = std::fs::canonicalize(root);
    paths
        .iter()
        .map(|path| {
            let root_real = root_real.as_ref().map_err(|e| ReadError::Io {
                path: path.clone(),
                source: std::io::Error::new(e.kind(), e.to_string()),
            })?;
            let real = resolve_inside_real(root, root_real, path)?;
            read_resolved(root, &real, path, max)
        })
        .collect()
}

/// [`read_many`] on the blocking pool, off the runtime's core threads.
pub async fn read_many_async(
    root: PathBuf,
    paths: Vec<PathBuf>,
    max: u64,
) -> Vec<Result<Vec<u8>, ReadError>> {
    let n = paths.len();
    let shown_paths = paths.clone();
    match tokio::task::spawn_blocking(move || read_many(&root, &paths, max)).await {
        Ok(reads) if reads.len() == n => reads,
        _ => shown_paths
            .into_iter()
            .map(|path| {
                Err(ReadError::Io {
                    path,
                    source: std::io::Error::other("the reading task failed"),
                })
            })
            .collect(),
    }
}

fn read_resolved(root: &Path, real: &Path, path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ReadError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            ReadError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let not_regular = |ft: std::fs::FileType| ReadError::NotRegular {
        path: path.to_path_buf(),
        kind: kind_of(ft),
    };
    // Look before opening: opening a device can have effects of its own.
    let meta = std::fs::symlink_metadata(real).map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    // Non-blocking, so a FIFO swapped in since the look cannot stall the open; no following
    // of a symlink swapped in since; then check again what was actually opened.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(real)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ReadError::OutsideRoot {
                path: path.to_path_buf(),
                root: root.to_path_buf(),
            },
            _ => io(e),
        })?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let too_large = |size| ReadError::TooLarge {
        path: path.to_path_buf(),
        size,
        max,
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
    // The file may grow after fstat: never read past the cap.
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_capped`] on the blocking pool, off the runtime's core threads.
pub async fn read_capped_async(
    root: PathBuf,
    path: PathBuf,
    max: u64,
) -> Result<Vec<u8>, ReadError> {
    let shown_path = path.clone();
    tokio::task::spawn_blocking(move || read_capped(&root, &path, max))
        .await
        .unwrap_or_else(|e| {
            Err(ReadError::Io {
                path: shown_path,
                source: std::io::Error::other(e),
            })
        })
}

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "cannot write {}: its directory is outside the dependency directory {}",
        shown(path),
        shown(root)
    )]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("cannot write {}: {source}", shown(path))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl WriteError {
    /// A read-only file system (a ConfigMap volume) or no permission: the caller's hint differs.
    pub fn is_read_only(&self) -> bool {
        match self {
            WriteError::Io { source, .. } => {
                source.raw_os_error() == Some(libc::EROFS)
                    || source.kind() == std::io::ErrorKind::PermissionDenied
            }
            WriteError::OutsideRoot { .. } => false,
        }
    }
}

/// The temporary name beside a target is this much longer than the target's name.
pub const TEMP_NAME_EXTRA: usize = 22;

/// The longest file name depwatch can write: the temporary name must fit in a directory
/// entry (255 bytes on Linux file systems).
pub const MAX_WRITABLE_NAME: usize = 255 - TEMP_NAME_EXTRA;

/// The mode a file depwatch writes gets: the mode of the file it replaces (or what the umask
/// leaves of 0666 for a new one), plus group read and write in a setgid, group-writable
/// directory, so the group that writes there (CI's `scp`, an in-place write) can still write
/// the file after depwatch replaced it.
pub fn written_mode(previous: Option<u32>, created: u32, dir_mode: u32) -> u32 {
    let shared = dir_mode & 0o2020 == 0o2020;
    (previous.unwrap_or(created) & 0o777) | if shared { 0o060 } else { 0 }
}

/// Replace `path` (whose directory must be inside `root`) atomically: a temporary file with a
/// random name is created exclusively beside it (never following a symlink), written, fsynced
/// and renamed over the target; the directory is then fsynced. Watchers ignore the hidden
/// temporary name and see one completed save. The file's mode follows [`written_mode`].
pub fn write_atomic(root: &Path, path: &Path, content: &[u8]) -> Result<(), WriteError> {
    let io = |source: std::io::Error| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file name")))?;
    let dir_real = std::fs::canonicalize(dir).map_err(io)?;
    let root_real = std::fs::canonicalize(root).map_err(io)?;
    if !dir_real.starts_with(&root_real) {
        return Err(WriteError::OutsideRoot {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        });
    }
    let (tmp, mut file) = create_temp(&dir_real, &name.to_string_lossy()).map_err(io)?;
    let previous = std::fs::symlink_metadata(dir_real.join(name))
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.permissions().mode());
    let moded = file.metadata().and_then(|created| {
        let dir_mode = std::fs::metadata(&dir_real)?.permissions().mode();
        let mode = written_mode(previous, created.permissions().mode(), dir_mode);
        file.set_permissions(std::fs::Permissions::from_mode(mode))
    });
    let written = moded
        .and_then(|()| file.write_all(content))
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, dir_real.join(name)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    // The rename is durable once the directory is.
    if let Ok(d) = File::open(&dir_real) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A new hidden file with an unpredictable name in `dir`, created exclusively (`O_EXCL` never
/// follows a symlink planted at the name; a taken name is retried with another).
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..8 {
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        debug_assert_eq!(
            tmp.file_name().map(|n| n.len()),
            Some(name.len() + TEMP_NAME_EXTRA)
        );
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}

/// The name of the Unix user `uid` (through the system's user database, so directory users
/// are found too), or `uid 1234` when it has none.
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero `passwd` is a valid value to be written over.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to memory owned here, `buf.len()` is its true size, and the
    // name read below points into `buf`, which outlives that read.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: `pw_name` is a NUL-terminated string inside `buf` (checked non-null above).
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    escape(&name.to_string_lossy())
}

/// Who owns the file at `path` (its Unix user's name), when it can be read.
pub fn owner_name(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| user_name(m.uid()))
}

/// The Unix user running this process (its real uid: `$USER` can say anything).
pub fn current_user() -> String {
    // SAFETY: getuid has no preconditions and cannot fail.
    user_name(unsafe { libc::getuid() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_named_from_the_user_database_or_by_number() {
        assert_eq!(user_name(0), "root");
        assert_eq!(user_name(4_000_000_000), "uid 4000000000");
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("f");
        std::fs::write(&f, "x").expect("write");
        assert_eq!(owner_name(&f), Some(current_user()));
        assert_eq!(owner_name(&dir.path().join("none")), None);
    }
    use std::os::unix::fs::symlink;

    #[test]
    fn written_files_keep_their_mode_and_stay_group_writable_where_a_group_shares_the_directory() {
        // (mode of the replaced file, mode the umask leaves, directory mode) → mode
        let table = [
            (None, 0o640, 0o2775, 0o660),
            (Some(0o100644), 0o640, 0o2775, 0o664),
            (Some(0o100600), 0o600, 0o0755, 0o600),
            (None, 0o644, 0o0755, 0o644),
            // Group-writable but not setgid: files do not stay in the group; nothing added.
            (None, 0o640, 0o0775, 0o640),
        ];
        for (previous, created, dir, want) in table {
            assert_eq!(
                written_mode(previous, created, dir),
                want,
                "{previous:?} {created:o} {dir:o}"
            );
        }
    }

    #[test]
    fn escape_keeps_plain_names_and_escapes_control_characters() {
        for (input, want) in [
            ("web_prod.dep", "web_prod.dep"),
            ("a\nb_prod.dep", "a\\nb_prod.dep"),
            ("x\u{1b}[31m_y.dep", "x\\u{1b}[31m_y.dep"),
            ("tab\there", "tab\\there"),
            ("ünïcode_ns.dep", "ünïcode_ns.dep"),
            ("1.1\u{1b}[1A\u{1b}[2K", "1.1\\u{1b}[1A\\u{1b}[2K"),
            ("\u{1b}]0;pwned\u{7}", "\\u{1b}]0;pwned\\u{7}"),
            ("web\u{202e}ved.dep", "web\\u{202e}ved.dep"),
            ("we\u{200b}b", "we\\u{200b}b"),
            ("\u{feff}web", "\\u{feff}web"),
        ] {
            assert_eq!(escape(input), want, "{input:?}");
        }
    }

    #[test]
    fn reads_regular_files_and_links_that_stay_inside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/real"), "1.0\n").expect("write");
        symlink("sub/real", root.join("a_b.dep")).expect("link");
        std::fs::write(root.join("c_d.dep"), "2.0\n").expect("write");
        assert_eq!(
            read_capped(root, &root.join("a_b.dep"), 64).expect("inside link"),
            b"1.0\n"
        );
        assert_eq!(
            read_capped(root, &root.join("c_d.dep"), 64).expect("regular"),
            b"2.0\n"
        );
    }

    #[test]
    fn refuses_what_is_not_a_small_regular_file_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(outside.path().join("secret"), "token: hunter2hunter2\n").expect("write");
        symlink(outside.path().join("secret"), root.join("out_x.dep")).expect("link");
        symlink("/dev/zero", root.join("zero_x.dep")).expect("link");
        symlink(root.join("nowhere"), root.join("gone_x.dep")).expect("link");
        std::fs::create_dir(root.join("dir_x.dep")).expect("mkdir");
        std::fs::write(root.join("big_x.dep"), vec![b'1'; 65]).expect("write");
        let fifo = root.join("fifo_x.dep");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("cstr");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
        type Expect = fn(&ReadError) -> bool;
        let cases: [(&str, Expect); 7] = [
            ("out_x.dep", |e| matches!(e, ReadError::OutsideRoot { .. })),
            ("zero_x.dep", |e| matches!(e, ReadError::OutsideRoot { .. })),
            ("gone_x.dep", |e| matches!(e, ReadError::Dangling { .. })),
            ("dir_x.dep", |e| matches!(e, ReadError::NotRegular { .. })),
            ("big_x.dep", |e| {
                matches!(e, ReadError::TooLarge { size: 65, .. })
            }),
            ("fifo_x.dep", |e| matches!(e, ReadError::NotRegular { .. })),
            ("none_x.dep", ReadError::is_missing),
        ];
        for (name, expected) in cases {
            let err = read_capped(root, &root.join(name), 64).expect_err(name);
            assert!(expected(&err), "{name}: {err}");
            let text = err.to_string();
            assert!(
                text.contains(name),
                "{name}: the error names the file: {text}"
            );
            assert!(!text.contains("hunter2"), "{name}: no content: {text}");
        }
    }

    #[test]
    fn writes_replace_atomically_and_ignore_planted_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let target = victim.path().join("victim");
        std::fs::write(&target, "keep").expect("write");
        // The old predictable temporary names, planted as links to the victim.
        for pid in [std::process::id(), 1, 2] {
            symlink(&target, root.join(format!(".a_b.dep.depwatch-{pid}"))).expect("link");
        }
        write_atomic(root, &root.join("a_b.dep"), b"1.0\n").expect("write");
        assert_eq!(std::fs::read(root.join("a_b.dep")).expect("read"), b"1.0\n");
        assert_eq!(std::fs::read(&target).expect("victim"), b"keep");
        let leftovers: Vec<_> = std::fs::read_dir(root)
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary file is left behind");
        // A directory outside the root is refused.
        let err =
            write_atomic(root, &victim.path().join("x_y.dep"), b"1").expect_err("outside the root");
        assert!(matches!(err, WriteError::OutsideRoot { .. }), "{err}");
    }
}
