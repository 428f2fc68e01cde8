//! `tunnel-agent enroll`: from an enrolment token to a working `[[gateway]]`, with no
//! key copied by hand.
//!
//! ```text
//!  token (file, $TUNNEL_ENROLL_TOKEN or stdin) ─▶ decode (typos caught)
//!  config checked (a clash with another [[gateway]] stops here, before the token is used)
//!  for each address: TCP ─▶ TLS 1.3, no client certificate, gateway trusted by pin
//!      pin differs ─▶ stop: nothing was sent
//!  key: made here (or the one an earlier run with this token left) and kept on disk
//!       before it is sent, so a lost answer can be asked for again with the same key
//!  POST /v1/enrol ─▶ Issued: checked, credential.pem + ca.pem written atomically,
//!                  [[gateway]] added to agent.toml
//!               └▶ Refused: why, in words (expired, used, unknown, …)
//! ```
//!
//! The token's secret is sent to the pinned gateway only, and never printed.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use rcgen::KeyPair;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig};
use tunnel_proto::enrolment::{ENROL_PATH, EnrolRequest, Issued, RefusalKind, Refused};
use tunnel_proto::target::{Host, Target, is_valid_service_name};
use tunnel_proto::token::{EnrolmentToken, format_pin, pin_of_public_key};
use tunnel_transport::certs::utc;

use crate::config_file::{self, GatewayTable, Plan};
use crate::credential;
use crate::exchange::{self, Answer};
use crate::pin::PinnedCa;
use crate::state;

/// The environment variable a token may come in.
pub const TOKEN_VARIABLE: &str = "TUNNEL_ENROLL_TOKEN";
/// Time allowed for TCP and TLS set-up with one address.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the gateway to answer the enrolment.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the command was given.
#[derive(Debug)]
pub struct Options {
    pub config: PathBuf,
    pub name: Option<String>,
    pub token_file: Option<PathBuf>,
}

/// Where the files of one enrolled gateway go.
struct Files {
    credential: PathBuf,
    ca: PathBuf,
    /// The key of an enrolment in flight with one token.
    pending_key: PathBuf,
    /// The id of the token the credential came from (not secret): a second run with
    /// the same token finds it done.
    token_id: PathBuf,
}

/// What is already in the gateway's state directory, judged against a new token.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    /// Nothing there (or nothing readable): enrol.
    Nothing,
    /// This very token made the credential there: nothing to do.
    Done,
    /// A credential of the same identity at the same gateway: a new token replaces it.
    Replaceable,
    /// Another identity's, or another gateway's: never overwritten.
    Foreign(String),
}

fn existing(files: &Files, token: &EnrolmentToken) -> Existing {
    let Ok(certs) = tunnel_transport::tls::load_certs(&files.credential) else {
        return Existing::Nothing;
    };
    let Some(cert) = certs
        .first()
        .and_then(|der| tunnel_transport::certs::CertInfo::parse(der).ok())
    else {
        return Existing::Nothing;
    };
    let ca_pin = tunnel_transport::tls::load_certs(&files.ca)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .and_then(|der| tunnel_transport::certs::CertInfo::parse(&der).ok())
        .map(|ca| ca.key_digest);
    let identity = cert.common_name().unwrap_or_default().to_string();
    if ca_pin != Some(token.ca_pin) {
        return Existing::Foreign(format!(
            "{} holds the credential of `{identity}` at another gateway (its CA is not this token's)",
            files.credential.display()
        ));
    }
    if identity != token.identity {
        return Existing::Foreign(format!(
            "{} holds the credential of `{identity}`, and this token is for `{}`",
            files.credential.display(),
            token.identity
        ));
    }
    match std::fs::read_to_string(&files.token_id) {
        Ok(id) if id.trim() == token.id => Existing::Done,
        _ => Existing::Replaceable,
    }
}

/// Reads the token: from `--token-file`, else `$TUNNEL_ENROLL_TOKEN`, else stdin.
fn read_token(token_file: Option<&Path>) -> Result<(String, String)> {
    if let Some(file) = token_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the token from {}", file.display()))?;
        return Ok((text, file.display().to_string()));
    }
    if let Some(text) = std::env::var_os(TOKEN_VARIABLE) {
        return Ok((
            text.to_string_lossy().into_owned(),
            format!("${TOKEN_VARIABLE}"),
        ));
    }
    let mut text = String::new();
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("Paste the enrolment token, then press Enter:");
        stdin
            .read_line(&mut text)
            .context("reading the token from the terminal")?;
    } else {
        stdin
            .take(64 * 1024)
            .read_to_string(&mut text)
            .context("reading the token from stdin")?;
    }
    if text.trim().is_empty() {
        bail!(
            "no enrolment token: give it on stdin, in ${TOKEN_VARIABLE}, or in a file with --token-file"
        );
    }
    Ok((text, "stdin".into()))
}

pub fn run(options: Options) -> Result<()> {
    let (text, source) = read_token(options.token_file.as_deref())?;
    let token =
        EnrolmentToken::decode(&text).with_context(|| format!("the token from {source}"))?;
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| token.gateway.clone());
    if !is_valid_service_name(&name) {
        bail!(
            "`{name}` cannot name a gateway in agent.toml (one word of letters, digits, - or _): choose one with --name"
        );
    }
    let state_dir =
        std::path::absolute(state::default_state_dir()?).context("finding the state directory")?;
    let gateway_dir = state_dir.join(&name);
    let files = Files {
        credential: gateway_dir.join("credential.pem"),
        ca: gateway_dir.join("ca.pem"),
        pending_key: state_dir.join(format!("enrol-{}.key.pem", token.id)),
        token_id: gateway_dir.join("token-id"),
    };
    let config_path = std::path::absolute(&options.config).unwrap_or(options.config.clone());
    let table = GatewayTable {
        name: name.clone(),
        addresses: token.addresses.clone(),
        ca: files.ca.clone(),
        credential: files.credential.clone(),
        server_name: None,
    };
    // A clash in the config stops the enrolment before the token is used.
    let plan = config_file::plan(read_config(&config_path)?.as_deref(), &config_path, &table)?;
    match existing(&files, &token) {
        Existing::Foreign(what) => bail!(
            "{what}: it is never overwritten; enrol this one under another gateway name with --name NAME (the token is still unused)"
        ),
        Existing::Done if plan == Plan::AlreadyThere => {
            tunnel_transport::daemon::print_out(&format!(
                "already enrolled with this token: {} and [[gateway]] `{name}` in {} are in place; nothing to do\n",
                files.credential.display(),
                config_path.display()
            ))?;
            return Ok(());
        }
        Existing::Done | Existing::Replaceable | Existing::Nothing => {}
    }
    state::private_dir(&gateway_dir)?;

    let runtime = tunnel_transport::daemon::runtime()?;
    let enrolled = runtime.block_on(enrol(&token, &files))?;

    let config_written = install(&enrolled, &files, table, &config_path)?;
    state::write_atomically(&files.token_id, format!("{}\n", token.id).as_bytes(), 0o600)?;
    // Done: the key lives in credential.pem now.
    let _ = std::fs::remove_file(&files.pending_key);

    let issued = &enrolled.issued;
    let groups = if issued.groups.is_empty() {
        String::new()
    } else {
        format!(" (groups: {})", issued.groups.join(", "))
    };
    let config_line = if config_written {
        format!("added [[gateway]] `{name}` to {}", config_path.display())
    } else {
        format!(
            "{} already has [[gateway]] `{name}` with this credential: left as it was (a running agent picks up the new credential by itself)",
            config_path.display()
        )
    };
    tunnel_transport::daemon::print_out(&format!(
        "enrolled as `{}`{groups} with gateway `{name}`: certificate serial {}, valid until {}\n\
         wrote {} (private key and certificate; the key never left this machine)\n\
         wrote {} (the gateway's CA)\n\
         {config_line}\n\
         next: add [[route]] or [[forward]] tables that go via `{name}` to {}, then start the agent: tunnel-agent run\n",
        issued.identity,
        issued.serial,
        utc(issued.not_after),
        files.credential.display(),
        files.ca.display(),
        config_path.display()
    ))?;
    let offset = enrolled.clock_offset;
    if let Some(words) = exchange::describe_offset(offset) {
        let local_now = exchange::wall_now();
        if (enrolled.not_before as f64) > local_now {
            bail!(
                "{words}: by this machine's clock the new certificate is not valid until {} (the files above are written and good): set the clock right (e.g. enable NTP) before starting the agent",
                utc(enrolled.not_before)
            );
        }
        eprintln!(
            "warning: {words}; the certificate is renewed by the gateway's clock, but set this machine's clock right (e.g. enable NTP)"
        );
    }
    Ok(())
}

/// Writes what an enrolment brought: ca.pem, credential.pem (each atomically), and
/// the `[[gateway]]` table in the config at `config_path`. Returns whether the config
/// was changed.
fn install(
    enrolled: &Enrolled,
    files: &Files,
    table: GatewayTable,
    config_path: &Path,
) -> Result<bool> {
    let ca_pem = enrolled.issued.ca.trim_end().to_string() + "\n";
    state::write_atomically(&files.ca, ca_pem.as_bytes(), 0o644)?;
    let credential_pem = credential::pem(&enrolled.key, &enrolled.issued.certificate);
    state::write_atomically(&files.credential, credential_pem.as_bytes(), 0o600)?;
    let table = GatewayTable {
        server_name: config_file::server_name_for(&table.addresses, &enrolled.names),
        ..table
    };
    Ok(
        match config_file::plan(read_config(config_path)?.as_deref(), config_path, &table)? {
            Plan::AlreadyThere => false,
            Plan::Write(text) => {
                if let Some(dir) = config_path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating the directory {}", dir.display()))?;
                }
                let mode = std::fs::metadata(config_path)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
                    .unwrap_or(0o644);
                state::write_atomically(config_path, text.as_bytes(), mode)?;
                true
            }
        },
    )
}

fn read_config(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A finished enrolment.
struct Enrolled {
    key: KeyPair,
    issued: Issued,
    not_before: i64,
    /// The names the gateway's certificate carries.
    names: Vec<String>,
    clock_offset: f64,
}

/// A gateway connection trusted by the token's pin.
struct Trusted {
    send: h2::client::SendRequest<Bytes>,
    /// The host of the address, as the request names the gateway.
    authority: String,
    names: Vec<String>,
}

async fn enrol(token: &EnrolmentToken, files: &Files) -> Result<Enrolled> {
    let mut failures = Vec::new();
    let mut trusted = None;
    for address in &token.addresses {
        match tokio::time::timeout(DIAL_TIMEOUT, dial(address, token.ca_pin)).await {
            Err(_) => failures.push(format!(
                "{address}: no answer within {:.0}s",
                DIAL_TIMEOUT.as_secs_f64()
            )),
            Ok(Err(Dialled::Mistrusted(message))) => bail!(message),
            Ok(Err(Dialled::Failed(e))) => failures.push(format!("{address}: {e:#}")),
            Ok(Ok(connection)) => {
                trusted = Some(connection);
                break;
            }
        }
    }
    let Some(trusted) = trusted else {
        bail!(
            "no address of gateway `{}` could be reached ({}); nothing was sent",
            token.gateway,
            failures.join("; ")
        );
    };

    let key = pending_key(&files.pending_key, &token.id)?;
    let csr = credential::request(&key, &token.identity)?;
    let body = serde_json::to_vec(&EnrolRequest {
        token_id: token.id.clone(),
        secret: token.secret.encode(),
        csr,
    })
    .context("encoding the enrolment request")?;
    let request = exchange::request(&trusted.authority, ENROL_PATH)?;
    let sent = exchange::wall_now();
    let send = trusted.send;
    let exchanged = tokio::time::timeout(ANSWER_TIMEOUT, async {
        let mut ready = send
            .ready()
            .await
            .context("the connection to the gateway")?;
        let (response, stream) = ready
            .send_request(request, false)
            .context("sending the enrolment request")?;
        exchange::answer(response, stream, Bytes::from(body)).await
    })
    .await
    .unwrap_or_else(|_| {
        Err(anyhow!(
            "no answer within {:.0}s",
            ANSWER_TIMEOUT.as_secs_f64()
        ))
    });
    let (status, answer) = exchanged.map_err(|e| {
        anyhow!(
            "{e:#}: the gateway may or may not have enrolled this agent; run the same command again (it presents the same key, and the gateway answers with the same certificate)"
        )
    })?;
    let received = exchange::wall_now();
    let answer = exchange::interpret(status, &answer)?;
    let clock_offset = exchange::clock_offset(answer.gateway_time(), sent, received);
    let issued = match answer {
        Answer::Issued(issued) => issued,
        Answer::Refused(refused) => {
            if refusal_is_final(refused.error) {
                let _ = std::fs::remove_file(&files.pending_key);
            }
            bail!(refusal_message(&refused, token, clock_offset));
        }
    };
    let ca = credential::certificates(&issued.ca).context("the CA the gateway sent")?;
    let pinned = ca.iter().any(|cert| {
        credential::public_key_of(cert).is_ok_and(|spki| pin_of_public_key(&spki) == token.ca_pin)
    });
    if !pinned {
        bail!(
            "the gateway sent a CA certificate that does not have the token's pin ({}): nothing was written; tell the gateway's operator",
            format_pin(&token.ca_pin)
        );
    }
    let info = credential::check_issued(&issued.certificate, &key, &ca)
        .context("the certificate the gateway issued: nothing was written")?;
    Ok(Enrolled {
        key,
        issued,
        not_before: info.not_before,
        names: trusted.names,
        clock_offset,
    })
}

/// The key for the enrolment with token `id`: the one an earlier attempt left, else a
/// new one, written to disk before it is sent.
fn pending_key(path: &Path, id: &str) -> Result<KeyPair> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let key = credential::key_from_pem(&text).with_context(|| {
            format!(
                "{} (the key of an earlier enrolment with token {id}): remove it and ask for a new token",
                path.display()
            )
        })?;
        eprintln!(
            "using the key an earlier attempt with this token made ({})",
            path.display()
        );
        return Ok(key);
    }
    let key = credential::fresh_key()?;
    if !state::create_new(path, key.serialize_pem().as_bytes(), 0o600)? {
        // Another run with the same token got there first: use its key.
        return pending_key(path, id);
    }
    Ok(key)
}

enum Dialled {
    /// The gateway is not the one the token was made for: stop, send nothing.
    Mistrusted(String),
    Failed(anyhow::Error),
}

async fn dial(address: &str, pin: [u8; 32]) -> Result<Trusted, Dialled> {
    let failed = |e: anyhow::Error| Dialled::Failed(e);
    let host = match Target::parse(address) {
        Ok(Target::Addr { host, .. }) => host,
        _ => {
            return Err(failed(anyhow!("`{address}` in the token is not host:port")));
        }
    };
    let authority = match &host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    let server_name = tunnel_transport::tls::server_name(&authority).map_err(failed)?;
    let verifier = Arc::new(PinnedCa::new(pin));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| failed(anyhow!("TLS 1.3 set-up: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(address)
        .await
        .with_context(|| format!("TCP connect to {address}"))
        .map_err(failed)?;
    let tls = match TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => {
            return Err(match verifier.mistrust() {
                Some(mistrust) => Dialled::Mistrusted(mistrust.explain(address)),
                None => Dialled::Failed(anyhow!(e).context("TLS handshake")),
            });
        }
    };
    let (send, connection) = tunnel_transport::liveness::client_builder()
        .handshake(tls)
        .await
        .context("HTTP/2 handshake")
        .map_err(failed)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Trusted {
        send,
        authority,
        names: verifier.seen().names,
    })
}

/// A refusal after which the key of this enrolment is of no more use.
fn refusal_is_final(kind: RefusalKind) -> bool {
    matches!(
        kind,
        RefusalKind::UnknownToken
            | RefusalKind::TokenExpired
            | RefusalKind::TokenUsed
            | RefusalKind::Revoked
    )
}

/// Why the gateway would not enrol this agent, and what to do, in words.
fn refusal_message(refused: &Refused, token: &EnrolmentToken, clock_offset: f64) -> String {
    let says = refused.message.trim();
    let kind = serde_json::to_value(refused.error)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let why = match refused.error {
        RefusalKind::TokenExpired => {
            let mut text = format!(
                "the token expired at {} by the gateway's clock (it says: {says}): ask the gateway's operator for a new one (tunnel-gateway token)",
                utc(token.expires)
            );
            if let Some(words) = exchange::describe_offset(clock_offset) {
                text.push_str(&format!(
                    "; note that {words}, so the token may still have looked valid here"
                ));
            }
            text
        }
        RefusalKind::TokenUsed => format!(
            "the token was already used by another key: ask for a new token (a token enrols one key only; it says: {says})"
        ),
        RefusalKind::UnknownToken => format!(
            "the gateway does not know this token (it says: {says}): it was not made there, or was withdrawn; check it is the token for gateway `{}`, or ask for a new one",
            token.gateway
        ),
        RefusalKind::Revoked => format!(
            "identity `{}` is revoked at the gateway (it says: {says}): ask its operator",
            token.identity
        ),
        RefusalKind::BadRequest => format!(
            "it could not read the request (it says: {says}): this agent and the gateway may be of different versions"
        ),
        RefusalKind::Internal => format!(
            "it failed (it says: {says}): try again later (the same command is safe to repeat), or tell its operator"
        ),
        _ => format!("{kind}: {says}"),
    };
    format!("the gateway refused enrolment: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_proto::token::Secret;
    use tunnel_transport::certs::unix_now;

    fn token() -> EnrolmentToken {
        EnrolmentToken {
            gateway: "site-b".into(),
            addresses: vec!["127.0.0.1:7443".into()],
            ca_pin: [7; 32],
            id: "abc123".into(),
            secret: Secret([42; 32]),
            expires: 1_767_441_600,
            identity: "alice".into(),
            groups: vec![],
        }
    }

    fn refused(error: RefusalKind, message: &str) -> Refused {
        Refused {
            error,
            message: message.into(),
            gateway_time: unix_now(),
        }
    }

    #[test]
    fn refusals_say_what_happened_and_what_to_do() {
        let expired = refusal_message(
            &refused(RefusalKind::TokenExpired, "expired"),
            &token(),
            0.0,
        );
        assert_eq!(
            expired,
            "the gateway refused enrolment: the token expired at 2026-01-03 12:00:00 UTC by the gateway's clock (it says: expired): ask the gateway's operator for a new one (tunnel-gateway token)"
        );
        let skewed = refusal_message(
            &refused(RefusalKind::TokenExpired, "expired"),
            &token(),
            -3600.0,
        );
        assert!(
            skewed.ends_with("; note that this machine's clock is 3600 s ahead of the gateway's, so the token may still have looked valid here"),
            "{skewed}"
        );
        let used = refusal_message(&refused(RefusalKind::TokenUsed, "used"), &token(), 0.0);
        assert!(
            used.starts_with("the gateway refused enrolment: the token was already used by another key: ask for a new token"),
            "{used}"
        );
        let unknown = refusal_message(&refused(RefusalKind::UnknownToken, "no"), &token(), 0.0);
        assert!(unknown.contains("does not know this token"), "{unknown}");
        assert_ne!(expired, used);
    }

    #[test]
    fn the_secret_never_shows_in_messages() {
        let secret = token().secret.encode();
        for kind in [
            RefusalKind::TokenExpired,
            RefusalKind::TokenUsed,
            RefusalKind::UnknownToken,
            RefusalKind::Internal,
        ] {
            let message = refusal_message(&refused(kind, "x"), &token(), 100.0);
            assert!(!message.contains(&secret), "{message}");
        }
    }

    #[test]
    fn a_pending_key_is_kept_and_used_again() {
        let dir = std::env::temp_dir().join(format!(
            "tunnel-agent-enrol-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        state::private_dir(&dir).unwrap();
        let path = dir.join("enrol-abc.key.pem");
        let first = pending_key(&path, "abc").unwrap();
        let again = pending_key(&path, "abc").unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(
            first.subject_public_key_info(),
            again.subject_public_key_info()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A gateway that serves one enrolment the way `answer` says, with a certificate
    /// chain [its own, its CA's]; counts the requests it received.
    mod mock {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use super::*;
        use crate::credential::tests::test_ca;
        use rcgen::{CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose};
        use rustls_pki_types::PrivateKeyDer;
        use tokio::net::TcpListener;
        use tokio_rustls::TlsAcceptor;
        use tokio_rustls::rustls::ServerConfig;

        pub struct Gateway {
            pub address: String,
            pub ca_pin: [u8; 32],
            pub requests: Arc<AtomicUsize>,
        }

        pub type Answer =
            fn(&EnrolRequest, &rcgen::Issuer<'static, KeyPair>, &str) -> (u16, String);

        pub async fn start(answer: Answer) -> Gateway {
            let (ca_pem, ca) = test_ca("tunnel CA test");
            let ca_der = credential::certificates(&ca_pem).unwrap().remove(0);
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["gw.test".to_string()]).unwrap();
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let leaf = params.signed_by(&key, &ca).unwrap().der().clone();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf, ca_der.clone()],
                    PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                )
                .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap().to_string();
            let requests = Arc::new(AtomicUsize::new(0));
            let counted = requests.clone();
            tokio::spawn(async move {
                let acceptor = TlsAcceptor::from(Arc::new(config));
                while let Ok((tcp, _)) = listener.accept().await {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        continue;
                    };
                    let Ok(mut connection) = h2::server::handshake(tls).await else {
                        continue;
                    };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        counted.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(request.uri().path(), ENROL_PATH);
                        let mut body = request.into_body();
                        let mut read = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            read.extend_from_slice(&chunk);
                        }
                        let enrol: EnrolRequest = serde_json::from_slice(&read).unwrap();
                        let (status, text) = answer(&enrol, &ca, &ca_pem);
                        let response = http::Response::builder().status(status).body(()).unwrap();
                        let mut send = respond.send_response(response, false).unwrap();
                        send.send_data(Bytes::from(text), true).unwrap();
                    }
                }
            });
            Gateway {
                address,
                ca_pin: pin_of_public_key(&credential::public_key_of(&ca_der).unwrap()),
                requests,
            }
        }

        /// Issues a client certificate for the key in the request.
        pub fn issue(
            enrol: &EnrolRequest,
            ca: &rcgen::Issuer<'static, KeyPair>,
            ca_pem: &str,
        ) -> (u16, String) {
            let mut csr = CertificateSigningRequestParams::from_pem(&enrol.csr).unwrap();
            csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = csr.signed_by(ca).unwrap();
            let issued = Issued {
                certificate: cert.pem(),
                ca: ca_pem.to_string(),
                identity: "alice".into(),
                groups: vec![],
                serial: "01".into(),
                not_after: unix_now() + 86_400,
                gateway_time: unix_now(),
            };
            (200, serde_json::to_string(&issued).unwrap())
        }

        pub fn used(
            _: &EnrolRequest,
            _: &rcgen::Issuer<'static, KeyPair>,
            _: &str,
        ) -> (u16, String) {
            let refused = Refused {
                error: RefusalKind::TokenUsed,
                message: "token abc123 is bound to another key".into(),
                gateway_time: unix_now(),
            };
            (403, serde_json::to_string(&refused).unwrap())
        }
    }

    fn scratch_files() -> (PathBuf, Files) {
        let dir = std::env::temp_dir().join(format!(
            "tunnel-agent-enrol-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        state::private_dir(&dir).unwrap();
        let files = Files {
            credential: dir.join("credential.pem"),
            ca: dir.join("ca.pem"),
            pending_key: dir.join("enrol-abc123.key.pem"),
            token_id: dir.join("token-id"),
        };
        (dir, files)
    }

    #[tokio::test]
    async fn a_pinned_gateway_enrols_a_key_made_here() {
        let gateway = mock::start(mock::issue).await;
        let (dir, files) = scratch_files();
        let token = EnrolmentToken {
            addresses: vec!["127.0.0.1:1".into(), gateway.address.clone()],
            ca_pin: gateway.ca_pin,
            ..token()
        };
        let enrolled = enrol(&token, &files).await.unwrap();
        assert_eq!(enrolled.names, ["gw.test"]);
        assert!(
            enrolled.clock_offset.abs() < 5.0,
            "{}",
            enrolled.clock_offset
        );
        // The key was on disk before it was sent, for a retry to present it again.
        let kept = credential::key_from_pem(&std::fs::read_to_string(&files.pending_key).unwrap())
            .unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(
            kept.subject_public_key_info(),
            enrolled.key.subject_public_key_info()
        );
        let again = enrol(&token, &files).await.unwrap();
        assert_eq!(
            again.key.subject_public_key_info(),
            enrolled.key.subject_public_key_info()
        );

        // What is written makes a working, renewed [[gateway]].
        let config = dir.join("config/agent.toml");
        let table = GatewayTable {
            name: "site-b".into(),
            addresses: vec![gateway.address.clone()],
            ca: files.ca.clone(),
            credential: files.credential.clone(),
            server_name: None,
        };
        assert!(install(&enrolled, &files, table.clone(), &config).unwrap());
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains("server_name = \"gw.test\""), "{text}");
        let parsed = tunnel_proto::config::AgentConfig::parse(&text, &config).unwrap();
        let peer = &parsed.gateways[0];
        assert!(peer.renews);
        tunnel_transport::tls::client_config(&peer.ca, &peer.cert, &peer.key).unwrap();
        let certificate =
            crate::certificate::Certificate::load(&peer.ca, &peer.cert, true).unwrap();
        assert_eq!(certificate.problem_at(unix_now()), None);
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&files.credential), 0o600);
        // Enrolling again leaves the config as it is.
        assert!(!install(&again, &files, table, &config).unwrap());
        assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_gateway_without_the_pin_is_told_nothing() {
        let gateway = mock::start(mock::issue).await;
        let (dir, files) = scratch_files();
        let token = EnrolmentToken {
            addresses: vec![gateway.address.clone()],
            ..token()
        };
        let error = enrol(&token, &files).await.err().unwrap().to_string();
        assert!(
            error.starts_with(&format!(
                "the gateway at {} is not the one this token was made for: its CA's pin is sha256:",
                gateway.address
            )),
            "{error}"
        );
        assert!(error.ends_with("; nothing was sent"), "{error}");
        assert_eq!(
            gateway.requests.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert!(
            !files.pending_key.exists(),
            "no key is made for a gateway not trusted"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_used_token_is_refused_in_words_and_its_key_dropped() {
        let gateway = mock::start(mock::used).await;
        let (dir, files) = scratch_files();
        let token = EnrolmentToken {
            addresses: vec![gateway.address.clone()],
            ca_pin: gateway.ca_pin,
            ..token()
        };
        let error = enrol(&token, &files).await.err().unwrap().to_string();
        assert_eq!(
            error,
            "the gateway refused enrolment: the token was already used by another key: ask for a new token (a token enrols one key only; it says: token abc123 is bound to another key)"
        );
        assert!(!files.pending_key.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
