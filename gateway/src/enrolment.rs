//! The operator's side of identities: `token`, `revoke` and `identities`.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tunnel_proto::config::GatewayConfig;
use tunnel_proto::config::gateway::is_valid_identity;
use tunnel_proto::token::{EnrolmentToken, format_pin};
use tunnel_transport::certs::{CertInfo, rfc3339, unix_now, utc};

use crate::setup;
use crate::state::{IdentityRecord, Revocations, State};

pub struct Token {
    /// The token, for stdout.
    pub text: String,
    /// What it grants and how to use it, for stderr.
    pub note: String,
}

fn first_cert(path: &Path) -> Result<CertInfo> {
    let certs = tunnel_transport::tls::load_certs(path)?;
    let first = certs.first().context("no certificate")?;
    CertInfo::parse(first).with_context(|| format!("reading {}", path.display()))
}

pub fn token(
    config: &GatewayConfig,
    config_path: &Path,
    identity: &str,
    groups: &[String],
    ttl: Duration,
    renew_for: Option<Duration>,
    addresses: &[String],
) -> Result<Token> {
    if !is_valid_identity(identity) {
        bail!("--identity `{identity}`: use 1 to 64 letters, digits, . - _ @");
    }
    for group in groups {
        if !is_valid_identity(group) {
            bail!("--group `{group}`: use 1 to 64 letters, digits, . - _ @");
        }
    }
    if ttl.is_zero() || ttl > Duration::from_secs(30 * 86_400) {
        bail!("--ttl: give 1s to 30d (a token is meant to be used soon)");
    }
    let gateway_cert = first_cert(&config.cert)?;
    let ca = first_cert(&config.ca)?;
    let mut advice = None;
    let addresses = if addresses.is_empty() {
        let derived = setup::agent_address(config.listen, &gateway_cert.names, config_path);
        let unknown = derived.address.starts_with("HOST:") || derived.address.ends_with(":PORT");
        match derived.edit {
            Some(edit) if unknown => bail!(
                "the token must say where agents reach this gateway, and gateway.toml does not tell: {edit}. Give it with --address HOST:PORT"
            ),
            edit => advice = edit,
        }
        vec![derived.address]
    } else {
        for a in addresses {
            if !matches!(
                tunnel_proto::Target::parse(a),
                Ok(tunnel_proto::Target::Addr { .. })
            ) {
                bail!("--address `{a}` is not HOST:PORT (IPv6 as [ADDR]:PORT)");
            }
        }
        addresses.to_vec()
    };
    let state = State::open_for_admin(&config.state_dir)?;
    let now = unix_now();
    let (record, secret) = state.create_token(identity, groups, ttl, renew_for, now)?;
    let token = EnrolmentToken {
        gateway: setup::agent_name(&gateway_cert.names),
        addresses: addresses.clone(),
        ca_pin: ca.key_digest,
        id: record.id.clone(),
        secret,
        expires: record.expires,
        identity: identity.to_string(),
        groups: groups.to_vec(),
    };
    let groups_said = if groups.is_empty() {
        String::new()
    } else {
        format!(" in groups {}", groups.join(", "))
    };
    let note = format!(
        "token {} for `{identity}`{groups_said}: usable once until {}, at {} (CA {}).\n\
         On the agent's machine: tunnel-agent enroll (it reads the token from stdin,\n\
         --token-file or $TUNNEL_ENROLL_TOKEN; never put it on a command line).",
        record.id,
        utc(record.expires),
        addresses.join(", "),
        format_pin(&ca.key_digest)
    );
    let note = match advice {
        Some(advice) => {
            format!("{note}\nnote: {advice}; or give the address with --address HOST:PORT.")
        }
        None => note,
    };
    Ok(Token {
        text: token.encode(),
        note,
    })
}

pub fn revoke(state_dir: &Path, identity: Option<&str>, serial: Option<&str>) -> Result<String> {
    let state = State::open_for_admin(state_dir)?;
    let known = state.identities()?;
    match (identity, serial) {
        (Some(identity), None) => {
            if !is_valid_identity(identity) {
                bail!("--identity `{identity}`: not an identity");
            }
            let (_, now) = state.revoke(|r, now| {
                r.identities.insert(identity.to_string(), now);
            })?;
            let mut said = format!(
                "revoked every certificate of `{identity}` issued until {} (written to {}); it may enrol again only with a new token",
                utc(now),
                state.revocations_path().display()
            );
            if !known.iter().any(|r| r.identity == identity) {
                let names: Vec<&str> = known.iter().map(|r| r.identity.as_str()).collect();
                said.push_str(&format!(
                    "\nnote: no identity `{identity}` enrolled here (enrolled: {}); certificates from `issue` are not listed, so it was revoked all the same: check the spelling",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ));
            }
            Ok(said)
        }
        (None, Some(serial)) => {
            let serial = serial
                .trim()
                .trim_start_matches("0x")
                .replace(':', "")
                .to_ascii_lowercase();
            if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!(
                    "--serial `{serial}`: give the serial in hex, as `tunnel-gateway identities` shows it"
                );
            }
            let serial = serial.trim_start_matches("00").to_string();
            // The certificates its lineage had before it go with it: a holder of the
            // one before could otherwise reconnect and renew past the revocation.
            // Older ones than the kept lineage shows are cut off by the revoked one's
            // issue time.
            let (earlier, cutoff) = known
                .iter()
                .find_map(|r| {
                    let at = r.serials.iter().position(|s| *s == serial)?;
                    Some((
                        r.serials[..at].to_vec(),
                        r.issued.get(at).map(|t| (r.identity.clone(), *t)),
                    ))
                })
                .unwrap_or_default();
            state.revoke(|r, now| {
                r.serials.insert(serial.clone(), now);
                for s in &earlier {
                    r.serials.entry(s.clone()).or_insert(now);
                }
                if let Some((identity, issued)) = &cutoff {
                    let at = r.older_than.entry(identity.clone()).or_insert(*issued);
                    *at = (*at).max(*issued);
                }
            })?;
            let mut said = format!(
                "revoked certificate {serial} (written to {})",
                state.revocations_path().display()
            );
            match known.iter().find(|r| r.serials.contains(&serial)) {
                Some(r) => said.push_str(&format!(" of `{}`", r.identity)),
                None => said.push_str(
                    "\nnote: no enrolled identity has had this serial lately (`tunnel-gateway identities` lists them); certificates from `issue` are not listed, so it was revoked all the same: check it",
                ),
            }
            Ok(said)
        }
        _ => bail!("give --identity ID or --serial HEX"),
    }
}

#[derive(Serialize)]
struct IdentityView {
    identity: String,
    groups: Vec<String>,
    enrolled: String,
    serial: String,
    not_after: String,
    renewals: u64,
    last_renewed: Option<String>,
    renew_until: Option<String>,
    /// Why it may not be used, if revoked.
    revoked: Option<String>,
}

#[derive(Serialize)]
struct TokenView {
    id: String,
    identity: String,
    groups: Vec<String>,
    expires: String,
    state: &'static str,
}

#[derive(Serialize)]
struct Listing {
    identities: Vec<IdentityView>,
    tokens: Vec<TokenView>,
    revocations: Revocations,
}

fn identity_view(r: &IdentityRecord, revocations: &Revocations) -> IdentityView {
    // The current certificate started BACKDATE before it was issued; judged as such.
    let issued = r.last_renewed.unwrap_or(r.enrolled);
    let revoked = revocations.verdict(
        &r.identity,
        &r.serial,
        issued - tunnel_proto::enrolment::BACKDATE_SECS,
    );
    IdentityView {
        identity: r.identity.clone(),
        groups: r.groups.clone(),
        enrolled: rfc3339(r.enrolled),
        serial: r.serial.clone(),
        not_after: rfc3339(r.not_after),
        renewals: r.renewals,
        last_renewed: r.last_renewed.map(rfc3339),
        renew_until: r.renew_until.map(rfc3339),
        revoked,
    }
}

pub fn identities(state_dir: &Path, json: bool) -> Result<String> {
    let state = State::open_for_admin(state_dir)?;
    let revocations = state.revocations()?;
    let now = unix_now();
    let listing = Listing {
        identities: state
            .identities()?
            .iter()
            .map(|r| identity_view(r, &revocations))
            .collect(),
        tokens: state
            .tokens()?
            .into_iter()
            .map(|t| TokenView {
                state: match (&t.redeemed, now > t.expires) {
                    (Some(_), _) => "used",
                    (None, true) => "expired",
                    (None, false) => "unused",
                },
                id: t.id,
                identity: t.identity,
                groups: t.groups,
                expires: rfc3339(t.expires),
            })
            .collect(),
        revocations,
    };
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&listing)?));
    }
    let mut out = String::new();
    let _ = writeln!(out, "identities: {}", listing.identities.len());
    for i in &listing.identities {
        let status = match &i.revoked {
            Some(why) => format!("REVOKED ({why})"),
            None if i.not_after < rfc3339(now) => "expired".to_string(),
            None => "valid".to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<20} groups [{}]  certificate {}  until {}  {}  renewals {}{}",
            i.identity,
            i.groups.join(", "),
            i.serial,
            i.not_after,
            status,
            i.renewals,
            i.renew_until
                .as_ref()
                .map(|u| format!("  may renew until {u}"))
                .unwrap_or_default()
        );
    }
    let unused: Vec<&TokenView> = listing
        .tokens
        .iter()
        .filter(|t| t.state == "unused")
        .collect();
    let _ = writeln!(out, "\ntokens waiting to be used: {}", unused.len());
    for t in unused {
        let _ = writeln!(out, "  {}  for {}  expires {}", t.id, t.identity, t.expires);
    }
    let r = &listing.revocations;
    let _ = writeln!(
        out,
        "\nrevoked: {} identities, {} certificates",
        r.identities.len(),
        r.serials.len()
    );
    for (identity, at) in &r.identities {
        let _ = writeln!(out, "  identity {identity} on {}", utc(*at));
    }
    for (serial, at) in &r.serials {
        let _ = writeln!(out, "  certificate {serial} on {}", utc(*at));
    }
    Ok(out)
}
