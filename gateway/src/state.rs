//! What the gateway remembers about identities, on disk in `state_dir`, which replicas
//! of one gateway share:
//!
//! ```text
//!  state_dir/
//!    .lock                 every change holds it (flock), so replicas never race
//!    tokens/ID.json        an enrolment token: the SHA-256 of its secret (never the
//!                          secret), what it grants, and once redeemed, by which key
//!                          and the certificate it gave
//!    identities/NAME.json  an enrolled identity: its groups, current certificate,
//!                          the serials of its lineage, renewals, how long it may renew
//!    revocations.json      revoked identities and serials, with when
//! ```
//!
//! Every file is replaced whole ([`tunnel_transport::atomic_file`]); nothing here
//! holds a secret an attacker could use: token secrets are kept as digests.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tunnel_proto::enrolment::{BACKDATE_SECS, RefusalKind};
use tunnel_proto::token::{Secret, secret_digest};
use tunnel_transport::certs::utc;

use crate::authority::Signed;
use crate::secrets::{digest_from_hex, hex, same_digest};

/// Serials kept per identity, to know which live connections belong to its lineage.
const LINEAGE: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub identity: String,
    pub groups: Vec<String>,
    pub created: i64,
    pub expires: i64,
    /// How long the enrolment may renew itself; `None`: until revoked.
    pub renew_for_secs: Option<u64>,
    pub redeemed: Option<Redemption>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Redemption {
    pub key_sha256: String,
    pub at: i64,
    pub certificate: String,
    pub serial: String,
    pub not_after: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub identity: String,
    pub groups: Vec<String>,
    /// The token it enrolled with: names its lineage of certificates.
    pub enrolment: String,
    pub enrolled: i64,
    /// The certificate issued last: the one whose key recovers an expired identity.
    pub serial: String,
    pub not_after: i64,
    /// No renewal after this moment; `None`: until revoked.
    pub renew_until: Option<i64>,
    pub renewals: u64,
    pub last_renewed: Option<i64>,
    /// The most recent serials of this lineage, newest last.
    pub serials: Vec<String>,
    /// When each of `serials` was issued (seconds since 1970), in the same order.
    #[serde(default)]
    pub issued: Vec<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    /// Identity → when: every certificate of it issued until then is revoked.
    pub identities: BTreeMap<String, i64>,
    /// Serial (lower-case hex) → when.
    pub serials: BTreeMap<String, i64>,
    /// Identity → the issue time of a revoked certificate of its: every certificate of
    /// it issued before that goes too (however long its lineage grew since).
    #[serde(default)]
    pub older_than: BTreeMap<String, i64>,
}

impl Revocations {
    /// Why a certificate of `identity` with `serial`, valid from `not_before`, may no
    /// longer be used, if it is revoked.
    pub fn verdict(&self, identity: &str, serial: &str, not_before: i64) -> Option<String> {
        if let Some(at) = self.serials.get(serial) {
            return Some(format!("certificate {serial} was revoked on {}", utc(*at)));
        }
        let issued = not_before + BACKDATE_SECS;
        if let Some(at) = self.identities.get(identity).filter(|at| issued <= **at) {
            return Some(format!("{identity} was revoked on {}", utc(*at)));
        }
        match self.older_than.get(identity) {
            Some(cutoff) if issued < *cutoff => Some(format!(
                "certificate {serial} is older than a revoked certificate of {identity} (issued {})",
                utc(*cutoff)
            )),
            _ => None,
        }
    }
}

/// A refusal the agent is told, with its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub kind: RefusalKind,
    pub message: String,
}

fn deny(kind: RefusalKind, message: impl Into<String>) -> Denial {
    Denial {
        kind,
        message: message.into(),
    }
}

/// What a redemption gave: the token's record (with its redemption), and whether it
/// was a repeat by the same key (a lost reply).
#[derive(Debug)]
pub struct Redeemed {
    pub token: TokenRecord,
    pub redemption: Redemption,
    pub repeated: bool,
}

/// The certificate a renewal is asked for by.
#[derive(Debug, Clone)]
pub struct Presented {
    pub identity: String,
    pub serial: String,
    pub not_before: i64,
    /// True when it has expired (accepted for renewal within the recovery window).
    pub expired: bool,
}

#[derive(Debug)]
pub struct State {
    dir: PathBuf,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "{} is damaged (not the JSON this gateway writes)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).context("encoding state")?;
    tunnel_transport::atomic_file::write(path, &bytes, 0o600)
}

/// For the administrator's commands (`token`, `revoke`, `identities`): when root works
/// on a file or directory that belongs to another user (the gateway's own state
/// directory of a system service, a gateway.toml someone else wrote), the command goes
/// on as that user, so what it writes is theirs and it never follows a link or a path
/// they control with root's rights.
pub fn become_owner_of(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let owner = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    if owner.uid() == 0 {
        return Ok(());
    }
    let uid = nix::unistd::Uid::from_raw(owner.uid());
    let gid = nix::unistd::Gid::from_raw(owner.gid());
    nix::unistd::setgroups(&[gid])
        .and_then(|()| nix::unistd::setresgid(gid, gid, gid))
        .and_then(|()| nix::unistd::setresuid(uid, uid, uid))
        .with_context(|| {
            format!(
                "becoming uid {uid} (the owner of {}) to work on it",
                dir.display()
            )
        })
}

/// A name usable as a file name here: identities and token ids are checked where they
/// enter, this is the last guard.
fn file_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'))
}

impl State {
    /// [`State::open`] for the administrator's commands: run by root on a state
    /// directory of the gateway's own user, the rest of the command runs as that user.
    pub fn open_for_admin(dir: &Path) -> Result<State> {
        become_owner_of(dir)?;
        State::open(dir)
    }

    /// Opens `dir`, creating it (mode 0700) with its subdirectories if needed.
    pub fn open(dir: &Path) -> Result<State> {
        for sub in ["", "tokens", "identities"] {
            let path = dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .with_context(|| {
                    format!("creating {} (state_dir in gateway.toml)", path.display())
                })?;
        }
        Ok(State {
            dir: dir.to_path_buf(),
        })
    }

    /// Holds the state's lock until dropped; blocks while another process holds it.
    fn lock(&self) -> Result<Flock<fs::File>> {
        let path = self.dir.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
    }

    fn token_path(&self, id: &str) -> PathBuf {
        self.dir.join("tokens").join(format!("{id}.json"))
    }

    fn identity_path(&self, identity: &str) -> PathBuf {
        self.dir.join("identities").join(format!("{identity}.json"))
    }

    pub fn revocations_path(&self) -> PathBuf {
        self.dir.join("revocations.json")
    }

    /// Makes a token for `identity`; returns its record and the secret (shown once,
    /// never stored).
    pub fn create_token(
        &self,
        identity: &str,
        groups: &[String],
        ttl: Duration,
        renew_for: Option<Duration>,
        now: i64,
    ) -> Result<(TokenRecord, Secret)> {
        let mut id = [0u8; 8];
        crate::secrets::fill_random(&mut id)?;
        let mut secret = [0u8; 32];
        crate::secrets::fill_random(&mut secret)?;
        let secret = Secret(secret);
        let record = TokenRecord {
            id: hex(&id),
            secret_sha256: hex(&secret_digest(&secret)),
            identity: identity.to_string(),
            groups: groups.to_vec(),
            created: now,
            expires: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 4)),
            renew_for_secs: renew_for.map(|d| d.as_secs()),
            redeemed: None,
        };
        let _lock = self.lock()?;
        write_json(&self.token_path(&record.id), &record)?;
        Ok((record, secret))
    }

    /// Redeems token `id` with `secret` for the key whose digest is `key`: the first
    /// key binds the token, the same key again gets the same certificate, any other key
    /// is refused. `issue` signs the certificate when one is due.
    pub fn redeem(
        &self,
        id: &str,
        secret: &Secret,
        key: &[u8; 32],
        now: i64,
        issue: impl FnOnce(&TokenRecord) -> Result<Signed>,
    ) -> Result<Result<Redeemed, Denial>> {
        let unknown = || {
            deny(
                RefusalKind::UnknownToken,
                format!("this gateway has no token {id} (was it made by another gateway?)"),
            )
        };
        if !file_safe(id) {
            return Ok(Err(unknown()));
        }
        let _lock = self.lock()?;
        let path = self.token_path(id);
        let Some(mut token) = read_json::<TokenRecord>(&path)? else {
            return Ok(Err(unknown()));
        };
        let stored = digest_from_hex(&token.secret_sha256)
            .with_context(|| format!("{} holds no usable digest", path.display()))?;
        if !same_digest(&stored, &secret_digest(secret)) {
            return Ok(Err(unknown()));
        }
        if let Some(redemption) = &token.redeemed {
            let bound = digest_from_hex(&redemption.key_sha256).unwrap_or([0; 32]);
            return Ok(if same_digest(&bound, key) {
                Ok(Redeemed {
                    redemption: redemption.clone(),
                    token,
                    repeated: true,
                })
            } else {
                Err(deny(
                    RefusalKind::TokenUsed,
                    format!(
                        "token {id} was already used on {} by another key: ask for a new token",
                        utc(redemption.at)
                    ),
                ))
            });
        }
        if let Some(at) = self
            .revocations()?
            .identities
            .get(&token.identity)
            .filter(|at| token.created <= **at)
        {
            return Ok(Err(deny(
                RefusalKind::Revoked,
                format!(
                    "{} was revoked on {}, after token {id} was made: ask for a new token",
                    token.identity,
                    utc(*at)
                ),
            )));
        }
        if now > token.expires {
            return Ok(Err(deny(
                RefusalKind::TokenExpired,
                format!(
                    "token {id} expired on {} (the gateway's clock says {}): ask for a new token",
                    utc(token.expires),
                    utc(now)
                ),
            )));
        }
        let signed = issue(&token)?;
        let redemption = Redemption {
            key_sha256: hex(key),
            at: now,
            certificate: signed.cert_pem.clone(),
            serial: signed.serial.clone(),
            not_after: signed.not_after,
        };
        token.redeemed = Some(redemption.clone());
        write_json(&path, &token)?;
        let record = IdentityRecord {
            identity: token.identity.clone(),
            groups: token.groups.clone(),
            enrolment: token.id.clone(),
            enrolled: now,
            serial: signed.serial.clone(),
            not_after: signed.not_after,
            renew_until: token
                .renew_for_secs
                .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX / 4))),
            renewals: 0,
            last_renewed: None,
            issued: vec![signed.not_before + BACKDATE_SECS],
            serials: vec![signed.serial],
        };
        write_json(&self.identity_path(&record.identity), &record)?;
        Ok(Ok(Redeemed {
            token,
            redemption,
            repeated: false,
        }))
    }

    /// Renews the certificate `presented` for a fresh key: refused when revoked, past
    /// the enrolment's renewal period, or (for an expired certificate) when it is not
    /// the identity's latest. `issue` signs the new certificate.
    pub fn renew(
        &self,
        presented: &Presented,
        now: i64,
        issue: impl FnOnce(&IdentityRecord) -> Result<Signed>,
    ) -> Result<Result<(IdentityRecord, Signed), Denial>> {
        let identity = &presented.identity;
        if !file_safe(identity) {
            return Ok(Err(deny(RefusalKind::BadRequest, "not an identity")));
        }
        let _lock = self.lock()?;
        // Read under the lock that `revoke` writes under: a revocation is either seen
        // here, or was made after this renewal's certificate (which it then covers).
        if let Some(why) =
            self.revocations()?
                .verdict(identity, &presented.serial, presented.not_before)
        {
            return Ok(Err(deny(
                RefusalKind::Revoked,
                format!("{why}: enrol again with a new token"),
            )));
        }
        let path = self.identity_path(identity);
        let Some(mut record) = read_json::<IdentityRecord>(&path)? else {
            return Ok(Err(deny(
                RefusalKind::BadRequest,
                format!(
                    "{identity} did not enrol with a token here, so its certificate is not renewed: ask the gateway's operator for a token (tunnel-gateway token)"
                ),
            )));
        };
        // Only the lineage's latest certificate renews, or the one before it (whose
        // renewal answer may have been lost): an older key, even one still valid,
        // cannot fork the lineage.
        let recent = record
            .serials
            .iter()
            .rev()
            .take(2)
            .any(|s| *s == presented.serial);
        if !recent {
            let why = if record.serials.contains(&presented.serial) {
                format!(
                    "certificate {} was already replaced (the current one is {}): only the latest certificate renews",
                    presented.serial, record.serial
                )
            } else {
                format!(
                    "certificate {} is not of {identity}'s current enrolment",
                    presented.serial
                )
            };
            return Ok(Err(deny(
                RefusalKind::Superseded,
                format!("{why}; enrol again with a new token"),
            )));
        }
        if let Some(until) = record.renew_until.filter(|until| now > *until) {
            return Ok(Err(deny(
                RefusalKind::RenewalEnded,
                format!(
                    "{identity}'s enrolment allowed renewals until {}: enrol again with a new token",
                    utc(until)
                ),
            )));
        }
        let signed = issue(&record)?;
        record.serial = signed.serial.clone();
        record.not_after = signed.not_after;
        record.renewals += 1;
        record.last_renewed = Some(now);
        record.serials.push(signed.serial.clone());
        record.issued.push(signed.not_before + BACKDATE_SECS);
        if record.serials.len() > LINEAGE {
            let excess = record.serials.len() - LINEAGE;
            record.serials.drain(..excess);
            let excess = record.issued.len().saturating_sub(LINEAGE);
            record.issued.drain(..excess);
        }
        write_json(&path, &record)?;
        Ok(Ok((record, signed)))
    }

    /// Whether `newer` comes after `current` in `identity`'s lineage (an extension
    /// never moves a connection back onto an older certificate).
    pub fn is_later_in_lineage(&self, identity: &str, newer: &str, current: &str) -> Result<bool> {
        if !file_safe(identity) {
            return Ok(false);
        }
        let Some(record) = read_json::<IdentityRecord>(&self.identity_path(identity))? else {
            return Ok(false);
        };
        let at = |serial: &str| record.serials.iter().position(|s| s == serial);
        Ok(match (at(newer), at(current)) {
            (Some(new), Some(now)) => new > now,
            // The current one fell out of the kept lineage: anything in it is later.
            (Some(_), None) => true,
            (None, _) => false,
        })
    }

    pub fn revocations(&self) -> Result<Revocations> {
        Ok(read_json(&self.revocations_path())?.unwrap_or_default())
    }

    /// Adds a revocation, made at the moment the lock is held (so that every
    /// certificate issued before it is older, and none after it escapes it); it is on
    /// disk before this returns. `change` gets that moment.
    pub fn revoke(&self, change: impl FnOnce(&mut Revocations, i64)) -> Result<(Revocations, i64)> {
        let _lock = self.lock()?;
        let now = tunnel_transport::certs::unix_now();
        let mut revocations = self.revocations()?;
        change(&mut revocations, now);
        write_json(&self.revocations_path(), &revocations)?;
        Ok((revocations, now))
    }

    #[cfg(test)]
    pub fn identity(&self, identity: &str) -> Result<Option<IdentityRecord>> {
        if !file_safe(identity) {
            return Ok(None);
        }
        read_json(&self.identity_path(identity))
    }

    fn all<T: serde::de::DeserializeOwned>(&self, sub: &str) -> Result<Vec<T>> {
        let dir = self.dir.join(sub);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.ends_with(".json") && !n.starts_with('.')) {
                out.extend(read_json(&path)?);
            }
        }
        Ok(out)
    }

    pub fn identities(&self) -> Result<Vec<IdentityRecord>> {
        let mut all: Vec<IdentityRecord> = self.all("identities")?;
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        Ok(all)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let mut all: Vec<TokenRecord> = self.all("tokens")?;
        all.sort_by_key(|t| t.created);
        Ok(all)
    }

    /// When anything a running gateway reads (revocations, identities) last changed.
    pub fn changed_at(&self) -> Option<std::time::SystemTime> {
        [self.revocations_path(), self.dir.join("identities")]
            .iter()
            .filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (State, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "state-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        (State::open(&dir).unwrap(), dir)
    }

    fn signed(serial: &str) -> Signed {
        Signed {
            cert_pem: format!("cert {serial}"),
            serial: serial.into(),
            not_before: 900,
            not_after: 2000,
        }
    }

    #[test]
    fn a_token_binds_to_its_first_key() {
        let (state, dir) = state();
        let (token, secret) = state
            .create_token(
                "alice",
                &["lab".into()],
                Duration::from_secs(900),
                None,
                1000,
            )
            .unwrap();
        let first = state
            .redeem(&token.id, &secret, &[1; 32], 1001, |_| Ok(signed("0a")))
            .unwrap()
            .unwrap();
        assert!(!first.repeated);
        // The same key again (a lost reply): the same certificate, nothing new signed.
        let again = state
            .redeem(&token.id, &secret, &[1; 32], 1002, |_| {
                panic!("signed twice")
            })
            .unwrap()
            .unwrap();
        assert!(again.repeated);
        assert_eq!(again.redemption.serial, "0a");
        let other = state
            .redeem(&token.id, &secret, &[2; 32], 1003, |_| {
                panic!("signed for a thief")
            })
            .unwrap()
            .unwrap_err();
        assert_eq!(other.kind, RefusalKind::TokenUsed);
        let wrong = state
            .redeem(&token.id, &Secret([9; 32]), &[1; 32], 1003, |_| {
                panic!("no")
            })
            .unwrap()
            .unwrap_err();
        assert_eq!(wrong.kind, RefusalKind::UnknownToken);
        let record = state.identity("alice").unwrap().unwrap();
        assert_eq!(
            (record.groups, record.serial),
            (vec!["lab".to_string()], "0a".into())
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_token_expires_after_its_last_second() {
        let (state, dir) = state();
        let (token, secret) = state
            .create_token("bob", &[], Duration::from_secs(10), None, 1000)
            .unwrap();
        let late = state
            .redeem(&token.id, &secret, &[1; 32], 1011, |_| panic!("no"))
            .unwrap()
            .unwrap_err();
        assert_eq!(late.kind, RefusalKind::TokenExpired);
        assert!(
            state
                .redeem(&token.id, &secret, &[1; 32], 1010, |_| Ok(signed("0b")))
                .unwrap()
                .is_ok()
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn renewal_follows_the_lineage_and_stops_when_revoked() {
        let (state, dir) = state();
        let (token, secret) = state
            .create_token("carol", &[], Duration::from_secs(60), None, 1000)
            .unwrap();
        state
            .redeem(&token.id, &secret, &[1; 32], 1000, |_| Ok(signed("01")))
            .unwrap()
            .unwrap();
        let presented = |serial: &str, expired| Presented {
            identity: "carol".into(),
            serial: serial.into(),
            not_before: 1000 - BACKDATE_SECS,
            expired,
        };
        state
            .renew(&presented("01", false), 1100, |_| Ok(signed("02")))
            .unwrap()
            .unwrap();
        state
            .renew(&presented("02", false), 1150, |_| Ok(signed("03")))
            .unwrap()
            .unwrap();
        // Only the two latest certificates renew, valid or expired.
        let stale = state
            .renew(&presented("01", false), 1200, |_| panic!("no"))
            .unwrap()
            .unwrap_err();
        assert_eq!(stale.kind, RefusalKind::Superseded);
        let (revoked, _) = state
            .revoke(|r, now| {
                r.identities.insert("carol".into(), now);
            })
            .unwrap();
        // Read under the lock: no in-memory copy can miss it.
        let refused = state
            .renew(&presented("03", false), 1301, |_| panic!("no"))
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.kind, RefusalKind::Revoked);
        assert_eq!(state.revocations().unwrap(), revoked);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_token_made_before_its_identity_was_revoked_is_refused() {
        let (state, dir) = state();
        let now = tunnel_transport::certs::unix_now();
        let (spare, secret) = state
            .create_token("kim", &[], Duration::from_secs(900), None, now - 10)
            .unwrap();
        state
            .revoke(|r, now| {
                r.identities.insert("kim".into(), now);
            })
            .unwrap();
        let refused = state
            .redeem(&spare.id, &secret, &[1; 32], now, |_| panic!("signed"))
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.kind, RefusalKind::Revoked);
        // A token made after the revocation works.
        let (fresh, secret) = state
            .create_token("kim", &[], Duration::from_secs(900), None, now + 5)
            .unwrap();
        assert!(
            state
                .redeem(&fresh.id, &secret, &[1; 32], now + 6, |_| Ok(signed("0c")))
                .unwrap()
                .is_ok()
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_revoked_serial_takes_every_older_certificate_of_its_identity() {
        let mut list = Revocations::default();
        list.serials.insert("0a".into(), 2000);
        list.older_than.insert("alice".into(), 1500);
        let issued_at = |t: i64| t - BACKDATE_SECS;
        assert!(list.verdict("alice", "0a", issued_at(1500)).is_some());
        assert!(list.verdict("alice", "01", issued_at(1000)).is_some());
        assert!(list.verdict("alice", "0b", issued_at(1600)).is_none());
        assert!(list.verdict("bob", "02", issued_at(1000)).is_none());
    }
}
