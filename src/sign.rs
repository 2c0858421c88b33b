//! `airlock keygen`, `airlock sign`, and `--sign` on convert/quantize: minisign key pairs and
//! signatures (the `minisign` crate's), and the signed per-tensor manifest (the engine's
//! `signature` module computes it). Verification lives in the engine; see `verify.rs`.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use airlock_engine::bounded::read_bounded;
use airlock_engine::gguf::{GgufFile, OpenOptions as GgufOpen, GGUF_MAGIC};
use airlock_engine::memory::human_bytes;
use airlock_engine::signature::{manifest_path, signature_path, Manifest};
use anyhow::{anyhow, bail, Context, Result};
use ct_codecs::{Base64, Decoder};
use minisign::{KeyPair, PublicKey, SecretKey, SecretKeyBox};

/// A secret key file is two lines, about 350 bytes.
const MAX_SECRET_KEY_BYTES: u64 = 4 << 10;
/// minisign's own limit on a password.
const MAX_PASSWORD_BYTES: usize = 1024;
/// Key derivation cost caps: the `minisign` tool's strongest settings (scrypt, 1 GiB, 2^25
/// operations) with room to spare. A key file asking for more would run scrypt for hours.
const MAX_KDF_OPSLIMIT: u64 = 1 << 27;
const MAX_KDF_MEMLIMIT: u64 = 1 << 30;

#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    airlock keygen -o release            # writes release.pub and release.key (asks a password)\n  \
    airlock sign model.gguf --key release.key\n  \
    airlock verify model.gguf --pubkey release.pub\n\n\
    The files are minisign's formats: the `minisign` tool verifies airlock's signatures \
    (minisign -Vm model.gguf -p release.pub) and signs with its keys. Keep NAME.key offline; \
    copy NAME.pub to the machines that load the models.")]
pub struct KeygenArgs {
    /// Write NAME.pub (public key) and NAME.key (secret key, mode 0600); neither may exist
    #[arg(short = 'o', long = "output", value_name = "NAME")]
    pub output: PathBuf,
    /// Leave the secret key unencrypted (for automated signing on a protected machine)
    #[arg(long = "no-password", conflicts_with = "password_file")]
    pub no_password: bool,
    /// Read the password from this file (its first line) instead of the terminal, for scripts
    #[arg(long = "password-file", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

#[derive(clap::Args)]
#[command(after_help = "Writes, beside MODEL:\n  \
    MODEL.minisig                   minisign signature of the whole file (minisign -Vm MODEL -p KEY.pub)\n  \
    MODEL.manifest.json             size, whole-file SHA-256, and a SHA-256 of each byte range: the\n                                  \
    metadata (chat template, tokenizer), each tensor, the padding\n  \
    MODEL.manifest.json.minisig     minisign signature of the manifest\n\
    An existing signature is replaced. A file that is not GGUF gets MODEL.minisig only (for \
    a --tokenizer file loaded under --require-signature).")]
pub struct SignArgs {
    /// File to sign (a GGUF model, or a tokenizer.json)
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// minisign secret key (`airlock keygen`, or the `minisign` tool's)
    #[arg(short = 'k', long = "key", value_name = "KEY.key")]
    pub key: PathBuf,
    /// Read the key's password from this file (its first line) instead of the terminal
    #[arg(long = "password-file", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

/// `--sign` on the commands that write a model.
#[derive(clap::Args, Clone, Debug)]
pub struct SignWithArgs {
    /// Sign the output with this minisign secret key once it is complete, as `airlock sign`
    /// does (the password is asked before the work starts)
    #[arg(long = "sign", value_name = "KEY.key")]
    pub sign: Option<PathBuf>,
    /// Read the signing key's password from this file instead of the terminal
    #[arg(long = "password-file", value_name = "FILE", requires = "sign")]
    pub password_file: Option<PathBuf>,
}

impl SignWithArgs {
    /// The key, decrypted now so a long run does not end at a password prompt.
    pub fn open(&self) -> Result<Option<SigningKey>> {
        self.sign
            .as_deref()
            .map(|k| SigningKey::open(k, self.password_file.as_deref()))
            .transpose()
    }
}

/// A decrypted secret key and its public half.
pub struct SigningKey {
    sk: SecretKey,
    pk: PublicKey,
    /// minisign's key id, as it prints it.
    pub id: String,
}

fn key_id(keynum: &[u8]) -> String {
    // minisign prints the 8-byte key number as a little-endian u64 in hex.
    keynum.iter().rev().map(|b| format!("{b:02X}")).collect()
}

impl SigningKey {
    /// Read the minisign secret key at `path`; an encrypted one is decrypted with the password
    /// from `password_file`, or asked on the terminal.
    pub fn open(path: &Path, password_file: Option<&Path>) -> Result<Self> {
        let bytes = read_bounded(path, MAX_SECRET_KEY_BYTES)
            .with_context(|| format!("cannot read the secret key {}", path.display()))?;
        let bad =
            |reason: String| anyhow!("{} is not a minisign secret key: {reason}", path.display());
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        let mut lines = text.lines();
        if !lines
            .next()
            .is_some_and(|l| l.starts_with("untrusted comment:"))
        {
            return Err(bad(
                "the first line must start with `untrusted comment:`".into()
            ));
        }
        let encoded = lines
            .next()
            .ok_or_else(|| bad("the key line is missing".into()))?
            .trim();
        // Read the key's header before handing it to the minisign crate: whether it is
        // encrypted, and a key-derivation cost that will not run for hours.
        let raw = Base64::decode_to_vec(encoded, None)
            .map_err(|_| bad("the key line is not base64".into()))?;
        // sig_alg(2) kdf_alg(2) chk_alg(2) salt(32) opslimit(8) memlimit(8) keynum(8) sk(64) chk(32)
        if raw.len() != 158 {
            return Err(bad(format!("the key is {} bytes, not 158", raw.len())));
        }
        if &raw[0..2] != b"Ed" {
            return Err(bad("not an Ed25519 key".into()));
        }
        let le = |r: &[u8]| u64::from_le_bytes(r.try_into().unwrap_or([0xff; 8]));
        let encrypted = match &raw[2..4] {
            [0, 0] => false,
            b"Sc" => true,
            _ => return Err(bad("unknown key encryption".into())),
        };
        if encrypted && (le(&raw[38..46]) > MAX_KDF_OPSLIMIT || le(&raw[46..54]) > MAX_KDF_MEMLIMIT)
        {
            return Err(bad(
                "its key-derivation settings are far above minisign's strongest".into(),
            ));
        }
        let skbox = SecretKeyBox::from_string(&text).map_err(|e| bad(e.to_string()))?;
        let sk = if encrypted {
            let password = match password_file {
                Some(f) => read_password_file(f)?,
                None => prompt_password(&format!("Password for {}: ", path.display()))?,
            };
            SecretKey::from_box(skbox, Some(password)).map_err(|e| {
                if e.to_string().contains("Wrong password") {
                    anyhow!("wrong password for {}", path.display())
                } else {
                    bad(e.to_string())
                }
            })?
        } else if raw[126..].iter().all(|&b| b == 0) {
            // The `minisign` tool's unencrypted keys (-W) carry no checksum, which the crate's
            // reader insists on. Signing checks the result against the public half, so a
            // damaged key still fails, at the first signature.
            SecretKey::from_bytes(&raw).map_err(|e| bad(e.to_string()))?
        } else {
            SecretKey::from_unencrypted_box(skbox).map_err(|e| bad(e.to_string()))?
        };
        let pk = PublicKey::from_secret_key(&sk).map_err(|e| bad(e.to_string()))?;
        Ok(SigningKey {
            id: key_id(sk.keynum()),
            sk,
            pk,
        })
    }

    /// A minisign signature (prehashed, as minisign makes them) of `data`.
    fn sign(&self, data: &[u8], trusted_comment: &str) -> Result<String> {
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            data,
            Some(trusted_comment),
            Some(&format!("signature from airlock secret key {}", self.id)),
        )
        .map_err(|e| anyhow!("signing failed: {e}"))?;
        Ok(sig.into_string())
    }
}

/// The password in `path`: its first line, at most 1024 bytes.
fn read_password_file(path: &Path) -> Result<String> {
    let bytes = read_bounded(path, MAX_PASSWORD_BYTES as u64 + 2)
        .with_context(|| format!("cannot read the password file {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow!("the password file {} is not UTF-8 text", path.display()))?;
    let pw = text.lines().next().unwrap_or_default().to_string();
    check_password(pw, &path.display().to_string())
}

fn check_password(pw: String, from: &str) -> Result<String> {
    if pw.is_empty() {
        bail!("the password from {from} is empty (keygen --no-password makes a key without one)");
    }
    if pw.len() > MAX_PASSWORD_BYTES {
        bail!("the password from {from} is over {MAX_PASSWORD_BYTES} bytes");
    }
    Ok(pw)
}

fn prompt_password(prompt: &str) -> Result<String> {
    // A script with redirected input gets an error, not a prompt on a terminal it cannot see.
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to ask the password on (standard input is not one); use --password-file FILE");
    }
    let pw = rpassword::prompt_password(prompt).map_err(|e| {
        anyhow!("cannot read a password from the terminal ({e}); use --password-file FILE")
    })?;
    check_password(pw, "the terminal")
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub fn run_keygen(args: KeygenArgs) -> Result<ExitCode> {
    let pub_path = with_suffix(&args.output, ".pub");
    let key_path = with_suffix(&args.output, ".key");
    for p in [&pub_path, &key_path] {
        if p.symlink_metadata().is_ok() {
            bail!("{} exists; keygen never overwrites a key", p.display());
        }
    }
    let password = if args.no_password {
        None
    } else if let Some(f) = &args.password_file {
        Some(read_password_file(f)?)
    } else {
        let a = prompt_password(&format!("Password for {}: ", key_path.display()))?;
        let b = prompt_password("Password again: ")?;
        if a != b {
            bail!("the passwords differ");
        }
        Some(a)
    };
    let kp = match password {
        Some(pw) => KeyPair::generate_encrypted_keypair(Some(pw)),
        None => KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|e| anyhow!("cannot generate a key pair: {e}"))?;
    let id = key_id(kp.pk.keynum());
    let comment = if args.no_password {
        "minisign secret key (unencrypted, airlock keygen)"
    } else {
        "minisign encrypted secret key (airlock keygen)"
    };
    let sk_box = kp
        .sk
        .to_box(Some(comment))
        .map_err(|e| anyhow!("cannot encode the secret key: {e}"))?;
    let pk_box = kp
        .pk
        .to_box()
        .map_err(|e| anyhow!("cannot encode the public key: {e}"))?;
    // create_new: a key created between the check above and here is not overwritten either.
    write_new(&key_path, sk_box.to_string().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&pub_path, pk_box.to_string().as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    println!(
        "key {id}: public key {} (copy it to the machines that verify), secret key {} (mode \
         0600{}; keep it offline)",
        pub_path.display(),
        key_path.display(),
        if args.no_password {
            ", no password"
        } else {
            ", password-protected"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Create `path` (it must not exist) with `mode`, write `bytes` and sync.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// Write `bytes` to `path` through a temporary file beside it, renamed into place, so a reader
/// never sees half a signature.
fn write_replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = write_new(&tmp, bytes, 0o644).and_then(|()| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// UTC calendar time of a Unix timestamp (Howard Hinnant's days-from-civil inverse).
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

enum Held {
    Gguf(GgufFile),
    Raw(airlock_engine::gguf::Source),
}

/// What signing wrote.
pub struct Signed {
    pub files: Vec<PathBuf>,
    pub ranges: Option<usize>,
}

/// Sign `path` with `key`: `PATH.minisig` always, and for a GGUF file the manifest and its
/// signature. The file is read once (mapped); the manifest's range digests, its whole-file
/// SHA-256 and the whole-file BLAKE2b of the signature are computed side by side.
pub fn sign_file(path: &Path, key: &SigningKey) -> Result<Signed> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let source =
        GgufFile::read_source(path, &GgufOpen { no_mmap: false }).map_err(|e| anyhow!("{e}"))?;
    // A file that claims to be GGUF must be one that airlock reads: its manifest names its
    // tensors. Anything else gets the whole-file signature only.
    let held = if source.starts_with(&GGUF_MAGIC) {
        Held::Gguf(GgufFile::from_source(source).map_err(|e| anyhow!("{}: {e}", path.display()))?)
    } else {
        Held::Raw(source)
    };
    let bytes: &[u8] = match &held {
        Held::Gguf(f) => f.bytes(),
        Held::Raw(s) => s,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let size = bytes.len();
    let comment = |file: &str| {
        format!(
            "timestamp:{now}\tfile:{file}\tsize:{size}\tsigned:{}",
            utc(now)
        )
    };
    let (manifest, whole_sig) = rayon::join(
        || match &held {
            Held::Gguf(f) => Some(Manifest::compute(&name, f)),
            Held::Raw(_) => None,
        },
        || key.sign(bytes, &comment(&name)),
    );
    let whole_sig = whole_sig?;
    let mut files = Vec::new();
    let mut ranges = None;
    if let Some(m) = manifest {
        let json = m.to_json();
        let mpath = manifest_path(path);
        let mname = format!("{name}.manifest.json");
        let msig = key.sign(
            json.as_bytes(),
            &format!(
                "timestamp:{now}\tfile:{mname}\tmodel:{name}\tsize:{size}\tsigned:{}",
                utc(now)
            ),
        )?;
        write_replace(&mpath, json.as_bytes())?;
        let mspath = signature_path(&mpath);
        write_replace(&mspath, msig.as_bytes())?;
        ranges = Some(m.ranges.len());
        files.push(mpath);
        files.push(mspath);
    }
    let spath = signature_path(path);
    write_replace(&spath, whole_sig.as_bytes())?;
    files.insert(0, spath);
    Ok(Signed { files, ranges })
}

/// Sign `path` and say what was written on stderr (`sign`, and `--sign` after a conversion).
pub fn sign_and_report(path: &Path, key: &SigningKey) -> Result<()> {
    let t0 = Instant::now();
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let signed = sign_file(path, key)?;
    let secs = t0.elapsed().as_secs_f64();
    let what = match signed.ranges {
        Some(n) => format!("manifest of {n} ranges and whole-file signature"),
        None => "whole-file signature only (not a GGUF file)".into(),
    };
    eprintln!(
        "signed {} ({}) with key {}: {what} in {secs:.1} s",
        path.display(),
        human_bytes(size),
        key.id
    );
    for f in &signed.files {
        eprintln!("  wrote {}", f.display());
    }
    Ok(())
}

pub fn run_sign(args: SignArgs) -> Result<ExitCode> {
    let key = SigningKey::open(&args.key, args.password_file.as_deref())?;
    sign_and_report(&args.model, &key)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_matches_known_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        // `date -u -d @951782400` (a leap day).
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_733_465_277), "2024-12-06T06:07:57Z");
    }

    #[test]
    fn key_ids_are_printed_as_minisign_prints_them() {
        assert_eq!(key_id(&[1, 2, 3, 4, 5, 6, 7, 0xab]), "AB07060504030201");
    }
}
