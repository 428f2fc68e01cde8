#!/bin/sh
cd /tmp/trial-sup-hostile
exec ip netns exec hostsup1 setpriv --reuid hsupu --regid hsupu --clear-groups env HOME=/tmp TUNNEL_DEBUG=${DBG:-1} ./bin/tunnel-run --config u/agent.toml -- "$@"
