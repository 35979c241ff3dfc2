//! The token-shard format, defined once: llm.c / modded-nanogpt's `.bin` shards.
//!
//! A shard is a header of 256 little-endian int32 (`[0]` magic, `[1]` version, `[2]` token count,
//! the rest zero) followed by that many little-endian uint16 tokens. Everything that reads or
//! writes shards in finegpt (Python included) goes through this file.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// First header int of every shard (llm.c's GPT-2 format).
pub const MAGIC: i32 = 20240520;
/// Second header int: the uint16-token version of the format.
pub const VERSION: i32 = 1;
/// The header is this many int32.
pub const HEADER_INTS: usize = 256;
pub const HEADER_BYTES: usize = HEADER_INTS * 4;
pub const TOKEN_BYTES: usize = 2;

// Tokens are handed out as `&[u16]` straight from the mapping, which is only the file's
// little-endian layout on a little-endian machine.
#[cfg(not(target_endian = "little"))]
compile_error!("finegpt-loader reads shards in place and supports little-endian targets only");

/// What went wrong, so the Python side can pick the exception type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file does not exist.
    NotFound,
    /// The file exists but is not a valid shard (magic, version, size).
    Format,
    /// Reading or writing failed for another reason (permissions, disk full, ...).
    Io,
    /// A bad argument (batch size, rank, ...), not a file problem.
    Config,
}

/// An error whose message names the file (or flag) and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }

    fn io(path: &Path, what: &str, err: io::Error) -> Self {
        let kind = if err.kind() == io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Io };
        let hint = if kind == ErrorKind::NotFound { " (no such file)" } else { "" };
        Error::new(kind, format!("{}: cannot {what}{hint}: {err}", path.display()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Checks a shard header against the file's length and returns the token count.
pub fn parse_header(path: &Path, header: &[u8], file_len: u64) -> Result<u64> {
    let hint = "--> HINT: is this a token shard written by `finegpt prepare` or llm.c?";
    if header.len() < HEADER_BYTES {
        return Err(Error::new(
            ErrorKind::Format,
            format!(
                "{}: file is {file_len} bytes, shorter than the {HEADER_BYTES}-byte shard header {hint}",
                path.display()
            ),
        ));
    }
    let int = |i: usize| i32::from_le_bytes(header[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let (magic, version, ntok) = (int(0), int(1), int(2));
    if magic != MAGIC {
        return Err(Error::new(
            ErrorKind::Format,
            format!("{}: wrong magic number {magic} (expected {MAGIC}) {hint}", path.display()),
        ));
    }
    if version != VERSION {
        return Err(Error::new(
            ErrorKind::Format,
            format!(
                "{}: unsupported shard version {version} (expected {VERSION}: uint16 GPT-2 tokens; \
                 version 7 is llm.c's uint32 Llama-3 format)",
                path.display()
            ),
        ));
    }
    if ntok < 0 {
        return Err(Error::new(
            ErrorKind::Format,
            format!("{}: header gives a negative token count {ntok}", path.display()),
        ));
    }
    let ntok = ntok as u64;
    let expected = HEADER_BYTES as u64 + TOKEN_BYTES as u64 * ntok;
    if file_len != expected {
        let relation = if file_len < expected { "shorter" } else { "longer" };
        return Err(Error::new(
            ErrorKind::Format,
            format!(
                "{}: file is {file_len} bytes, {relation} than its header says ({ntok} tokens = \
                 {expected} bytes); the shard is truncated or corrupt: write it again",
                path.display()
            ),
        ));
    }
    Ok(ntok)
}

/// Reads and validates a shard's header and size without mapping it; returns the token count.
pub fn validate(path: &Path) -> Result<u64> {
    let mut file = File::open(path).map_err(|e| Error::io(path, "open shard", e))?;
    let len = file.metadata().map_err(|e| Error::io(path, "stat shard", e))?.len();
    let mut header = Vec::with_capacity(HEADER_BYTES);
    (&mut file)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut header)
        .map_err(|e| Error::io(path, "read shard header", e))?;
    parse_header(path, &header, len)
}

/// The header of a shard holding `ntok` tokens.
pub fn header(ntok: usize) -> Result<[u8; HEADER_BYTES]> {
    let ntok = i32::try_from(ntok).map_err(|_| {
        Error::new(ErrorKind::Config, format!("a shard holds at most {} tokens, got {ntok}", i32::MAX))
    })?;
    let mut bytes = [0u8; HEADER_BYTES];
    for (i, value) in [MAGIC, VERSION, ntok].into_iter().enumerate() {
        bytes[4 * i..4 * i + 4].copy_from_slice(&value.to_le_bytes());
    }
    Ok(bytes)
}

/// Writes a shard atomically: a temporary file in the same directory, fsync, then rename, so a
/// reader never maps a half-written shard (a file truncated under a mapping kills the reader).
pub fn write(path: &Path, tokens: &[u16]) -> Result<()> {
    let head = header(tokens.len())?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::new(ErrorKind::Config, format!("{}: not a file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        file.write_all(&head).map_err(|e| Error::io(&tmp, "write", e))?;
        // SAFETY: u16 has no padding and any byte pattern is valid to read; the target is
        // little-endian (checked above), so these bytes are the file's layout.
        let bytes = unsafe { std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), tokens.len() * TOKEN_BYTES) };
        file.write_all(bytes).map_err(|e| Error::io(&tmp, "write", e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, "fsync", e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, "rename the temporary shard onto", e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; a directory that cannot be opened for sync is not an error.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A validated, memory-mapped shard.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    ntok: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, "open shard", e))?;
        let len = file.metadata().map_err(|e| Error::io(path, "stat shard", e))?.len();
        // SAFETY: the mapping is read-only; a file truncated while mapped would fault (SIGBUS),
        // which is why shards are validated here and only ever replaced by rename, never rewritten.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "memory-map shard", e))?;
        let ntok = parse_header(path, &map[..map.len().min(HEADER_BYTES)], len)? as usize;
        Ok(Shard { path: path.to_path_buf(), map, ntok })
    }

    pub fn len(&self) -> usize {
        self.ntok
    }

    pub fn is_empty(&self) -> bool {
        self.ntok == 0
    }

    pub fn tokens(&self) -> &[u16] {
        let body = &self.map[HEADER_BYTES..];
        // SAFETY: the mapping is page-aligned and the header is 1024 bytes, so the body is 2-byte
        // aligned; its length is exactly 2·ntok (checked in parse_header); little-endian target.
        unsafe { std::slice::from_raw_parts(body.as_ptr().cast::<u16>(), self.ntok) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("finegpt-shard-test-{name}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn roundtrip() {
        let path = tmpdir("roundtrip").join("a.bin");
        let tokens: Vec<u16> = (0..5000u32).map(|i| (i * 7 % 65536) as u16).collect();
        write(&path, &tokens).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 1024 + 2 * 5000);
        assert_eq!(validate(&path).unwrap(), 5000);
        let shard = Shard::open(&path).unwrap();
        assert_eq!(shard.tokens(), &tokens[..]);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn header_layout() {
        let h = header(3).unwrap();
        assert_eq!(&h[0..4], &20240520i32.to_le_bytes());
        assert_eq!(&h[4..8], &1i32.to_le_bytes());
        assert_eq!(&h[8..12], &3i32.to_le_bytes());
        assert!(h[12..].iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_bad_headers() {
        let p = Path::new("x.bin");
        let mut h = header(10).unwrap().to_vec();
        assert_eq!(parse_header(p, &h, 1044).unwrap(), 10);
        let short = parse_header(p, &h, 1040).unwrap_err();
        assert!(short.message.contains("x.bin") && short.message.contains("shorter"), "{short}");
        let long = parse_header(p, &h, 1046).unwrap_err();
        assert!(long.message.contains("longer"), "{long}");
        assert!(parse_header(p, &h[..100], 100).unwrap_err().message.contains("header"));
        h[4..8].copy_from_slice(&7i32.to_le_bytes());
        assert!(parse_header(p, &h, 1044).unwrap_err().message.contains("version 7"));
        h[0..4].copy_from_slice(&20240801i32.to_le_bytes());
        let magic = parse_header(p, &h, 1044).unwrap_err();
        assert_eq!(magic.kind, ErrorKind::Format);
        assert!(magic.message.contains("magic"));
    }

    #[test]
    fn missing_file_is_not_found() {
        let err = validate(Path::new("/nonexistent/finegpt/a.bin")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.message.contains("/nonexistent/finegpt/a.bin"));
    }
}
