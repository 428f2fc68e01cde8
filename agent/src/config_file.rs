//! Adding an enrolled gateway to `agent.toml`: a `[[gateway]]` table appended to the
//! text as it is (the file's comments and order stay), and only when the result is a
//! valid config.
//!
//! ```text
//!  no file ─────────────────────────────▶ new file with the table
//!  no table of that name ───────────────▶ table appended
//!  a table of that name, same credential ▶ left alone (enrolling again replaced the files)
//!  a table of that name, other files ───▶ refused: --name, or remove the table
//! ```

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use tunnel_proto::config::AgentConfig;
use tunnel_proto::target::{Host, Target};

/// The `[[gateway]]` table enrolment writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTable {
    pub name: String,
    pub addresses: Vec<String>,
    pub ca: PathBuf,
    pub credential: PathBuf,
    pub server_name: Option<String>,
}

/// What to do with the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Write this text (the old text with the table added, or a new file).
    Write(String),
    /// The file already has this gateway with these files.
    AlreadyThere,
}

fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

impl GatewayTable {
    /// The table as TOML text.
    pub fn text(&self) -> String {
        let address = match self.addresses.as_slice() {
            [one] => quoted(one),
            many => {
                let items: Vec<String> = many.iter().map(|a| quoted(a)).collect();
                format!("[{}]", items.join(", "))
            }
        };
        let mut text = format!(
            "[[gateway]]\nname = {}\naddress = {address}\nca = {}\ncredential = {}\n",
            quoted(&self.name),
            quoted(&self.ca.to_string_lossy()),
            quoted(&self.credential.to_string_lossy()),
        );
        if let Some(server_name) = &self.server_name {
            text.push_str(&format!("server_name = {}\n", quoted(server_name)));
        }
        text
    }
}

/// The name to check the gateway's certificate against, when the hosts of `addresses`
/// are not among the `names` it carries: its first DNS name (else its first name).
pub fn server_name_for(addresses: &[String], names: &[String]) -> Option<String> {
    let all_named = addresses.iter().all(|address| {
        let host = match Target::parse(address) {
            Ok(Target::Addr {
                host: Host::Name(name),
                ..
            }) => name,
            Ok(Target::Addr {
                host: Host::Ip(ip), ..
            }) => ip.to_string(),
            _ => return false,
        };
        names.iter().any(|n| n.eq_ignore_ascii_case(&host))
    });
    if all_named {
        return None;
    }
    names
        .iter()
        .find(|n| n.parse::<IpAddr>().is_err())
        .or_else(|| names.first())
        .cloned()
}

/// `path` with `.` and `..` taken out by its text alone (the files need not exist).
fn lexical(path: &Path) -> PathBuf {
    let mut clean = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    clean
}

/// Decides what to write to the config at `path`, whose text is `existing` (`None`: no
/// file yet), so that it has `table`.
pub fn plan(existing: Option<&str>, path: &Path, table: &GatewayTable) -> Result<Plan> {
    let old = existing.unwrap_or("");
    let parsed: toml::Table = old.parse().map_err(|e| {
        anyhow!(
            "{}: not valid TOML ({e}): fix it, or enrol into another file with --config",
            path.display()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let gateways = parsed
        .get("gateway")
        .and_then(toml::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for gateway in gateways {
        if gateway.get("name").and_then(toml::Value::as_str) != Some(table.name.as_str()) {
            continue;
        }
        let same_credential = gateway
            .get("credential")
            .and_then(toml::Value::as_str)
            .is_some_and(|c| lexical(&base.join(c)) == lexical(&table.credential));
        if same_credential {
            return Ok(Plan::AlreadyThere);
        }
        bail!(
            "{} already has a [[gateway]] named `{}` that uses other files: enrol under another name with --name NAME, or remove that table first",
            path.display(),
            table.name
        );
    }
    let mut text = old.to_string();
    if !text.is_empty() {
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push('\n');
    }
    text.push_str(&table.text());
    AgentConfig::parse(&text, path).map_err(|e| {
        anyhow!(
            "{} would not be valid with the new [[gateway]] table: {e}\nFix the file, then run the same enroll command again (the token was not used, and nothing was written)",
            path.display()
        )
    })?;
    Ok(Plan::Write(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> GatewayTable {
        GatewayTable {
            name: "site-b".into(),
            addresses: vec!["127.0.0.1:7443".into()],
            ca: "/state/tunnel/site-b/ca.pem".into(),
            credential: "/state/tunnel/site-b/credential.pem".into(),
            server_name: Some("gw.site-b.example.org".into()),
        }
    }

    fn path() -> &'static Path {
        Path::new("/home/alice/.config/tunnel/agent.toml")
    }

    #[test]
    fn a_new_file_gets_one_table_that_parses_as_a_renewed_credential() {
        let Plan::Write(text) = plan(None, path(), &table()).unwrap() else {
            panic!("nothing to write");
        };
        assert_eq!(
            text,
            "[[gateway]]\nname = \"site-b\"\naddress = \"127.0.0.1:7443\"\nca = \"/state/tunnel/site-b/ca.pem\"\ncredential = \"/state/tunnel/site-b/credential.pem\"\nserver_name = \"gw.site-b.example.org\"\n"
        );
        let config = AgentConfig::parse(&text, path()).unwrap();
        let gateway = &config.gateways[0];
        assert!(gateway.renews);
        assert_eq!(gateway.cert, gateway.key);
        assert_eq!(gateway.addresses[0].server_name, "gw.site-b.example.org");
    }

    #[test]
    fn an_existing_file_keeps_its_text_and_gains_the_table() {
        let old = "# my tunnels\ncontrol = \"/tmp/a.sock\"\n\n[[gateway]]\nname = \"site-a\"\naddress = \"10.0.0.1:7443\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a-key.pem\"";
        let mut two = table();
        two.addresses = vec!["10.0.0.2:7443".into(), "[fd00::2]:7443".into()];
        two.server_name = None;
        let Plan::Write(text) = plan(Some(old), path(), &two).unwrap() else {
            panic!("nothing to write");
        };
        assert!(text.starts_with(old), "{text}");
        assert!(
            text.contains("address = [\"10.0.0.2:7443\", \"[fd00::2]:7443\"]\n"),
            "{text}"
        );
        let config = AgentConfig::parse(&text, path()).unwrap();
        assert_eq!(config.gateways.len(), 2);
        assert_eq!(config.gateways[1].addresses.len(), 2);
    }

    #[test]
    fn the_same_gateway_again_is_left_alone_and_another_is_refused() {
        let Plan::Write(text) = plan(None, path(), &table()).unwrap() else {
            panic!("nothing to write");
        };
        assert_eq!(
            plan(Some(&text), path(), &table()).unwrap(),
            Plan::AlreadyThere
        );
        // A relative credential path names the same file from the config's directory.
        let relative = text.replace(
            "/state/tunnel/site-b/credential.pem",
            "../../../../state/tunnel/site-b/credential.pem",
        );
        assert_eq!(
            plan(Some(&relative), path(), &table()).unwrap(),
            Plan::AlreadyThere
        );
        let mut elsewhere = table();
        elsewhere.credential = "/other/credential.pem".into();
        let error = plan(Some(&text), path(), &elsewhere)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "/home/alice/.config/tunnel/agent.toml already has a [[gateway]] named `site-b` that uses other files: enrol under another name with --name NAME, or remove that table first"
        );
    }

    #[test]
    fn a_file_that_is_not_toml_is_not_touched() {
        let error = plan(Some("[[gateway"), path(), &table())
            .unwrap_err()
            .to_string();
        assert!(error.contains("not valid TOML"), "{error}");
        assert!(error.contains("--config"), "{error}");
    }

    #[test]
    fn a_server_name_is_written_only_when_the_address_is_not_among_the_names() {
        let names = vec!["gw.site-b.example.org".to_string(), "10.0.0.1".to_string()];
        assert_eq!(server_name_for(&["10.0.0.1:7443".into()], &names), None);
        assert_eq!(
            server_name_for(&["GW.site-b.example.org:7443".into()], &names),
            None
        );
        assert_eq!(
            server_name_for(&["127.0.0.1:7443".into()], &names).as_deref(),
            Some("gw.site-b.example.org")
        );
        assert_eq!(
            server_name_for(&["127.0.0.1:7443".into()], &["10.0.0.1".into()]).as_deref(),
            Some("10.0.0.1")
        );
    }
}
