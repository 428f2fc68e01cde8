//! An agent asks about its own reach (see `tunnel_proto::discovery`): the services and
//! publications its identity may reach by name, and the policy's answer for one
//! destination, names resolved as for a stream but nothing dialled.

use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::StatusCode;
use tunnel_proto::Target;
use tunnel_proto::discovery::{Answer, PublicationReach, Question, Reach, ServiceReach};
use tunnel_transport::messages::{read_body, reply_json};

use crate::policy::Caller;
use crate::publications::names;
use crate::server::Gateway;

/// `POST /v1/services`: what `caller` may reach by name here.
pub fn services(gateway: &Gateway, caller: &Caller, mut respond: SendResponse<Bytes>) {
    let services = gateway
        .policy()
        .services_for(caller)
        .into_iter()
        .map(|(name, target)| ServiceReach { name, target })
        .collect();
    let live: Vec<String> = gateway
        .publishers
        .views()
        .into_iter()
        .filter(|p| !p.publishers.is_empty())
        .map(|p| p.name)
        .collect();
    let publications = gateway
        .config
        .publications
        .iter()
        .filter(|(_, rule)| names(&rule.reach, caller))
        .map(|(name, _)| PublicationReach {
            name: name.clone(),
            published: live.contains(name),
        })
        .collect();
    let callbacks = gateway
        .config
        .callbacks
        .as_ref()
        .filter(|rule| names(&rule.for_, caller))
        .map(|rule| tunnel_proto::callback::CallbackOffer {
            address: rule.address,
            ports: rule.ports,
        });
    let reach = Reach {
        identity: caller.identity.clone(),
        services,
        publications,
        callbacks,
    };
    reply_json(&mut respond, StatusCode::OK, &reach);
}

/// `POST /v1/explain`: the policy's answer for one destination.
pub async fn explain(
    gateway: Arc<Gateway>,
    caller: Caller,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    let question = read_body(body, 4096)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<Question>(&b).ok());
    let Some(question) = question else {
        reply_json(
            &mut respond,
            StatusCode::BAD_REQUEST,
            &"the question is not {\"target\": \"host:port\"}",
        );
        return;
    };
    let answer =
        |allowed: bool, class: Option<String>, why: String, addresses: Vec<String>| Answer {
            identity: caller.identity.clone(),
            target: question.target.clone(),
            allowed,
            class,
            why,
            addresses,
        };
    let reply = match Target::parse(&question.target) {
        Err(e) => answer(
            false,
            Some("bad-request".into()),
            format!("not a destination: {e}"),
            Vec::new(),
        ),
        Ok(target) => explain_target(&gateway, &caller, &target, answer).await,
    };
    reply_json(&mut respond, StatusCode::OK, &reply);
}

async fn explain_target(
    gateway: &Gateway,
    caller: &Caller,
    target: &Target,
    answer: impl Fn(bool, Option<String>, String, Vec<String>) -> Answer,
) -> Answer {
    // A publication, by its name (as a service, or as a host with any port).
    let publication = match target {
        Target::Service(name) => Some(name.clone()),
        Target::Addr {
            host: tunnel_proto::Host::Name(name),
            ..
        } => Some(name.clone()),
        Target::Addr { .. } => None,
    };
    if let Some(name) = publication
        && let Some(rule) = gateway.config.publications.get(&name)
    {
        let live = gateway
            .publishers
            .views()
            .iter()
            .any(|p| p.name == name && !p.publishers.is_empty());
        return if !names(&rule.reach, caller) {
            answer(
                false,
                Some("denied".into()),
                format!("{caller} is not in the `reach` of [publish.{name}]"),
                Vec::new(),
            )
        } else if live {
            answer(
                true,
                None,
                format!("`{name}` is a publication {caller} may reach, published now"),
                Vec::new(),
            )
        } else {
            answer(
                true,
                None,
                format!(
                    "`{name}` is a publication {caller} may reach, but no agent publishes it now"
                ),
                Vec::new(),
            )
        };
    }
    match gateway.policy().addresses(caller, target).await {
        Ok(addresses) => answer(
            true,
            None,
            "an allow rule admits it".to_string(),
            addresses.iter().map(ToString::to_string).collect(),
        ),
        Err(refusal) => answer(
            false,
            Some(refusal.class.as_str().to_string()),
            refusal.why,
            Vec::new(),
        ),
    }
}
